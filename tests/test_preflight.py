"""Preflight: busy databases, missing sign-off and weak roles are refused; legacy rows are reported;
the backup and snapshot a rollback relies on are taken, verified and kept."""

import dataclasses
import json
import subprocess
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import nbformat
import pytest

from runbooks import backup, connection, identity, pgtools, preflight, records, runner, verification
from runbooks.records import sha256_of

from runbooks import engine, paths
from runhelpers import assert_identical, readonly, run_check, sign_off_window, snapshot_of, target_entry
from sqlhelpers import wait_until

pytestmark = pytest.mark.both_versions   # privilege checks differ from 16 on (role membership, SET ROLE)

PLAINTEXT_KEYS = ("ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0", "ts_live_0123456789abcdef0123456789abcdef",
                  "ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90")
HEIDI = "0b000000-0000-4000-8000-000000000008"


@pytest.fixture
def conn(empty_db):
    c = readonly(empty_db)
    yield c
    c.close()


# -- activity thresholds -------------------------------------------------------------------------

def test_a_transaction_held_open_by_another_connection_beyond_the_limit_is_refused(empty_db, conn):
    holder = empty_db.connect(application_name="a forgotten psql session")
    with holder.cursor() as cur:
        cur.execute("select 1")            # psycopg2 opened a transaction; it stays open
    wait_until(lambda: empty_db.query("select 1 from pg_stat_activity where application_name = 'a forgotten psql session' "
                                      "and clock_timestamp() - xact_start > interval '1.2 s'"),
               "the transaction older than the limit in pg_stat_activity")
    try:
        refused = preflight.long_transactions(conn, max_transaction_seconds=1)
        allowed = preflight.long_transactions(conn, max_transaction_seconds=300)
    finally:
        holder.rollback()
        holder.close()
    assert refused.status == "error" and "longer than 1s" in refused.summary
    assert [r["application"] for r in refused.rows] == ["a forgotten psql session"]
    assert refused.rows[0]["open_seconds"] >= 1
    assert allowed.status == "ok"


@contextmanager
def one_waits_for_the_other(db, holds: str, waits: str):
    """Session "the holder" runs `holds` and keeps its transaction open; session "the waiter" runs `waits`
    in a thread. Yields once pg_stat_activity shows the waiter waiting on a lock (observed, not timed)."""
    holder = db.connect(application_name="the holder")
    waiter = db.connect(application_name="the waiter")
    with holder.cursor() as cur:
        cur.execute(holds)
    thread = threading.Thread(target=lambda: waiter.cursor().execute(waits))
    thread.start()
    try:
        wait_until(lambda: db.query("select 1 from pg_stat_activity where application_name = 'the waiter' "
                                    "and wait_event_type = 'Lock'"), "the waiter waiting on a lock")
        yield
    finally:
        holder.rollback()
        thread.join()
        waiter.rollback()
        holder.close()
        waiter.close()


def test_a_session_blocked_by_another_is_refused_and_the_blocker_is_named(empty_db, conn):
    empty_db.execute("create table public.busy (id int)")
    with one_waits_for_the_other(empty_db, "lock table public.busy in access exclusive mode",
                                 "select count(*) from public.busy"):
        refused = preflight.blocking_locks(conn, max_blocked_sessions=0)
        tolerated = preflight.blocking_locks(conn, max_blocked_sessions=1)
    assert refused.status == "error" and "1 session(s) waiting on locks" in refused.summary
    [row] = refused.rows
    assert row["blocked_application"] == "the waiter" and row["blocking_application"] == "the holder"
    assert tolerated.status == "warning"
    assert preflight.blocking_locks(conn).status == "ok"


def test_a_session_waiting_on_another_transactions_row_is_the_apps_contention_and_is_not_refused(empty_db, conn):
    empty_db.execute("create table public.busy (id int); insert into public.busy values (1)")
    with one_waits_for_the_other(empty_db, "update public.busy set id = id", "update public.busy set id = id"):
        seen = preflight.blocking_locks(conn, max_blocked_sessions=0)
    assert seen.status == "ok" and "1 wait(s) on another transaction's row" in seen.summary
    [row] = seen.rows
    assert row["waits_for"] == "transactionid" and row["blocking_application"] == "the holder"


def test_connections_above_the_allowed_share_of_max_connections_are_refused(conn):
    refused = preflight.connections(conn, max_connection_share=0.0)
    assert refused.status == "error" and "max_connection_share" in refused.summary
    assert preflight.connections(conn, max_connection_share=0.8).status == "ok"
    assert {"database", "role", "application", "state", "connections"} <= set(refused.rows[0])


# -- sign-off ----------------------------------------------------------------------------------

def test_production_without_the_sign_off_is_refused_naming_every_missing_item():
    check = preflight.signoff_check(production=True, approver="Dana DBA")
    assert check.status == "error" and check.summary.startswith("production deployment refused")
    for name in ("change_ticket", "maintenance_window", "stakeholders_notified", "rollback_plan_confirmed"):
        assert name in check.summary
    statuses = {r["parameter"]: r["status"] for r in check.rows if r["parameter"]}
    assert statuses["approver"] == "signed off" and statuses["change_ticket"].startswith("MISSING")


def test_production_outside_its_maintenance_window_is_refused():
    check = preflight.signoff_check(production=True, approver="Dana", change_ticket="CHG-1",
                                    maintenance_window=sign_off_window(-5, -1), stakeholders_notified=True,
                                    rollback_plan_confirmed=True)
    assert check.status == "error" and "outside the maintenance window" in check.summary
    assert {r["parameter"]: r["status"] for r in check.rows}["maintenance_window"] == "OUTSIDE the window now"


def test_production_inside_its_window_with_every_item_signed_off_passes():
    check = preflight.signoff_check(production=True, approver="Dana", change_ticket="CHG-1",
                                    maintenance_window=sign_off_window(-1, 2), stakeholders_notified=True,
                                    rollback_plan_confirmed=True)
    assert check.status == "ok" and "signed off by Dana (CHG-1)" in check.summary


def test_a_malformed_maintenance_window_is_refused_on_any_target():
    check = preflight.signoff_check(production=False, maintenance_window="tonight")
    assert check.status == "error" and "ISO 8601" in check.summary


def test_sign_off_is_optional_elsewhere_and_shown_as_the_guides_checklist():
    check = preflight.signoff_check(production=False, approver="Dana")
    assert check.status == "info" and "optional" in check.summary
    items = [r["checklist item"] for r in check.rows]
    assert {"Backup current database", "Schedule maintenance window", "Notify stakeholders",
            "Prepare rollback plan", "Set up monitoring", "Test RLS policies"} <= set(items)


def test_skipping_the_backup_is_refused_for_production_and_only_warned_elsewhere(empty_db, conn, tmp_path):
    production = dataclasses.replace(empty_db.target, production=True)
    refused = preflight.backup(conn, production, tmp_path, records.new_run_id(), take=False)
    assert refused.status == "error" and "refused for a production target" in refused.summary
    warned = preflight.backup(conn, empty_db.target, tmp_path, records.new_run_id(), take=False)
    assert warned.status == "warning" and "cannot be rolled back" in warned.summary
    assert not (tmp_path / "backup").exists()


# -- privileges and extensions -------------------------------------------------------------------

def test_a_role_that_owns_nothing_is_refused_with_each_missing_privilege_named(server, legacy_db):
    password = "Limited-Pa55word-xyz"
    legacy_db.execute(f"create role limited_deployer login password '{password}'")
    server.pg.add_pgpass("limited_deployer", password)
    service = f"{legacy_db.name}_limited"
    server.pg.add_service(service, legacy_db.name, user="limited_deployer")
    from runbooks import connection
    conn = connection.connect(connection.from_service(service), readonly=True, autocommit=True)
    try:
        check = preflight.privileges(conn)
    finally:
        conn.close()
        server.admin_execute("drop role limited_deployer")
    assert check.status == "error" and check.summary.startswith("role limited_deployer lacks")
    missing = {r["requirement"] for r in check.rows if r["ok"] == "NO"}
    assert any("CREATE on the database" in m for m in missing)
    assert any("owner of every object" in m for m in missing)
    assert any("SET ROLE" in m for m in missing)
    owners = next(r for r in check.rows if "owner of every object" in r["requirement"])
    assert "postgres" in owners["detail"]


def test_the_deploying_superuser_may_deploy_roll_back_and_verify(conn):
    check = preflight.privileges(conn)
    assert check.status == "ok" and "superuser" in check.summary
    assert {r["needed for"] for r in check.rows} >= {"deploy", "deploy + rollback", "verification"}


def test_an_extension_in_an_app_schema_is_pointed_out_as_re_created_by_a_rollback(empty_db, conn):
    empty_db.execute("create extension if not exists citext with schema public")
    check = preflight.extensions(conn)
    assert check.status == "ok" and "citext" in check.summary
    assert "rollback" in next(r for r in check.rows if r["extension"] == "citext")["note"]


def test_a_trusted_extension_the_deploying_owner_made_is_no_rollback_blocker_a_superusers_beside_it_is(legacy_db, server):
    role, password = f"owner_{legacy_db.name}", "Owner-Pa55word-trgm"
    server.admin_execute(f"create role {role} login password '{password}'")
    server.pg.add_pgpass(role, password)
    server.admin_execute(f"alter database {legacy_db.name} owner to {role}")
    service = f"{legacy_db.name}_owner"
    server.pg.add_service(service, legacy_db.name, user=role)
    target = connection.from_service(service)
    try:
        owner = connection.connect(target, autocommit=True)
        with owner.cursor() as cur:
            cur.execute("create schema trigrams; create extension pg_trgm with schema trigrams")
        owner.close()
        conn = connection.connect(target, readonly=True, autocommit=True)
        try:
            rows = [r for r in preflight.privileges(conn).rows if r["needed for"] == "rollback"]
            legacy_db.execute("create extension pg_buffercache with schema trigrams")   # the superuser's
            blocked = [r for r in preflight.privileges(conn).rows if r["needed for"] == "rollback"]
        finally:
            conn.close()
    finally:
        legacy_db.execute(f"drop schema trigrams cascade; alter database {legacy_db.name} owner to postgres")
        server.admin_execute(f"drop role {role}")
    assert not any("pg_trgm" in r["detail"] for r in rows)
    assert any(r["ok"] == "NO" and r["detail"].startswith("extension pg_buffercache (in trigrams) is owned by postgres")
               for r in blocked)


# -- the advisor's findings before the deployment -------------------------------------------------

def test_the_preflight_records_the_advisors_findings_and_counts_the_legacy_objects_the_phases_converge_as_theirs(
        legacy_db, tmp_path):
    check = run_check(legacy_db, verification.advisor_baseline, tmp_path)
    saved = json.loads((tmp_path / verification.ADVISOR_BASELINE_FILE).read_text())["findings"]
    assert [(f["lint"], f["object"]) for f in saved] == [(r["lint"], r["object"]) for r in check.rows]
    assert check.status == "ok" and f"{len(saved)} finding(s) recorded" in check.summary
    whose = {(r["lint"], r["object"]): r["whose"] for r in check.rows}
    assert whose[("rls_disabled_in_public", "audit_logs")] == "the deployment's (the phases converge it)"
    assert whose[("function_search_path_mutable", "handle_updated_at()")] == (
        "the deployment's (phase 1 replaces this updated-at function)")


def test_a_finding_on_someone_elses_object_before_the_deployment_is_a_preflight_warning_naming_its_fix(
        legacy_db, tmp_path):
    legacy_db.execute("""create function public.handle_new_user() returns trigger language plpgsql security definer
                         set search_path = '' as $$ begin return new; end $$""")
    check = run_check(legacy_db, verification.advisor_baseline, tmp_path)
    assert check.status == "warning"
    assert "handle_new_user() (revoke execute on function public.handle_new_user() from public, anon, " \
           "authenticated;)" in check.summary


# -- legacy rows ----------------------------------------------------------------------------------

def test_legacy_rows_that_break_the_new_rules_are_reported_and_no_key_is_ever_shown(legacy_db):
    check = run_check(legacy_db, preflight.legacy_rule_breakers)
    assert check.status == "warning" and "kept and reported" in check.summary
    found = {r["rule"]: r for r in check.rows}
    assert found["SKU not valid per validate_sku (lowercase, too short, bad characters)"]["sample"] == "wid-001"
    assert found["SKU repeated within an organization, ignoring case"]["rows"] == 2
    assert found["negative stock (quantity < 0)"]["rows"] == 1
    assert found["reserved quantity not between 0 and the quantity"]["rows"] == 2
    assert found["member whose auth user is gone"]["sample"] == HEIDI
    assert found["organization slug not valid per validate_org_slug"]["sample"] == "Initech_Legacy"
    assert found["member role other than owner, admin, member, viewer"]["sample"] == "editor"
    assert found["plaintext api keys stored"]["rows"] == 3
    shown = repr(check) + check._repr_html_()
    assert not any(key in shown for key in PLAINTEXT_KEYS)


def test_on_an_empty_database_the_rules_do_not_apply_and_nothing_is_reported(conn):
    check = preflight.legacy_rule_breakers(conn)
    assert check.status == "ok"
    assert all(r["rows"] in (None, 0) for r in check.rows)


def test_once_phase_3_is_applied_the_report_comes_from_verify_data_integrity(migrated_db):
    check = run_check(migrated_db, preflight.legacy_rule_breakers)
    assert check.status == "warning" and check.summary.startswith("verify_data_integrity()")
    assert {"products_sku_format", "members_without_user", "organizations_slug_format"} <= {r["rule"] for r in check.rows}


def test_the_history_tells_pending_phases_and_files_changed_since_they_were_applied(migrated_db):
    conn = readonly(migrated_db)
    try:
        assert preflight.applied_phases(conn).summary == "0 phase(s) to apply: none"
        migrated_db.execute("update truthsource.deployment_history set sha256 = repeat('0', 64) where version = '001'")
        check = preflight.applied_phases(conn)
    finally:
        conn.close()
    assert check.status == "error" and "001" in check.summary and "-p force true" in check.summary
    assert {r["phase"]: r["state"] for r in check.rows}["001"] == "applied, FILE CHANGED"


def test_a_file_changed_since_applied_is_refused_by_the_preflight_unless_forced_and_then_warned(migrated_db):
    migrated_db.execute("update truthsource.deployment_history set sha256 = repeat('0', 64) where version = '002'")
    conn = readonly(migrated_db)
    try:
        refused, forced = preflight.applied_phases(conn), preflight.applied_phases(conn, force=True)
    finally:
        conn.close()
    assert refused.status == "error"
    assert "002_production_enhancements.sql changed since it was applied" in refused.summary
    assert "-p force true" in refused.summary and "force = True" in refused.summary
    assert forced.status == "warning" and "re-applied as forced" in forced.summary


# -- backup and snapshot ---------------------------------------------------------------------------

@pytest.mark.parametrize("dump_beside", [False, True], ids=["dump after the snapshot", "dump beside the snapshot"])
def test_the_snapshot_and_the_backup_describe_one_moment_even_while_someone_writes(legacy_db, tmp_path, dump_beside):
    conn = readonly(legacy_db)
    run = SimpleNamespace(target=legacy_db.target, run_id=records.new_run_id(), record_dir=tmp_path)
    organizations = legacy_db.query("select count(*) from public.organizations")[0][0]
    try:
        with preflight.one_moment(run, backup=dump_beside) as moment:
            legacy_db.execute("insert into public.organizations (name, slug) values ('Late', 'late-writer')")
            snap = preflight.snapshot(conn, tmp_path, moment=moment)
            check = preflight.backup(conn, legacy_db.target, tmp_path, run.run_id, snapshot=moment)
    finally:
        conn.close()
    assert snap.status == "ok" and (tmp_path / "snapshot.json").is_file()
    saved = json.loads((tmp_path / "snapshot.json").read_text())
    assert saved["row_counts"]["public.products"] == 7 and saved["fingerprint"]
    assert saved["row_counts"]["public.organizations"] == organizations  # the late write is not in it
    assert check.status == "ok"
    info = json.loads((tmp_path / "backup" / "backup.json").read_text())
    dump = tmp_path / "backup" / info["file_name"]
    assert dump.is_file() and info["sha256"] == sha256_of(dump) and info["size_bytes"] == dump.stat().st_size
    assert info["toc_entries"] > 0 and info["full_read"] is True and info["snapshot_id"]
    facts = {r["fact"]: r["value"] for r in check.rows}
    assert facts["sha256"] == info["sha256"] and facts["file"] == f"backup/{info['file_name']}"
    pg_restore = pgtools.find_tool("pg_restore", legacy_db.server.major).path
    data = subprocess.run([str(pg_restore), "--data-only", "--table", "organizations", "-f", "-", str(dump)],
                          capture_output=True, text=True, check=True).stdout
    assert "late-writer" not in data  # nor in the backup


def test_a_dump_started_with_the_moment_and_never_finished_is_stopped_and_leaves_no_file(empty_db, tmp_path):
    run = SimpleNamespace(target=empty_db.target, run_id=records.new_run_id(), record_dir=tmp_path)
    with preflight.one_moment(run, backup=True) as moment:
        assert isinstance(moment.dump, backup.DumpInProgress)
        process = moment.dump.process
    assert process.poll() is not None
    assert list((tmp_path / "backup").iterdir()) == []


def test_a_dump_that_cannot_start_with_the_moment_is_the_backup_checks_error(empty_db, conn, tmp_path):
    run = SimpleNamespace(target=empty_db.target, run_id=records.new_run_id(), record_dir=tmp_path)
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / f"{empty_db.name}-{run.run_id}.dump").write_text("an earlier backup")
    with preflight.one_moment(run, backup=True) as moment:
        check = preflight.backup(conn, empty_db.target, tmp_path, run.run_id, snapshot=moment)
    assert check.status == "error" and "already exists" in check.summary


def test_the_backup_command_shown_holds_no_password(empty_db, tmp_path):
    text = preflight.backup_command(empty_db.target, tmp_path, "20260101T000000Z-abcdef", 18)
    assert "--format=custom" in text and f"service={empty_db.name}" in text and "password=" not in text.lower()


# -- the notebook ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_preflight_notebook_refuses_production_without_sign_off_before_any_backup(server, empty_db, tmp_path,
                                                                                        monkeypatch):
    targets = tmp_path / "targets.toml"
    targets.write_text(target_entry("prod", server, empty_db.name, production=True))
    monkeypatch.setenv("RUNBOOK_TARGETS", str(targets))
    from runbooks import connection
    outcome = runner.run_plan("deploy", ("preflight",), connection.from_targets_file("prod", targets),
                              records_root=tmp_path / "records", progress=lambda *_: None,
                              parameters={"approver": "Dana DBA"})
    assert outcome.verdict == "failed"
    [entry] = outcome.notebooks
    assert "production deployment refused" in entry["error"] and "change_ticket" in entry["error"]
    record = outcome.record.path
    assert not (record / "backup").exists() and not (record / "snapshot.json").exists()
    nb = nbformat.read(record / entry["file"], as_version=4)
    failing = next(c for c in nb.cells if c.get("execution_count") == entry["failed_cell"])
    assert "signoff_check" in failing.source


# -- the database's identity, the backup's witness, unfinished runs ----------------------------------

def test_the_identity_is_written_once_and_read_back_the_same_by_every_later_preflight(empty_db):
    first = run_check(empty_db, preflight.database_identity, empty_db.target, records.new_run_id())
    again = run_check(empty_db, preflight.database_identity, empty_db.target, records.new_run_id())
    facts = [{r["fact"]: r["value"] for r in c.rows} for c in (first, again)]
    assert first.status == again.status == "ok"
    assert "written now" in first.summary and "earlier preflight" in again.summary
    uuid = facts[1][f"identity ({identity.IDENTITY_TABLE})"]
    assert facts[0][f"identity ({identity.IDENTITY_TABLE})"] == uuid + " (created now)"
    [(oid, system_identifier)] = empty_db.query("select (select oid from pg_database where datname = current_database()),"
                                                " (select system_identifier::text from pg_control_system())")
    assert facts[1]["database oid"] == oid and facts[1]["system identifier (pg_control_system)"] == system_identifier
    assert empty_db.query(f"select database_uuid::text from {identity.IDENTITY_TABLE}") == [(uuid,)]


def test_pg_control_system_needs_no_superuser_and_the_backup_records_the_identity(empty_db, tmp_path, server):
    # a plain role reads the system identifier too (PUBLIC may execute pg_control_system on 15 to 18)
    server.admin_execute("do $$ begin create role plain_reader login password 'plain-reader-pw'; "
                         "exception when duplicate_object then null; end $$")
    server.pg.add_pgpass("plain_reader", "plain-reader-pw")
    server.pg.add_service(f"{empty_db.name}_plain", empty_db.name, user="plain_reader")
    plain = connection.connect(connection.from_service(f"{empty_db.name}_plain"), readonly=True, autocommit=True)
    try:
        seen = identity.read_identity(plain)
    finally:
        plain.close()
    run_id = records.new_run_id()
    run_check(empty_db, preflight.database_identity, empty_db.target, run_id)
    assert run_check(empty_db, preflight.backup, empty_db.target, tmp_path, run_id).status == "ok"
    recorded = json.loads((tmp_path / "backup" / "backup.json").read_text())["identity"]
    assert recorded["system_identifier"] == seen.system_identifier is not None
    assert recorded["database_oid"] == seen.database_oid and recorded["database"] == empty_db.name
    assert recorded["database_uuid"] and seen.database_uuid is None   # truthsource is not for PUBLIC to read


def test_the_backups_sha256_is_witnessed_in_the_database_and_an_unfinished_run_is_reported(empty_db, tmp_path):
    run_id = records.new_run_id()
    run_check(empty_db, preflight.database_identity, empty_db.target, run_id)
    assert run_check(empty_db, preflight.backup, empty_db.target, tmp_path, run_id).status == "ok"
    witnessed = run_check(empty_db, preflight.witness_backup, empty_db.target, tmp_path, run_id, "dana")
    info = json.loads((tmp_path / "backup" / "backup.json").read_text())
    assert witnessed.status == "ok"
    assert empty_db.query(f"select backup_file, backup_sha256, operator, finished_at from {identity.RUNS_TABLE} "
                          "where run_id = %s", (run_id,)) == [(info["file_name"], info["sha256"], "dana", None)]

    # the runner never marked it finished (it died): the next preflight says so, and what to do
    later = run_check(empty_db, preflight.unfinished_runs, records.new_run_id())
    assert later.status == "warning" and run_id in later.summary
    assert f"runbook rollback --run {run_id} --yes" in later.rows[0]["what to do"]
    assert "runbook deploy again" in later.rows[0]["what to do"]
    assert run_check(empty_db, preflight.unfinished_runs, run_id).status == "ok"   # not itself

    # a later run that finished resumed it: no longer reported
    later_run = records.new_run_id()
    conn = empty_db.connect(autocommit=True)
    try:
        identity.record_run(conn, run_id=later_run, step="00_preflight", backup_file="later.dump",
                            backup_sha256="ab" * 32, backup_taken_at=info["taken_at"], operator="dana")
        assert identity.finish_run(conn, later_run, "passed") and not identity.finish_run(conn, later_run, "failed")
    finally:
        conn.close()
    assert run_check(empty_db, preflight.unfinished_runs, records.new_run_id()).status == "ok"


@pytest.mark.slow
def test_a_deploy_reports_an_unfinished_run_goes_on_and_marks_its_own_run_finished(legacy_db, tmp_path):
    died = records.new_run_id()
    conn = legacy_db.connect()
    try:
        identity.ensure_identity(conn)
        identity.record_run(conn, run_id=died, step="00_preflight", backup_file="died.dump", backup_sha256="cd" * 32,
                            backup_taken_at="2026-01-01T00:00:00+00:00", operator="dana")
        conn.commit()
    finally:
        conn.close()
    said = []
    outcome = runner.run_plan("deploy", ("preflight",), legacy_db.target, records_root=tmp_path, progress=said.append)
    assert outcome.verdict == "passed", outcome.notebooks
    warning = next(line for line in said if "WARNING" in line)
    assert f"run {died}" in warning and f"runbook rollback --run {died} --yes" in warning
    checks = {c["name"]: c["status"] for c in outcome.notebooks[0]["checks"]}
    assert checks["database_identity"] == checks["witness_backup"] == "ok" and checks["unfinished_runs"] == "warning"
    assert legacy_db.query(f"select verdict, finished_at is not null from {identity.RUNS_TABLE} where run_id = %s",
                           (outcome.run_id,)) == [("passed", True)]


# -- what the phases would refuse, asked before anything changes ------------------------------------------

def refused_by_the_preflight(db) -> preflight.Check:
    """phase_preconditions on db, which must refuse and leave the database exactly as it was."""
    before = snapshot_of(db)
    check = run_check(db, preflight.phase_preconditions)
    assert_identical(before, snapshot_of(db))
    assert check.status == "error" and "nothing has changed" in check.summary
    return check


def test_the_phases_would_refuse_nothing_on_the_databases_they_deploy_to(legacy_db, empty_db, migrated_db, make_db):
    for db in (legacy_db, empty_db, migrated_db, make_db("variant")):
        check = run_check(db, preflight.phase_preconditions)
        assert check.status == "ok" and "unique rules (5)" in check.summary, (db.name, check)


def test_duplicate_skus_as_phase_2_sees_them_are_refused_by_name_before_phase_1_as_phase_2_would(legacy_db):
    # GAD-100 twice; TPS-REPORT twice once char(20) becomes text (blank-padded values compare equal);
    # WID-001 and wid-001 differ in case: phase 2's unique rule allows them (reported by legacy_rule_breakers)
    legacy_db.execute("drop index if exists public.idx_products_sku; "
                      "alter table public.products alter column sku type char(20); "
                      "insert into public.products (organization_id, sku, name) values "
                      "('0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget again'), "
                      "('0a000000-0000-4000-8000-000000000003', 'TPS-REPORT  ', 'TPS report, padded')")
    check = refused_by_the_preflight(legacy_db)
    [row] = [r for r in check.rows if r["table"] == "products"]
    assert "products_organization_id_sku_key" in row["refuses"] and row["rows"] == 4
    assert "GAD-100 (2 rows)" in row["which"] and "TPS-REPORT (2 rows)" in row["which"]
    assert "wid" not in row["which"].lower()
    # what phase 2 itself says, once phase 1 is applied (the half-done deployment the preflight prevents)
    for version, path in paths.PHASES[:2]:
        if version == "001":
            with pytest.raises(Exception, match="products_organization_id_sku_key.*duplicated values"):
                engine.ApplyEngine(legacy_db.target, run_id=records.new_run_id(), operator="t").apply(version, path)
        else:
            engine.ApplyEngine(legacy_db.target, run_id=records.new_run_id(), operator="t").apply(version, path)


@pytest.mark.parametrize("table, rule, legacy_change, named", [
    ("organizations", "organizations_slug_key",
     "alter table public.organizations drop constraint organizations_slug_key; "
     "insert into public.organizations (name, slug) select 'Copy', slug from public.organizations where slug = 'acme'",
     "acme (2 rows)"),
    ("organization_members", "organization_members_organization_id_user_id_key",
     "alter table public.organization_members drop constraint organization_members_organization_id_user_id_key; "
     "insert into public.organization_members (organization_id, user_id, role) select organization_id, user_id, 'member' "
     f"from public.organization_members where user_id = '{HEIDI}'", HEIDI),
    ("inventory", "inventory_product_id_location_key",
     "alter table public.inventory drop constraint inventory_product_id_location_key; "
     "insert into public.inventory (organization_id, product_id, location) select organization_id, product_id, location "
     "from public.inventory where id = '0d000000-0000-4000-8000-000000000001'",
     "0c000000-0000-4000-8000-000000000001, main (2 rows)"),
    # a legacy column name phase 2 renames (or carries) into sku
    ("products", "products_organization_id_sku_key",
     "alter table public.products rename column sku to product_code; "
     "insert into public.products (organization_id, product_code, name) values "
     "('0a000000-0000-4000-8000-000000000002', 'GLX-COG-12', 'Cog again')", "GLX-COG-12 (2 rows)"),
])
def test_duplicates_under_each_unique_rule_of_phase_2_are_refused_naming_them(legacy_db, table, rule, legacy_change,
                                                                              named):
    legacy_db.execute(legacy_change)
    [row] = refused_by_the_preflight(legacy_db).rows
    assert row["table"] == table and rule in row["refuses"] and named in row["which"]


def test_duplicated_plaintext_api_keys_are_refused_by_their_row_ids_and_no_key_or_hash_is_shown(legacy_db):
    [(key,)] = legacy_db.query("select key from public.api_keys where key is not null order by id limit 1")
    legacy_db.execute("alter table public.api_keys drop constraint api_keys_key_key; "
                      "update public.api_keys set key = %s where key is not null and key <> %s and id = "
                      "(select min(id::text)::uuid from public.api_keys where key is not null and key <> %s)",
                      (key, key, key))
    check = refused_by_the_preflight(legacy_db)
    [row] = check.rows
    assert row["table"] == "api_keys" and "api_keys_key_hash_key" in row["refuses"] and row["rows"] == 2
    ids = [i for (i,) in legacy_db.query("select id::text from public.api_keys where key = %s order by 1", (key,))]
    assert all(i in row["which"] for i in ids)
    shown = repr(check) + check._repr_html_() + (preflight.phase_preconditions.sql or "")
    assert not any(k in shown for k in PLAINTEXT_KEYS)


def test_a_key_column_of_another_type_duplicated_ids_and_a_legacy_table_of_phase_3_are_refused_by_name(legacy_db):
    legacy_db.execute("alter table public.api_keys alter column created_by type text; "
                      "insert into public.audit_logs (id, action) select id, 'copy' from public.audit_logs limit 1; "
                      "create table public.rate_limits (key text primary key, hits integer)")
    check = refused_by_the_preflight(legacy_db)
    which = {r["table"]: r["which"] for r in check.rows}
    assert which["api_keys"] == "api_keys.created_by is text, the contract needs uuid"
    [(duplicated_id,)] = legacy_db.query("select id::text from public.audit_logs group by id having count(*) > 1")
    assert which["audit_logs"] == f"ids {duplicated_id}" and any("primary key" in r["refuses"] for r in check.rows)
    assert any(r["which"] == "rate_limits.window_start is missing (expected timestamp with time zone)"
               for r in check.rows)


@pytest.mark.slow
def test_a_deploy_on_duplicate_skus_stops_in_the_preflight_before_the_backup_and_before_phase_1(legacy_db, tmp_path):
    legacy_db.execute("insert into public.products (organization_id, sku, name) values "
                      "('0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget again')")
    before = snapshot_of(legacy_db)
    outcome = runner.run_plan("deploy", ("preflight", "phase1", "phase2", "phase3"), legacy_db.target,
                              records_root=tmp_path, progress=lambda *_: None)
    assert outcome.verdict == "failed"
    entry, *later = outcome.notebooks
    assert entry["status"] == "failed" and {n["status"] for n in later} == {"not run"}
    assert "products_organization_id_sku_key" in entry["error"] and "GAD-100" in entry["error"]
    assert not (outcome.record.path / "backup").exists()
    assert_identical(before, snapshot_of(legacy_db))
    assert legacy_db.query("select to_regclass('truthsource.deployment_history')") == [(None,)]   # no phase ran
