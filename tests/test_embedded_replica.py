"""The production-like embedded server: durable settings, WAL archived, a streaming replica."""

from sqlhelpers import wait_until


def test_the_durable_server_runs_as_production_does(replicated_server):
    settings = dict(replicated_server.pg.execute_admin(
        "select name, setting from pg_settings where name in "
        "('fsync', 'synchronous_commit', 'full_page_writes', 'wal_level', 'archive_mode')"))
    assert settings == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
                        "wal_level": "logical", "archive_mode": "on"}


def test_the_durable_server_archives_its_wal(replicated_server):
    pg = replicated_server.pg
    pg.execute_admin("create table archive_probe (); drop table archive_probe")  # WAL in this segment
    (segment,) = pg.execute_admin("select pg_walfile_name(pg_current_wal_lsn())")[0]
    pg.execute_admin("select pg_switch_wal()")   # a switch completes the segment; the archiver copies it
    wait_until(lambda: (pg.archive_dir / segment).exists(), f"WAL segment {segment} archived")


def test_the_replica_streams_and_its_lag_grows_while_its_replay_is_paused(replicated_server):
    pg = replicated_server.pg
    (replica,) = pg.replicas
    assert replica.execute_admin("select pg_is_in_recovery()") == [(True,)]
    assert pg.execute_admin("select state from pg_stat_replication") == [("streaming",)]
    replica.pause_replay()
    try:
        pg.execute_admin("create table if not exists lag_probe as select g from generate_series(1, 50000) g")
        behind = "select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0) from pg_stat_replication"
        wait_until(lambda: pg.execute_admin(behind)[0][0] > 1_000_000, "the replica falls behind")
    finally:
        replica.resume_replay()
    wait_until(lambda: pg.execute_admin(behind)[0][0] == 0, "the replica catches up once replay resumes")
    assert replica.execute_admin("select count(*) from lag_probe") == [(50000,)]
    pg.execute_admin("drop table lag_probe")
