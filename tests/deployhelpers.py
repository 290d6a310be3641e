"""Helpers shared by tests/test_preflight.py, test_verification.py and test_rollback.py.

A fully migrated database (the legacy fixture with the three phases applied through the apply
engine, so the deployment history matches the files on disk) is built once per server and
cloned per test: a clone takes milliseconds, the phases take seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import psycopg2
import pytest

import conftest  # tests/conftest.py: the Database class
from runbooks import connection, engine, fixtures, notebook, records
from runbooks.paths import PHASES

PHASE3_FILE = PHASES[2][1]
needs_phase3 = pytest.mark.skipif(not PHASE3_FILE.is_file(),
                                  reason=f"{PHASE3_FILE.name} (phase 3) is not written yet: verification calls its functions")
TEMPLATE_RUN_ID = "20000101T000000Z-7e57ab"
_counter = itertools.count()


VARIANT_FIXTURE = Path(__file__).parent / "fixtures" / "legacy_variant.sql"


def migrated_template(server, start: str = "legacy") -> str:
    """A database with the three phases applied through the engine (built once per server and start).

    start: 'legacy' (the legacy fixture), 'empty' (the Supabase shim alone) or 'variant'
    (tests/fixtures/legacy_variant.sql: another legacy shape).
    """
    templates = server.__dict__.setdefault("_deployment_templates", {})
    if start not in templates:
        db = server.create_database("legacy" if start == "legacy" else "shim")
        if start == "variant":
            conn = psycopg2.connect(db.dsn)
            try:
                fixtures.run_script(conn, VARIANT_FIXTURE)
            finally:
                conn.close()
        apply_engine = engine.ApplyEngine(db.target, run_id=TEMPLATE_RUN_ID, operator="template-builder")
        for version, path in PHASES:
            apply_engine.apply(version, path)
        templates[start] = db.name
    return templates[start]


def clone(server, template: str) -> conftest.Database:
    name = f"d{next(_counter)}_{template}"[:63]
    server.admin_execute(f"create database {name} template {template}")
    server.pg.add_service(name, name)
    return conftest.Database(name, server.pg)


@pytest.fixture
def migrated_db(server):
    """A clone of the migrated legacy database, dropped after the test."""
    if not PHASE3_FILE.is_file():
        pytest.skip(f"{PHASE3_FILE.name} (phase 3) is not written yet")
    db = clone(server, migrated_template(server))
    yield db
    server.drop_database(db)


def make_run(db, record_dir: Path, run_id: str | None = None, *, readonly: bool = True) -> notebook.Run:
    """A notebook Run without a kernel: what a notebook's setup() gives, for the package's steps."""
    conn = db.connect(readonly=readonly, autocommit=True)
    return notebook.Run(notebook="test", target=db.target, run_id=run_id or records.new_run_id(), operator="tester",
                        record_dir=Path(record_dir), conn=conn, facts=connection.server_facts(conn))


def readonly(db):
    """A read-only autocommit connection, as notebooks have."""
    return db.connect(readonly=True, autocommit=True)
