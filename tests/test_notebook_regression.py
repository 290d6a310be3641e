"""nbval regression of every committed runbook against the legacy fixture.

The notebooks run in deployment order on one legacy database (preflight, the three phases,
verification, maintenance, troubleshooting, then rollback back to the legacy state), each under
`pytest --nbval-lax`: the cells tagged `nbval-check-output` must reproduce their committed
outputs (times, ids and digests sanitized by nbval_sanitize.cfg); every cell must run without
error. After a deliberate change to the notebooks or SQL, refresh the expected outputs with
`.venv/bin/python tests/refresh_notebook_outputs.py` and review the diff.
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from notebook_chain import CHAIN, CHECK_TAG, DATABASE, SANITIZE, parameterized_copy
from runbooks.paths import NOTEBOOK_DIR

pytestmark = pytest.mark.slow


def nbval(notebook, cwd) -> subprocess.CompletedProcess:
    """pytest --nbval-lax on one notebook, in a process of its own (the suite's conftest stays out)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-sanitize-with", str(SANITIZE), "--rootdir", str(cwd), str(notebook)],
        cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def chain(server, tmp_path_factory):
    db = server.create_database("legacy", name=DATABASE)
    root = tmp_path_factory.mktemp("nbval")
    yield {"service": db.name, "records": root / "records", "copies": root / "copies", "db": db}
    server.drop_database(db)


def test_every_runbook_has_checked_cells_with_their_expected_outputs_committed():
    for path in sorted(NOTEBOOK_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        checked = [c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", [])]
        assert checked, f"{path.name} has no cell tagged {CHECK_TAG}"
        assert all(c.outputs for c in checked), f"{path.name}: a checked cell has no expected output"
        unchecked = [c for c in nb.cells if c.cell_type == "code" and c not in checked and c.outputs]
        assert not unchecked, f"{path.name}: outputs committed for cells nbval does not check"


@pytest.mark.parametrize("name", CHAIN)
def test_the_runbook_reproduces_its_checked_outputs(chain, name):
    copy = parameterized_copy(name, chain["service"], chain["records"], chain["copies"])
    result = nbval(copy, chain["copies"])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_the_regression_fails_when_a_checked_output_changes(chain, tmp_path):
    """Prove the suite can fail: a copy whose expected output was altered must not pass."""
    copy = parameterized_copy("00_preflight", chain["service"], tmp_path / "records", tmp_path)
    nb = nbformat.read(copy, as_version=4)
    cell = next(c for c in nb.cells if CHECK_TAG in c.metadata.get("tags", []))
    for output in cell.outputs:
        if "text" in output:
            output["text"] = output["text"] + "a line the runbook never prints\n"
        for mime in output.get("data", {}):
            if mime.startswith("text/"):
                output["data"][mime] = output["data"][mime] + "a line the runbook never prints"
    nbformat.write(nb, copy)
    result = nbval(copy, tmp_path)
    assert result.returncode != 0
    assert "a line the runbook never prints" in result.stdout
