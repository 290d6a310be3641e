"""The heartbeat says what the server is doing for a run while it runs (runbooks/watch.py).

Every wait here is on observed state (pg_locks, pg_stat_progress_create_index, a callback), never on
a timer: the heartbeat is read with lines(), or its thread is awaited through its own say callback.
"""

from __future__ import annotations

import threading

import pytest

from runbooks import connection
from runbooks.watch import Heartbeat
from sqlhelpers import wait_until, waiting_backend


@pytest.fixture
def demo(empty_db):
    empty_db.execute("create table public.demo (id int primary key, note text); "
                     "insert into public.demo select g, 'row ' || g from generate_series(1, 1000) g")
    return empty_db


def run_in_thread(db, sql: str, application_name: str) -> threading.Thread:
    """Run sql on a connection of its own (named so) in a thread; the connection closes after."""
    def run():
        conn = db.connect(application_name=application_name, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_statement_waiting_for_a_lock_is_shown_with_what_it_waits_for_and_who_holds_it(demo):
    holder = demo.connect(application_name="the app")
    with holder.cursor() as cur:
        cur.execute("lock table public.demo in access exclusive mode; select pg_backend_pid()")
        holder_pid = cur.fetchone()[0]
    thread = run_in_thread(demo, "alter table public.demo add column extra int", "runbook run 20260101T000000Z-abcdef")
    try:
        waiter = waiting_backend(demo, "runbook run 20260101T000000Z-abcdef")
        head, *busy = Heartbeat(demo.target, what="phase 001").lines()
    finally:
        holder.rollback()
        holder.close()
        thread.join()
    assert head.startswith("  … phase 001: ") and "so far" in head
    [line] = busy
    assert f"pid {waiter} active" in line and "alter table public.demo add column extra int" in line
    assert f"waiting for a relation lock held by pid {holder_pid}" in line


def test_an_index_built_concurrently_shows_its_phase_and_progress(demo):
    old = demo.connect(application_name="an old transaction")
    with old.cursor() as cur:  # an open snapshot: CREATE INDEX CONCURRENTLY waits for it to end
        cur.execute("set transaction isolation level repeatable read; select count(*) from auth.users")
    thread = run_in_thread(demo, "create index concurrently demo_note_idx on public.demo (note)", "runbook run x")
    try:
        wait_until(lambda: demo.query("select 1 from pg_stat_progress_create_index where phase like 'waiting%'"),
                   "the index build waiting for the old transaction")
        lines = Heartbeat(demo.target).lines()
    finally:
        old.rollback()
        old.close()
        thread.join()
    assert any("create index concurrently of demo: waiting for" in line for line in lines), lines


def test_nothing_running_is_said_too(demo):
    assert Heartbeat(demo.target, what="preflight").lines()[1:] == []
    assert Heartbeat(demo.target, what="preflight").lines()[0].endswith("no statement running on the server")


def test_while_a_step_runs_the_heartbeat_speaks_again_and_again_until_it_ends(demo):
    said, twice = [], threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if sum(line.startswith("  … ") for line in said) >= 2:
            twice.set()

    with Heartbeat(demo.target, what="phase 002", interval=0.01, say=say):
        assert twice.wait(120), said
    count = len(said)
    assert all(line.startswith("  … phase 002: ") for line in said if not line.startswith("    "))
    assert len(said) == count  # quiet once the step has ended


def test_a_server_that_cannot_be_read_is_said_once_then_only_the_step(demo):
    gone = connection.Target(name="gone", kind="target", params={"host": "127.0.0.1", "port": 1, "dbname": "x"})
    heartbeat = Heartbeat(gone, what="phase 001")
    first, second = heartbeat.lines(), heartbeat.lines()
    assert len(first) == 1 and "cannot read the server's activity" in first[0]
    assert len(second) == 1 and "cannot read" not in second[0]
