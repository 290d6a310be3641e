"""A database owner that is not a superuser -- Supabase's `postgres` -- deploys and rolls back.

Each database here is built the way the rehearsal shim leaves a Supabase project: the superuser
applies the shim (so schema public carries default privileges FOR ROLE postgres, a role the owner
is not a member of, like Supabase's supabase_admin), public and the app objects belong to the owner,
and the owner's password is only in .pgpass. A rollback empties public instead of dropping it,
leaves the foreign default privileges alone, and puts everything else back exactly; a deployment
that could not be rolled back is refused by the preflight before anything changes.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from runbooks import cli, connection, engine, fixtures, paths, preflight, records, restore, snapshot
from runbooks.backup import take_backup

from runhelpers import OwnerDatabase, assert_identical, history, run_check, snapshot_of

pytestmark = pytest.mark.both_versions   # what an owner who is no superuser may do changed in 16

VARIANT = Path(__file__).parent / "fixtures" / "legacy_variant.sql"
UNSEEN = Path(__file__).parent / "fixtures" / "legacy_unseen.sql"   # written after every step it meets
LEGACY = paths.LEGACY_FIXTURE_FILE
_numbers = itertools.count()

DEFAULT_PRIVILEGES_SQL = """
select pg_get_userbyid(d.defaclrole), coalesce(n.nspname, '(global)'), d.defaclobjtype::text,
       d.defaclacl::text[]
from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace
order by 1, 2, 3"""


@dataclass
class OwnedDatabase(OwnerDatabase):
    """A database, its owner (no superuser) and the owner's password."""

    password: str = ""


@pytest.fixture
def owned_db(server):
    """Factory: owned_db(legacy shape file) -> an OwnedDatabase holding that legacy shape."""
    made: list[OwnedDatabase] = []

    def make(shape: Path) -> OwnedDatabase:
        number = next(_numbers)
        db = OwnedDatabase(server, f"owned_{number}", f"app_owner_{number}", "Owner-" + secrets.token_urlsafe(18))
        server.admin_execute(f"create role {db.owner} login createrole password '{db.password}'")
        server.admin_execute(f"create database {db.name} owner {db.owner}")
        made.append(db)
        conn = psycopg2.connect(server.pg.conninfo(db.name))
        try:
            # as the superuser: roles, auth, and default privileges FOR ROLE postgres in public
            assert fixtures.load_shim(conn)
            with conn.cursor() as cur:
                cur.execute(f"""grant all on schema auth to {db.owner};
                                grant all on auth.users to {db.owner};
                                grant anon, authenticated, service_role to {db.owner};
                                alter schema public owner to {db.owner};
                                set role {db.owner}""")
                cur.execute(Path(shape).read_text())
            conn.commit()
        finally:
            conn.close()
        server.pg.add_pgpass(db.owner, db.password)
        server.pg.add_service(db.name, db.name, user=db.owner)
        return db

    yield make
    for db in made:
        server.admin_execute(f"drop database if exists {db.name} with (force)")
        server.admin_execute(f"drop role if exists {db.owner}")


def record_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def deploy_then_roll_back(db: OwnedDatabase, root: Path) -> None:
    """`runbook deploy`, then `runbook rollback --yes` of that run, as the owner, checked end to end."""
    before = snapshot_of(db)
    default_privileges = db.as_superuser(DEFAULT_PRIVILEGES_SQL)
    assert {(role, schema, kind) for role, schema, kind, _ in default_privileges} == {
        ("postgres", "public", "r"), ("postgres", "public", "S"), ("postgres", "public", "f")}

    assert cli.main(["deploy", "--service", db.name, "--records", str(root)]) == 0
    [deploy_run] = [p.name for p in root.iterdir()]
    deployed = history(db)
    assert [(r["version"], r["run_id"], r["applied_by"]) for r in deployed] == [
        (version, deploy_run, deployed[0]["applied_by"]) for version, _ in paths.PHASES]
    assert not snapshot.compare_snapshots(before, snapshot_of(db)).identical

    assert cli.main(["rollback", "--service", db.name, "--run", deploy_run, "--yes", "--records", str(root)]) == 0
    [rollback_run] = [p.name for p in root.iterdir() if p.name != deploy_run]
    assert_identical(before, snapshot_of(db))

    # the history keeps every row and gains the rollback's; nothing of the deployment counts as applied
    rows = history(db)
    assert [r["id"] for r in rows[:-1]] == [r["id"] for r in deployed]
    assert (rows[-1]["version"], rows[-1]["action"], rows[-1]["run_id"]) == ("rollback", "rollback", rollback_run)
    assert engine.latest_applied(rows) == {}
    # public was emptied, not dropped; the default privileges of postgres in it were never touched
    assert db.as_superuser(DEFAULT_PRIVILEGES_SQL) == default_privileges
    assert db.as_superuser("select pg_get_userbyid(nspowner) from pg_namespace where nspname = 'public'") == [
        (db.owner,)]
    plan = next(c for c in records.Record.open(root, rollback_run).manifest()["notebooks"][0]["checks"]
                if c["name"] == "restore_plan")
    emptied = plan["summary"].split(";")[0]
    assert plan["status"] in ("ok", "warning") and emptied.startswith("empty ") and "public" in emptied
    # the password is in no file of either record
    for run in (deploy_run, rollback_run):
        assert db.password.encode() not in record_bytes(root / run)
        assert records.Record.open(root, run).verify() == []


@pytest.mark.slow
def test_an_owner_that_is_no_superuser_deploys_and_rolls_back_a_legacy_database_this_project_has_never_seen(
        owned_db, tmp_path):
    db = owned_db(VARIANT)
    deploy_then_roll_back(db, tmp_path / "records")
    # phase 1 dropped the duplicate updated-at function in schema extensions: it is back (the
    # snapshot does not describe the platform schemas, so ask)
    assert db.as_superuser("select to_regprocedure('extensions.moddatetime()') is not null") == [(True,)]


@pytest.mark.slow
def test_a_legacy_shape_written_after_every_step_deploys_and_rolls_back_and_its_preflight_reads_an_enum_role(
        owned_db, tmp_path):
    # the benchmark's first run of this shape found the preflight's rule queries written for text columns
    db = owned_db(UNSEEN)
    found = {r["rule"]: r for r in run_check(db, preflight.legacy_rule_breakers).rows}
    assert found["member role other than owner, admin, member, viewer"]["sample"] == "guest"
    deploy_then_roll_back(db, tmp_path / "records")


@pytest.mark.slow
def test_an_owner_that_is_no_superuser_deploys_and_rolls_back_the_shipped_legacy_fixture(owned_db, tmp_path):
    deploy_then_roll_back(owned_db(LEGACY), tmp_path / "records")


@pytest.mark.slow
def test_a_deployment_that_could_not_be_rolled_back_is_refused_by_the_preflight_before_anything_changes(
        owned_db, tmp_path):
    db = owned_db(LEGACY)
    # an object in public that the owner cannot act for: a rollback could not re-create it as postgres's
    db.as_superuser("create table public.platform_notes (id int)")
    before = snapshot_of(db)
    root = tmp_path / "records"
    assert cli.main(["deploy", "--service", db.name, "--records", str(root)]) == 1
    [run] = [p.name for p in root.iterdir()]
    manifest = records.Record.open(root, run).manifest()
    assert [n["status"] for n in manifest["notebooks"]] == ["failed", "not run", "not run", "not run", "not run"]
    error = manifest["notebooks"][0]["error"]
    assert "a rollback would be impossible" in error and "table public.platform_notes" in error
    assert "owned by postgres" in error
    assert not (root / run / "backup").exists()                      # stopped before the backup
    assert db.as_owner("select to_regnamespace('truthsource'), to_regnamespace('private')") == [(None, None)]
    assert_identical(before, snapshot_of(db))


def test_the_preflight_names_each_rollback_blocker_and_the_role_that_owns_it(owned_db):
    db = owned_db(LEGACY)
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    try:
        clean = preflight.privileges(conn)
        assert restore.rollback_blockers(conn) == []
        db.as_superuser("create table public.platform_notes (id int); create extension if not exists citext")
        blocked = preflight.privileges(conn)
        blockers = restore.rollback_blockers(conn)
    finally:
        conn.close()
    assert clean.status == "ok" and "least privilege" in clean.summary
    assert {r["requirement"]: r["ok"] for r in clean.rows}[preflight.ROLLBACK_REQUIREMENT] == "yes"
    assert len(blockers) == 2
    assert blockers[0] == (f"extension citext (in public) is owned by postgres, which role {db.owner} cannot act for: "
                           "a rollback drops and re-creates it")
    assert blockers[1].startswith("1 object(s) in the app schemas are owned by postgres, which role "
                                  f"{db.owner} cannot act for (table public.platform_notes)")
    assert blocked.status == "error"
    assert [r["detail"] for r in blocked.rows if r["needed for"] == "rollback"] == blockers
    assert "a rollback would be impossible, so the deployment is refused before it starts" in blocked.summary


def test_a_superuser_is_refused_too_when_an_object_outside_the_app_schemas_would_be_lost(server, owned_db):
    db = owned_db(LEGACY)
    db.as_superuser("create view auth.organization_names as select name from public.organizations")
    conn = psycopg2.connect(server.pg.conninfo(db.name))   # the superuser
    conn.autocommit = True
    try:
        blockers = restore.rollback_blockers(conn)
        check = preflight.privileges(conn)
    finally:
        conn.close()
    assert len(blockers) == 1 and "view auth.organization_names" in blockers[0]
    assert check.status == "error" and "view auth.organization_names" in check.summary


def owner_deployment(db: OwnedDatabase, tmp_path: Path):
    """A backup and a snapshot as the owner, then changes to public a deployment might make."""
    before = snapshot_of(db)
    info = take_backup(db.target, tmp_path, "run-owner")
    db.as_owner("""create schema extra; create table extra.t (id int);
                   create table public.added (id int primary key); insert into public.added values (1);
                   alter table public.products add column extra_note text;
                   delete from public.inventory;
                   create function public.added_fn() returns int language sql as 'select 1';
                   create type public.added_mood as enum ('calm');
                   alter default privileges in schema public grant select on tables to anon""")
    return before, info


def refused_rollback(db: OwnedDatabase, info) -> str:
    """Roll back to `info`'s backup as the owner, expecting a refusal: its message, once the
    database is checked unchanged."""
    now = snapshot_of(db)
    with pytest.raises(restore.RestoreRefused) as refused:
        restore.restore_backup(db.target, info.path, info.sha256, run_id="run-owner", operator="owner")
    assert_identical(now, snapshot_of(db))
    return str(refused.value)


def test_the_kept_schemas_foreign_default_privileges_survive_the_rollback_unchanged(owned_db, tmp_path):
    db = owned_db(LEGACY)
    default_privileges = db.as_superuser(DEFAULT_PRIVILEGES_SQL)
    before, info = owner_deployment(db, tmp_path)
    result = restore.restore_backup(db.target, info.path, info.sha256, run_id="run-owner", operator="owner")
    assert_identical(before, snapshot_of(db))
    assert result.kept_schemas == ["app", "public"] and result.dropped_schemas == ["extra"]
    assert result.default_privileges_reset == [db.owner]
    assert "the default privileges of postgres in schema public for tables" in result.kept_as_they_are
    assert "FOR ROLE postgres" not in result.prelude_sql and "DROP SCHEMA IF EXISTS extra CASCADE;" in result.prelude_sql
    assert db.as_superuser(DEFAULT_PRIVILEGES_SQL) == default_privileges
    # the owner's own default privileges, added by the deployment, are gone again
    assert [r for r in db.as_superuser(DEFAULT_PRIVILEGES_SQL) if r[0] == db.owner] == []


def test_foreign_default_privileges_changed_since_the_backup_are_refused_naming_the_role_that_could_put_them_back(
        owned_db, tmp_path):
    db = owned_db(LEGACY)
    _, info = owner_deployment(db, tmp_path)
    db.as_superuser("alter default privileges for role postgres in schema public revoke all on tables from anon")
    message = refused_rollback(db, info)
    assert f"role {db.owner} is not a superuser" in message and "Nothing was changed" in message
    assert ("the default privileges of postgres in schema public for tables changed since the backup was taken; "
            "only postgres or a superuser can put them back") in message


def test_a_kept_schema_whose_comment_changed_is_refused_when_re_creating_it_would_need_another_role(
        owned_db, tmp_path):
    db = owned_db(LEGACY)
    _, info = owner_deployment(db, tmp_path)
    db.as_owner("comment on schema public is 'changed by the deployment'")
    message = refused_rollback(db, info)
    assert "the comment on schema public changed since the backup was taken" in message
    assert "cannot act for postgres, whose objects or default privileges the backup has in it" in message


def test_a_trusted_extension_the_owner_created_in_public_is_no_blocker_and_a_rollback_re_creates_it_as_the_owner(
        owned_db, tmp_path):
    db = owned_db(LEGACY)
    # pg_trgm is trusted: the database owner (CREATE on the database) may create it, and drop it again
    db.as_owner("create extension pg_trgm with schema public; "
                "create index products_name_trgm on public.products using gin (name public.gin_trgm_ops)")
    assert db.as_owner("select trusted from pg_available_extension_versions v join pg_available_extensions a "
                       "on a.name = v.name and a.default_version = v.version where v.name = 'pg_trgm'") == [(True,)]
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    try:
        assert restore.rollback_blockers(conn) == []
        assert preflight.privileges(conn).status == "ok"
    finally:
        conn.close()
    before, info = owner_deployment(db, tmp_path)
    db.as_owner("drop index public.products_name_trgm")
    result = restore.restore_backup(db.target, info.path, info.sha256, run_id="run-owner", operator="owner")
    assert result.extensions_recreated == ["pg_trgm"]
    assert_identical(before, snapshot_of(db))
    assert db.as_superuser("select extowner::regrole::text, extnamespace::regnamespace::text from pg_extension "
                           "where extname = 'pg_trgm'") == [(db.owner, "public")]
    assert db.as_owner("select count(*) from pg_indexes where indexname = 'products_name_trgm'") == [(1,)]


def test_an_untrusted_extension_and_a_trusted_one_the_role_could_not_put_back_are_rollback_blockers(
        owned_db, server):
    db = owned_db(LEGACY)
    db.as_owner("create extension pg_trgm with schema public")
    # an untrusted extension the owner created while it was a superuser
    server.admin_execute(f"alter role {db.owner} superuser")
    db.as_owner("create extension pg_buffercache with schema public")
    server.admin_execute(f"alter role {db.owner} nosuperuser")
    server.admin_execute(f"revoke create on database {db.name} from {db.owner}, public")
    db.as_superuser("create extension citext with schema public")     # the superuser's: trusted, but not the owner's
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    try:
        blockers = restore.rollback_blockers(conn)
    finally:
        conn.close()
    assert (f"extension citext (in public) is owned by postgres, which role {db.owner} cannot act for: a rollback "
            "drops and re-creates it") in blockers
    assert (f"extension pg_trgm (in public) is trusted, but its owner {db.owner} has no CREATE privilege on the "
            "database, which re-creating it needs") in blockers
    assert "extension pg_buffercache (in public) is not trusted: dropping and re-creating it needs a superuser" in blockers


def test_a_table_in_a_publication_another_role_owns_is_a_rollback_blocker(owned_db):
    db = owned_db(LEGACY)
    # the rollback drops public.products, which takes it out of the publication; only its owner may add it back
    db.as_superuser("create publication app_changes for table public.products")
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    try:
        blockers = restore.rollback_blockers(conn)
    finally:
        conn.close()
    assert (f"table products is in publication app_changes, owned by postgres, which role {db.owner} cannot act for: "
            "a rollback drops and re-creates it, and only the publication's owner may add it back "
            f"(make {db.owner} its owner, or roll back as a superuser)") in blockers
    db.as_superuser(f"alter publication app_changes owner to {db.owner}")
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    try:
        assert restore.rollback_blockers(conn) == []
    finally:
        conn.close()
