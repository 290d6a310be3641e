"""Batches that yield to a replica, the Python side: the limit reaches the phase's session, the heartbeat
says why a batch is paused (runbooks/engine.py, watch.py) — on a durable server streaming to a real hot standby whose replay the test pauses
(``pg_wal_replay_pause()``), so lag grows for real. Every wait is on observed state, never a timer.
"""

from __future__ import annotations

import threading

import pytest

from runbooks import engine, paths, runner
from runbooks.watch import Heartbeat
from sqlhelpers import wait_until

RUN_ID = "20260101T000000Z-5e1a9c"
RUN_APP = f"runbook run {RUN_ID}"
BEHIND_SQL = "select coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0) from pg_stat_replication"
SQL_SIDE = "replication_backlog" in "".join(p.read_text() for _, p in paths.PHASES)


@pytest.fixture
def paused_replica(replicated_server):
    """The replicated server's standby with its replay paused; resumed (and caught up) after the test."""
    pg = replicated_server.pg
    (replica,) = pg.replicas
    replica.pause_replay()
    try:
        yield replica
    finally:
        replica.resume_replay()
        wait_until(lambda: pg.execute_admin(BEHIND_SQL)[0][0] == 0, "the replica catching up")


def phase_file(tmp_path, sql: str):
    path = tmp_path / "901_probe.sql"
    path.write_text(sql)
    return path


@pytest.mark.parametrize("limit, seen", [(2.5, "2.5"), (0, "0"), (10, "10"), (0.00001, "0.00001"), (None, None)])
def test_max_replica_lag_reaches_the_session_that_applies_the_phase(empty_db, tmp_path, limit, seen):
    probe = phase_file(tmp_path, "create table public.limit_seen as "
                                 "select current_setting('truthsource.max_replica_lag', true) as seconds;")
    engine.ApplyEngine(empty_db.target, run_id=RUN_ID, max_replica_lag=limit).apply("901", probe)
    assert empty_db.query("select nullif(seconds, '') from public.limit_seen") == [(seen,)]


def test_a_negative_max_replica_lag_is_refused():
    with pytest.raises(ValueError, match="max_replica_lag"):
        engine.replica_lag_setting(-1)


def test_every_phase_notebook_takes_max_replica_lag_as_a_number():
    for step in ("phase1", "phase2", "phase3"):
        parameter = runner.declared_parameters(step)["max_replica_lag"]
        assert (parameter.kind, parameter.default_text) == ("float", "10.0"), step


def sleeping_run_backend(db) -> tuple[threading.Thread, int]:
    """A backend of the run asleep between two batches (pg_sleep, as the phase files pause), once seen."""
    conn = db.connect(application_name=RUN_APP, autocommit=True)

    def sleep():
        try:
            with conn.cursor() as cur:
                cur.execute("select pg_sleep(600)")
        except Exception:   # the test cancels it once it has read the heartbeat
            pass
        finally:
            conn.close()

    thread = threading.Thread(target=sleep)
    thread.start()
    pid = wait_until(lambda: db.query("select pid from pg_stat_activity where application_name = %s "
                                      "and wait_event = 'PgSleep'", (RUN_APP,)), "the run's backend asleep")[0][0]
    return thread, pid


def test_the_heartbeat_says_a_paused_batch_waits_for_the_replica_and_how_far_behind_it_is(
        replicated_server, paused_replica):
    db = replicated_server.create_database("empty")
    try:
        db.execute("create table public.wal_probe as select g from generate_series(1, 50000) g")
        wait_until(lambda: replicated_server.pg.execute_admin(BEHIND_SQL)[0][0] > 1_000_000, "the replica behind")
        thread, pid = sleeping_run_backend(db)
        try:
            lines = Heartbeat(db.target, what="phase 001", applications=(RUN_APP,)).lines()
        finally:
            db.query("select pg_cancel_backend(%s)", (pid,))
            thread.join()
    finally:
        replicated_server.drop_database(db)
    [line] = [line for line in lines if f"pid {pid}" in line]
    assert " — paused: replica " in line and line.endswith(" behind"), line


def test_a_paused_batch_with_no_replica_streaming_is_said_as_a_pause_between_batches(empty_db):
    thread, pid = sleeping_run_backend(empty_db)
    try:
        lines = Heartbeat(empty_db.target, what="phase 001", applications=(RUN_APP,)).lines()
    finally:
        empty_db.query("select pg_cancel_backend(%s)", (pid,))
        thread.join()
    assert any(f"pid {pid}" in line and line.endswith("paused between batches") for line in lines), lines


@pytest.mark.skipif(not SQL_SIDE, reason="needs the SQL side of the pause (private.replication_backlog(), branch i20sql)")
def test_phase_twos_batches_pause_while_the_replica_is_behind_and_go_on_once_it_catches_up(replicated_server):
    pg = replicated_server.pg
    (replica,) = pg.replicas
    db = replicated_server.create_database("legacy@1")
    said: list[str] = []
    try:
        with runner.environment({"PGOPTIONS": "-c truthsource.backfill_batch_pages=1"}):
            replica.pause_replay()
            try:
                apply = engine.ApplyEngine(db.target, run_id=RUN_ID, max_replica_lag=0.001)
                outcome: dict = {}
                thread = threading.Thread(target=lambda: outcome.setdefault(
                    "result", apply.apply("001", dict(paths.PHASES)["001"])))
                thread.start()
                wait_until(lambda: db.query("select 1 from pg_stat_activity where application_name = %s "
                                            "and wait_event = 'PgSleep'", (RUN_APP,)), "a batch paused",
                           stopped=lambda: None if thread.is_alive() else "the phase ended")
                said = Heartbeat(db.target, applications=(RUN_APP,)).lines()
            finally:
                replica.resume_replay()
            thread.join()
    finally:
        replicated_server.drop_database(db)
    assert outcome["result"].status == "applied"
    assert any(" — paused: replica " in line for line in said), said
