"""Verification: every check passes on a fully migrated database, leaves nothing behind, and fails
when something is broken on purpose (a policy dropped, a second updated-at function, rows deleted)."""

import io
import threading

import psycopg2
import psycopg2.extras
import pytest

from runbooks import preflight, runner, snapshot, verification
from runbooks.checks import Check

from runhelpers import readonly

pytestmark = pytest.mark.both_versions   # the checks read the catalogs of each version

ALL_CHECKS = (verification.phases_applied, verification.updated_at_trigger, verification.helper_functions,
              verification.data_integrity, verification.database_stats, verification.query_latency,
              verification.performance_lints, verification.suspicious_activity, verification.rls_spot_checks,
              verification.security_lints, verification.compliance, verification.duplicate_functions,
              verification.duplicate_tables)


@pytest.fixture
def conn(migrated_db):
    c = readonly(migrated_db)
    yield c
    c.close()


def shown_statements(sql: str, starts: tuple[str, ...]) -> list[str]:
    """The statements of a check's shown SQL that begin with `starts`, one a line (outlines left out)."""
    return [line.removesuffix(";") for line in sql.splitlines() if line.startswith(starts) and "<" not in line]


def by_case(check: Check, key: str) -> dict:
    return {row[key]: row for row in check.rows}


def test_every_check_and_every_success_criterion_passes_on_a_fully_migrated_database(migrated_db, conn, tmp_path):
    preflight.snapshot(conn, tmp_path)
    checks = [check(conn) for check in ALL_CHECKS] + [verification.row_counts(conn, tmp_path)]
    failed = {c.name: c.summary for c in checks if c.status == "error"}
    assert failed == {}
    # legacy rows that break a rule are reported, not hidden
    assert next(c for c in checks if c.name == "data_integrity").status == "warning"
    criteria = verification.success_criteria(checks)
    assert criteria.status == "ok" and [r["result"] for r in criteria.rows] == ["pass"] * 10
    assert {r["criteria"] for r in criteria.rows} == {"technical", "business"}


def test_nothing_the_verification_does_stays_behind_but_sequence_positions(migrated_db, conn):
    before = snapshot.take_snapshot(conn)
    for check in ALL_CHECKS:
        check(conn)
    after = snapshot.take_snapshot(conn)
    comparison = snapshot.compare_snapshots(before, after)
    assert comparison.fingerprint_equal and comparison.counts_equal
    assert all("sequence" in str(b) for b, _ in comparison.content_differences.values())


def test_the_updated_at_trigger_is_exercised_by_an_update_and_the_guides_call_fails_as_it_must(conn):
    check = verification.updated_at_trigger(conn)
    assert check.status == "ok"
    rows = by_case(check, "table")
    assert rows["public.products"]["moved"] == "yes" and rows["public.products"]["row"] == "synthetic"
    assert "trigger functions can only be called as triggers" in rows["(the guide's test)"]["read back"]


@pytest.mark.parametrize("check, starts", [
    (verification.updated_at_trigger, ("update ",)),
    (verification.helper_functions, ("select public.",)),
    (verification.rls_spot_checks, ("select ", "set local role ", "insert ", "update ", "delete ")),
    (verification.compliance, ("select ", "set local role ", "update ", "delete ")),
    (verification.query_latency, ("select ", "set local role ")),
])
def test_the_sql_a_check_shows_is_the_sql_it_runs_statement_for_statement(migrated_db, check, starts):
    shown = shown_statements(check.sql, starts)
    log = io.StringIO()
    logged = psycopg2.connect(migrated_db.target.conninfo(options="-c default_transaction_read_only=on"),
                              connection_factory=psycopg2.extras.LoggingConnection)
    try:
        logged.initialize(log)
        logged.autocommit = True
        assert check(logged).status == "ok"
    finally:
        logged.close()
    ran = log.getvalue().splitlines()
    assert len(shown) > 5 and [s for s in shown if s not in ran] == []


def test_a_table_whose_updated_at_trigger_is_gone_fails_the_updated_at_test(migrated_db, conn):
    migrated_db.execute("drop trigger update_products_updated_at on public.products")
    check = verification.updated_at_trigger(conn)
    assert check.status == "error" and "public.products" in check.summary
    assert by_case(check, "table")["public.products"]["trigger"].startswith("NONE")


def test_a_dropped_policy_fails_the_rls_spot_checks_and_the_rls_criterion(migrated_db, conn):
    migrated_db.execute("drop policy products_select_members on public.products")
    check = verification.rls_spot_checks(conn)
    assert check.status == "error"
    wrong = [f"{r['as']} {r['does']}" for r in check.rows if r["ok"] == "NO"]
    assert "authenticated (member) reads products of A" in wrong
    criteria = by_case(verification.success_criteria([check]), "criterion")
    assert criteria["All RLS policies working"]["result"] == "FAIL"


def test_an_open_policy_fails_the_rls_spot_checks_and_the_security_lints(migrated_db, conn):
    migrated_db.execute("create policy everyone_reads on public.api_keys for select to authenticated using (true)")
    rls = verification.rls_spot_checks(conn)
    assert "authenticated (member) reads api_keys of A (admins only)" in rls.summary
    lints = verification.security_lints(conn)
    assert lints.status == "error" and "policy_always_true: everyone_reads on api_keys" in lints.summary


def test_rls_switched_off_and_a_truncate_grant_fail_the_security_lints(migrated_db, conn):
    migrated_db.execute("alter table public.rate_limits disable row level security; "
                        "grant truncate on public.products to authenticated")
    check = verification.security_lints(conn)
    assert check.status == "error"
    assert "rls_disabled_in_public: rate_limits" in check.summary
    assert "api_role_may_truncate: products" in check.summary


def test_a_finding_the_preflight_recorded_on_someone_elses_object_is_a_warning_with_its_fix_a_new_one_fails(
        migrated_db, conn, tmp_path):
    migrated_db.execute("""create function public.handle_new_user() returns trigger language plpgsql security definer
                           set search_path = '' as $$ begin return new; end $$""")
    verification.advisor_baseline(conn, tmp_path)
    older = verification.security_lints(conn, tmp_path)
    assert older.status == "warning"
    fix = "revoke execute on function public.handle_new_user() from public, anon, authenticated;"
    assert f"security_definer_function_executable_by_api_users: handle_new_user() (fix: {fix})" in older.summary
    row = next(r for r in older.rows if r["object"] == "handle_new_user()")
    assert row["level"] == "warning" and "pre-existing, not the deployment's" in row["detail"]

    migrated_db.execute("""create function public.grant_me_admin() returns void language sql security definer
                           set search_path = '' as 'select null'""")
    introduced = verification.security_lints(conn, tmp_path)
    assert introduced.status == "error"
    assert introduced.summary.startswith("1 finding(s) the contract forbids: security_definer_function_executable_by_"
                                         "api_users: grant_me_admin() (against the preflight's advisor baseline")
    row = next(r for r in introduced.rows if r["object"] == "grant_me_admin()")
    assert "not in the preflight's baseline: made since it was taken" in row["detail"]


def test_a_finding_on_the_deployments_own_objects_fails_even_when_the_preflight_recorded_it(migrated_db, conn, tmp_path):
    migrated_db.execute("grant execute on function public.is_org_admin(uuid, uuid) to anon; "
                        "create table private.notes (id int primary key); alter table private.notes enable row level security")
    verification.advisor_baseline(conn, tmp_path)
    check = verification.security_lints(conn, baseline_dir=tmp_path)
    assert check.status == "error"
    assert "contract_function_executable_by_clients: is_org_admin(uuid,uuid)" in check.summary
    assert "rls_enabled_no_policy: private.notes" in check.summary


def test_without_a_baseline_the_lints_say_so_and_only_the_deployments_objects_fail(migrated_db, conn, tmp_path):
    migrated_db.execute("""create function public.handle_new_user() returns trigger language plpgsql security definer
                           set search_path = '' as $$ begin return new; end $$""")
    check = verification.security_lints(conn, tmp_path / "a run without a preflight")
    assert check.status == "warning" and "no advisor baseline" in check.summary
    migrated_db.execute("grant execute on function public.is_org_admin(uuid, uuid) to anon")
    check = verification.security_lints(conn)
    assert check.status == "error" and "is_org_admin(uuid,uuid)" in check.summary and "no advisor baseline" in check.summary


def test_a_second_updated_at_function_and_an_overload_fail_the_duplicate_check(migrated_db, conn):
    migrated_db.execute("""
        create function public.touch_updated_at() returns trigger language plpgsql set search_path = ''
          as $$ begin new.updated_at := now(); return new; end $$;
        create function public.is_org_admin(user_uuid text, org_uuid text) returns boolean language sql
          set search_path = '' as $$ select false $$;""")
    check = verification.duplicate_functions(conn)
    assert check.status == "error"
    assert "touch_updated_at(): another updated-at function" in check.summary
    assert "is_org_admin: 1 overload(s) beside the contract's" in check.summary


def test_a_table_defined_twice_fails_the_duplicate_check(migrated_db, conn):
    migrated_db.execute("create table private.audit_logs (id bigint); create table public.products_old (id int)")
    check = verification.duplicate_tables(conn)
    assert check.status == "error" and "audit_logs: defined more than once" in check.summary
    assert by_case(check, "table")["products_old"]["status"] == "warning"


def test_an_unindexed_foreign_key_fails_the_performance_lints(migrated_db, conn):
    migrated_db.execute("drop index public.profiles_organization_id_idx")
    check = verification.performance_lints(conn)
    assert check.status == "error" and "unindexed_foreign_key: profiles_organization_id_fkey on profiles" in check.summary


def test_the_helper_functions_answer_for_synthetic_users_and_a_wrong_answer_fails(migrated_db, conn):
    check = verification.helper_functions(conn)
    assert check.status == "ok"
    rows = by_case(check, "call")
    assert rows["get_user_organization_id(drifter)"]["actual"] == "org B"       # the earliest membership
    assert rows["get_user_organization_id(outsider)"]["actual"] == "NULL"
    migrated_db.execute("""create or replace function public.is_org_admin(user_uuid uuid, org_uuid uuid)
        returns boolean language sql stable security definer set search_path = '' as $$ select true $$""")
    broken = verification.helper_functions(conn)
    assert broken.status == "error" and "is_org_admin(member, org A)" in broken.summary


def test_detect_suspicious_activity_flags_a_listed_address_and_a_blind_one_fails(migrated_db, conn):
    check = verification.suspicious_activity(conn)
    assert check.status == "ok"
    assert [r["ok"] for r in check.rows] == ["yes"] * 3
    migrated_db.execute("""create or replace function public.detect_suspicious_activity(p_org_id uuid, p_ip_address inet,
        p_user_id uuid) returns table (is_suspicious boolean, risk_score integer, reasons text[])
        language sql security definer set search_path = '' as $$ select false, 0, '{}'::text[] $$""")
    assert verification.suspicious_activity(conn).status == "error"


def test_integrity_errors_fail_and_legacy_warnings_are_shown(migrated_db, conn):
    check = verification.data_integrity(conn)
    assert check.status == "warning" and "products_sku_format" in check.summary
    migrated_db.execute("alter table public.inventory disable row level security")
    broken = verification.data_integrity(conn)
    assert broken.status == "error" and "rls_disabled" in broken.summary


def test_rows_deleted_since_the_preflight_snapshot_fail_the_no_data_loss_check(migrated_db, conn, tmp_path):
    preflight.snapshot(conn, tmp_path)
    migrated_db.execute("delete from public.inventory where quantity < 0")
    check = verification.row_counts(conn, tmp_path)
    assert check.status == "error" and "ROWS LOST" in check.summary and "public.inventory" in check.summary
    criteria = by_case(verification.success_criteria([check]), "criterion")
    assert criteria["No data loss"]["result"] == "FAIL"


def test_without_any_snapshot_no_data_loss_cannot_be_proven_and_says_so(conn, tmp_path):
    check = verification.row_counts(conn, tmp_path / "nothing-here")
    assert check.status == "warning" and "cannot be proven" in check.summary


def test_a_baseline_record_is_used_when_this_run_has_no_snapshot(conn, tmp_path):
    baseline = tmp_path / "earlier-run"
    preflight.snapshot(conn, baseline)
    check = verification.row_counts(conn, tmp_path / "this-run", baseline)
    assert check.status == "ok" and "earlier-run/snapshot.json" in check.summary


def test_phases_that_are_not_applied_from_the_files_on_disk_fail(migrated_db, conn):
    assert verification.phases_applied(conn).status == "ok"
    migrated_db.execute("update truthsource.deployment_history set sha256 = repeat('0', 64) where version = '002'")
    check = verification.phases_applied(conn)
    assert check.status == "error" and "002 applied, FILE CHANGED" in check.summary


def test_on_a_database_the_phases_never_reached_every_check_fails_without_raising(legacy_db):
    conn = readonly(legacy_db)
    try:
        checks = [check(conn) for check in ALL_CHECKS]
    finally:
        conn.close()
    assert {c.name for c in checks if c.status == "error"} >= {
        "phases_applied", "helper_functions", "data_integrity", "database_stats", "suspicious_activity",
        "compliance", "duplicate_functions", "duplicate_tables", "security_lints"}
    assert "could not run" in next(c for c in checks if c.name == "data_integrity").summary


def test_a_criterion_whose_checks_did_not_run_fails():
    check = verification.success_criteria([Check("phases_applied", "ok", "fine")])
    rows = by_case(check, "criterion")
    assert check.status == "error"
    assert rows["All migrations apply successfully"]["result"] == "pass"
    assert rows["No data loss"]["result"] == "FAIL" and rows["No data loss"]["notes"] == "not run: row_counts"


@pytest.mark.slow
def test_the_notebook_runs_every_check_after_a_failure_and_the_criteria_fail_the_run(migrated_db, tmp_path):
    migrated_db.execute("drop policy products_select_members on public.products")
    outcome = runner.run_plan("verify", ("verification",), migrated_db.target, records_root=tmp_path,
                              progress=lambda *_: None)
    assert outcome.verdict == "failed"
    [entry] = outcome.notebooks
    statuses = {c["name"]: c["status"] for c in entry["checks"]}
    assert statuses["rls_spot_checks"] == "error" and statuses["success_criteria"] == "error"
    assert statuses["duplicate_tables"] == "ok" and statuses["row_counts"] == "warning"   # ran after the failure
    assert "rls_spot_checks" in entry["error"] and "success_criteria" in entry["error"]


@pytest.mark.parametrize("start", ["empty", "variant"])
def test_the_checks_work_on_any_database_the_phases_converged_not_only_the_fixture(make_db, start):
    conn = readonly(make_db(f"{start}@3"))
    try:
        checks = [check(conn) for check in ALL_CHECKS]
    finally:
        conn.close()
    assert {c.name: c.summary for c in checks if c.status == "error"} == {}


# Supabase's advisor rules (splinter), as the verification writes them: (lint, SQL that breaks the rule once,
# the object reported, its level: error on the deployment's objects, the advisor's own level elsewhere)
ADVISOR_BREAKAGE = (
    ("rls_enabled_no_policy", "drop policy rate_limits_no_client_access on public.rate_limits", "rate_limits", "error"),
    ("rls_enabled_no_policy", "create table private.notes (id int primary key); alter table private.notes enable row level security",
     "private.notes", "error"),
    ("policy_exists_rls_disabled", "alter table public.inventory disable row level security", "inventory", "error"),
    ("auth_users_exposed", "create view public.user_emails as select id, email from auth.users; "
                           "grant select on public.user_emails to authenticated", "user_emails", "warning"),
    ("rls_references_user_metadata", "create policy p_meta on public.products for select to authenticated "
                                     "using (((select auth.jwt()) -> 'user_metadata' ->> 'org') = organization_id::text)",
     "p_meta on products", "error"),
    ("materialized_view_in_api", "create materialized view public.product_names as select name from public.products; "
                                 "grant select on public.product_names to anon", "product_names", "warning"),
    ("unsupported_reg_types", "alter table public.products add column kind regproc", "products.kind", "error"),
    ("fkey_to_auth_unique", "create unique index users_email_once on auth.users (email); "
                            "create table public.invites (id int primary key, email varchar(255) references auth.users (email)); "
                            "create index on public.invites (email)", "invites_email_fkey on invites", "warning"),
    ("sensitive_columns_exposed", "create table public.leaky (id int primary key, password text); "
                                  "grant select on public.leaky to anon", "leaky", "warning"),
    ("auth_rls_initplan", "create policy p_setting on public.threat_intelligence for select to authenticated "
                          "using (current_setting('app.team', true) = 'red')", "p_setting on threat_intelligence", "error"),
    ("unindexed_foreign_key", "create table private.pairs (a uuid, b uuid, primary key (b, a), "
                              "foreign key (a, b) references private.pairs (b, a))", "pairs_a_b_fkey on private.pairs", "error"),
    ("no_primary_key", "create table private.scratch (x int)", "private.scratch", "error"),
)


def test_each_advisor_rule_finds_what_it_looks_for_at_the_level_of_whose_object_it_is(make_db):
    db = make_db("empty@3")
    for _, breakage, _, _ in ADVISOR_BREAKAGE:
        db.execute(breakage)
    conn = readonly(db)
    try:
        rows = verification.security_lints(conn).rows + verification.performance_lints(conn).rows
    finally:
        conn.close()
    found = {(r["lint"], r["object"]): r["level"] for r in rows if r["object"]}
    for lint, _, obj, level in ADVISOR_BREAKAGE:
        assert found.get((lint, obj)) == level, (lint, obj, found)


# -- a live app writing all along ------------------------------------------------------------------------------

class AppClient(threading.Thread):
    """An app client committing audited writes one request after another until told to stop: as an
    authenticated admin of the fixture's organization (claims set, as PostgREST does), or as service_role."""

    def __init__(self, db, who: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.db, self.who, self.stop, self.writes, self.error = db, who, stop, 0, None
        self.wrote = threading.Event()

    def run(self):
        conn = self.db.connect(application_name=f"app client {self.who}")
        try:
            while not self.stop.is_set():
                self.request(conn)
                self.writes += 1
                self.wrote.set()
        except Exception as exc:   # the test asserts none happened
            self.error = exc
            self.wrote.set()
        finally:
            conn.close()

    def request(self, conn):
        sku = f"APP-{self.who.upper()[:5]}-{self.writes}"
        with conn.cursor() as cur:
            if self.who == "service_role":
                verification.act_as(cur, "service_role")
                cur.execute("select public.log_security_event('app.request', 'low', %s, %s, '198.51.100.7', '{}')",
                            (APP_ORG, APP_ADMIN))
            else:
                verification.act_as(cur, "app_admin", {"app_admin": APP_ADMIN})
            cur.execute("insert into public.products (organization_id, sku, name) values (%s, %s, 'written by the app')",
                        (APP_ORG, sku))    # audited by its trigger
        conn.commit()


APP_ORG = "0a000000-0000-4000-8000-000000000001"     # the fixture's organization and one of its admins
APP_ADMIN = "0b000000-0000-4000-8000-000000000002"


def test_the_verification_passes_while_app_clients_write_audited_rows_all_along(migrated_db, conn, tmp_path):
    preflight.snapshot(conn, tmp_path)
    stop = threading.Event()
    clients = [AppClient(migrated_db, who, stop) for who in ("authenticated", "service_role")]
    for client in clients:
        client.start()
    for client in clients:
        client.wrote.wait()
    try:
        audit_before = migrated_db.query("select count(*) from public.audit_logs")[0][0]
        checks = [check(conn) for check in ALL_CHECKS] + [verification.row_counts(conn, tmp_path)]
        audit_after = migrated_db.query("select count(*) from public.audit_logs")[0][0]
    finally:
        stop.set()
        for client in clients:
            client.join()
    assert [c.error for c in clients] == [None, None]
    assert audit_after > audit_before        # the app wrote audited rows while the checks ran
    failed = {c.name: c.summary for c in checks if c.status == "error"}
    assert failed == {}
    compliance = next(c for c in checks if c.name == "compliance")
    own = next(r for r in compliance.rows if r["does"].startswith("its own log rows"))
    assert own["ok"] == "yes" and own["expected"] == own["actual"]
    assert verification.success_criteria(checks).status == "ok"


def test_a_dry_run_that_deletes_the_verifications_own_expired_log_rows_fails_the_compliance_check(migrated_db, conn):
    # a broken retention: its "dry run" deletes the expired audit rows (only its own synthetic ones are expired)
    migrated_db.execute("""
        create or replace function public.apply_data_retention(p_dry_run boolean default true)
        returns table (table_name text, rows_affected bigint) language plpgsql security definer set search_path = ''
        as $$ begin
          delete from public.audit_logs where created_at < now() - interval '7 years';
          return query select 'audit_logs'::text, 1::bigint;
        end $$""")
    check = verification.compliance(conn)
    assert check.status == "error" and "its own log rows unchanged" in check.summary
    own = next(r for r in check.rows if r["does"].startswith("its own log rows"))
    assert "audit_logs rows (CHANGED)" in own["actual"]
