"""`runbook` from the outside: exit codes 0/1/2, refusals before anything changes."""

import socket

import pytest

from runbooks import cli, engine, records, runner

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
    (["deploy", "--target", "staging", "-p", "lock_retries", "lots"],
     "parameter 'lock_retries' takes an integer (default 5), not 'lots'"),
    (["deploy", "--target", "staging", "-p", "max_transaction_seconds", "abc"],
     "parameter 'max_transaction_seconds' takes an integer"),
    (["deploy", "--target", "staging", "-p", "max_connection_share", "most"], "'max_connection_share' takes a number"),
    (["deploy", "--target", "staging", "-p", "force", "maybe"],
     "parameter 'force' takes true/false (also yes/no, on/off, 1/0)"),
    (["deploy", "--target", "staging", "-p", "lock_retries", "none"], "'lock_retries' takes an integer"),
    (["maintain", "weekly", "--target", "staging", "-p", "retention_max_rows", "1e5"],
     "'retention_max_rows' takes an integer or none"),
    (["deploy", "--target", "prod"], "pass --yes"),
    (["deploy", "--target", "prod", "--yes"], "production needs -p approver"),
    (["deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", "tonight"],
     "not START/END in ISO 8601"),
    (["deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", sign_off_window(2, 4)],
     "outside the maintenance window"),
    (["rollback", "--target", "staging", "--run", "20260101T000000Z-abcdef"], "no records folder"),
    (["records", "list"], "no records folder"),
    (["records", "verify", "20260101T000000Z-abcdef"], "no records folder"),
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


def test_parameters_take_their_type_from_the_notebooks_parameters_cell():
    given = [["force", "no"], ["reapply", "OFF"], ["take_backup", "0"], ["stakeholders_notified", "Yes"],
             ["rollback_plan_confirmed", "on"], ["lock_retries", "3"], ["max_connection_share", "0.5"],
             ["max_transaction_seconds", "600"], ["lock_timeout", "100ms"], ["approver", "Dana DBA"],
             ["change_ticket", "none"]]
    assert cli.parse_parameters(given, runner.DEPLOY_PLAN) == {
        "force": False, "reapply": False, "take_backup": False, "stakeholders_notified": True,
        "rollback_plan_confirmed": True, "lock_retries": 3, "max_connection_share": 0.5,
        "max_transaction_seconds": 600, "lock_timeout": "100ms", "approver": "Dana DBA", "change_ticket": None}
    assert cli.parse_parameters([["retention_max_rows", "None"], ["apply_retention", "1"]], ("maintenance",)) == {
        "retention_max_rows": None, "apply_retention": True}


def test_a_password_typed_as_a_parameter_value_is_refused_with_exit_2_and_never_echoed(
        targets_file, tmp_path, capsys):
    secret = records.known_secrets()[0]   # the test server's own password, from .pgpass
    # inside a longer value: a random password may begin with "-", which argparse takes for an option
    code = runbook("deploy", "--target", "staging", "-p", "approver", f"Dana {secret}",
                   "--records", tmp_path / "records",
                   "--targets-file", targets_file)
    printed = capsys.readouterr()
    assert code == 2
    assert "the value of parameter 'approver' holds a password" in printed.err
    assert secret not in printed.out + printed.err
    assert not (tmp_path / "records").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["deploy", "status"])
@pytest.mark.parametrize("case", ["no server listens", "no such role", "wrong password"])
def test_an_unreachable_server_or_a_failed_login_is_refused_with_exit_2_naming_the_target(
        command, case, server, empty_db, tmp_path, monkeypatch, capsys):
    port, user, password = server.pg.port, "postgres", None
    if case == "no server listens":
        port = free_port()
    elif case == "no such role":
        user = "no_such_role"
    else:
        password = "Wrong-Pa55word-typed-here"
    targets = tmp_path / "targets.toml"
    targets.write_text(f'[targets.there]\nhost = "127.0.0.1"\nport = {port}\ndbname = "{empty_db.name}"\n'
                       f'user = "{user}"\nsslmode = "disable"\n')
    before = empty_db.query("select count(*) from pg_class")
    with monkeypatch.context() as patched:
        if password:
            patched.setenv("PGPASSWORD", password)   # libpq prefers it to .pgpass
        code = runbook(command, "--target", "there", "--targets-file", targets,
                       *(["--records", tmp_path / "records"] if command == "deploy" else []))
    printed = capsys.readouterr()
    assert code == 2, printed
    assert f"cannot connect to target 'there' (host 127.0.0.1, port {port}, dbname {empty_db.name}, user {user}," \
        in printed.err
    assert password is None or password not in printed.out + printed.err
    assert empty_db.query("select count(*) from pg_class") == before
    if command == "deploy":   # the attempt is on record, as refused
        [manifest] = [records.Record.open(tmp_path / "records", p.name).manifest()
                      for p in (tmp_path / "records").iterdir()]
        assert manifest["verdict"] == "refused" and "cannot connect to target 'there'" in manifest["error"]
        assert {n["status"] for n in manifest["notebooks"]} == {"not run"}


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


def test_a_deploy_over_an_applied_file_that_changed_is_refused_before_anything_changes_unless_forced(
        migrated_db, tmp_path, capsys):
    migrated_db.execute("update truthsource.deployment_history set sha256 = repeat('0', 64) where version = '002'")
    rows = migrated_db.query("select count(*) from truthsource.deployment_history")
    assert runbook("deploy", "--service", migrated_db.name, "--records", tmp_path / "records") == 2
    said = capsys.readouterr().err
    assert "002_production_enhancements.sql changed since it was applied" in said and "-p force true" in said
    assert migrated_db.query("select count(*) from truthsource.deployment_history") == rows
    assert not (tmp_path / "records").exists()   # refused before a record was opened


LIBPQ_TARGET_ENV = ("PGSERVICE", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER")


def test_without_service_or_target_a_command_uses_libpqs_environment_as_the_notebooks_do_and_says_so(
        migrated_db, monkeypatch, capsys):
    for name in LIBPQ_TARGET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGSERVICE", migrated_db.name)
    assert runbook("status") == 0
    out, err = capsys.readouterr()
    assert f"service {migrated_db.name}: database {migrated_db.name}" in out
    assert f"target: service '{migrated_db.name}' (from PGSERVICE; no --service or --target given)" in err
    monkeypatch.delenv("PGSERVICE")
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    monkeypatch.setenv("PGPORT", str(migrated_db.server.port))
    monkeypatch.setenv("PGDATABASE", migrated_db.name)
    monkeypatch.setenv("PGUSER", "postgres")
    assert runbook("status") == 0
    out, err = capsys.readouterr()
    assert f"database {migrated_db.name} on 127.0.0.1:{migrated_db.server.port}" in out
    assert (f"target: libpq's environment (PGHOST=127.0.0.1, PGPORT={migrated_db.server.port}, "
            f"PGDATABASE={migrated_db.name}, PGUSER=postgres; no --service or --target given)") in err


def test_without_service_target_or_any_libpq_environment_a_command_is_refused_naming_what_to_give(
        monkeypatch, tmp_path, capsys):
    for name in LIBPQ_TARGET_ENV:
        monkeypatch.delenv(name, raising=False)
    assert runbook("status") == 2
    assert runbook("deploy", "--records", tmp_path / "records") == 2
    said = capsys.readouterr().err
    assert "no target: give --service NAME or --target NAME, or export PGSERVICE" in said
    assert not (tmp_path / "records").exists()


def test_records_list_on_an_empty_folder_says_so(tmp_path, capsys):
    assert runbook("records", "list", "--records", tmp_path) == 0
    assert "no records" in capsys.readouterr().out


def test_status_fits_100_columns_and_names_the_run_and_checksum_of_each_applied_phase(migrated_db, capsys):
    assert runbook("status", "--service", migrated_db.name) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= cli.WIDTH
    assert out.count("applied  ") == 3 and out.count(": the file matches") == 3
    assert out.splitlines()[1].split() == ["phase", "file", "state", "applied", "at", "(UTC)", "by"]


def test_a_records_folder_that_is_not_there_is_refused_by_the_commands_that_read_records(tmp_path, capsys):
    missing = tmp_path / "recrods"
    for args in (["records", "list"], ["records", "show", "20260101T000000Z-abcdef"],
                 ["records", "verify", "20260101T000000Z-abcdef"]):
        assert runbook(*args, "--records", missing) == 2
        assert f"no records folder {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_a_command_that_writes_a_record_creates_a_new_records_folder_and_says_so_but_not_its_parents(
        tmp_path, capsys):
    targets = tmp_path / "targets.toml"
    targets.write_text(f'[targets.nowhere]\nhost = "127.0.0.1"\nport = {free_port()}\ndbname = "x"\n'
                       'user = "postgres"\nsslmode = "disable"\n')
    new = tmp_path / "records"
    # nothing listens there: refused, and the attempt is on record in the new folder
    assert runbook("verify", "--target", "nowhere", "--targets-file", targets, "--records", new) == 2
    assert f"(records folder {new} created)" in capsys.readouterr().out
    assert [r["verdict"] for r in records.list_records(new)] == ["refused"]
    deeper = tmp_path / "no-such-parent" / "records"
    assert runbook("verify", "--target", "nowhere", "--targets-file", targets, "--records", deeper) == 2
    assert "its parent folder" in capsys.readouterr().err and not deeper.parent.exists()


@pytest.mark.slow
def test_a_production_deploy_with_full_sign_off_inside_its_window_passes_and_records_the_sign_off(
        targets_file, tmp_path, empty_db, capsys):
    window = sign_off_window(-1, 2)
    root = tmp_path / "records"
    code = runbook("deploy", "--target", "prod", "--yes", *SIGNOFF, "-p", "maintenance_window", window,
                   "-p", "promotion_override", "first deployment (test_promotion covers the evidence)",
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
                                      "maintenance_window": window,
                                      "promotion_override": "first deployment (test_promotion covers the evidence)"}
    assert record.verify() == []
    conn = empty_db.connect()
    try:
        assert {s.state for s in engine.phase_states(conn)} == {"applied, file matches"}
    finally:
        conn.close()
