"""How long each phase will take, and how long it holds the app's tables, said before anything changes.

The estimate reads the target's table sizes from the catalog (``pg_relation_size``: no scan) and
multiplies them by rates the scale benchmark measured (``benchmarks/scale.py``; figures and machine in
``BENCHMARKS.md``). It is a planning figure, not a promise: a slower disk, a busier server or other
data shapes change it, so a production deployment must fit the rest of its maintenance window with
a margin (``MARGIN``), or it is refused.

What holds the app's tables: phase 2 runs its body in one transaction after taking ACCESS EXCLUSIVE
locks on the tables it converges, so for the body's whole duration the app can neither read nor
write them; its no-transaction tail builds indexes concurrently (the app goes on) and rewrites the
tables that held plaintext keys (ACCESS EXCLUSIVE on each for its rewrite). Phases 1 and 3 change
functions, policies and small tables, and validate constraints (SHARE UPDATE EXCLUSIVE: reads and
writes go on).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from . import engine, signoff
from .checks import Check, fetch, human_duration, sql_check
from .contract import CORE_TABLES, PLAINTEXT_KEY_COLUMNS

GIB = 1024 ** 3
MARGIN = 1.5   # the estimate times this must fit the rest of a production maintenance window

# Seconds per GiB of heap and fixed seconds per phase, measured at 1M products (0.47 GiB of converged
# tables, 3,000 plaintext keys) on 2 busy cores, PostgreSQL 18: phase 2 took 41.5 s, of which the body
# 34 s (key search 11.6 s), the rewrite 2.8 s and the concurrent index builds 4 s; phases 1 and 3 well under
# a second. Rounded up: on a quiet server the estimate errs long, which is the safe side.
RATES = {
    "phase 000 fixed": 1.0,
    "phase 001 fixed": 3.0,
    "phase 001 body per GiB of the converged tables": 45.0,
    "phase 001 key search per GiB of public tables": 25.0,
    "phase 001 indexes per GiB of the converged tables": 10.0,
    "phase 001 rewrite per GiB of the tables that held keys": 15.0,
    "phase 002 fixed": 2.0,
    "phase 002 validation per GiB of the converged tables": 2.0,
}
CONVERGED_TABLES = CORE_TABLES
KEY_HOLDING_TABLES = ("api_keys", "audit_logs")

SIZES_SQL = f"""
select c.relname::text as table_name, pg_relation_size(c.oid) as heap_bytes,
       greatest(c.reltuples, 0)::bigint as rows_estimated,
       exists (select 1 from pg_attribute a
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and c.relname = 'api_keys'
                  and a.attname in ({", ".join(f"'{c}'" for c in PLAINTEXT_KEY_COLUMNS)})) as holds_plaintext_keys
from pg_class c
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
order by heap_bytes desc
"""


@dataclass(frozen=True)
class PhaseEstimate:
    version: str
    seconds: float
    lock_seconds: float           # ACCESS EXCLUSIVE: the app waits on these tables for this long
    locked_tables: tuple[str, ...]
    applies: bool                 # False: already applied with the same file, skipped

    def row(self) -> dict:
        return {"phase": self.version, "will run": "yes" if self.applies else "no (applied)",
                "estimated": human_duration(self.seconds) if self.applies else "0s",
                "app blocked (ACCESS EXCLUSIVE)": (f"{human_duration(self.lock_seconds)} on {', '.join(self.locked_tables)}"
                                                   if self.applies and self.locked_tables else "none")}


def estimate_phases(sizes: list[dict], applied: set[str]) -> list[PhaseEstimate]:
    """Per phase, from table sizes (SIZES_SQL rows) and the versions already applied unchanged."""
    gib = {r["table_name"]: r["heap_bytes"] / GIB for r in sizes}
    converged = sum(gib.get(t, 0) for t in CONVERGED_TABLES)
    plaintext = any(r["holds_plaintext_keys"] for r in sizes)
    keys_search = sum(gib.values()) * RATES["phase 001 key search per GiB of public tables"] if plaintext else 0
    body = (RATES["phase 001 fixed"] + converged * RATES["phase 001 body per GiB of the converged tables"]
            + keys_search)
    rewritten = [t for t in KEY_HOLDING_TABLES if t in gib] if plaintext else []
    rewrite = sum(gib[t] for t in rewritten) * RATES["phase 001 rewrite per GiB of the tables that held keys"]
    indexes = converged * RATES["phase 001 indexes per GiB of the converged tables"]
    present = tuple(t for t in CONVERGED_TABLES if t in gib)
    return [
        PhaseEstimate("000", RATES["phase 000 fixed"], 0.0, (), "000" not in applied),
        PhaseEstimate("001", body + indexes + rewrite, body + rewrite, present, "001" not in applied),
        PhaseEstimate("002", RATES["phase 002 fixed"] + converged * RATES["phase 002 validation per GiB of the converged tables"],
                      0.0, (), "002" not in applied),
    ]


@sql_check(SIZES_SQL, "duration and lock windows, predicted")
def duration(conn, *, production: bool = False, maintenance_window: str | None = None,
             now: datetime | None = None) -> Check:
    """How long the phases still to apply will take and hold the app's tables; a production
    deployment whose estimate (with a margin) does not fit the rest of its window is refused."""
    sizes = fetch(conn, SIZES_SQL)
    applied = {s.version for s in engine.phase_states(conn) if s.state == "applied, file matches"}
    phases = estimate_phases(sizes, applied)
    total = sum(p.seconds for p in phases if p.applies)
    blocked = sum(p.lock_seconds for p in phases if p.applies)
    rows = [p.row() for p in phases]
    summary = (f"about {human_duration(total)} for the phases still to apply, the app blocked on the converged tables "
               f"for about {human_duration(blocked)} ({sum(r['heap_bytes'] for r in sizes) / GIB:.2f} GiB in public)")
    if maintenance_window:
        left = (signoff.parse_window(maintenance_window)[1] - (now or datetime.now(timezone.utc))).total_seconds()
        if total * MARGIN > left:
            status = "error" if production else "warning"
            return Check("duration", status, f"{summary}: with a margin of {MARGIN:g}x that does not fit the "
                         f"{human_duration(max(left, 0))} left of the maintenance window {maintenance_window}", rows=rows)
        summary += f"; fits the {human_duration(left)} left of the window with a margin of {MARGIN:g}x"
    return Check("duration", "info", summary, rows=rows)



TIMEOUT_FLOOR = 15 * 60   # seconds: the least any phase statement is given
TIMEOUT_FACTOR = 4         # times the phase's whole estimate: a runaway is stopped, a big database is not


def statement_timeout(conn, version: str) -> str:
    """The statement_timeout for a phase, grown with the data: no fixed limit that a database ten
    times larger would hit, and still a bound on a statement that runs away."""
    [phase] = [p for p in estimate_phases(fetch(conn, SIZES_SQL), set()) if p.version == version]
    return timeout_for(phase)


def timeout_for(phase: PhaseEstimate) -> str:
    return f"{max(TIMEOUT_FLOOR, round(TIMEOUT_FACTOR * phase.seconds))}s"
