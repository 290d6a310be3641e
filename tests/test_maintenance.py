"""Maintenance: each cadence end to end with its record; retention deletes nothing in a dry run
and exactly what the policies say when applied; the monthly backup verification writes one row;
and the checks find what they are for."""

from __future__ import annotations

import json

import pytest

from runbooks import backup, cli, maintenance, records, runner, snapshot

from runhelpers import checks_of, executed_notebook, make_run, notebook_text, snapshot_of
from sqlhelpers import wait_until

# Old and recent log rows, and policies to apply to them: security events are kept 30 days (not the
# default year), threat intelligence retention is switched off, rate-limit windows keep their 2 days.
SEED_RETENTION = """
insert into public.security_events (event_type, severity, details, created_at) values
  ('login_failed', 'low', '{"seed": "old"}', now() - interval '500 days'),
  ('login_failed', 'medium', '{"seed": "old"}', now() - interval '400 days'),
  ('token_reuse', 'high', '{"seed": "old"}', now() - interval '370 days'),
  ('login_failed', 'low', '{"seed": "old"}', now() - interval '45 days'),
  ('login_failed', 'low', '{"seed": "recent"}', now() - interval '10 days'),
  ('login_failed', 'low', '{"seed": "recent"}', now() - interval '2 days');
insert into public.threat_intelligence (ip_address, threat_type, severity, first_seen_at, last_seen_at) values
  ('203.0.113.9', 'scanner', 'medium', now() - interval '300 days', now() - interval '200 days'),
  ('198.51.100.77', 'botnet', 'high', now() - interval '20 days', now() - interval '1 day');
insert into public.rate_limits (key, window_start, window_length, max_requests, request_count, last_request_at) values
  ('ip:192.0.2.1', date_trunc('hour', now()) - interval '3 days', interval '1 hour', 100, 5, now() - interval '3 days'),
  ('ip:192.0.2.1', date_trunc('hour', now()), interval '1 hour', 100, 1, now());
update public.data_retention_policies set retention_period = interval '30 days' where table_name = 'security_events';
update public.data_retention_policies set is_enabled = false where table_name = 'threat_intelligence';
"""
LOG_TABLES = ("audit_logs", "security_events", "rate_limits", "threat_intelligence", "backup_verifications")


def counts(db) -> dict[str, int]:
    return {t: db.query(f"select count(*) from public.{t}")[0][0] for t in LOG_TABLES}


def past_retention(db) -> dict[str, int]:
    """What the policies say should go, counted here independently of apply_data_retention()."""
    expected = {}
    for table, column, period in db.query("""select table_name, timestamp_column, retention_period::text
                                             from public.data_retention_policies where is_enabled order by 1"""):
        [(n,)] = db.query(f"select count(*) from public.{table} where {column} < now() - %s::interval", (period,))
        expected[table] = n
    return expected


def unchanged(db, before: dict) -> None:
    comparison = snapshot.compare_snapshots(before, snapshot_of(db))
    assert comparison.identical, comparison.problems()


# -- each cadence end to end -----------------------------------------------------------------

@pytest.mark.slow
def test_daily_maintenance_passes_on_a_migrated_legacy_database_changes_nothing_and_keeps_its_record(
        migrated_db, tmp_path):
    before = snapshot_of(migrated_db)
    outcome = runner.run_plan("maintain daily", ("maintenance",), migrated_db.target, records_root=tmp_path,
                              parameters={"cadence": "daily"}, progress=lambda *_: None)

    assert outcome.verdict == "passed", outcome.notebooks
    [entry] = outcome.notebooks
    assert (outcome.record.path / entry["file"]).is_file() and (outcome.record.path / entry["html"]).is_file()
    assert outcome.record.verify() == []
    manifest = outcome.record.manifest()
    assert manifest["command"] == "maintain daily" and manifest["parameters"] == {"cadence": "daily"}
    checks = checks_of(outcome)
    assert checks["migrated"]["status"] == "ok"
    assert checks["integrity"]["status"] == "warning"           # the legacy rows the phases kept, reported
    assert checks["security_events"]["status"] == "ok"
    assert checks["weekly_tasks"] == {"name": "weekly_tasks", "status": "info",
                                      "summary": "skipped: this run's cadence is daily"}
    assert checks["monthly_tasks"]["status"] == "info"
    assert "retention_plan" not in checks and "backup_verification" not in checks
    text = notebook_text(executed_notebook(outcome))
    assert "skipped: a weekly task (this run's cadence is daily)" in text
    assert "products_sku_format" in text and "wid-001" in text
    assert (outcome.record.path / maintenance.ACTIVITY_FILE).is_file()
    unchanged(migrated_db, before)


@pytest.mark.slow
def test_weekly_maintenance_in_dry_run_shows_what_retention_would_delete_and_deletes_nothing(migrated_db, tmp_path):
    migrated_db.execute(SEED_RETENTION)
    expected = past_retention(migrated_db)
    assert expected["security_events"] == 4 and expected["rate_limits"] == 1 and "threat_intelligence" not in expected
    before = snapshot_of(migrated_db)

    outcome = runner.run_plan("maintain weekly", ("maintenance",), migrated_db.target, records_root=tmp_path,
                              parameters={"cadence": "weekly"}, progress=lambda *_: None)

    assert outcome.verdict == "passed", outcome.notebooks
    checks = checks_of(outcome)
    assert checks["retention_plan"]["summary"] == (f"dry run: {sum(expected.values())} row(s) past retention in "
                                                   f"{sum(1 for n in expected.values() if n)} table(s)")
    assert checks["retention_apply"]["status"] == "info" and "nothing deleted" in checks["retention_apply"]["summary"]
    for name in ("audit_trail", "rls_coverage", "policy_review", "foreign_keys_without_index"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["daily_tasks"]["status"] == checks["monthly_tasks"]["status"] == "info"
    unchanged(migrated_db, before)


@pytest.mark.slow
def test_weekly_maintenance_with_apply_retention_deletes_exactly_what_the_policies_say(migrated_db, tmp_path):
    migrated_db.execute(SEED_RETENTION)
    expected = past_retention(migrated_db)
    before = counts(migrated_db)
    enabled = len(expected)

    code = cli.main(["maintain", "weekly", "--service", migrated_db.name, "-p", "apply_retention", "true",
                     "--records", str(tmp_path)])

    assert code == 0
    [manifest_path] = tmp_path.glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["parameters"] == {"apply_retention": True, "cadence": "weekly"}
    after = counts(migrated_db)
    for table in LOG_TABLES:
        deleted = expected.get(table, 0)
        added = enabled if table == "audit_logs" else 0      # each policy's real run is recorded in audit_logs
        assert after[table] == before[table] - deleted + added, table
    assert migrated_db.query("select count(*) from public.audit_logs where action = 'data_retention.applied'") == [
        (enabled,)]
    assert migrated_db.query("""select details ->> 'seed', count(*) from public.security_events
                                group by 1 order by 1""") == [("recent", 2)]
    assert migrated_db.query("select count(*) from public.threat_intelligence") == [(2,)]   # its policy is off
    assert past_retention(migrated_db) == {t: 0 for t in expected}
    apply_check = next(c for c in manifest["notebooks"][0]["checks"] if c["name"] == "retention_apply")
    assert apply_check["status"] == "ok" and f"deleted {sum(expected.values())} row(s)" in apply_check["summary"]


@pytest.mark.slow
def test_monthly_maintenance_verifies_a_fresh_backup_and_writes_one_backup_verifications_row(migrated_db, tmp_path):
    outcome = runner.run_plan("maintain monthly", ("maintenance",), migrated_db.target, records_root=tmp_path,
                              parameters={"cadence": "monthly"}, progress=lambda *_: None)

    assert outcome.verdict == "passed", outcome.notebooks
    checks = checks_of(outcome)
    assert checks["backup_verification"]["status"] == "ok"
    for name in ("full_integrity", "function_conflicts", "table_conflicts", "privileged_roles",
                 "definer_search_path", "function_exposure", "table_exposure", "plaintext_secrets"):
        assert checks[name]["status"] in ("ok", "warning"), checks[name]
    assert checks["api_key_hygiene"]["status"] == "warning"
    [row] = migrated_db.query("""select run_id, backup_label, backup_format, backup_sha256, backup_bytes, toc_entries,
                                        status, verified_by, details from public.backup_verifications""")
    run_id, label, fmt, sha, size, toc, status, verified_by, details = row
    dump = outcome.record.path / "backup" / label
    assert run_id == outcome.run_id and fmt == "custom" and status == "passed" and verified_by == records.operator_facts()["operator"]
    assert sha == records.sha256_of(dump) and size == dump.stat().st_size and toc > 0
    assert details["record_file"] == f"backup/{label}" and details["full_read"] is True
    assert outcome.record.manifest()["backup"]["sha256"] == sha
    assert backup.verify_backup(dump, sha).toc_entries == toc
    assert outcome.record.verify() == []


# -- the checks, one by one (no kernel) ------------------------------------------------------

@pytest.fixture
def run_on(tmp_path):
    made = []

    def make(db, run_id=None):
        run_id = run_id or records.new_run_id()
        # each run in its own folder under one records root, where the daily check finds the previous run
        made.append(make_run(db, tmp_path / "records" / run_id, run_id))
        return made[-1]

    yield make
    for run in made:
        run.close()


def test_a_cadence_other_than_daily_weekly_or_monthly_is_refused(migrated_db, run_on):
    with pytest.raises(ValueError, match="cadence must be one of daily, weekly, monthly"):
        maintenance.start(run_on(migrated_db), "hourly")
    assert cli.main(["maintain", "hourly", "--service", migrated_db.name]) == 2


def test_maintenance_refuses_a_database_the_phases_have_not_migrated(make_db, run_on):
    run = run_on(make_db("legacy"))
    assert maintenance.migrated(run.conn).status == "error"
    check = maintenance.integrity(run.conn)
    assert check.status == "error" and "phase 3 is not applied" in check.summary


def test_retention_refuses_to_apply_above_its_row_limit_and_deletes_nothing(migrated_db, run_on):
    migrated_db.execute(SEED_RETENTION)
    before = counts(migrated_db)
    run = run_on(migrated_db)
    check = maintenance.apply_retention(run.conn, run, apply=True, max_rows=3)
    assert check.status == "error" and "more than retention_max_rows = 3" in check.summary
    assert counts(migrated_db) == before


def stats_of(db) -> dict:
    [(commits, rollbacks)] = db.query("select xact_commit, xact_rollback from pg_stat_database "
                                      "where datname = current_database()")
    return {"commits": commits, "rollbacks": rollbacks}


def test_the_daily_rates_are_judged_since_the_last_daily_run_kept_in_the_history_not_since_the_server_began(
        migrated_db, run_on, tmp_path):
    first = run_on(migrated_db, "20260101T000000Z-aaaaaa")
    check = maintenance.database_activity(first.conn, first)
    assert check.status == "ok" and "first daily run of this database: baseline recorded" in check.summary
    assert {r["signal"]: r["status"] for r in check.rows}["rolled-back share of transactions"] == "not judged"
    assert migrated_db.query(f"select run_id, cadence from {maintenance.MAINTENANCE_TABLE}") == [
        ("20260101T000000Z-aaaaaa", "daily")]
    baseline = json.loads((first.record_dir / maintenance.ACTIVITY_FILE).read_text())["counters"]

    # the runbooks' own verification undoes its work in five transactions; the app rolls back one of its own
    from runbooks import verification
    conn = migrated_db.connect(readonly=True, autocommit=True)
    for _ in range(5):
        with verification.rolled_back(conn) as cur:
            cur.execute("insert into public.organizations (name, slug) values ('Undone', 'undone-org')")
    conn.close()
    app = migrated_db.connect()
    with app.cursor() as cur:
        cur.execute("insert into public.organizations (name, slug) values ('Rolled back', 'rolled-back-org')")
    app.rollback()
    app.close()
    wait_until(lambda: stats_of(migrated_db)["rollbacks"] > baseline["rollbacks"], "the app's rollback counted")
    assert migrated_db.query("select count(*) from public.organizations where slug in ('undone-org', "
                             "'rolled-back-org')") == [(0,)]   # nothing of either stayed

    # the next daily run, its record elsewhere: the interval comes from the database's own history
    second = make_run(migrated_db, tmp_path / "elsewhere" / "20260102T000000Z-aaaaaa", "20260102T000000Z-aaaaaa")
    try:
        check = maintenance.database_activity(second.conn, second)
    finally:
        second.close()
    assert "(since the previous daily run, 20260101T000000Z-aaaaaa)" in check.summary
    assert check.rows[0]["value"].startswith("since the daily run 20260101T000000Z-aaaaaa")
    counters = json.loads((second.record_dir / maintenance.ACTIVITY_FILE).read_text())["counters"]
    assert counters["rollbacks"] - baseline["rollbacks"] == 1          # the app's, not the verification's
    assert counters["commits"] - baseline["commits"] >= 5


def test_a_critical_security_event_fails_the_daily_check_and_a_high_one_warns(migrated_db, run_on):
    conn = run_on(migrated_db).conn
    assert maintenance.plot_security_events(conn) is None          # nothing to plot yet
    migrated_db.execute("insert into public.security_events (event_type, severity) values ('token_reuse', 'high')")
    assert maintenance.security_events(conn).status == "warning"
    migrated_db.execute("insert into public.security_events (event_type, severity) values ('sql_injection', 'critical')")
    check = maintenance.security_events(conn)
    assert check.status == "error" and "1 CRITICAL event(s)" in check.summary
    assert [(r["severity"], r["event_type"], r["events"]) for r in check.rows] == [
        ("critical", "sql_injection", 1), ("high", "token_reuse", 1)]
    assert maintenance.security_events(conn, fail_on_critical=False).status == "warning"
    assert maintenance.plot_security_events(conn).startswith(b"\x89PNG")   # the trend, as an inline PNG


def test_the_policy_review_finds_an_open_policy_and_auth_uid_called_per_row(migrated_db, run_on):
    conn = run_on(migrated_db).conn
    assert maintenance.policy_review(conn).status == "ok"
    migrated_db.execute("""
        create policy open_read on public.products for select to authenticated using (true);
        create policy own_profile on public.profiles for select to authenticated using (auth.uid() = id);""")
    check = maintenance.policy_review(conn)
    assert check.status == "error"
    findings = {r["policy"]: r["finding"] for r in check.rows}
    assert findings["open_read"] == "OPEN: always true for authenticated"
    assert findings["own_profile"].startswith("1 auth.*() call(s) not wrapped")


def test_a_table_without_row_level_security_fails_the_rls_check(migrated_db, run_on):
    migrated_db.execute("create table public.notes (id int)")
    check = maintenance.rls_coverage(run_on(migrated_db).conn)
    assert check.status == "error" and "public.notes" in check.summary
    [row] = [r for r in check.rows if r["table_name"] == "public.notes"]
    assert row["note"] == "RLS OFF: the API roles read and write every row"


def test_the_security_audit_finds_an_extra_bypassrls_role_a_leaky_definer_function_and_exposed_grants(
        migrated_db, run_on, server):
    role = f"{migrated_db.name}_reporting"
    # roles are the cluster's: other modules' tests on this server may have left privileged ones (supabase_admin)
    before = [name for (name,) in migrated_db.query("select rolname from pg_roles where rolsuper or rolbypassrls")]
    server.admin_execute(f"create role {role} bypassrls")
    try:
        migrated_db.execute("""
            create function public.leaky() returns int language sql security definer as 'select 1';
            grant execute on function public.verify_data_integrity() to authenticated;
            grant select on public.products to anon;
            alter table public.api_keys add column api_key text;""")
        conn = run_on(migrated_db).conn
        roles = maintenance.privileged_roles(conn)
        assert roles.status == "warning" and role in roles.summary
        assert maintenance.privileged_roles(conn, expected=",".join([*before, role])).status == "ok"
        assert [r["function"] for r in maintenance.definer_search_path(conn).rows] == ["public.leaky()"]
        exposure = maintenance.function_exposure(conn)
        assert exposure.status == "error"
        assert {r["function"]: r["finding"] for r in exposure.rows} == {
            "public.leaky()": "executable by anon (the contract: anon reads and writes nothing)",
            "public.verify_data_integrity()": "not for clients, yet executable by authenticated"}
        tables = maintenance.table_exposure(conn)
        assert tables.status == "error" and [(r["table"], r["role"]) for r in tables.rows] == [("public.products", "anon")]
        secrets = maintenance.plaintext_secrets(conn)
        assert secrets.status == "error" and secrets.rows[0]["column_name"] == "api_key"
    finally:
        migrated_db.execute("drop function if exists public.leaky()")
        server.admin_execute(f"drop role {role}")


def test_the_api_key_review_names_each_key_that_needs_attention(migrated_db, run_on):
    check = maintenance.api_key_hygiene(run_on(migrated_db).conn)
    assert check.status == "warning"
    assert {r["name"]: r["findings"] for r in check.rows} == {
        "CI deploy": "older than 365 days: rotate; unused for over 90 days: revoke?",
        "Old integration": "",
        "Reporting": "expired but not revoked; older than 365 days: rotate; never used (created over 90 days ago): revoke?",
        "Webhook signer": "older than 365 days: rotate; never used (created over 90 days ago): revoke?"}
