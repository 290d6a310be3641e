"""The runbooks in deployment order against one legacy database, as the nbval regression runs
them (tests/test_notebook_regression.py) and as tests/refresh_notebook_outputs.py records them.

Each notebook is run as a parameterized copy (papermill's injected-parameters cell, nothing
executed) naming the test database and fixed run ids, so its checked outputs are comparable.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill

from runbooks.paths import NOTEBOOK_DIR

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
DEPLOY_RUN = "20260101T000000Z-0000d1"
RUNS = {  # notebook -> the run it belongs to (a deployment shares one; others have their own)
    "00_preflight": DEPLOY_RUN,
    "01_phase1_core_functions": DEPLOY_RUN,
    "02_phase2_core_schema": DEPLOY_RUN,
    "03_phase3_production_enhancements": DEPLOY_RUN,
    "04_verification": DEPLOY_RUN,
    "06_maintenance": "20260101T010000Z-0000e1",
    "07_troubleshooting": "20260101T020000Z-0000f1",
    "05_rollback": "20260101T030000Z-0000a1",
}
CHAIN = tuple(RUNS)  # the order the regression runs them in: rollback last, back to the legacy state
CHECK_TAG = "nbval-check-output"
DATABASE = "nbval_legacy"  # one name in the regression and in the refresh: it shows in (padded) tables


def parameters(name: str, service: str, records_root: Path) -> dict:
    run_id = RUNS[name]
    values = {"target_kind": "service", "target_name": service, "run_id": run_id,
              "record_dir": str(records_root / run_id), "operator": "nbval"}
    if name == "05_rollback":
        values.update(rollback_run_id=DEPLOY_RUN, rollback_record_dir=str(records_root / DEPLOY_RUN))
    return values


def parameterized_copy(name: str, service: str, records_root: Path, dest: Path) -> Path:
    """The committed notebook with an injected-parameters cell, outputs (the expected ones) kept."""
    nb = papermill.iorw.load_notebook_node(str(NOTEBOOK_DIR / f"{name}.ipynb"))  # (papermill wants tags on every cell)
    nb = papermill.parameterize.parameterize_notebook(nb, parameters(name, service, records_root))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path
