"""Helpers for the tests of the runbooks and their steps (preflight, verification, rollback,
maintenance, troubleshooting, the CLI): runs without a kernel, read-only connections, snapshots,
the deployment history, and what an executed notebook shows. SQL-level helpers are in sqlhelpers.py;
databases come from the fixtures of conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import nbformat
import psycopg2

from runbooks import cli, connection, engine, notebook, preflight, records, snapshot
from sqlhelpers import query_once, wait_until


def runbook(*args) -> int:
    """The `runbook` command, in this process: its exit code."""
    return cli.main([str(a) for a in args])


def readonly(db):
    """A read-only autocommit connection, as notebooks have."""
    return db.connect(readonly=True, autocommit=True)


def run_check(db, check, *args, **kwargs):
    """One check function, called on a read-only connection of its own."""
    conn = readonly(db)
    try:
        return check(conn, *args, **kwargs)
    finally:
        conn.close()


def make_run(db, record_dir: Path, run_id: str | None = None, *, readonly: bool = True) -> notebook.Run:
    """What a notebook's setup() returns, without a kernel, so steps and checks can be called directly.

    record_dir is the run's own folder (created, as setup() does); a run that looks for earlier
    runs beside it (maintenance's daily activity) wants records_root / run_id.
    """
    folder = Path(record_dir)
    folder.mkdir(parents=True, exist_ok=True)
    conn = db.connect(readonly=readonly, autocommit=True)
    return notebook.Run(notebook="test", target=db.target, run_id=run_id or records.new_run_id(), operator="tester",
                        record_dir=folder, conn=conn, facts=connection.server_facts(conn))


def snapshot_of(db, **kwargs) -> dict:
    """snapshot.take_snapshot of the database, on a connection of its own."""
    conn = readonly(db)
    try:
        return snapshot.take_snapshot(conn, **kwargs)
    finally:
        conn.close()


def assert_identical(before: dict, after: dict) -> None:
    comparison = snapshot.compare_snapshots(before, after)
    assert comparison.identical, json.dumps(comparison.as_dict()["problems"] + [comparison.differences], indent=1)


def history(db) -> list[dict]:
    """The deployment history rows, oldest first."""
    conn = readonly(db)
    try:
        return engine.read_history(conn)
    finally:
        conn.close()


def sign_off_window(start_hours: float, end_hours: float) -> str:
    """A change window (start/end in UTC, the format preflight's sign-off reads), relative to now."""
    now = datetime.now(timezone.utc)
    return f"{now + timedelta(hours=start_hours):%Y-%m-%dT%H:%MZ}/{now + timedelta(hours=end_hours):%Y-%m-%dT%H:%MZ}"


def target_entry(name: str, server, dbname: str, *, production: bool = False) -> str:
    """One [targets.NAME] table of a targets file: a database of the test server, as its superuser."""
    return (f'\n[targets.{name}]\nhost = "127.0.0.1"\nport = {server.pg.port}\ndbname = "{dbname}"\n'
            f'user = "postgres"\nsslmode = "disable"\n' + ("production = true\n" if production else ""))


def preflight_record(db, folder: Path, run_id: str) -> None:
    """What the preflight leaves, as its notebook takes it: the database's identity, the snapshot and
    the backup of one moment, and the backup's witness in the database (no manifest: unsealed)."""
    conn = readonly(db)
    try:
        assert preflight.database_identity(conn, db.target, run_id).status == "ok"
        with preflight.one_moment(SimpleNamespace(target=db.target, run_id=run_id)) as moment:
            assert preflight.snapshot(conn, folder, moment=moment).status == "ok"
            assert preflight.backup(conn, db.target, folder, run_id, snapshot=moment).status == "ok"
        assert preflight.witness_backup(conn, db.target, folder, run_id, "deployer").status == "ok"
    finally:
        conn.close()


# -- what a run shows -------------------------------------------------------------------------

def executed_notebook(outcome) -> nbformat.NotebookNode:
    """The first notebook of a runner outcome, as executed and kept in its record."""
    return nbformat.read(outcome.record.path / outcome.notebooks[0]["file"], as_version=4)


def notebook_text(nb) -> str:
    """Every text output of an executed notebook, joined (what a reader sees)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append(output["text"])
            for mime in ("text/plain", "text/markdown"):
                if mime in output.get("data", {}):
                    parts.append(output["data"][mime])
    return "\n".join(parts)


def checks_of(outcome) -> dict[str, dict]:
    """The verdict's checks by name (the last one of a name wins)."""
    return {c["name"]: c for c in outcome.notebooks[0].get("checks", [])}


def wait_for_stats(db, table: str, seq_scans: int) -> None:
    """Statistics reach pg_stat_user_tables when the backends flush them: wait until they show."""
    wait_until(lambda: db.query("select 1 from pg_stat_user_tables where relid = %s::regclass and seq_scan >= %s",
                                (table, seq_scans)), f"{table}: {seq_scans} sequential scans recorded")


# -- a deployment held inside phase 2 ------------------------------------------------------------

PHASE_TWO_WAITING_SQL = """select a.pid from pg_stat_activity a
                           where a.datname = current_database() and a.application_name like 'runbook run %%'
                             and a.wait_event_type = 'Lock' and %s = any (pg_blocking_pids(a.pid))"""


def hold_phase_two(db):
    """A session whose lock phase 2 waits for (phase 1 does not): ACCESS SHARE on audit_logs."""
    blocker = db.connect(application_name="a long report")
    with blocker.cursor() as cur:
        cur.execute("lock table public.audit_logs in access share mode")
    return blocker


def deploy_in_a_process(db, root, *extra, capture: bool = True) -> subprocess.Popen:
    """`runbook deploy` of the database in a process of its own (its output captured, or dropped)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "runbooks.cli", "deploy", "--service", db.name,
                             "--records", str(root), *extra],
                            stdout=out, stderr=subprocess.STDOUT if capture else subprocess.DEVNULL, text=True,
                            env=os.environ.copy())


def wait_for_phase_two(db, blocker, deploy: subprocess.Popen) -> int:
    """The pid of the deploy's backend once pg_stat_activity shows it waiting for the blocker's lock
    (observed, not timed; the deploy ending first fails the test)."""
    found = wait_until(lambda: db.query(PHASE_TWO_WAITING_SQL, (blocker.get_backend_pid(),)),
                       "phase 2 waiting for the blocker", stopped=lambda: ended(deploy))
    return found[0][0]


def ended(process: subprocess.Popen) -> str | None:
    """None while the process runs; once it has ended, its exit code and the end of its output."""
    if process.poll() is None:
        return None
    return f"the process ended with {process.returncode}" + (
        ":\n" + process.stdout.read()[-4000:] if process.stdout else "")


# -- a database its owner deploys, that owner no superuser ---------------------------------------

@dataclass
class OwnerDatabase:
    """A database of the test server whose libpq service (of its name) connects as its owner."""

    server: object
    name: str
    owner: str

    @property
    def target(self) -> connection.Target:
        return connection.from_service(self.name)

    def connect(self, **kwargs):
        """As the owner (what snapshot_of and history connect with)."""
        return connection.connect(self.target, **kwargs)

    def as_owner(self, sql: str, params=None) -> list[tuple]:
        return query_once(self.connect(autocommit=True), sql, params)

    def as_superuser(self, sql: str, params=None) -> list[tuple]:
        return query_once(psycopg2.connect(self.server.pg.conninfo(self.name)), sql, params)
