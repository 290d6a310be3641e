"""The phases on a database initialised the way Supabase initialises a project, as its `postgres`.

The database comes from supabase_project.supabase_db: platform roles, auth owned by supabase_admin,
PostgREST's DDL event triggers, storage, realtime, public's default privileges, a legacy shape loaded
by the project's `postgres` (no superuser), then real projects' additions (handle_new_user() on
auth.users, products in supabase_realtime, a storage policy calling a public function, pg_trgm in
public). The three phases go through runbooks.engine.ApplyEngine as that `postgres`; then Supabase's
advisor rules, as the verification writes them, find nothing on the deployment's objects but the exposure
the contract intends (with pg_graphql, a stand-in of its resolver here, signed-in users see the core tables
they read: a note naming the contract). And `runbook
deploy` end to end as that `postgres`: pg_trgm in public blocks nothing (trusted, and its own), and the
project's own handle_new_user() is a warning naming its fix (in the preflight's advisor baseline), while
a finding made after the baseline fails the verification.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runbooks import cli, contract, engine, paths, records, verification
from runbooks.contract import CORE_TABLES, HISTORY_SCHEMA, TABLES

from supabase_project import GRAPHQL_STAND_IN, OWNER, supabase_db  # noqa: F401 (the fixture)

VARIANT = Path(__file__).parent / "fixtures" / "legacy_variant.sql"
CONTRACT_FUNCTIONS = {f.name for f in contract.FUNCTIONS}
RUN_ID = "20260101T000000Z-5b5b5b"
HANDLE_NEW_USER_FIX = "revoke execute on function public.handle_new_user() from public, anon, authenticated;"


def deploy(db) -> None:
    """The three phases, as a deployment applies them, connected as the project's postgres."""
    applier = engine.ApplyEngine(db.target, run_id=RUN_ID, operator="supabase-test")
    for version, path in paths.PHASES:
        result = applier.apply(version, path)
        assert result.status == "applied", (version, result)


def is_deployments(obj: str) -> bool:
    """Whether an advisor finding's object is the deployment's: a contract table (or an index, policy or
    constraint named after one), a contract function, or anything in private or the history schema."""
    if obj.startswith(("private.", f"{HISTORY_SCHEMA}.")) or " private." in obj:
        return True
    words = re.findall(r"[a-z_][a-z0-9_]*", obj.replace("public.", ""))
    return any(w in TABLES or w in CONTRACT_FUNCTIONS or any(w.startswith(t + "_") for t in TABLES) for w in words)


def advisor_findings(db) -> list[dict]:
    """Every finding of the verification's advisor lints (security and performance), any level."""
    conn = db.connect(autocommit=True)
    try:
        checks = [verification.security_lints(conn), verification.performance_lints(conn)]
    finally:
        conn.close()
    return [row for check in checks for row in (check.rows or []) if row["object"]]


@pytest.mark.parametrize("shape", [paths.LEGACY_FIXTURE_FILE, VARIANT], ids=["legacy", "variant"])
def test_the_phases_deploy_as_supabases_postgres_and_the_advisor_finds_nothing_on_what_they_own(supabase_db, shape):
    db = supabase_db(shape)
    db.as_superuser(GRAPHQL_STAND_IN)           # pg_graphql, on by default in Supabase projects
    assert db.as_owner("select rolsuper, rolcreaterole, rolbypassrls from pg_roles where rolname = current_user") == [
        (False, True, True)]
    deploy(db)

    findings = advisor_findings(db)
    # on the deployment's objects, at any level, only the exposure the contract intends: signed-in users read
    # the core tables, so pg_graphql shows them to signed-in users (a note naming the contract)
    assert {(f["lint"], f["object"], f["level"], f["detail"]) for f in findings if is_deployments(f["object"])} == {
        ("pg_graphql_authenticated_table_exposed", t, "info", verification.INTENDED_GRAPHQL_EXPOSURE) for t in CORE_TABLES}
    # what the project had before stays reported, at the advisor's level for someone else's objects
    found = {(f["lint"], f["object"]) for f in findings}
    assert ("extension_in_public", "pg_trgm") in found
    assert any(lint.startswith("security_definer") and "handle_new_user" in obj for lint, obj in found)

    # the platform is as it was: the event triggers fired for the deployment's DDL and still stand; the
    # realtime table and the storage policy are in place; a new user still gets a profile
    assert db.as_superuser("select evtname, evtenabled from pg_event_trigger order by 1") == [
        ("pgrst_ddl_watch", "O"), ("pgrst_drop_watch", "O")]
    assert db.as_superuser("select tablename from pg_publication_tables where pubname = 'supabase_realtime'") == [
        ("products",)]
    assert db.as_superuser("select count(*) from pg_policies where schemaname = 'storage'") == [(1,)]
    new_user = "5b000000-0000-4000-8000-000000000001"
    db.as_owner(f"insert into auth.users (id, email, raw_user_meta_data) values "
                f"('{new_user}', 'new@example.test', '{{\"full_name\": \"New User\"}}')")
    assert db.as_owner(f"select full_name from public.profiles where id = '{new_user}'") == [("New User",)]


def test_the_fixture_is_a_supabase_like_project_before_anything_is_deployed(supabase_db):
    db = supabase_db(paths.LEGACY_FIXTURE_FILE)
    assert db.as_superuser("""select nspname, pg_get_userbyid(nspowner) from pg_namespace
                               where nspname in ('auth', 'extensions', 'storage') order by 1""") == [
        ("auth", "supabase_admin"), ("extensions", "supabase_admin"), ("storage", "supabase_admin")]
    assert db.as_superuser("""select pg_get_userbyid(relowner) from pg_class where oid = 'auth.users'::regclass""") == [
        ("supabase_auth_admin",)]
    # pgcrypto and uuid-ossp in extensions (stand-ins of their functions where the server lacks them)
    [(available,)] = db.as_superuser("select count(*) = 2 from pg_available_extensions where name in ('pgcrypto', 'uuid-ossp')")
    assert db.as_superuser("""select extname, extnamespace::regnamespace::text from pg_extension
                               where extname in ('pgcrypto', 'uuid-ossp', 'pg_trgm') order by 1""") == [
        ("pg_trgm", "public")] + ([("pgcrypto", "extensions"), ("uuid-ossp", "extensions")] if available else [])
    assert db.as_superuser("select to_regprocedure('extensions.uuid_generate_v4()') is not null, "
                           "to_regprocedure('extensions.gen_random_bytes(integer)') is not null") == [(True, True)]
    assert db.as_superuser(f"""select pg_has_role('{OWNER}', r, 'member') from unnest(array['anon', 'authenticated',
                               'service_role']) r""") == [(True,), (True,), (True,)]
    # public's default privileges give the API roles everything supabase_admin and postgres create there
    assert db.as_superuser("""select pg_get_userbyid(defaclrole), defaclobjtype from pg_default_acl
                               where defaclnamespace = 'public'::regnamespace order by 1, 2""") == [
        (OWNER, "S"), (OWNER, "f"), (OWNER, "r"), ("supabase_admin", "S"), ("supabase_admin", "f"), ("supabase_admin", "r")]
    assert db.as_superuser("""select has_function_privilege('anon', 'public.handle_new_user()', 'execute'),
                                     (select prosecdef from pg_proc where oid = 'public.handle_new_user()'::regprocedure)""") == [
        (True, True)]


def checks_of_run(root: Path, run: str) -> dict[str, dict]:
    """{notebook step (preflight, verification, ...): {check name: check}} of a run's manifest."""
    manifest = records.Record.open(root, run).manifest()
    return {n["name"]: {c["name"]: c for c in n.get("checks") or []} for n in manifest["notebooks"]}


def runbook_deploy(db, root: Path) -> tuple[int, str]:
    """`runbook deploy` as the project's postgres: (exit code, run id)."""
    code = cli.main(["deploy", "--service", db.name, "--records", str(root)])
    [run] = [p.name for p in root.iterdir()]
    return code, run


@pytest.mark.slow
def test_a_deployment_as_supabases_postgres_passes_and_reports_the_projects_own_finding_as_a_warning_with_its_fix(
        supabase_db, tmp_path):
    db = supabase_db(paths.LEGACY_FIXTURE_FILE)
    root = tmp_path / "records"
    code, run = runbook_deploy(db, root)
    checks = checks_of_run(root, run)
    assert code == 0, {n: {c: v["summary"] for c, v in cs.items() if v["status"] == "error"} for n, cs in checks.items()}
    # pg_trgm in public, owned by postgres and trusted: no rollback blocker; the preflight names the pre-existing finding
    assert checks["preflight"]["privileges"]["status"] == "ok"
    baseline = checks["preflight"]["advisor_baseline"]
    assert baseline["status"] == "warning" and HANDLE_NEW_USER_FIX in baseline["summary"]
    assert (root / run / verification.ADVISOR_BASELINE_FILE).is_file()
    # the verification: a warning naming the fix, not a failure
    lints = checks["verification"]["security_lints"]
    assert lints["status"] == "warning" and f"handle_new_user() (fix: {HANDLE_NEW_USER_FIX})" in lints["summary"]
    assert f"against the preflight's advisor baseline {run}/{verification.ADVISOR_BASELINE_FILE}" in lints["summary"]
    assert checks["verification"]["success_criteria"]["status"] == "ok"
    # the fix named does fix it
    db.as_owner(HANDLE_NEW_USER_FIX)
    assert not [f for f in advisor_findings(db) if f["lint"] == "security_definer_function_executable_by_api_users"]


@pytest.mark.slow
def test_a_finding_the_deployment_introduced_fails_the_verification_and_without_a_baseline_only_its_own_objects_fail(
        supabase_db, tmp_path):
    db = supabase_db(paths.LEGACY_FIXTURE_FILE)
    root = tmp_path / "records"
    code, run = runbook_deploy(db, root)
    assert code == 0
    # after the preflight's baseline: a SECURITY DEFINER function in public, executable by the API roles
    # (public's default privileges grant it to them)
    db.as_owner("""create function public.grant_me_admin() returns void language sql security definer
                   set search_path = '' as 'select null'""")
    # `runbook verify` compares with the newest preflight of the target: the deployment's
    assert cli.main(["verify", "--service", db.name, "--records", str(root)]) == 1
    [verify_run] = [p.name for p in root.iterdir() if p.name != run]
    lints = checks_of_run(root, verify_run)["verification"]["security_lints"]
    assert lints["status"] == "error"
    assert "security_definer_function_executable_by_api_users: grant_me_admin()" in lints["summary"]
    assert "handle_new_user" not in lints["summary"].split("(against")[0]      # the older one is no failure

    # with no preflight to compare with, it says so: the deployment's objects fail, others are warnings
    conn = db.connect(autocommit=True)
    try:
        alone = verification.security_lints(conn)
    finally:
        conn.close()
    assert alone.status == "warning" and "no advisor baseline" in alone.summary
    assert "grant_me_admin() (fix: revoke execute on function public.grant_me_admin() from public, anon, " \
           "authenticated;)" in alone.summary


@pytest.mark.slow
def test_a_rollback_as_supabases_postgres_re_creates_pg_trgm_as_its_owner_and_puts_back_what_the_platform_held(
        supabase_db, tmp_path):
    db = supabase_db(paths.LEGACY_FIXTURE_FILE)
    platform = ("select tgname from pg_trigger where tgrelid = 'auth.users'::regclass and not tgisinternal",
                "select policyname from pg_policies where schemaname = 'storage'",
                "select tablename from pg_publication_tables where pubname = 'supabase_realtime'",
                "select extname, extowner::regrole::text, extnamespace::regnamespace::text from pg_extension "
                "where extname = 'pg_trgm'")
    before = [db.as_superuser(sql) for sql in platform]
    assert before[3] == [("pg_trgm", OWNER, "public")]
    trgm = "select oid from pg_extension where extname = 'pg_trgm'"
    [(created,)] = db.as_superuser(trgm)
    root = tmp_path / "records"
    code, run = runbook_deploy(db, root)
    assert code == 0
    # the rollback proves the app schemas equal the preflight's snapshot (its notebook fails otherwise)
    assert cli.main(["rollback", "--service", db.name, "--run", run, "--yes", "--records", str(root)]) == 0
    [(re_created,)] = db.as_superuser(trgm)
    assert re_created != created          # dropped with public's content, and created again
    # dropped with public and put back: the trigger on auth.users, the storage policy calling public, the
    # realtime table; pg_trgm re-created by postgres, so postgres owns it again
    assert [db.as_superuser(sql) for sql in platform] == before
