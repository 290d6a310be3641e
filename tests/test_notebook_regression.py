"""nbval regression of every committed runbook against the legacy fixture.

The notebooks run in deployment order on one legacy database (preflight, the three phases,
verification, maintenance, troubleshooting, then rollback back to the legacy state), each under
`pytest --nbval-lax`: the cells tagged `nbval-check-output` must reproduce their expected
outputs (times, ids and digests sanitized by nbval_sanitize.cfg); every cell must run without
error. The committed notebooks carry no outputs; the expected ones are in tests/notebook_expected/
(tests/notebook_chain.py), with each checked cell's source, which must equal the committed one.
After a deliberate change to the notebooks or SQL, refresh the expected outputs with
`.venv/bin/python tests/refresh_notebook_outputs.py` and review the diff.
"""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from notebook_chain import CHAIN, CHECK_TAG, DATABASE, SANITIZE, checked_cells, parameterized_copy, read_expected
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


def committed(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def test_the_regression_runs_every_committed_runbook():
    assert sorted(CHAIN) == sorted(path.stem for path in NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.mark.parametrize("name", CHAIN)
def test_a_committed_runbook_carries_no_outputs_and_no_execution_counts(name):
    ran = [c.get("id") for c in committed(name).cells
           if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not ran, f"{name}: cells {ran} carry outputs or execution counts (expected outputs live in tests/)"


@pytest.mark.parametrize("name", CHAIN)
def test_the_expected_outputs_are_of_the_committed_cells_whose_sources_they_repeat_exactly(name):
    checked = checked_cells(committed(name))
    expected = read_expected(name)
    assert checked, f"{name} has no cell tagged {CHECK_TAG}"
    assert [c.get("id") for c in checked] == [e["id"] for e in expected], \
        f"{name}: the checked cells and the expected ones differ; run tests/refresh_notebook_outputs.py"
    for cell, entry in zip(checked, expected):
        assert cell.source == entry["source"], \
            f"{name}: cell {cell.get('id')} changed since its outputs were expected; run tests/refresh_notebook_outputs.py"
        assert entry["outputs"], f"{name}: checked cell {cell.get('id')} has no expected output"


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
