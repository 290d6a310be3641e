"""A deployment on a database the app keeps using, and one whose server session is cut mid-phase.

Production stays online: the app reads and writes as `authenticated` users while the runbooks
deploy, and a DBA's worst night includes a backend terminated under a phase. Waits are on observed
state (pg_stat_activity, pg_locks, the deploy's own exit), never on timers.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter

import psycopg2
import pytest

from conftest import DEBIAN_15, Database
from runbooks import fixtures, records, runner, snapshot
from runbooks.embedded import EmbeddedPostgres
from runhelpers import (assert_identical, deploy_in_a_process, history, hold_phase_two, runbook, snapshot_of,
                        wait_for_phase_two)

ACME = "0a000000-0000-4000-8000-000000000001"
BOB_THE_ADMIN = "0b000000-0000-4000-8000-000000000002"
GADGET = "0c000000-0000-4000-8000-000000000003"
FLAVOUR_BINARIES = {"pg18": None, "pg15": DEBIAN_15}   # a server of its own: the test crashes it
APP_STATEMENTS = (
    f"select id, name, sku, price from public.products where organization_id = '{ACME}' order by sku limit 50",
    f"select id, name from public.organizations where id = '{ACME}'",
    f"update public.products set price = price where id = '{GADGET}'",
)


class App:
    """Clients acting as Bob (an admin of Acme) through PostgREST's role and claims, until stopped."""

    def __init__(self, db, clients: int = 2):
        self.db, self.stop, self.done, self.failed = db, threading.Event(), Counter(), Counter()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> "App":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _client(self, number: int) -> None:
        conn = self.db.connect(application_name=f"the app {number}")
        claims = json.dumps({"sub": BOB_THE_ADMIN, "role": "authenticated", "aud": "authenticated"})
        try:
            while not self.stop.is_set():
                for sql in APP_STATEMENTS:
                    try:
                        with conn.cursor() as cur:
                            cur.execute("select set_config('request.jwt.claims', %s, true)", (claims,))
                            cur.execute("set local role authenticated; set local statement_timeout = '60s'")
                            cur.execute(sql)
                        conn.commit()
                        self.done[sql.split()[0]] += 1
                    except psycopg2.Error as exc:
                        conn.rollback()
                        self.failed[exc.pgcode] += 1
        finally:
            conn.close()


@pytest.mark.slow
def test_a_whole_deployment_passes_its_verification_while_the_app_reads_and_writes_as_authenticated(make_db, tmp_path):
    db = make_db("legacy")
    with App(db) as app:
        deploy = deploy_in_a_process(db, tmp_path / "records")
        output, _ = deploy.communicate()
    assert deploy.returncode == 0, output[-4000:] + f"\napp: done {dict(app.done)}, failed {dict(app.failed)}"
    assert "verdict: PASSED" in output
    assert app.done["select"] > 0, "the app read nothing while the deployment ran"
    assert [r["version"] for r in history(db)] == ["000", "001", "002"]


@pytest.mark.slow
def test_a_deploy_whose_backend_is_terminated_inside_a_phase_says_so_and_its_run_rolls_back(make_db, tmp_path, capsys):
    db = make_db("legacy")
    root = tmp_path / "records"
    blocker = hold_phase_two(db)
    try:
        deploy = deploy_in_a_process(db, root, "-p", "lock_timeout", "10min", "-p", "lock_retries", "0")
        pid = wait_for_phase_two(db, blocker, deploy)
        db.query("select pg_terminate_backend(%s)", (pid,))
        output, _ = deploy.communicate()
    finally:
        blocker.rollback()
        blocker.close()
    assert deploy.returncode == 1, output[-4000:]
    [run_id] = [p.name for p in root.iterdir()]
    manifest = json.loads((root / run_id / records.MANIFEST).read_text())
    failed = [n for n in manifest["notebooks"] if n["status"] == "failed"]
    assert [n["name"] for n in failed] == ["phase2"]
    assert "terminating connection due to administrator command" in failed[0]["error"]
    assert "connection already closed" not in failed[0]["error"]
    assert [r["version"] for r in history(db)] == ["000"]          # phase 2 left nothing behind

    capsys.readouterr()
    assert runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", root) == 0
    assert_identical(snapshot.load_snapshot(root / run_id / "snapshot.json"), snapshot_of(db))



@pytest.mark.slow
def test_a_deploy_cut_by_a_server_crash_inside_a_phase_fails_and_its_run_rolls_back(tmp_path, capsys):
    with EmbeddedPostgres(FLAVOUR_BINARIES.get(os.environ.get("RUNBOOKS_TEST_FLAVOURS", "pg18"))) as pg:
        pg.add_service("crash_test", "crash_test")
        with runner.environment(pg.client_env()):
            admin = psycopg2.connect(pg.conninfo())
            admin.autocommit = True
            admin.cursor().execute("create database crash_test")
            admin.close()
            conn = psycopg2.connect(pg.conninfo("crash_test"))
            fixtures.load_shim(conn)
            fixtures.load_legacy_fixture(conn)
            conn.commit()
            conn.close()
            db = Database("crash_test", pg)
            before = snapshot_of(db)
            root = tmp_path / "records"
            blocker = hold_phase_two(db)
            deploy = deploy_in_a_process(db, root, "-p", "lock_timeout", "10min", "-p", "lock_retries", "0")
            wait_for_phase_two(db, blocker, deploy)
            pg.crash_and_recover()
            output, _ = deploy.communicate()
            blocker.close()
            assert deploy.returncode == 1, output[-4000:]
            assert [r["version"] for r in history(db)] == ["000"]      # the crash rolled phase 2 back
            [run_id] = [p.name for p in root.iterdir()]
            capsys.readouterr()
            assert runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", root) == 0
            assert_identical(before, snapshot_of(db))
