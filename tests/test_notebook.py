"""ipython-sql made safe: %sql inspects read-only, and every SQL error fails the papermill run."""

from pathlib import Path

import pytest

from runbooks import runner

from runhelpers import executed_notebook

FIXTURES = Path(__file__).parent / "notebooks"


@pytest.fixture
def run_fixture(empty_db, tmp_path):
    def run(name):
        return runner.run_plan("test", [str(FIXTURES / name)], empty_db.target, records_root=tmp_path,
                               progress=lambda *_: None)
    return run


def test_a_sql_error_in_a_percent_sql_cell_fails_the_run_and_the_record_shows_the_cell(run_fixture):
    outcome = run_fixture("sql_error.ipynb")
    assert outcome.exit_code == 1
    [entry] = outcome.notebooks
    assert entry["status"] == "failed" and entry["failed_cell"] == 4
    assert "division by zero" in entry["error"]
    nb = executed_notebook(outcome)
    failing = next(c for c in nb.cells if c.get("execution_count") == 4)
    assert failing.source == "%sql select 1 / 0 as boom"
    assert any(o.output_type == "error" and "DivisionByZero" in o.ename + o.evalue for o in failing.outputs)
    assert not any("never reached" in str(c.get("outputs")) for c in nb.cells)
    assert (outcome.record.path / entry["html"]).is_file()


def test_percent_sql_is_read_only_so_a_write_fails_the_run(run_fixture, empty_db):
    outcome = run_fixture("sql_write_refused.ipynb")
    assert outcome.exit_code == 1
    assert "read-only transaction" in outcome.notebooks[0]["error"]
    assert empty_db.query("select to_regclass('should_not_exist')") == [(None,)]


def test_percent_sql_inspection_works_on_todays_prettytable_and_returns_a_dataframe(run_fixture):
    outcome = run_fixture("sql_inspection.ipynb")
    assert outcome.exit_code == 0, outcome.notebooks
    assert outcome.notebooks[0]["status"] == "passed"


def test_a_database_that_cannot_be_reached_refuses_the_run_before_anything_runs(tmp_path, server):
    from runbooks import connection
    server.pg.add_service("nowhere", "no_such_database")
    outcome = runner.run_plan("test", [str(FIXTURES / "sql_inspection.ipynb")], connection.from_service("nowhere"),
                              records_root=tmp_path, progress=lambda *_: None)
    assert outcome.verdict == "refused" and outcome.exit_code == 2   # the contract: refused before any change
    assert "no_such_database" in outcome.error
    assert outcome.notebooks[0]["status"] == "not run"


def test_a_records_folder_given_relative_to_the_working_directory_works(empty_db, tmp_path, monkeypatch):
    """`make rehearse` writes to ./records: papermill changes directory while it runs, paths must not care."""
    monkeypatch.chdir(tmp_path)
    outcome = runner.run_plan("test", [str(FIXTURES / "sql_inspection.ipynb")], empty_db.target,
                              records_root=Path("records"), progress=lambda *_: None)
    assert outcome.exit_code == 0, outcome.notebooks
    record = tmp_path / "records" / outcome.run_id
    assert (record / "kernels.log").is_file()
    assert outcome.record.verify() == []
