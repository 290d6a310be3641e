"""What the server is doing for a run, said while it runs: a line at least every ``interval`` seconds.

A long statement (a backfill, an index built concurrently, a table rewritten) or a wait for a lock
is otherwise silence, in the terminal and in the notebook. A :class:`Heartbeat` watches the run's
backends from a connection of its own — ``pg_stat_activity`` by application name, the progress
views of ``CREATE INDEX`` and ``CLUSTER``, phase 2's batch counts, ``pg_blocking_pids`` — and says
what each is doing, for how long, who it waits for, and, where PostgreSQL reports progress, how far it is with rate and ETA.
Batches paused while a replica falls behind say so with the reason ("paused: replica 14 s behind").

It reads and never changes anything; when it cannot read (the server went away), it says so once
and keeps quiet about it after.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import connection
from .backup import redact
from .checks import human_duration

# Backends of this project's runs: the engine names its connections "runbook run <run id>".
RUNBOOK_APPLICATIONS = ("runbook%",)
# ... but not the watchers beside a run (heartbeats, impact.py's and resources.py's samplers)
WATCHERS = ("runbook heartbeat", "runbook impact", "runbook resources")

ACTIVITY_SQL = r"""
select a.pid, a.application_name, a.state,
       extract(epoch from clock_timestamp() - coalesce(a.query_start, a.backend_start))::float8 as seconds,
       a.wait_event_type, a.wait_event,
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 90) as query,
       pg_blocking_pids(a.pid) as blockers,
       coalesce(ci.command, cl.command) as command,
       coalesce(ci.phase, cl.phase) as phase,
       coalesce(ci.blocks_done, cl.heap_blks_scanned) as done,
       coalesce(ci.blocks_total, cl.heap_blks_total) as total,
       coalesce(ci.relid, cl.relid)::regclass::text as relation
  from pg_catalog.pg_stat_activity a
  left join pg_catalog.pg_stat_progress_create_index ci on ci.pid = a.pid
  left join pg_catalog.pg_stat_progress_cluster cl on cl.pid = a.pid
 where a.datname = current_database() and a.pid <> pg_backend_pid()
   and a.state is distinct from 'idle' and a.application_name like any (%s)
   and a.application_name <> all (%s)
 order by a.pid
"""

# After its commit, phase 2 redacts copies of plaintext keys and carries the logs' legacy columns in
# batches, and counts each batch done in these tables (sql/001_core_schema.sql, section 11)
BACKFILL_SQL = """
select 'backfill' as step, table_name, max(rows_done) as done, max(rows_total) as total, 'rows' as unit
  from private.pending_backfills group by table_name
union all
select 'redaction', table_name, pages_done, pages_total, 'pages'
  from private.pending_redactions where done_at is null
order by 1, 2
"""


# Between batches, phase 2 sleeps while a replica falls behind or WAL archiving lags (wait event PgSleep):
# the phase files' own reason, where the function exists and may be called, else the lag read here.
BACKLOG_FUNCTION = "private.replication_backlog()"
BACKLOG_SQL = f"""select case when to_regprocedure('{BACKLOG_FUNCTION}') is not null
                              then has_function_privilege('{BACKLOG_FUNCTION}', 'execute') else false end"""
LAG_SQL = """
select 'replica ' || coalesce(round(extract(epoch from max(replay_lag)))::text || ' s',
                              pg_size_pretty(max(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)))) || ' behind'
  from pg_stat_replication having count(*) > 0
"""


@dataclass
class Progress:
    """Blocks done of a total at one moment, to derive a rate from two samples."""
    done: int
    total: int
    at: float


@dataclass
class Heartbeat:
    """Says every ``interval`` seconds what the watched backends are doing (``say`` gets each line).

    Use as a context manager around a long step, or call :meth:`lines` to read the state once."""
    target: connection.Target
    what: str = "run"
    applications: tuple[str, ...] = RUNBOOK_APPLICATIONS
    interval: float = 10.0
    say: callable = print
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _conn: object = field(default=None, init=False, repr=False)
    _seen: dict = field(default_factory=dict, init=False, repr=False)
    _started: float = field(default_factory=time.monotonic, init=False, repr=False)
    _failed: bool = field(default=False, init=False, repr=False)

    def __enter__(self) -> "Heartbeat":
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat {self.what}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            for line in self.lines():
                self.say(line)

    def lines(self) -> list[str]:
        """What to say now: one line for the step, then one per busy backend."""
        elapsed = time.monotonic() - self._started
        head = f"  … {self.what}: {human_duration(elapsed)} so far"
        try:
            rows = self._activity()
        except Exception as exc:  # the server went away, or the watcher may not read it: say so once
            self._close()
            if self._failed:
                return [head]
            self._failed = True
            return [f"{head}; cannot read the server's activity: {redact(str(exc).strip().splitlines()[0])}"]
        backfills = [self._describe_backfill(b) for b in self._backfills()]
        if not rows:
            return [f"{head}; no statement running on the server"] + backfills
        return [head] + [self._describe(row) for row in rows] + backfills

    def _activity(self) -> list[dict]:
        if self._conn is None or self._conn.closed:
            self._conn = connection.connect(self.target, application_name="runbook heartbeat",
                                            readonly=True, autocommit=True)
        with self._conn.cursor() as cur:
            cur.execute(ACTIVITY_SQL, (list(self.applications), list(WATCHERS)))
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def _backfills(self) -> list[dict]:
        try:
            with self._conn.cursor() as cur:
                cur.execute("select to_regclass('private.pending_backfills') is not null "
                            "and to_regclass('private.pending_redactions') is not null")
                if not cur.fetchone()[0]:
                    return []
                cur.execute(BACKFILL_SQL)
                return [dict(zip(("step", "table", "done", "total", "unit"), row)) for row in cur.fetchall()]
        except Exception:  # a role that may not read them: the batches' statements still show above
            self._conn.rollback()
            return []

    def _describe_backfill(self, row: dict) -> str:
        text = f"    {row['step']} of {row['table']}: "
        if not row["total"]:
            return text + f"{row['done']:,} {row['unit']} done"
        return text + self._progress((row["step"], row["table"]), row["done"], row["total"], row["unit"])

    def _progress(self, key, done: int, total: int, unit: str) -> str:
        """done/total with rate and ETA from the previous sample of the same key."""
        now = time.monotonic()
        before = self._seen.get(key)
        self._seen[key] = Progress(done, total, now)
        text = f"{done:,}/{total:,} {unit} ({100 * min(done, total) / total:.0f}%)"
        if before is not None and done > before.done and now > before.at:
            rate = (done - before.done) / (now - before.at)
            text += f", {rate:,.0f} {unit}/s, about {human_duration(max(total - done, 0) / rate)} left"
        return text

    def _describe(self, row: dict) -> str:
        text = f"    pid {row['pid']} {row['state']} {human_duration(row['seconds'])}: {redact(row['query'] or '')}"
        if row["wait_event_type"] == "Lock":
            text += f" — waiting for a {row['wait_event']} lock held by pid {', '.join(map(str, row['blockers'])) or '?'}"
        elif row["wait_event"] == "PgSleep":
            reason = self._backlog()
            text += f" — paused: {reason}" if reason else " — paused between batches"
        elif row["wait_event_type"]:
            text += f" — waiting ({row['wait_event_type']}: {row['wait_event']})"
        if row["command"]:
            text += f" — {row['command'].lower()} of {row['relation']}: {row['phase']}{self._rate(row)}"
        return text

    def _backlog(self) -> str | None:
        """Why the batches pause ('replica 14 s behind', 'WAL archiving 40 segments behind'), or None."""
        try:
            with self._conn.cursor() as cur:
                cur.execute(BACKLOG_SQL)
                if cur.fetchone()[0]:   # judged by this session's limit (the default), not the run's: may be None
                    cur.execute(f"select {BACKLOG_FUNCTION}")
                    reason = cur.fetchone()[0]
                    if reason:
                        return reason
                cur.execute(LAG_SQL)
                row = cur.fetchone()
                return row[0] if row else None
        except Exception:   # a role that may not read the lag: the pause is said without its reason
            return None

    def _rate(self, row: dict) -> str:
        """Blocks done / total, with rate and ETA from the previous sample of the same backend."""
        done, total = row["done"] or 0, row["total"] or 0
        return f", {self._progress(row['pid'], done, total, 'blocks')}" if total else ""

    def _close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

