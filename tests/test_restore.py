"""Rollback: the backup comes back exactly, deployment objects go, the history stays and grows."""

import json
import secrets
import subprocess

import pytest

from pathlib import Path

from runbooks import engine, identity, paths
from runbooks.backup import take_backup
from runbooks.records import sha256_of
from runbooks.pgtools import find_tool
from runbooks.restore import RestoreFailed, RestoreRefused, execute_plan, plan_restore, restore_backup
from runbooks.snapshot import compare_snapshots

from runhelpers import assert_identical, history, snapshot_of

pytestmark = pytest.mark.both_versions   # SET ROLE from 16, and a pg_restore newer than the server, depend on the version

# The state before the deployment: what the backup holds.
BEFORE_DEPLOY = """
create extension if not exists citext with schema public;
create table public.organizations (id uuid primary key default gen_random_uuid(), name text not null,
  slug public.citext unique, created_at timestamptz not null default now(), updated_at timestamptz not null default now());
create table public.products (id bigint generated always as identity primary key,
  organization_id uuid not null references public.organizations(id), sku text not null,
  price numeric(12,2) not null check (price >= 0), updated_at timestamptz default now());
create function public.update_updated_at_column() returns trigger language plpgsql
  as $$ begin new.updated_at = now(); return new; end $$;
create trigger products_updated_at before update on public.products
  for each row execute function public.update_updated_at_column();
create function public.is_org_member(user_uuid uuid, org_uuid uuid) returns boolean
  language sql stable security definer set search_path = '' as $$ select true $$;
revoke execute on function public.is_org_member(uuid, uuid) from public, anon;
alter table public.organizations enable row level security;
create policy org_read on public.organizations for select to authenticated using ((select auth.uid()) is not null);
create function public.handle_new_user() returns trigger language plpgsql security definer set search_path = ''
  as $$ begin return new; end $$;
create trigger on_auth_user_created after insert on auth.users for each row execute function public.handle_new_user();
create schema reporting;
create view reporting.org_sizes as select o.slug, count(p.id) as products
  from public.organizations o left join public.products p on p.organization_id = o.id group by o.slug;
grant usage on schema reporting to authenticated;
grant select on reporting.org_sizes to authenticated;
comment on table public.products is 'what organizations sell';
insert into public.organizations (id, name, slug)
  select ('00000000-0000-0000-0000-' || lpad(i::text, 12, '0'))::uuid, 'Org ' || i, 'org-' || i from generate_series(1, 20) i;
insert into public.products (organization_id, sku, price)
  select ('00000000-0000-0000-0000-' || lpad((i % 20 + 1)::text, 12, '0'))::uuid, 'SKU-' || i, i * 1.5
  from generate_series(1, 200) i;
"""

# What a deployment might do: new schema, tables, functions, policies, triggers (one on a platform
# table), changed rows, grants, default privileges, comments, an extension, a dropped view.
DEPLOYMENT = """
create schema extra;
create table extra.audit (id serial primary key, note text);
insert into extra.audit (note) values ('deployed');
create table public.api_keys (id uuid primary key default gen_random_uuid(), key_hash text unique);
alter table public.products add column currency text not null default 'USD';
create or replace function public.is_org_member(user_uuid uuid, org_uuid uuid) returns boolean
  language sql stable security definer set search_path = '' as $$ select false $$;
drop policy org_read on public.organizations;
create policy org_read on public.organizations for select to authenticated using (true);
create policy org_write on public.organizations for update to authenticated using (true);
alter table public.products enable row level security;
create trigger organizations_updated_at before update on public.organizations
  for each row execute function public.update_updated_at_column();
create function public.on_user_deleted() returns trigger language plpgsql as $$ begin return old; end $$;
create trigger on_auth_user_deleted after delete on auth.users for each row execute function public.on_user_deleted();
update public.products set price = price + 1 where id <= 50;
delete from public.products where id > 190;
insert into public.organizations (name, slug) values ('New', 'new-org');
revoke select on public.organizations from anon;
grant execute on function public.is_org_member(uuid, uuid) to anon;
alter default privileges in schema public revoke all on tables from anon;
alter default privileges grant select on tables to authenticated;
comment on table public.products is 'changed';
comment on schema public is 'deployed';
create extension if not exists hstore with schema public;
drop view reporting.org_sizes;
"""


def record(db, version, run_id):
    conn = db.connect()
    try:
        engine.ensure_history(conn)
        engine.record_history(conn, version=version, file_name=f"{version}_phase.sql", sha256="ab" * 32,
                              action="apply", operator="deployer", seconds=0.5, statements=3, run_id=run_id)
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def deployed(empty_db, tmp_path):
    """(db, backup info, snapshot before the deployment), with the deployment applied."""
    empty_db.execute(BEFORE_DEPLOY)
    record(empty_db, "000", "earlier-run")
    before = snapshot_of(empty_db)
    info = take_backup(empty_db.target, tmp_path, "run-1")
    record(empty_db, "001", "run-1")
    empty_db.execute(DEPLOYMENT)
    return empty_db, info, before


def test_a_rollback_returns_the_database_to_its_pre_deployment_snapshot(deployed):
    db, info, before = deployed
    assert not compare_snapshots(before, snapshot_of(db)).identical
    result = restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice",
                            restored_to=info.taken_at)
    assert_identical(before, snapshot_of(db))
    # reporting is here now and in the backup: emptied and refilled, the schema kept; public's comment
    # changed, which its owner may put back, so public is dropped and re-created from the backup
    assert result.dropped_schemas == ["extra", "public"] and result.kept_schemas == ["reporting"]
    assert result.restored_schemas == ["public", "reporting"] and result.extensions_recreated == ["citext"]
    # objects the deployment created are gone, also outside the managed schemas
    assert db.query("select to_regnamespace('extra'), to_regclass('public.api_keys')") == [(None, None)]
    assert db.query("select tgname from pg_trigger where tgrelid = 'auth.users'::regclass and not tgisinternal") == [
        ("on_auth_user_created",)]
    assert db.query("select extname from pg_extension where extname = 'hstore'") == []
    assert result.outside_objects_restored == ["on_auth_user_created on auth.users"]
    assert result.outside_objects_dropped == ["on_auth_user_deleted on auth.users"]
    # the result holds its plan; the record reads the plan's facts and the run's as before
    assert result.plan.kept_schemas is result.kept_schemas and result.archive_entries_restored == len(result.plan.entries)
    recorded = json.loads(json.dumps(result.as_dict()))
    assert {"backup_path", "rollback_row", "history_rows_kept", "prelude_sql", "psql_messages", "pg_restore"} <= set(recorded)
    assert recorded["rollback_row"]["run_id"] == "run-1" and "plan" not in recorded


def test_grants_rls_policies_and_default_privileges_come_back(deployed):
    db, info, before = deployed
    restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice", restored_to=info.taken_at)
    assert db.query("""select has_table_privilege('anon', 'public.organizations', 'SELECT'),
                              has_function_privilege('anon', 'public.is_org_member(uuid, uuid)', 'EXECUTE'),
                              has_table_privilege('authenticated', 'reporting.org_sizes', 'SELECT'),
                              (select relrowsecurity from pg_class where oid = 'public.organizations'::regclass),
                              (select relrowsecurity from pg_class where oid = 'public.products'::regclass),
                              obj_description('public'::regnamespace, 'pg_namespace')""") == [
        (True, False, True, True, False, "standard public schema")]
    assert db.query("select count(*) from pg_default_acl where defaclnamespace = 0") == [(0,)]
    assert db.query("""select nspacl::text[] from pg_namespace where nspname = 'public'""") == [(
        ["pg_database_owner=UC/pg_database_owner", "=U/pg_database_owner", "anon=U/pg_database_owner",
         "authenticated=U/pg_database_owner", "service_role=U/pg_database_owner"],)]
    # a new table in public still gets the shim's default grants: default privileges are back
    db.execute("create table public.after_rollback (id int)")
    assert db.query("select has_table_privilege('anon', 'public.after_rollback', 'SELECT')") == [(True,)]


def test_the_history_keeps_its_rows_and_records_the_rollback(deployed):
    db, info, _ = deployed
    result = restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice",
                            restored_to=info.taken_at)
    rows = history(db)
    assert [(r["version"], r["action"], r["run_id"]) for r in rows] == [
        ("000", "apply", "earlier-run"), ("001", "apply", "run-1"), ("rollback", "rollback", "run-1")]
    rollback = rows[-1]
    assert (rollback["file_name"], rollback["sha256"], rollback["applied_by"]) == (info.file_name, info.sha256, "alice")
    assert rollback["restored_to"].isoformat() == info.taken_at and rollback["duration_ms"] >= 0
    assert result.rollback_row["id"] == rollback["id"] and result.history_rows_kept == 2
    # what the history says is applied now: only what the backup had
    assert set(engine.latest_applied(rows)) == {"000"}


def test_when_the_backup_was_taken_comes_from_backup_json_when_not_given(deployed):
    db, info, before = deployed
    restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice")
    assert history(db)[-1]["restored_to"].isoformat() == info.taken_at
    assert_identical(before, snapshot_of(db))


def test_a_wrong_sha256_is_refused_before_anything_changes(deployed):
    db, info, _ = deployed
    now = snapshot_of(db)
    with pytest.raises(RestoreRefused, match="does not match its recorded sha256.*Nothing was changed"):
        restore_backup(db.target, info.path, "0" * 64, run_id="run-1", operator="alice")
    assert_identical(now, snapshot_of(db))
    assert history(db)[-1]["action"] == "apply"


def test_a_restore_that_fails_midway_leaves_the_database_as_it_was(empty_db, tmp_path, server):
    # The backup grants to a role that is dropped before the rollback: the GRANT near the end
    # of the script fails after the drops and the data, and everything is rolled back.
    db, role = empty_db, f"gone_{empty_db.name}"
    server.admin_execute(f"create role {role} nologin")
    db.execute(BEFORE_DEPLOY + f"grant select on public.products to {role};")
    record(db, "000", "earlier-run")
    info = take_backup(db.target, tmp_path, "run-2")
    db.execute(DEPLOYMENT + f"revoke all on public.products from {role};")
    server.admin_execute(f"drop role {role}")
    deployed_state, rows = snapshot_of(db), history(db)
    with pytest.raises(RestoreFailed) as failed:
        restore_backup(db.target, info.path, info.sha256, run_id="run-2", operator="alice")
    assert f'role "{role}" does not exist' in str(failed.value)
    assert "rolled back" in str(failed.value)
    assert_identical(deployed_state, snapshot_of(db))
    assert history(db) == rows


def test_a_role_that_does_not_own_the_schemas_is_refused_before_anything_changes(deployed, server):
    db, info, _ = deployed
    role, password = f"helper_{db.name}", secrets.token_urlsafe(16)
    server.admin_execute(f"create role {role} login password '{password}'")
    server.pg.add_pgpass(role, password)
    server.pg.add_service(f"{db.name}_helper", db.name, user=role)
    from runbooks.connection import from_service
    now = snapshot_of(db)
    with pytest.raises(RestoreRefused) as refused:
        restore_backup(from_service(f"{db.name}_helper"), info.path, info.sha256, run_id="run-1", operator="bob")
    message = str(refused.value)
    assert f"role {role} is not a superuser" in message and "schema public is owned by pg_database_owner" in message
    assert "extension citext (in public) is owned by" in message and "Nothing was changed" in message
    assert_identical(now, snapshot_of(db))


def test_an_outside_object_that_cannot_be_put_back_is_refused_before_anything_changes(deployed):
    db, info, _ = deployed
    db.execute("create view auth.org_names as select name from public.organizations")
    now = snapshot_of(db)
    with pytest.raises(RestoreRefused, match=r"view auth\.org_names"):
        restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice")
    assert_identical(now, snapshot_of(db))


def test_the_history_schema_and_platform_schemas_are_never_managed(deployed):
    db, info, _ = deployed
    for schema in ("truthsource", "auth", "pg_catalog"):
        with pytest.raises(RestoreRefused, match="never dropped by a rollback"):
            restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice",
                           managed_schemas=["public", schema])


def test_a_plan_shows_what_will_happen_and_changes_nothing(deployed):
    db, info, _ = deployed
    now = snapshot_of(db)
    plan = plan_restore(db.target, info.path, info.sha256, run_id="run-1", operator="alice")
    described = json.loads(json.dumps(plan.describe()))
    assert described["managed_schemas"] == ["extra", "public", "reporting"]
    assert "DROP SCHEMA IF EXISTS extra, public CASCADE;" in described["prelude_sql"]
    assert "CREATE SCHEMA public;" in described["prelude_sql"]
    assert "INSERT INTO truthsource.deployment_history" in described["postlude_sql"]
    assert described["history_rows_kept"] == 2 and described["archive_entries_restored"] > 0
    assert_identical(now, snapshot_of(db))


def test_changes_to_the_public_schema_itself_are_rolled_back(empty_db, tmp_path):
    # pg_dump writes only how public differs from initdb's: owner, comment, ACL against pg_init_privs
    db = empty_db
    db.execute("""comment on schema public is 'ours';
                  grant create on schema public to authenticated;
                  revoke usage on schema public from public;
                  create table public.t (id int); insert into public.t values (1)""")
    before = snapshot_of(db)
    info = take_backup(db.target, tmp_path, "run-3")
    db.execute("""comment on schema public is null;
                  revoke create on schema public from authenticated;
                  grant usage on schema public to public;
                  grant create on schema public to anon""")
    restore_backup(db.target, info.path, info.sha256, run_id="run-3", operator="alice")
    assert_identical(before, snapshot_of(db))
    assert db.query("select obj_description('public'::regnamespace, 'pg_namespace')") == [("ours",)]


@pytest.mark.skipif(not paths.LEGACY_FIXTURE_FILE.exists(), reason="no legacy fixture yet")
def test_a_legacy_database_comes_back_exactly(legacy_db, tmp_path):
    before = snapshot_of(legacy_db)
    info = take_backup(legacy_db.target, tmp_path, "run-4")
    legacy_db.execute("""create schema deployed; create table deployed.x (id int);
                         create table public.rollback_probe (id int); insert into public.rollback_probe values (1)""")
    restore_backup(legacy_db.target, info.path, info.sha256, run_id="run-4", operator="alice")
    assert_identical(before, snapshot_of(legacy_db))


def test_a_database_owner_that_is_not_a_superuser_can_roll_back_what_it_owns(empty_db, tmp_path, server):
    # Supabase's `postgres` is no superuser: the owner of the database and of the app's objects
    db, role, password = empty_db, f"owner_{empty_db.name}", secrets.token_urlsafe(16)
    server.admin_execute(f"create role {role} login password '{password}'")
    server.admin_execute(f"alter database {db.name} owner to {role}")
    # the shim's default privileges belong to the superuser; this role could not put them back
    db.execute("""alter default privileges in schema public revoke all on tables from anon, authenticated, service_role;
                  alter default privileges in schema public revoke all on functions from anon, authenticated, service_role;
                  alter default privileges in schema public revoke all on sequences from anon, authenticated, service_role""")
    server.pg.add_pgpass(role, password)
    server.pg.add_service(f"{db.name}_owner", db.name, user=role)
    from runbooks.connection import connect, from_service
    owner = from_service(f"{db.name}_owner")
    conn = connect(owner, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("""create schema app;
                       create table app.items (id int primary key, name text);
                       insert into app.items select i, 'item ' || i from generate_series(1, 10) i;
                       create table public.things (id int primary key);
                       insert into public.things select generate_series(1, 5);
                       alter table public.things enable row level security;
                       create policy things_read on public.things for select to authenticated using (true);
                       grant select on public.things to authenticated""")
    conn.close()
    before = snapshot_of(db)
    info = take_backup(db.target, tmp_path, "run-5")
    conn = connect(owner, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("""create schema extra; drop policy things_read on public.things;
                       delete from app.items where id > 5; create table public.more (id int)""")
    conn.close()
    result = restore_backup(owner, info.path, info.sha256, run_id="run-5", operator="owner")
    assert_identical(before, snapshot_of(db))
    assert result.dropped_schemas == ["extra"] and result.kept_schemas == ["app", "public"]


def test_a_backup_written_by_a_newer_pg_dump_restores_on_an_older_server(empty_db, tmp_path, server):
    newest = find_tool("pg_dump", None)
    if newest.major <= server.pg.major:
        pytest.skip(f"no pg_dump newer than the server's {server.pg.major} here")
    db = empty_db
    db.execute("create table public.t (id int primary key, v text); insert into public.t values (1, 'one')")
    before = snapshot_of(db)
    dump = tmp_path / f"{db.name}-newer.dump"
    subprocess.run([str(newest.path), "-Fc", "--no-password", "-f", str(dump), "-d", db.target.conninfo()], check=True)
    db.execute("drop table public.t; create table public.u (id int)")
    # pg_restore 18 writes `SET transaction_timeout`, which PostgreSQL 15 does not know
    result = restore_backup(db.target, dump, sha256_of(dump), run_id="run-6", operator="alice",
                            restored_to="2000-01-01T00:00:00+00:00")
    assert result.pg_restore["major"] == newest.major
    assert_identical(before, snapshot_of(db))


def test_a_backup_that_breaks_while_streaming_is_never_half_committed(deployed):
    # The plan verified the file; if it is damaged afterwards, pg_restore fails mid-script and
    # psql is killed before its input ends, so the drops already sent are rolled back.
    db, info, _ = deployed
    plan = plan_restore(db.target, info.path, info.sha256, run_id="run-1", operator="alice")
    dump = plan.backup_path
    dump.write_bytes(dump.read_bytes()[: info.size_bytes // 2])
    deployed_state, rows = snapshot_of(db), history(db)
    with pytest.raises(RestoreFailed, match="pg_restore could not read.*rolled back"):
        execute_plan(plan, db.target)
    assert_identical(deployed_state, snapshot_of(db))
    assert history(db) == rows


def test_a_session_holding_a_lock_makes_the_rollback_fail_fast_and_change_nothing(deployed):
    db, info, _ = deployed
    blocker = db.connect()
    with blocker.cursor() as cur:
        cur.execute("select count(*) from public.products")   # holds ACCESS SHARE until rollback
    try:
        deployed_state = snapshot_of(db)
        with pytest.raises(RestoreFailed, match="lock timeout"):
            restore_backup(db.target, info.path, info.sha256, run_id="run-1", operator="alice",
                           lock_timeout="300ms")
    finally:
        blocker.rollback()
        blocker.close()
    assert_identical(deployed_state, snapshot_of(db))


def test_a_restore_script_cut_short_is_rolled_back_never_committed(deployed):
    # psql --single-transaction would COMMIT when its input ends: a feeder killed with the runner and
    # its kernel would leave half a restore. The script commits in its last line, or not at all.
    db, info, _ = deployed
    plan = plan_restore(db.target, info.path, info.sha256, run_id="run-1", operator="alice")
    assert plan.prelude_sql.count("BEGIN;") == 1 and plan.postlude_sql.rstrip().endswith("COMMIT;")
    deployed_state, rows = snapshot_of(db), history(db)
    psql = subprocess.run([str(plan.psql.path), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password",
                           "-d", db.target.conninfo(), "-f", "-"],
                          input=plan.prelude_sql, capture_output=True, text=True)   # the drops, then the end
    assert psql.returncode == 0, psql.stderr
    assert_identical(deployed_state, snapshot_of(db))
    assert history(db) == rows


def test_a_backup_of_another_database_with_the_same_identity_row_is_refused(deployed, server):
    db, info, _ = deployed
    conn = db.connect()
    try:
        identity.ensure_identity(conn)
        conn.commit()
    finally:
        conn.close()
    again = take_backup(db.target, Path(info.path).parent / "again", "run-7")   # records the identity row too
    copy = server.create_database("empty")
    try:   # a database that merely resembles it: the identity row copied along, as a dump and restore would
        copy.execute(f"create schema truthsource; create table {identity.IDENTITY_TABLE} as "
                     f"select true as singleton, '{again.identity['database_uuid']}'::uuid as database_uuid")
        before = snapshot_of(copy)
        with pytest.raises(RestoreRefused, match=f"is a backup of database {db.name} .*database oid"):
            restore_backup(copy.target, again.path, again.sha256, run_id="run-7", operator="alice")
        assert_identical(before, snapshot_of(copy))
    finally:
        server.drop_database(copy)


def another_superuser(db, server, name: str):
    """A second superuser of the server, logging in through .pgpass, as the target of a libpq service."""
    from runbooks.connection import from_service
    role, password = f"{name}_{db.name}", secrets.token_urlsafe(16)
    server.admin_execute(f"create role {role} login superuser password '{password}'")
    server.pg.add_pgpass(role, password)
    server.pg.add_service(f"{db.name}_{name}", db.name, user=role)
    return role, from_service(f"{db.name}_{name}")


def test_a_superuser_other_than_the_extensions_owner_re_creates_it_as_its_owner_and_the_proof_holds(deployed, server):
    db, info, before = deployed
    owner = db.query("select extowner::regrole::text from pg_extension where extname = 'citext'")[0][0]
    role, target = another_superuser(db, server, "second_su")
    assert role != owner
    plan = plan_restore(target, info.path, info.sha256, run_id="run-1", operator="carol")
    assert plan.describe()["extensions_recreated"] == [f"citext (as its owner {owner})"]
    execute_plan(plan, target)
    assert_identical(before, snapshot_of(db))
    assert db.query("select extowner::regrole::text from pg_extension where extname = 'citext'") == [(owner,)]


def test_an_extension_whose_owner_could_not_re_create_it_is_a_rollback_blocker_before_the_deployment(empty_db, server):
    from runbooks.connection import connect
    from runbooks.restore import rollback_blockers
    db = empty_db
    role, target = another_superuser(db, server, "ext_owner")
    conn = connect(target, autocommit=True)
    with conn.cursor() as cur:
        cur.execute("create extension pg_buffercache with schema public")   # not trusted: a superuser's
    conn.close()
    server.admin_execute(f"alter role {role} nosuperuser")
    conn = connect(db.target, readonly=True)
    try:
        blockers = rollback_blockers(conn)
    finally:
        conn.close()
    assert any(f"extension pg_buffercache (in public) is owned by {role}, which may not create it" in b
               for b in blockers), blockers


def test_an_extension_re_created_under_its_owners_default_privileges_gets_exactly_the_grants_it_had(
        empty_db, tmp_path, server):
    """Supabase's postgres has default privileges in public (grant all on functions to anon, authenticated,
    service_role); an extension created there before them has none of those grants, and a rollback that
    re-creates it as its owner must not give them. pgcrypto where the server has it (Debian's 15; the
    embedded 18 is built without OpenSSL), else ltree: another extension of many functions."""
    db = empty_db
    owner = db.query("select current_user")[0][0]
    [(extension,)] = db.query("select name from pg_available_extensions where name in ('pgcrypto', 'ltree') "
                              "order by name = 'pgcrypto' desc limit 1")
    db.execute(f"""alter default privileges for role {owner} in schema public
                     revoke all on functions from anon, authenticated, service_role;
                   create extension {extension} with schema public;
                   alter default privileges for role {owner} in schema public
                     grant all on functions to anon, authenticated, service_role""")
    record(db, "000", "earlier-run")
    before = snapshot_of(db)
    info = take_backup(db.target, tmp_path, "run-1")
    db.execute("create table public.made_by_the_deployment (id int primary key)")
    role, target = another_superuser(db, server, "restorer")
    plan = plan_restore(target, info.path, info.sha256, run_id="run-1", operator="carol")
    assert plan.describe()["extensions_recreated"] == [f"{extension} (as its owner {owner})"]
    execute_plan(plan, target)
    assert_identical(before, snapshot_of(db))
    granted = db.query("""select count(*) from pg_proc p join pg_depend d on d.objid = p.oid
                            and d.classid = 'pg_proc'::regclass and d.deptype = 'e'
                          join pg_extension x on x.oid = d.refobjid and x.extname = %s
                          where array_to_string(p.proacl, ',') like '%%anon=%%'""", (extension,))
    assert granted == [(0,)]
    # the owner's default privileges themselves are as they were
    assert db.query(f"""select count(*) from pg_default_acl where defaclrole = '{owner}'::regrole
                          and defaclnamespace = 'public'::regnamespace and defaclobjtype = 'f'""") == [(1,)]
