"""How long each phase will take, and how long it holds the app's tables, said before anything changes.

The estimate reads the target's table sizes from the catalog (``pg_relation_size``: no scan) and
multiplies them by rates the scale benchmark measured (``benchmarks/scale.py``; figures and machine in
``BENCHMARKS.md``). It is a planning figure, not a promise: a slower disk, a busier server or other
data shapes change it, so a production deployment must fit the rest of its maintenance window with
a margin (``MARGIN``), or it is refused.

What holds the app's tables: phase 2 takes ACCESS EXCLUSIVE locks on the tables it converges for
its body, one transaction that changes the catalog (the keys are hashed before it, the unique rules
read before its locks; only api_keys' legacy flags are written there, a few rows per organization).
After its commit, without blocking the app: copies of plaintext keys are redacted, legacy columns
carried and converted in batches of pages (each its own short transaction), the tables that held keys
copied online, indexes built concurrently and rules validated (SHARE UPDATE EXCLUSIVE). Each table
whose columns or files are swapped then takes one short window (ACCESS EXCLUSIVE) whose work follows
what the app wrote since the last batch, not the table's size. Phases 1 and 3 change functions,
policies and small tables, and validate constraints (reads and writes go on).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from . import engine, signoff
from .checks import Check, fetch, human_duration, sql_check
from .contract import CORE_TABLE_COLUMNS, CORE_TABLES, PLAINTEXT_KEY_COLUMNS

GIB = 1024 ** 3
MARGIN = 1.5   # the estimate times this must fit the rest of a production maintenance window

# Seconds per GiB of heap and fixed seconds per phase, fitted to the durable runs of 2026-12-07 (BENCHMARKS.md:
# fsync, synchronous_commit and full_page_writes on, WAL archived, a streaming replica; PostgreSQL 15, 2 cores,
# the benchmark's app traffic on) at 100k and 1M products, legacy, variant and unseen shapes. Phase 2 at 1M, per
# statement: the logs' batches 101 s for 0.21 GiB of audit_logs (49.5 s with no app: the app's unindexed
# legacy queries share the two cores), the online rewrite 30 s, the key search 10 s, the concurrent index builds
# 13 s and the rules validated 6 s for 0.44 GiB of converged tables. A converted table (a column whose type
# changes by reading every row) was then updated in every row by the same batches; it is now copied with its
# conversions (the rates below say by how much that changed). Phases 1 and 3 take 0.05-0.16 s whatever the
# size or shape. The rates sit between the quiet and the busy figures, so every shape lands within 2x at both
# sizes; the benchmark prints each phase's prediction beside what the run measured: re-derive them when the
# phase files change.
RATES = {
    "phase 000 fixed": 0.1,
    "phase 001 fixed": 2.0,
    "phase 001 body per GiB of the converged tables": 10.0,
    "phase 001 key search per GiB of public tables": 20.0,
    "phase 001 log backfill per GiB of the logs in a legacy shape": 350.0,
    # the online copy of 2.0 GiB of audit_logs that carried its legacy columns: about 15 minutes at 10M beside an
    # app whose reads scanned products (7a88e63); at 1M, with those reads indexed first, phase 2 took 56 s in all
    # (bf63edc). A converted table is copied with its conversions from 8 MB on (48226ac): the unseen and variant
    # shapes took 66-73 s more than the legacy one at 1M (they took 270-290 s more as batches of updates)
    "phase 001 log carried in its copy per GiB": 200.0,
    "phase 001 conversion per GiB of a converted table": 450.0,
    "phase 001 legacy columns dropped per GiB of those logs": 10.0,
    "phase 001 indexes per GiB of the converged tables": 20.0,
    "phase 001 validation per GiB of the converged tables": 13.0,
    "phase 001 rewrite per GiB of the tables that held keys": 120.0,
    # the app's windows (ACCESS EXCLUSIVE), not part of the durations above: durable PostgreSQL 15 at 10M with a
    # streaming replica, the body 1.31 s of which hashing 30,000 keys 1.0 s (now before the locks), the rest the
    # catalog and the api keys' legacy flags; each swap at 1M and 10M 0.05-0.4 s
    "phase 001 window: body": 0.2,
    "phase 001 window: body per 1,000 api keys": 0.005,
    "phase 001 window: each table swapped": 0.2,
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


# columns of the converged tables whose type the phases change by reading every row (not a widening)
COLUMN_TYPES_SQL = """
select c.relname::text as table_name, a.attname::text as column_name, format_type(a.atttypid, a.atttypmod) as type
  from pg_attribute a join pg_class c on c.oid = a.attrelid
 where c.relnamespace = 'public'::regnamespace and c.relname = any(%s) and a.attnum > 0 and not a.attisdropped
"""


def _widens(have: str, accepted: tuple[str, ...]) -> bool:
    """A type change that reads no row: varchar/char to text, numeric(p,2) to numeric(12,2) with p <= 12."""
    if "text" in accepted and (have.startswith("character varying") or have.startswith("character(")):
        return True
    digits = [int(x) for x in have.removeprefix("numeric(").rstrip(")").split(",")] if have.startswith("numeric(") else []
    return "numeric(12,2)" in accepted and len(digits) == 2 and digits[0] <= 12 and digits[1] == 2


def converted_tables(columns: list[dict]) -> dict[str, list[str]]:
    """The converged tables with a column whose type must change by rewriting rows, and those columns."""
    found: dict[str, list[str]] = {}
    for row in columns:
        accepted = CORE_TABLE_COLUMNS.get(row["table_name"], {}).get(row["column_name"])
        if accepted and row["type"] not in accepted and not _widens(row["type"], accepted):
            found.setdefault(row["table_name"], []).append(f"{row['column_name']} {row['type']}")
    return found


def conversions(conn) -> dict[str, list[str]]:
    """converted_tables of the target, read from the catalog."""
    return converted_tables(fetch(conn, COLUMN_TYPES_SQL, (list(CORE_TABLES),)))


@dataclass(frozen=True)
class PhaseEstimate:
    version: str
    seconds: float
    lock_seconds: float           # ACCESS EXCLUSIVE: the app waits on these tables this long, all windows together
    locked_tables: tuple[str, ...]
    applies: bool                 # False: already applied with the same file, skipped

    def row(self) -> dict:
        return {"phase": self.version, "will run": "yes" if self.applies else "no (applied)",
                "estimated": human_duration(self.seconds) if self.applies else "0s",
                "app blocked (ACCESS EXCLUSIVE)": (f"{human_duration(self.lock_seconds)} on {', '.join(self.locked_tables)}"
                                                   if self.applies and self.locked_tables else "none")}


def estimate_phases(sizes: list[dict], applied: set[str], conversions: dict | None = None) -> list[PhaseEstimate]:
    """Per phase, from table sizes (SIZES_SQL rows), the versions already applied unchanged and the
    converted tables (converted_tables)."""
    gib = {r["table_name"]: r["heap_bytes"] / GIB for r in sizes}
    converged = sum(gib.get(t, 0) for t in CONVERGED_TABLES)
    plaintext = any(r["holds_plaintext_keys"] for r in sizes)
    logs = {r["table_name"] for r in sizes if r.get("legacy_log")}
    rewritten = [t for t in KEY_HOLDING_TABLES if t in gib] if plaintext else []
    in_copy = carried_in_copy(sizes)
    legacy_logs = sum(gib[t] for t in logs)
    # a legacy log's conversions ride on its carry: the same batches (or the same copy), priced once
    converted = sum(gib.get(t, 0) for t in (conversions or {}) if t not in logs)
    body = RATES["phase 001 fixed"] + converged * RATES["phase 001 body per GiB of the converged tables"]
    redaction = sum(gib.values()) * RATES["phase 001 key search per GiB of public tables"] if plaintext else 0
    backfill = (sum(gib[t] for t in logs - in_copy) * RATES["phase 001 log backfill per GiB of the logs in a legacy shape"]
                + sum(gib[t] for t in in_copy) * RATES["phase 001 log carried in its copy per GiB"]
                + converted * RATES["phase 001 conversion per GiB of a converted table"])
    drop_legacy = legacy_logs * RATES["phase 001 legacy columns dropped per GiB of those logs"]
    rewrite = sum(gib[t] for t in rewritten) * RATES["phase 001 rewrite per GiB of the tables that held keys"]
    online = converged * (RATES["phase 001 indexes per GiB of the converged tables"]
                          + RATES["phase 001 validation per GiB of the converged tables"]) + redaction + backfill
    present = tuple(t for t in CONVERGED_TABLES if t in gib)
    return [
        PhaseEstimate("000", RATES["phase 000 fixed"], 0.0, (), "000" not in applied),
        PhaseEstimate("001", body + drop_legacy + rewrite + online,
                      _windows(sizes, swapped=set(logs) | set(rewritten) | set(conversions or {})), present,
                      "001" not in applied),
        PhaseEstimate("002", RATES["phase 002 fixed"] + converged * RATES["phase 002 validation per GiB of the converged tables"],
                      0.0, (), "002" not in applied),
    ]


def carried_in_copy(sizes: list[dict]) -> set[str]:
    """The legacy logs whose legacy columns ride on their online rewrite (the tables that held keys): their copy
    carries them, no batches before it."""
    if not any(r["holds_plaintext_keys"] for r in sizes):
        return set()
    return {r["table_name"] for r in sizes if r.get("legacy_log") and r["table_name"] in KEY_HOLDING_TABLES}


def _windows(sizes: list[dict], swapped: set[str]) -> float:
    """Phase 2's ACCESS EXCLUSIVE windows together: the body (the catalog and api_keys' legacy flags), then one
    short swap per table whose columns or files change after the commit. Not the table sizes: no window reads
    a table."""
    keys = next((r["rows_estimated"] for r in sizes if r["table_name"] == "api_keys"), 0)
    return (RATES["phase 001 window: body"] + keys / 1000 * RATES["phase 001 window: body per 1,000 api keys"]
            + len(swapped) * RATES["phase 001 window: each table swapped"])


@sql_check(SIZES_SQL.strip() + ";\n\n-- the converged tables' column types (a conversion that rewrites rows)\n"
           + COLUMN_TYPES_SQL.strip(), "duration and lock windows, predicted")
def duration(conn, *, production: bool = False, maintenance_window: str | None = None,
             now: datetime | None = None) -> Check:
    """How long the phases still to apply will take and hold the app's tables; a production
    deployment whose estimate (with a margin) does not fit the rest of its window is refused."""
    sizes = fetch(conn, SIZES_SQL)
    applied = {s.version for s in engine.phase_states(conn) if s.state == "applied, file matches"}
    phases = estimate_phases(sizes, applied, conversions(conn))
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
    [phase] = [p for p in estimate_phases(fetch(conn, SIZES_SQL), set(), conversions(conn)) if p.version == version]
    return timeout_for(phase)


def timeout_for(phase: PhaseEstimate) -> str:
    return f"{max(TIMEOUT_FLOOR, round(TIMEOUT_FACTOR * phase.seconds))}s"
