"""The runbooks in deployment order against one legacy database, as the nbval regression runs
them (tests/test_notebook_regression.py) and as tests/refresh_notebook_outputs.py records them.

Each notebook is run as a parameterized copy (papermill's injected-parameters cell, nothing
executed) naming the test database and fixed run ids, so its checked outputs are comparable.

The committed notebooks carry no outputs: a DBA opening one sees nothing that looks like a result
before running it. What nbval compares with lives here, in ``tests/notebook_expected/<name>.json``:
for each cell tagged ``nbval-check-output``, its id, its source (which must equal the committed
cell's, so the two cannot drift) and its expected outputs. The copy nbval runs is the committed
notebook with those outputs put back (``expected_copy``).
"""

from __future__ import annotations

from pathlib import Path

import json

import nbformat
import papermill

from runbooks.paths import NOTEBOOK_DIR

ROOT = Path(__file__).resolve().parent.parent
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"
EXPECTED_DIR = Path(__file__).resolve().parent / "notebook_expected"
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


def checked_cells(nb) -> list:
    return [c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", [])]


def expected_path(name: str) -> Path:
    return EXPECTED_DIR / f"{name}.json"


def read_expected(name: str) -> list[dict]:
    """The expectations of one notebook: [{"id", "source", "outputs"}] in the notebook's order."""
    return json.loads(expected_path(name).read_text())["cells"]


def write_expected(name: str, cells: list[dict]) -> Path:
    """What refresh_notebook_outputs.py writes: one entry per checked cell, in the notebook's order."""
    EXPECTED_DIR.mkdir(exist_ok=True)
    document = {"notebook": f"notebooks/{name}.ipynb",
                "about": "nbval's expected outputs of the cells tagged nbval-check-output "
                         "(tests/notebook_chain.py; refresh with tests/refresh_notebook_outputs.py)",
                "cells": [{"id": c["id"], "source": c["source"], "outputs": c["outputs"]} for c in cells]}
    path = expected_path(name)
    path.write_text(json.dumps(document, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    return path


def with_expected_outputs(nb, name: str):
    """The notebook with each checked cell's expected outputs put back. Every code cell gets an
    execution count: nbval checks only cells its reference shows as run."""
    expected = {cell["id"]: cell for cell in read_expected(name)}
    code = (c for c in nb.cells if c.cell_type == "code")
    for count, cell in enumerate(code, start=1):
        cell.execution_count = count
        if cell.get("id") in expected:
            cell.outputs = [nbformat.from_dict(o) for o in expected[cell.get("id")]["outputs"]]
    return nb


def parameterized_copy(name: str, service: str, records_root: Path, dest: Path) -> Path:
    """The committed notebook with its expected outputs and an injected-parameters cell."""
    nb = papermill.iorw.load_notebook_node(str(NOTEBOOK_DIR / f"{name}.ipynb"))  # (papermill wants tags on every cell)
    nb = papermill.parameterize.parameterize_notebook(with_expected_outputs(nb, name),
                                                      parameters(name, service, records_root))
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path
