"""`runbook rehearse`: a whole deployment on a throwaway server, no database needed.

An embedded PostgreSQL is started, a database gets the Supabase shim and the legacy fixture
(with its data), and the deployment plan runs against it exactly as `runbook deploy` runs
against a real target: through a libpq service, with the password only in a private .pgpass.
"""

from __future__ import annotations

from pathlib import Path

import psycopg2

from . import connection, fixtures, runner
from .embedded import EmbeddedPostgres

DATABASE = "truthsource_rehearsal"
SERVICE = "rehearsal"


def prepare_database(pg: EmbeddedPostgres, dbname: str = DATABASE, legacy: bool = True, shim: bool = True) -> None:
    """A database on an embedded server, with the shim and the legacy fixture (each unless told not);
    the server's own .pgpass logs in, whatever the environment says."""
    admin = psycopg2.connect(pg.conninfo("postgres"), passfile=str(pg.client.pgpass_file))
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'create database "{dbname}"')
    finally:
        admin.close()
    if not shim:
        return
    conn = psycopg2.connect(pg.conninfo(dbname), passfile=str(pg.client.pgpass_file))
    try:
        fixtures.load_shim(conn)
        if legacy:
            fixtures.load_legacy_fixture(conn)
    finally:
        conn.close()


def rehearse(records_root: Path, progress=print) -> runner.Outcome:
    with EmbeddedPostgres() as pg:
        progress(f"rehearsal: embedded PostgreSQL {pg.version} on {pg.host}:{pg.port} "
                 f"(binaries {pg.bin_dir}); loading the Supabase shim and the legacy fixture")
        pg.add_service(SERVICE, DATABASE)
        with runner.environment(pg.client_env()):
            prepare_database(pg)
            target = connection.from_service(SERVICE)
            return runner.run_plan("rehearse", runner.DEPLOY_PLAN, target, records_root=records_root,
                                   progress=progress, manifest_extra={"rehearsal": {
                                       "server": f"embedded PostgreSQL {pg.version}",
                                       "fixture": "sql/support/legacy_fixture.sql"}})
