"""Phase 2's batches yield to a streaming replica that falls behind, and to nothing where nothing streams.

Between two batches (redaction, backfills, the online rewrite's copy and replay) the phase asks
private.replication_backlog() (000_core_functions.sql) whether a replica is further behind than
truthsource.max_replica_lag seconds; while it is, the phase says 'paused: <why>' and sleeps (wait event
PgSleep), holding no lock. The replica here is real: its replay is paused, so its lag grows for real.
"""

from __future__ import annotations

import threading

import psycopg2
import pytest

from sqlhelpers import PHASE_FILES, apply_psycopg2, wait_until

PHASE_TWO = PHASE_FILES[1]
APP_NAME = "p2-replica-test"
MORE_AUDIT_ROWS = """
insert into public.audit_logs (id, action, entity_type, entity_id, changes, ip, user_agent, created_at)
select 1000 + n, 'update', 'product', '0c000000-0000-4000-8000-000000000001', jsonb_build_object('n', n),
       '203.0.113.' || (n % 250), case when n % 100 = 0 then 'curl/8 (key ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0)' end,
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 minute'
  from generate_series(1, 3000) as n
"""
BACKLOG_SQL = "select set_config('truthsource.max_replica_lag', %s, false), private.replication_backlog()"


def backlog(conn, limit: str) -> str | None:
    """private.replication_backlog()'s answer on this session, under that limit."""
    with conn.cursor() as cur:
        cur.execute(BACKLOG_SQL, (limit,))
        return cur.fetchone()[1]


def test_phase_two_pauses_between_batches_while_the_replica_is_behind_and_finishes_once_it_catches_up(replicated_server):
    (replica,) = replicated_server.pg.replicas
    db = replicated_server.create_database("legacy@1")
    outcome: dict = {}

    def phase_two():
        try:
            outcome["notices"] = apply_psycopg2(db, PHASE_TWO, f"set application_name = '{APP_NAME}'; "
                                                "set truthsource.backfill_batch_pages = 1; set truthsource.max_replica_lag = 0.001")
        except psycopg2.Error as exc:
            outcome["error"] = exc

    db.execute(MORE_AUDIT_ROWS)
    replica.pause_replay()
    resumed = False
    thread = threading.Thread(target=phase_two)
    try:
        thread.start()
        wait_until(lambda: db.query("select 1 from pg_stat_activity where application_name = %s and wait_event = 'PgSleep'",
                                    (APP_NAME,)), "the phase sleeping between two batches", stopped=lambda: outcome or None)
        assert db.query("""select c.relname, l.mode from pg_locks l join pg_stat_activity a using (pid) join pg_class c on c.oid = l.relation
                            where a.application_name = %s and c.relnamespace in ('public'::regnamespace, 'private'::regnamespace)""",
                        (APP_NAME,)) == [], "no lock held while it waits"
        asked = db.connect(autocommit=True)   # one session: its samples say for how long the replica is behind
        try:
            why = wait_until(lambda: backlog(asked, "1"), "the replica said behind")
        finally:
            asked.close()
        assert why.startswith("replica ") and " s behind (" in why
        replica.resume_replay()
        resumed = True
        thread.join()
    finally:
        if not resumed:
            replica.resume_replay()
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert any(n.startswith("NOTICE:  paused: replica ") for n in outcome["notices"])
    assert db.query("""select (select count(*) from private.pending_backfills) + (select count(*) from private.pending_rewrites)
                            + (select count(*) from private.pending_redactions)""") == [(0,)]
    replicated_server.drop_database(db)


@pytest.mark.parametrize("limit", ["", "10", "0", "off", "0.5"])
def test_where_nothing_streams_nothing_is_behind_whatever_the_limit(make_db, limit):
    [(_, why)] = make_db("empty@1").query(BACKLOG_SQL, (limit,))
    assert why is None


def test_a_limit_that_is_no_number_of_seconds_is_refused_naming_the_setting(make_db):
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="truthsource.max_replica_lag is '10s'"):
        make_db("empty@1").query(BACKLOG_SQL, ("10s",))
