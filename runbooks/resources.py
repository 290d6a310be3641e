"""The WAL, replica lag and disk a phase uses, measured on the server while it runs.

A :class:`ResourceMeter` reads, beside the phase (``sampling.Sampler``):

- the WAL written meanwhile: ``pg_current_wal_insert_lsn()`` before and after (``pg_wal_lsn_diff``; the app's
  writes included) — every byte a replica must replay and the archive must keep;
- the largest replica lag seen (``pg_stat_replication``: bytes between the primary's WAL and what each
  standby replayed, and the ``replay_lag`` the server measured), where the role may read it (a role
  without ``pg_read_all_stats`` sees the rows but not their positions: then it says so);
- how far WAL archiving fell behind (``pg_stat_archiver``: segments between the one being written and
  the last one archived), where ``archive_mode`` is on;
- the largest extra disk used on the server: the database's size (``pg_database_size``) at its highest
  less at the start, and the temporary files written (``pg_stat_database.temp_bytes``).

The WAL itself lives on the server's disk until checkpoints recycle it, or longer while a replica's slot
or the archiver holds it: ``budgets.py`` counts it in what a phase needs.
"""

from __future__ import annotations

from . import connection
from .checks import human_bytes
from .sampling import Sampler

INTERVAL = 1.0   # seconds between samples: pg_database_size stats every file of the database

START_SQL = """
select pg_current_wal_insert_lsn() as lsn, pg_database_size(current_database()) as database_bytes,
       (select temp_bytes from pg_stat_database where datname = current_database()) as temp_bytes,
       current_setting('archive_mode') as archive_mode
"""
# archiving's backlog: the WAL segments complete and not archived yet, between the one being written and the
# last one archived (a WAL file's name is its timeline, then its log and segment numbers, 8 hex digits each)
SAMPLE_SQL = r"""
with files (now, archived, per_log) as (
  select pg_walfile_name(pg_current_wal_lsn()), last_archived_wal,
         4294967296 / pg_size_bytes(current_setting('wal_segment_size'))
    from pg_stat_archiver
)
select (select count(*) from pg_stat_replication) as replicas,
       (select count(replay_lsn) from pg_stat_replication) as replicas_readable,
       (select max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)) from pg_stat_replication)::bigint as lag_bytes,
       (select extract(epoch from max(greatest(write_lag, flush_lag, replay_lag))) from pg_stat_replication)::float8
         as lag_seconds,
       (select case when archived ~ '^[0-9A-F]{24}$' then greatest(
                 (('x' || substr(now, 9, 8))::bit(32)::bigint - ('x' || substr(archived, 9, 8))::bit(32)::bigint) * per_log
                 + ('x' || substr(now, 17, 8))::bit(32)::bigint - ('x' || substr(archived, 17, 8))::bit(32)::bigint - 1, 0) end
          from files) as archive_segments_behind,
       pg_database_size(current_database()) as database_bytes
"""
END_SQL = """
select pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)::bigint as wal_bytes,
       (select temp_bytes from pg_stat_database where datname = current_database()) as temp_bytes
"""


class ResourceMeter(Sampler):
    """WAL, replica lag, archiving and disk while a step runs (see the module docstring)."""

    application_name = "runbook resources"

    def __init__(self, target: connection.Target, interval: float = INTERVAL):
        super().__init__(target)
        self.interval = interval
        self.start: dict = {}
        self.figures: dict = {"wal_bytes": None, "replicas": None, "replica_lag_bytes": None,
                              "replica_lag_s": None, "archive_segments_behind": None,
                              "server_extra_bytes": 0, "temp_bytes": None}

    def next_interval(self) -> float:
        return self.interval

    def begin(self, cur) -> None:
        cur.execute(START_SQL)
        self.start = dict(zip((d.name for d in cur.description), cur.fetchone()))

    def sample(self, cur) -> None:
        cur.execute(SAMPLE_SQL)
        replicas, readable, lag_bytes, lag_seconds, behind, size = cur.fetchone()
        f = self.figures
        f["replicas"] = max(f["replicas"] or 0, replicas)
        f["replicas_readable"] = readable == replicas
        f["replica_lag_bytes"] = _largest(f["replica_lag_bytes"], lag_bytes)
        f["replica_lag_s"] = _largest(f["replica_lag_s"], lag_seconds)
        if self.start.get("archive_mode") in ("on", "always"):
            f["archive_segments_behind"] = _largest(f["archive_segments_behind"], behind)
        f["server_extra_bytes"] = max(f["server_extra_bytes"], size - self.start["database_bytes"])

    def finish(self, cur) -> None:
        self.sample(cur)
        cur.execute(END_SQL, (self.start["lsn"],))
        wal, temp = cur.fetchone()
        self.figures["wal_bytes"] = wal
        if temp is not None and self.start.get("temp_bytes") is not None:
            self.figures["temp_bytes"] = temp - self.start["temp_bytes"]

    def summary(self) -> dict:
        """The figures as the record keeps them (footprint.py)."""
        return {**self.figures, "database_bytes_at_start": self.start.get("database_bytes"),
                "interval_s": self.interval, "samples": self.samples, "problem": self.problem}


def _largest(seen, now):
    return now if seen is None else seen if now is None else max(seen, now)


def describe(figures: dict | None) -> str:
    """'WAL 1.2 GB, replica 2 behind at most 40 MB (3.1 s), server disk +300 MB, temp files 20 MB'."""
    if not figures:
        return "not measured"
    parts = [f"WAL {human_bytes(figures.get('wal_bytes'))}" if figures.get("wal_bytes") is not None else "WAL unknown"]
    parts.append(replica_text(figures))
    if figures.get("archive_segments_behind") is not None:
        parts.append(f"archiving at most {figures['archive_segments_behind']} WAL segment(s) behind")
    parts.append(f"server disk +{human_bytes(max(figures.get('server_extra_bytes') or 0, 0))} at most")
    if figures.get("temp_bytes"):
        parts.append(f"temporary files {human_bytes(figures['temp_bytes'])}")
    if figures.get("runner_bytes") is not None:
        parts.append(f"runner disk {human_bytes(figures['runner_bytes'])} (the backup)")
    if figures.get("problem"):
        parts.append(f"sampling stopped early: {figures['problem']}")
    return ", ".join(parts)


def replica_text(figures: dict) -> str:
    replicas = figures.get("replicas")
    if replicas is None:
        return "replicas not read"
    if replicas == 0:
        return "no replica streaming"
    if not figures.get("replicas_readable", True):
        return (f"{replicas} replica(s) streaming, their lag not readable by this role "
                "(pg_read_all_stats or pg_monitor shows it)")
    seconds = figures.get("replica_lag_s")
    return (f"{replicas} replica(s), lag at most {human_bytes(figures.get('replica_lag_bytes') or 0)}"
            + (f" ({seconds:.1f} s)" if seconds is not None else ""))
