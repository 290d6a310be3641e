"""A Supabase-initialised database for the tests: the fixture `supabase_db` and what it is made of.

`supabase_db(shape)` makes a database the way Supabase initialises a project
(tests/fixtures/supabase_platform.sql: platform roles, auth owned by supabase_admin, extensions,
PostgREST's event triggers, storage, the realtime publication, public's default privileges), loads
the app's legacy shape as the project's `postgres`, then real projects' additions
(tests/fixtures/supabase_additions.sql: handle_new_user() on auth.users, products in
supabase_realtime, a storage policy calling a public function, pg_trgm in public).

The test cluster's bootstrap superuser is itself named postgres, so the project's `postgres` is the
role OWNER here: no superuser, CREATEROLE, BYPASSRLS, a member of the API roles, owner of the
database, its password only in .pgpass. The libpq service of the database's name connects as OWNER.
Import the fixture where it is used: `from supabase_project import supabase_db`.
"""

from __future__ import annotations

import itertools
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from runhelpers import OwnerDatabase

FIXTURES = Path(__file__).parent / "fixtures"
PLATFORM_SQL = FIXTURES / "supabase_platform.sql"
ADDITIONS_SQL = FIXTURES / "supabase_additions.sql"
OWNER = "sb_postgres"      # the project's `postgres`
# pg_graphql's resolver, which graphql_public.graphql() calls (pg_graphql cannot be installed on the test servers):
# with it, the verification's pg_graphql rules apply as they do where the extension is installed
GRAPHQL_STAND_IN = """create schema graphql;
    create function graphql.resolve(query text, variables jsonb default '{}', "operationName" text default null,
                                    extensions jsonb default null) returns jsonb
    language sql set search_path = '' as 'select null::jsonb'"""
_numbers = itertools.count()
_passwords: dict[int, str] = {}   # server port -> OWNER's password on that server


@dataclass
class SupabaseDatabase(OwnerDatabase):
    """A Supabase-like project database; its service connects as OWNER."""

    owner: str = OWNER

    def psql_as_superuser(self, path: Path) -> None:
        """A fixture file through psql, with -v owner=OWNER; a failure shows psql's stderr."""
        done = subprocess.run([str(self.server.pg.binary("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                               "-v", f"owner={self.owner}", "-d", self.server.pg.conninfo(self.name), "-f", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.fail(f"{path.name} failed on {self.name}:\n{done.stderr[-4000:]}")


def _owner_role(server) -> None:
    """OWNER on this server, once: a login role whose password only .pgpass knows."""
    port = server.pg.port
    if port in _passwords:
        return
    password = "Sb-" + secrets.token_urlsafe(18)
    server.admin_execute(f"""do $$ begin
        if not exists (select 1 from pg_roles where rolname = '{OWNER}') then create role {OWNER} login; end if;
        end $$; alter role {OWNER} login password '{password}'""")
    server.pg.add_pgpass(OWNER, password)
    _passwords[port] = password


@pytest.fixture
def supabase_db(server):
    """Factory: supabase_db(legacy shape file or None, additions=True) -> a SupabaseDatabase."""
    made: list[SupabaseDatabase] = []

    def make(shape: Path | None, additions: bool = True) -> SupabaseDatabase:
        _owner_role(server)
        db = SupabaseDatabase(server, f"supabase_{next(_numbers)}")
        server.admin_execute(f"create database {db.name} owner {OWNER}")
        made.append(db)
        server.pg.add_service(db.name, db.name, user=OWNER)
        db.psql_as_superuser(PLATFORM_SQL)
        if shape is not None:
            conn = db.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(Path(shape).read_text())
                conn.commit()
            finally:
                conn.close()
        if additions:
            db.psql_as_superuser(ADDITIONS_SQL)
        return db

    yield make
    for db in made:
        server.drop_database(db)
