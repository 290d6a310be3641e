"""The phases on a database initialised the way Supabase initialises a project, as its `postgres`.

The database comes from supabase_project.supabase_db: platform roles, auth owned by supabase_admin,
PostgREST's DDL event triggers, storage, realtime, public's default privileges, a legacy shape loaded
by the project's `postgres` (no superuser), then real projects' additions (handle_new_user() on
auth.users, products in supabase_realtime, a storage policy calling a public function, pg_trgm in
public). The three phases go through runbooks.engine.ApplyEngine as that `postgres`; then Supabase's
advisor rules, as the verification writes them, find nothing on the deployment's objects.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runbooks import contract, engine, paths, verification
from runbooks.contract import HISTORY_SCHEMA, TABLES

from supabase_project import OWNER, supabase_db  # noqa: F401 (the fixture)

VARIANT = Path(__file__).parent / "fixtures" / "legacy_variant.sql"
CONTRACT_FUNCTIONS = {f.name for f in contract.FUNCTIONS}
RUN_ID = "20260101T000000Z-5b5b5b"


def deploy(db) -> None:
    """The three phases, as a deployment applies them, connected as the project's postgres."""
    applier = engine.ApplyEngine(db.target, run_id=RUN_ID, operator="supabase-test")
    for version, path in paths.PHASES:
        result = applier.apply(version, path)
        assert result.status == "applied", (version, result)


def is_deployments(obj: str) -> bool:
    """Whether an advisor finding's object is the deployment's: a contract table (or an index, policy or
    constraint named after one), a contract function, or anything in private or the history schema."""
    if obj.startswith(("private.", f"{HISTORY_SCHEMA}.")) or f" private." in obj:
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
    assert db.as_owner("select rolsuper, rolcreaterole, rolbypassrls from pg_roles where rolname = current_user") == [
        (False, True, True)]
    deploy(db)

    findings = advisor_findings(db)
    assert [f for f in findings if is_deployments(f["object"])] == []
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
