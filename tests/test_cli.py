"""`runbook` from the outside: exit codes 0/1/2, refusals before anything changes."""

import pytest

from runbooks import engine, records

from runhelpers import runbook, sign_off_window, target_entry


@pytest.fixture
def targets_file(tmp_path, server, empty_db):
    path = tmp_path / "targets.toml"
    path.write_text(target_entry("staging", server, empty_db.name)
                    + target_entry("prod", server, empty_db.name, production=True) + """
[targets.leaky]
host = "127.0.0.1"
dbname = "x"
user = "postgres"
password = "never-here"
""")
    return path


SIGNOFF = ["-p", "approver", "Dana DBA", "-p", "change_ticket", "CHG-1", "-p", "stakeholders_notified", "true",
           "-p", "rollback_plan_confirmed", "true"]


@pytest.mark.parametrize("args, message", [
    (["deploy", "--service", "no_such_service"], "service 'no_such_service' is not defined"),
    (["deploy", "--target", "nowhere"], "target 'nowhere' is not in"),
    (["deploy", "--target", "leaky"], "carries a password"),
    (["deploy", "--target", "staging", "-p", "no_such_parameter", "1"], "unknown parameter 'no_such_parameter'"),
    (["deploy", "--target", "staging", "-p", "db_password", "x"], "looks like a secret"),
    (["deploy", "--target", "staging", "-p", "run_id", "x"], "set by runbook itself"),
    (["deploy", "--target", "prod"], "pass --yes"),
    (["deploy", "--target", "prod", "--yes"], "production needs -p approver"),
    (["deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", "tonight"],
     "not START/END in ISO 8601"),
    (["deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", sign_off_window(2, 4)],
     "outside the maintenance window"),
    (["rollback", "--target", "staging", "--run", "20260101T000000Z-abcdef"], "no record 20260101T000000Z-abcdef"),
    (["records", "show", "not-a-run"], "is not a run id"),
    (["maintain", "hourly", "--target", "staging"], "invalid choice"),
])
def test_bad_usage_or_input_is_refused_with_exit_2_before_anything_changes(
        args, message, targets_file, tmp_path, empty_db, capsys):
    before = empty_db.query("select count(*) from pg_class")
    code = runbook(*args, "--records", tmp_path / "records", *(
        ["--targets-file", targets_file] if "--target" in args else []))
    assert code == 2
    assert message in capsys.readouterr().err
    assert empty_db.query("select count(*) from pg_class") == before
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())


def test_status_lists_pending_phases_on_a_fresh_database(empty_db, capsys):
    assert runbook("status", "--service", empty_db.name) == 0
    out = capsys.readouterr().out
    assert "000    000_core_functions.sql" in out and "pending" in out
    assert "history: 0 row(s)" in out


def test_status_says_when_an_applied_file_changed_on_disk(empty_db, capsys):
    conn = empty_db.connect()
    engine.ensure_history(conn)
    engine.record_history(conn, version="000", file_name="000_core_functions.sql", sha256="0" * 64, action="apply",
                          operator="alice", seconds=1.0, statements=3, run_id="20260101T000000Z-abcdef")
    conn.commit()
    conn.close()
    assert runbook("status", "--service", empty_db.name) == 1
    assert "CHANGED on disk" in capsys.readouterr().out


def test_records_list_on_an_empty_folder_says_so(tmp_path, capsys):
    assert runbook("records", "list", "--records", tmp_path) == 0
    assert "no records" in capsys.readouterr().out


@pytest.mark.slow
def test_a_production_deploy_with_full_sign_off_inside_its_window_passes_and_records_the_sign_off(
        targets_file, tmp_path, empty_db, capsys):
    window = sign_off_window(-1, 2)
    root = tmp_path / "records"
    code = runbook("deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", window,
                   "--records", root, "--targets-file", targets_file)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    [run_id] = [p.name for p in root.iterdir()]
    record = records.Record.open(root, run_id)
    assert f"seal: sha256 of manifest.json {record.seal()}" in printed.out + printed.err
    manifest = record.manifest()
    assert manifest["verdict"] == "passed"
    assert manifest["target"]["production"] is True
    assert manifest["parameters"] == {"approver": "Dana DBA", "change_ticket": "CHG-1",
                                      "stakeholders_notified": True, "rollback_plan_confirmed": True,
                                      "maintenance_window": window}
    assert record.verify() == []
    conn = empty_db.connect()
    try:
        assert {s.state for s in engine.phase_states(conn)} == {"applied, file matches"}
    finally:
        conn.close()
