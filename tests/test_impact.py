"""What the app felt while a phase ran (runbooks/impact.py): real app sessions wait on a real phase's locks.

Phase 2 is held at its first lock the test controls (a session holds ACCESS SHARE on audit_logs, which
phase 2 locks after the core tables it already holds); app sessions then wait on the core tables phase 2
holds. Every wait is observed (pg_locks, the sampler's own state, the engine's callbacks), never timed.
"""

from __future__ import annotations

import threading

import psycopg2

from runbooks import engine, impact, paths
from runbooks.impact import ImpactSampler
from runhelpers import PHASE_TWO_WAITING_SQL, hold_phase_two
from sqlhelpers import wait_until, waiting_backend

PHASE_TWO = dict(paths.PHASES)["001"]
RUN_ID = "20260101T000000Z-1a2b3c"


def phase_two_in_thread(db, lock_timeout: str, on_retry=None) -> tuple[engine.ApplyEngine, threading.Thread, dict]:
    """Phase 2 through the engine in a thread; what it returned or raised lands in the dict."""
    apply = engine.ApplyEngine(db.target, run_id=RUN_ID, operator="test", lock_timeout=lock_timeout,
                               lock_retries=50, retry_backoff=0.05, on_retry=on_retry)
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = apply.apply("001", PHASE_TWO)
        except Exception as exc:   # the test asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return apply, thread, outcome


def app_session(db, name: str, sql: str, *, transaction: bool = False) -> tuple[object, threading.Thread, dict]:
    """An app's statement on a connection of its own, in a thread; in a transaction it stays open after
    (the test ends it), so a failed statement leaves it aborted, as an app's would until it rolls back."""
    conn = db.connect(application_name=name, autocommit=not transaction)
    said: dict = {}

    def run():
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
            said["ok"] = True
        except psycopg2.Error as exc:
            said["error"] = exc.pgcode

    thread = threading.Thread(target=run)
    thread.start()
    return conn, thread, said


def test_app_sessions_waiting_on_the_phases_locks_are_kept_with_how_long_and_how_each_wait_ended(make_db):
    db = make_db("legacy@1")
    blocker = hold_phase_two(db)
    apply, phase, outcome = phase_two_in_thread(db, lock_timeout="10min")
    reader = canceller = None
    try:
        with ImpactSampler(db.target, (apply.application_name,)) as sampler:
            wait_until(lambda: db.query(PHASE_TWO_WAITING_SQL, (blocker.get_backend_pid(),)), "phase 2 waiting")
            reader, reader_thread, read = app_session(db, "the app reads", "select count(*) from public.organizations")
            canceller, cancelled_thread, cancelled = app_session(
                db, "the app writes", "update public.organizations set name = name", transaction=True)
            waiting_backend(db, "the app reads")
            writer = waiting_backend(db, "the app writes")
            wait_until(lambda: {w.application for w in sampler.waits.values()} >= {"the app reads", "the app writes"},
                       "the sampler seeing both app sessions wait")
            db.query("select pg_cancel_backend(%s)", (writer,))   # the app's own statement is cancelled
            cancelled_thread.join()
            wait_until(lambda: any(w.ended == "aborted" for w in sampler.waits.values()),
                       "the sampler seeing the cancelled session's transaction aborted")
            blocker.rollback()
            phase.join()
            reader_thread.join()
    finally:
        blocker.close()
        for conn in (reader, canceller):
            if conn is not None:
                conn.close()
    assert "error" not in outcome, outcome
    assert read == {"ok": True} and cancelled == {"error": "57014"}
    summary = sampler.summary()
    assert summary["sessions_waited"] == 2 and summary["aborted_after_wait"] == 1
    assert summary["longest_wait_s"] > 0 and summary["deadlocks"] == 0 and summary["gave_up"] == []
    ended = {w["application"]: w["ended"] for w in summary["slowest_waits"]}
    assert ended == {"the app reads": "went on", "the app writes": "aborted"}
    phase_pid = {pid for w in summary["slowest_waits"] for pid in w["held_by"]}
    assert len(phase_pid) == 1, "both waited on the phase's backend, and only on it"
    assert "2 sessions waited" in impact.describe(summary) and "1 aborted after waiting" in impact.describe(summary)


def test_the_lock_waits_the_phase_gave_up_itself_are_kept(make_db):
    db = make_db("legacy@1")
    blocker = hold_phase_two(db)
    gave_up = threading.Event()
    box: dict = {}

    def on_retry(attempt, delay, reason):
        box["sampler"].note_retry(attempt, delay, reason)
        gave_up.set()

    try:
        with ImpactSampler(db.target, (engine.ApplyEngine(db.target, run_id=RUN_ID).application_name,)) as sampler:
            box["sampler"] = sampler
            _, phase, outcome = phase_two_in_thread(db, lock_timeout="50ms", on_retry=on_retry)
            assert gave_up.wait(600), "the phase never gave up a lock wait"
            blocker.rollback()
            phase.join()
    finally:
        blocker.close()
    assert "error" not in outcome, outcome
    [first, *_] = sampler.summary()["gave_up"]
    assert "lock timeout" in first["statement"] and first["attempt"] == 1
    assert "lock wait(s) of its own" in impact.describe(sampler.summary())


def test_a_wait_on_a_lock_the_run_does_not_hold_is_the_apps_own_contention_and_not_counted(empty_db):
    empty_db.execute("create table public.demo (id int)")
    holder = empty_db.connect(application_name="a report")
    with holder.cursor() as cur:
        cur.execute("lock table public.demo in access share mode")
    other = None
    try:
        with ImpactSampler(empty_db.target, (f"runbook run {RUN_ID}",)) as sampler:
            other, other_thread, _ = app_session(empty_db, "another app", "lock table public.demo in access exclusive mode",
                                                transaction=True)
            waiting_backend(empty_db, "another app")
            seen = sampler.samples
            wait_until(lambda: sampler.samples > seen + 1, "the sampler reading while the app waits")
            holder.rollback()
            other_thread.join()
    finally:
        holder.close()
        if other is not None:
            other.close()
    assert sampler.summary()["sessions_waited"] == 0 and sampler.problem is None


def test_nothing_waiting_reads_as_no_impact():
    assert impact.describe({"sessions_waited": 0, "longest_wait_s": 0.0, "aborted_after_wait": 0, "deadlocks": 0,
                            "gave_up": []}) == "longest wait 0.00 s, 0 sessions waited, none cancelled"
    assert impact.describe(None) == "not measured"
