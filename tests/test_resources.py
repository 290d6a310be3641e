"""The WAL, replica lag and disk a phase uses, measured beside it (runbooks/resources.py, on the sampler of
runbooks/sampling.py): on a durable server streaming to a real hot standby whose replay the test pauses, so
the lag grows for real; a sampler that cannot read the server says why and never stops the step it watches.
"""

from __future__ import annotations

import pytest

from runbooks import connection, engine, paths, resources
from runbooks.resources import ResourceMeter
from sqlhelpers import wait_until

RUN_ID = "20260101T000000Z-7e5a11"
BEHIND_SQL = "select coalesce(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)), 0) from pg_stat_replication"


@pytest.fixture
def paused_replica(replicated_server):
    """The replicated server's standby with its replay paused; resumed (and caught up) after the test."""
    pg = replicated_server.pg
    (replica,) = pg.replicas
    pg.execute_admin("create table if not exists archive_probe (); drop table archive_probe; select pg_switch_wal()")
    wait_until(lambda: pg.execute_admin("select last_archived_wal from pg_stat_archiver")[0][0],
               "a WAL segment archived (as on any server that archives)")
    replica.pause_replay()
    try:
        yield replica
    finally:
        replica.resume_replay()
        wait_until(lambda: pg.execute_admin(BEHIND_SQL)[0][0] == 0, "the replica catching up")


def test_a_phases_wal_and_the_replicas_largest_lag_are_measured(replicated_server, paused_replica):
    db = replicated_server.create_database("legacy@1")
    try:
        with ResourceMeter(db.target) as meter:   # max_replica_lag 0: the batches never wait for the paused standby
            engine.ApplyEngine(db.target, run_id=RUN_ID, max_replica_lag=0).apply("001", dict(paths.PHASES)["001"])
    finally:
        replicated_server.drop_database(db)
    used = meter.summary()
    assert used["problem"] is None and used["replicas"] == 1 and used["replicas_readable"]
    assert used["wal_bytes"] > 0 and used["replica_lag_bytes"] >= used["wal_bytes"]
    assert used["archive_segments_behind"] is not None and used["server_extra_bytes"] > 0
    assert "1 replica(s), lag at most" in resources.describe(used)


def test_with_no_replica_streaming_the_record_says_so(empty_db):
    with ResourceMeter(empty_db.target) as meter:
        empty_db.execute("create table public.probe as select g from generate_series(1, 1000) g")
    used = meter.summary()
    assert used["replicas"] == 0 and used["wal_bytes"] > 0 and used["archive_segments_behind"] is None
    assert "no replica streaming" in resources.describe(used)


def test_a_sampler_that_cannot_read_the_server_says_why_and_the_step_goes_on():
    gone = connection.Target(name="gone", kind="target", params={"host": "127.0.0.1", "port": 1, "dbname": "x"})
    with ResourceMeter(gone) as meter:
        went_on = True
    assert went_on and meter.summary()["problem"].startswith("could not read the server")
    assert "sampling stopped early" in resources.describe(meter.summary())
