"""How long each phase will take, and how long it holds the app's tables, said before anything changes.

The estimate reads the target's table sizes from the catalog (``pg_relation_size``: no scan) and
multiplies them by rates the scale benchmark measured (``benchmarks/scale.py``; figures and machine in
``BENCHMARKS.md``). It is a planning figure, not a promise: a slower disk, a busier server or other
data shapes change it, so a production deployment must fit the rest of its maintenance window with
a margin (``MARGIN``), or it is refused.

What holds the app's tables: phase 2 takes ACCESS EXCLUSIVE locks on the tables it converges for
its body, one transaction that changes the schema and checks keys and unique rules (no row is
rewritten there). After its commit, without blocking the app: copies of plaintext keys are redacted
and the logs' legacy columns carried in batches of pages (each its own short transaction), indexes
are built concurrently and rules validated (SHARE UPDATE EXCLUSIVE). Two short windows follow the
batches: the logs' legacy columns dropped, and the tables that held plaintext keys rewritten (ACCESS
EXCLUSIVE on each for its rewrite). Phases 1 and 3 change functions, policies and small tables, and
validate constraints (reads and writes go on).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from . import engine, signoff
from .checks import Check, fetch, human_duration, sql_check
from .contract import CORE_TABLE_COLUMNS, CORE_TABLES, PLAINTEXT_KEY_COLUMNS

GIB = 1024 ** 3
MARGIN = 1.5   # the estimate times this must fit the rest of a production maintenance window

# Seconds per GiB of heap and fixed seconds per phase, measured on the benchmark's durable server (fsync,
# synchronous_commit and full_page_writes on, WAL archived, a streaming replica; PostgreSQL 18, 2 cores under a
# load of 7-9) at 100k products with no app traffic (BENCHMARKS.md): the body 1.4 s, the redaction's batches
# 2.1 s for 0.044 GiB of public tables, the logs' batches 18.7 s for 0.021 GiB of audit_logs (a commit, WAL
# flushed, per batch of 64 pages), their legacy columns dropped 0.16 s, the rewrite 1.0 s, the concurrent index
# builds 3.0 s and the rules validated 2.5 s for 0.044 GiB of converged tables; phase 1 0.4 s, phase 3 0.4 s.
# Rounded up (a busy server takes longer): the estimate errs long. The benchmark prints each phase's
# prediction beside what the run measured; re-derive these from its durable 1M run when the phase files change.
# The durable 1M run of 2026-12-07 (PostgreSQL 15, quiet machine, the app's traffic on) measured phases 1 and 3
# at 0.05-0.16 s whatever the size or shape (hence their fixed costs) and phase 2 at 0.57x (legacy), 1.59x
# (variant) and 1.42x (unseen) of these rates' prediction: the conversions of a variant shape are batched
# updates the rates below do not price separately yet.
RATES = {
    "phase 000 fixed": 0.1,
    "phase 001 fixed": 3.0,
    "phase 001 body per GiB of the converged tables": 10.0,
    "phase 001 key search per GiB of public tables": 50.0,
    "phase 001 log backfill per GiB of the logs in a legacy shape": 900.0,
    "phase 001 legacy columns dropped per GiB of those logs": 10.0,
    "phase 001 indexes per GiB of the converged tables": 70.0,
    "phase 001 validation per GiB of the converged tables": 60.0,
    "phase 001 rewrite per GiB of the tables that held keys": 50.0,
    "phase 002 fixed": 0.1,
    "phase 002 validation per GiB of the converged tables": 0.05,
}
CONVERGED_TABLES = CORE_TABLES
KEY_HOLDING_TABLES = ("api_keys", "audit_logs")
LOGS = ("audit_logs", "security_events")

def _log_columns() -> str:
    return ", ".join(f"('{t}', array[{', '.join(repr(c) for c in CORE_TABLE_COLUMNS[t])}, 'legacy_data', 'legacy_id'])"
                     for t in LOGS)


# legacy_log: a log with columns the contract does not name, whose rows phase 2 carries in batches
SIZES_SQL = f"""
with log_columns (table_name, contract_columns) as (values {_log_columns()})
select c.relname::text as table_name, pg_relation_size(c.oid) as heap_bytes,
       greatest(c.reltuples, 0)::bigint as rows_estimated,
       exists (select 1 from pg_attribute a
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and c.relname = 'api_keys'
                  and a.attname in ({", ".join(f"'{c}'" for c in PLAINTEXT_KEY_COLUMNS)})) as holds_plaintext_keys,
       exists (select 1 from log_columns l join pg_attribute a on a.attrelid = c.oid
                where l.table_name = c.relname and a.attnum > 0 and not a.attisdropped
                  and a.attname <> all (l.contract_columns)) as legacy_log
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
    legacy_logs = sum(gib[r["table_name"]] for r in sizes if r.get("legacy_log"))
    body = RATES["phase 001 fixed"] + converged * RATES["phase 001 body per GiB of the converged tables"]
    redaction = sum(gib.values()) * RATES["phase 001 key search per GiB of public tables"] if plaintext else 0
    backfill = legacy_logs * RATES["phase 001 log backfill per GiB of the logs in a legacy shape"]
    drop_legacy = legacy_logs * RATES["phase 001 legacy columns dropped per GiB of those logs"]
    rewritten = [t for t in KEY_HOLDING_TABLES if t in gib] if plaintext else []
    rewrite = sum(gib[t] for t in rewritten) * RATES["phase 001 rewrite per GiB of the tables that held keys"]
    online = converged * (RATES["phase 001 indexes per GiB of the converged tables"]
                          + RATES["phase 001 validation per GiB of the converged tables"]) + redaction + backfill
    present = tuple(t for t in CONVERGED_TABLES if t in gib)
    return [
        PhaseEstimate("000", RATES["phase 000 fixed"], 0.0, (), "000" not in applied),
        PhaseEstimate("001", body + drop_legacy + rewrite + online, body + drop_legacy + rewrite, present,
                      "001" not in applied),
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
