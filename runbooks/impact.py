"""What the app felt while a phase ran: who waited on the deployment's locks, for how long, and what failed.

An :class:`ImpactSampler` watches the database beside a phase, on a connection of its own, and keeps:

- every wait of an app session (a client backend that is not the run's) on a lock that a backend of the
  run holds, or has asked for ahead of it in the lock's queue (``pg_blocking_pids``): its session, role,
  statement, the lock it waited for, and its length — from ``pg_locks.waitstart`` (PostgreSQL 14+, the
  moment the wait began, even between two samples) to the last sample that still saw it;
- the statements the deployment's ``lock_timeout`` gave up on (the engine's retries: ``note_retry``);
- the deadlocks the server detected in the database meanwhile (``pg_stat_database.deadlocks``), and the
  waiting sessions whose transaction was aborted once their wait ended (a deadlock, their own timeout).
  The deployment itself cancels no session: its ``lock_timeout`` gives up its own statement instead.

Resolution: while a backend of the run is inside a transaction (it holds locks), the sampler reads every
``FAST`` seconds, otherwise every ``SLOW``; a wait shorter than the interval may go unseen (it is harmless
at that length), every longer one is seen, and its length is exact to within one interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import connection
from .checks import human_duration
from .sampling import Sampler

FAST = 0.05   # seconds between samples while the run holds locks
SLOW = 0.5    # ... and while it does not

# The run's backends are named "runbook run <run id>" (engine.ApplyEngine.application_name).
WAITS_SQL = r"""
with run as (
  select pid, xact_start from pg_catalog.pg_stat_activity
   where datname = current_database() and application_name = any(%(run)s)
)
select a.pid, a.usename::text as role, a.application_name,
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 160) as query, l.mode || coalesce(' on ' || l.relation::regclass,
                                                                         ' (' || l.locktype || ')') as lock,
       l.waitstart,
       clock_timestamp() as seen_at,
       array(select unnest(pg_catalog.pg_blocking_pids(a.pid)) intersect select pid from run) as held_by,
       exists (select 1 from run where xact_start is not null) as run_in_transaction
  from pg_catalog.pg_stat_activity a
  join pg_catalog.pg_locks l on l.pid = a.pid and not l.granted   -- a backend waits for one lock at a time
 where a.datname = current_database() and a.backend_type = 'client backend'
   and a.wait_event_type = 'Lock' and a.pid <> pg_backend_pid()
   and a.pid not in (select pid from run) and a.application_name not like 'runbook%%'   -- the runbooks' own
union all   -- one row even when nobody waits: whether the run holds locks sets the next interval
select null, null, null, null, null, null, clock_timestamp(), null,
       exists (select 1 from run where xact_start is not null)
"""
ENDED_SQL = "select pid, state from pg_catalog.pg_stat_activity where pid = any(%s)"
DEADLOCKS_SQL = "select deadlocks from pg_catalog.pg_stat_database where datname = current_database()"


@dataclass
class Wait:
    """One wait of one app session on the deployment, as the samples saw it."""
    pid: int
    role: str
    application: str
    query: str
    lock: str
    started: object          # server time (pg_locks.waitstart)
    last_seen: object        # server time of the last sample that saw it
    held_by: tuple[int, ...]
    ended: str | None = None  # how it ended: None (still waiting), 'went on', 'aborted', 'disconnected'

    @property
    def seconds(self) -> float:
        return max((self.last_seen - self.started).total_seconds(), 0.0)

    def as_dict(self) -> dict:
        return {"pid": self.pid, "role": self.role, "application": self.application, "query": self.query,
                "lock": self.lock, "seconds": round(self.seconds, 3), "held_by": list(self.held_by),
                "ended": self.ended or "still waiting"}


class ImpactSampler(Sampler):
    """Samples app sessions waiting on the run's backends (``run_applications``) while a phase runs."""

    application_name = "runbook impact"

    def __init__(self, target: connection.Target, run_applications: tuple[str, ...], *,
                 fast: float = FAST, slow: float = SLOW):
        super().__init__(target)
        self.run_applications = list(run_applications)
        self.fast, self.slow = fast, slow
        self.waits: dict[tuple, Wait] = {}
        self.retries: list[dict] = []
        self._busy = True
        self._deadlocks_at_start: int | None = None
        self.deadlocks: int | None = None
        self._started = time.monotonic()
        self.seconds = 0.0

    def note_retry(self, attempt: int, delay: float, reason: str) -> None:
        """The engine's lock_timeout gave up a statement (engine.ApplyEngine.on_retry)."""
        self.retries.append({"attempt": attempt, "pause_s": round(delay, 3), "statement": reason})

    def begin(self, cur) -> None:
        self._started = time.monotonic()
        cur.execute(DEADLOCKS_SQL)
        self._deadlocks_at_start = cur.fetchone()[0]

    def next_interval(self) -> float:
        return self.fast if self._busy else self.slow

    def sample(self, cur) -> None:
        cur.execute(WAITS_SQL, {"run": self.run_applications})
        rows = cur.fetchall()
        self._busy = bool(rows[-1][8])
        waiting = set()
        for pid, role, app, query, lock, started, seen_at, held_by, _ in rows[:-1]:
            if not held_by or started is None:
                continue   # waiting on someone else's lock: the app's own contention
            key = (pid, started)
            waiting.add(key)
            wait = self.waits.get(key)
            if wait is None:
                self.waits[key] = Wait(pid, role, app or "", query or "", lock, started, seen_at, tuple(held_by))
            else:
                wait.last_seen = seen_at
        self._settle(cur, [w for key, w in self.waits.items() if key not in waiting and w.ended is None])

    def _settle(self, cur, ended: list[Wait]) -> None:
        """How waits that were seen and are no longer ended: the session went on, or its transaction was
        aborted (a deadlock, its own timeout), or it disconnected."""
        if not ended:
            return
        cur.execute(ENDED_SQL, ([w.pid for w in ended],))
        states = dict(cur.fetchall())
        for wait in ended:
            state = states.get(wait.pid)
            wait.ended = ("disconnected" if state is None else
                          "aborted" if state == "idle in transaction (aborted)" else "went on")

    def finish(self, cur) -> None:
        self.sample(cur)
        cur.execute(DEADLOCKS_SQL)
        now = cur.fetchone()[0]
        if self._deadlocks_at_start is not None and now is not None:
            self.deadlocks = now - self._deadlocks_at_start
        self.seconds = time.monotonic() - self._started

    def summary(self) -> dict:
        """What the app felt, as the record keeps it (footprint.py)."""
        waits = sorted(self.waits.values(), key=lambda w: -w.seconds)
        return {
            "sessions_waited": len({w.pid for w in waits}),
            "waits": len(waits),
            "longest_wait_s": round(waits[0].seconds, 3) if waits else 0.0,
            "longest": waits[0].as_dict() if waits else None,
            "slowest_waits": [w.as_dict() for w in waits[:10]],
            "gave_up": self.retries,
            "aborted_after_wait": sum(w.ended == "aborted" for w in waits),
            "deadlocks": self.deadlocks,
            "cancelled_by_deployment": 0,
            "resolution_s": self.fast,
            "samples": self.samples,
            "problem": self.problem,
        }


def describe(impact: dict | None) -> str:
    """'longest wait 0.4 s, 3 sessions waited, none cancelled': what the app felt, in one line."""
    if not impact:
        return "not measured"
    waited = impact.get("sessions_waited") or 0
    text = (f"longest wait {impact.get('longest_wait_s', 0):.2f} s, "
            f"{waited} session{'s' if waited != 1 else ''} waited")
    failed = (impact.get("aborted_after_wait") or 0) + (impact.get("deadlocks") or 0)
    text += ", none cancelled" if not failed else (f", {failed} failed ({impact.get('deadlocks') or 0} deadlock(s), "
                                                   f"{impact.get('aborted_after_wait') or 0} aborted after waiting)")
    if impact.get("gave_up"):
        text += f"; the deployment gave up {len(impact['gave_up'])} lock wait(s) of its own (lock_timeout) and retried"
    if impact.get("problem"):
        text += f" (sampling stopped early: {impact['problem']})"
    return text


def rows(impact: dict) -> list[dict]:
    """The waits, longest first, for a table in the phase notebook."""
    return [{"session": f"pid {w['pid']} ({w['application'] or 'no application name'}, role {w['role']})",
             "waited": human_duration(w["seconds"]) if w["seconds"] >= 1 else f"{w['seconds']:.3f}s",
             "lock": w["lock"], "held by (run's pid)": ", ".join(map(str, w["held_by"])),
             "ended": w["ended"], "statement": w["query"]} for w in impact.get("slowest_waits", [])]
