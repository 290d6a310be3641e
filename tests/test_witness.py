"""A run's record and the database's witness of its backup agree: a witness left open is finished by
`runbook records finish` or by the next command on that database, and nothing is changed where the
target cannot be reached (the refusal names what to export)."""

from __future__ import annotations

import json

import pytest

from runbooks import identity, records, witness

from runhelpers import preflight_record, readonly, runbook


def open_witnesses(db) -> list[str]:
    conn = readonly(db)
    try:
        return [row["run_id"] for row in identity.open_witnesses(conn)]
    finally:
        conn.close()


@pytest.fixture
def sealed_with_its_witness_open(legacy_db, tmp_path):
    """(db, records root, run id): a run's preflight backup and its witness, its record sealed (as an older
    version sealed it when the target was out of reach), the witness left open."""
    run_id = records.new_run_id()
    folder = tmp_path / run_id
    preflight_record(legacy_db, folder, run_id)
    backup = json.loads((folder / "backup" / "backup.json").read_text())
    records.Record(tmp_path, run_id).write_manifest({
        "run_id": run_id, "command": "by hand", "target": legacy_db.target.describe(), "notebooks": [],
        "verdict": "passed", "backup": {"file": f"backup/{backup['file_name']}", "sha256": backup["sha256"]}})
    assert open_witnesses(legacy_db) == [run_id]
    return legacy_db, tmp_path, run_id


def test_records_finish_finishes_a_witness_left_open_with_the_records_verdict(sealed_with_its_witness_open, capsys):
    db, root, run_id = sealed_with_its_witness_open
    seal = records.Record.open(root, run_id).seal()
    assert runbook("records", "finish", run_id, "--records", root) == 0
    assert f"the database's witness of run {run_id}" in capsys.readouterr().out
    assert open_witnesses(db) == []
    assert db.query(f"select verdict from {identity.RUNS_TABLE} where run_id = %s", (run_id,)) == [("passed",)]
    assert records.Record.open(root, run_id).seal() == seal   # the record is not touched
    assert runbook("records", "finish", run_id, "--records", root) == 0   # again: finished already, said so
    assert "finished already" in capsys.readouterr().out


def test_records_finish_out_of_reach_changes_nothing_and_names_what_to_export(sealed_with_its_witness_open, tmp_path,
                                                                             capsys):
    from runbooks import runner
    db, root, run_id = sealed_with_its_witness_open
    with runner.environment({"PGSERVICEFILE": str(tmp_path / "no-such-pg_service.conf")}):
        assert runbook("records", "finish", run_id, "--records", root) == 2
    said = capsys.readouterr().err
    assert f"cannot reach service {db.name!r}" in said and "export PGSERVICEFILE" in said
    assert open_witnesses(db) == [run_id]


def test_the_next_command_on_the_database_finishes_a_witness_whose_record_is_sealed(sealed_with_its_witness_open,
                                                                                     tmp_path):
    db, root, run_id = sealed_with_its_witness_open
    conn = db.connect(autocommit=True)
    try:
        assert witness.reconcile(conn, [tmp_path / "elsewhere"], "") == []      # its record is not there: left open
        said = witness.reconcile(conn, [tmp_path / "elsewhere", root], "")
    finally:
        conn.close()
    assert len(said) == 1 and f"witness of run {run_id} was left open" in said[0]
    assert open_witnesses(db) == []
