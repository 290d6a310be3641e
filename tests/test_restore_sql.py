"""The rollback's SQL text (restore_sql): the script's pieces read and run as they claim."""

import pytest

from runbooks import restore_sql

pytestmark = pytest.mark.both_versions   # the restore's SQL branches on the server's version (SET ROLE from 16)


def test_a_created_public_gets_exactly_the_privileges_initdb_gives_it():
    assert restore_sql.public_baseline(None) == [
        "CREATE SCHEMA public;", "ALTER SCHEMA public OWNER TO pg_database_owner;",
        "COMMENT ON SCHEMA public IS 'standard public schema';", "GRANT USAGE ON SCHEMA public TO PUBLIC;"]


def test_recorded_initial_privileges_of_public_become_grants_the_owner_s_own_left_implicit():
    grants = restore_sql.public_baseline(["pg_database_owner=UC/pg_database_owner", "=U/pg_database_owner",
                                          "app=U*C/pg_database_owner"])[3:]
    assert grants == ["GRANT USAGE ON SCHEMA public TO PUBLIC;", "GRANT USAGE ON SCHEMA public TO app WITH GRANT OPTION;",
                      "GRANT CREATE ON SCHEMA public TO app;"]


def test_a_value_with_a_nul_character_never_reaches_the_script():
    with pytest.raises(restore_sql.UnsafeValue, match="NUL"):
        restore_sql.literal("run\x00id")
    assert restore_sql.literal("it's") == "'it''s'"


def test_identifiers_are_quoted_only_when_they_must_be_and_read_back_as_their_names():
    assert restore_sql.quote_ident("app_1") == "app_1"
    assert restore_sql.quote_ident('My "Schema"') == '"My ""Schema"""'
    assert restore_sql.unquote(restore_sql.quote_ident('My "Schema"')) == 'My "Schema"'


def test_the_extensions_pg_restore_creates_are_read_with_their_schemas():
    script = ('CREATE EXTENSION IF NOT EXISTS citext WITH SCHEMA public;\n'
              'COMMENT ON EXTENSION citext IS \'x\';\n'
              'CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA "My Schema";\n')
    assert restore_sql.extension_schemas(script) == {"citext": "public", "uuid-ossp": "My Schema"}


def test_an_extension_owned_by_another_role_is_created_as_that_role_and_others_are_left_as_they_are():
    line = b"CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;\n"
    assert restore_sql.as_extension_owner(line, {"pg_trgm": "Ext Owner"}) == (
        b'SET ROLE "Ext Owner";\nCREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;\nRESET ROLE;\n')
    assert restore_sql.as_extension_owner(line, {"citext": "someone"}) == line
    assert restore_sql.as_extension_owner(b"SELECT 1;\n", {"pg_trgm": "x"}) == b"SELECT 1;\n"


def test_the_script_opens_a_transaction_that_only_its_last_line_commits():
    prelude = restore_sql.prelude(database="app", file_name="pre.dump", sha="ab" * 32, run_id="run-1",
                                  lock_timeout="30s", reset_roles=["postgres"], kept=["public"], dropped=["private"],
                                  create_public=False, public_init=None)
    postlude = restore_sql.postlude(history_rows=[{"id": 1}, {"id": 2}], history_exists=True, file_name="pre.dump",
                                    sha="ab" * 32, operator="alice", run_id="run-1",
                                    restored_to="2026-01-01T00:00:00+00:00", entries=12, schemas=["public"])
    assert prelude.count("BEGIN;") == 1 and "COMMIT" not in prelude
    assert "DROP SCHEMA IF EXISTS private CASCADE;" in prelude and "CREATE SCHEMA public" not in prelude
    assert postlude.rstrip().endswith("COMMIT;") and postlude.count("COMMIT;") == 1
    assert "ANY ('{1,2}'::bigint[])) <> 2" in postlude


def test_the_script_s_sql_runs_on_the_server_and_is_rolled_back_without_its_last_line(empty_db):
    # prelude (emptying public, created again as initdb leaves it) then no COMMIT: nothing stays
    empty_db.execute("create schema gone; create table public.t (id int)")
    prelude = restore_sql.prelude(database="x", file_name="pre.dump", sha="0" * 64, run_id="run-1",
                                  lock_timeout="5s", reset_roles=[], kept=[], dropped=["gone", "public"],
                                  create_public=True, public_init=None)
    conn = empty_db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(prelude)
            cur.execute("select to_regnamespace('gone') is null, to_regclass('public.t') is null, "
                        "pg_get_userbyid(nspowner) from pg_namespace where nspname = 'public'")
            assert cur.fetchone() == (True, True, "pg_database_owner")
            cur.execute("rollback")
    finally:
        conn.close()
    assert empty_db.query("select to_regnamespace('gone') is not null, to_regclass('public.t') is not null") == [
        (True, True)]


def test_acts_for_is_true_for_the_connecting_role_itself(empty_db):
    assert empty_db.query(f"select {restore_sql.acts_for('current_user')}") == [(True,)]
