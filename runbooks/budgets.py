"""The disk and WAL a deployment needs, said before anything changes, and refused when it does not fit.

From the target's table and index sizes (read from the catalog, nothing is scanned) and ratios the scale
benchmark measured on a durable server (``benchmarks/scale.py``; figures in ``BENCHMARKS.md``):

- per phase still to apply, the **server disk** it needs beyond what the database holds now — rows every
  one of which a batch updates (the logs' legacy columns carried, a column converted to another type: a
  new version of each row until vacuum), new indexes, and a full copy of each table rewritten (``CLUSTER``
  or the online rewrite: the old and new files side by side until the swap) — and the **WAL** it writes
  (the same work, with a full page image at each page's first change after a checkpoint), which stays on
  the server's disk while a replica's slot or the archiver has not taken it;
- the **runner's disk** the record needs: the preflight's ``pg_dump -Fc`` of the whole database, and the
  verification's row hashes.

The runner's free space is known (``shutil.disk_usage`` of the records folder). The server's is known to
PostgreSQL's OS account only: plain SQL has no ``statvfs``. A superuser, or a member of
``pg_execute_server_program``, can ask ``df`` through ``COPY ... FROM PROGRAM`` (in a transaction that is
rolled back); any other role — on Supabase, ``postgres`` — cannot, and the DBA, who sees the project's disk
in the dashboard, gives it: ``-p server_disk_free 20GB`` or ``server_disk_free = "20GB"`` in the targets
file. Where neither is known the preflight says so, with the figure the deployment needs.

A deployment is refused (exit 2, before anything changes) when the need, times ``MARGIN``, does not fit the
free space known, or would fill the server's disk past ``FULL_SHARE`` (Supabase makes a project read-only at
95 % full, and grows its disk by half at 90 %, at most once every six hours).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from . import connection, engine, estimate
from .checks import Check, fetch, human_bytes, parse_bytes, sql_check
from .contract import CORE_TABLES

MARGIN = 1.5        # the need times this must fit the free space known
FULL_SHARE = 0.90   # ... and leave the server's disk at most this full
MIB = 1024 ** 2

# Measured on the benchmark's durable server (fsync, full_page_writes on, wal_level logical, WAL archived, a
# streaming replica; BENCHMARKS.md) at 100k products: phase 2 wrote 110 MB of WAL for 21 MB of legacy audit_logs
# carried, then rewritten, and 47 MB of converged tables indexed; the server grew by 34 MB and wrote 22 MB of
# temporary files; the record took 28 MB (a 16 MB backup). Rounded up: a budget errs large.
RATIOS = {
    "WAL per byte of a table rewritten (heap and indexes)": 1.5,
    "WAL per byte of heap whose every row is updated": 3.0,
    "disk per byte of heap whose every row is updated": 1.2,
    "new indexes per byte of the converged tables' heap": 0.6,
    "backup per byte of table data (heap and TOAST)": 0.6,
    "verification's row hashes per row": 64,
}
# catalog changes and history rows: phase 1 wrote 0.47-0.67 MB, phase 3 0.36-0.38 MB in the durable runs at 100k and 1M
FIXED_WAL = {"000": 5 * MIB // 8, "001": 4 * MIB, "002": 3 * MIB // 8}

TABLES_SQL = r"""
select n.nspname::text as schema_name, c.relname::text as table_name, pg_relation_size(c.oid) as heap_bytes,
       pg_total_relation_size(c.oid) - pg_indexes_size(c.oid) as data_bytes, pg_indexes_size(c.oid) as index_bytes,
       pg_total_relation_size(c.oid) as total_bytes, greatest(c.reltuples, 0)::bigint as rows_estimated
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where c.relkind in ('r', 'p', 'm') and n.nspname not in ('pg_catalog', 'information_schema')
   and n.nspname !~ '^pg_'
"""
SERVER_SQL = """
select (select setting from pg_settings where name = 'data_directory') as data_directory,   -- hidden from most roles
       (select rolsuper from pg_roles where rolname = current_user)
       or pg_has_role(current_user, 'pg_execute_server_program', 'member') as may_run_programs,
       current_setting('archive_mode') as archive_mode, pg_size_bytes(current_setting('max_wal_size')) as max_wal_size,
       (select count(*) from pg_replication_slots) as slots
"""
DF_SQL = "create temporary table runbook_df (line text); copy runbook_df from program %s; select line from runbook_df"


@dataclass
class PhaseNeed:
    """What one phase needs on the server: extra disk at its peak and the WAL it writes, and why."""
    version: str
    disk_bytes: int = 0
    wal_bytes: int = 0
    reasons: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)   # the tables it rewrites or updates every row of

    def add(self, disk: float, wal: float, reason: str, tables=()) -> None:
        self.disk_bytes += int(disk)
        self.wal_bytes += int(wal)
        if disk or wal:
            self.reasons.append(reason)
            self.tables += [t for t in tables if t not in self.tables]


def phase_needs(sizes: list[dict], legacy: list[dict], conversions: dict[str, list[str]],
                applied: set[str]) -> list[PhaseNeed]:
    """Per phase still to apply: its server disk and WAL (TABLES_SQL rows, estimate.SIZES_SQL rows)."""
    public = {r["table_name"]: r for r in sizes if r["schema_name"] == "public"}
    needs = {v: PhaseNeed(v, 0, FIXED_WAL[v], ["catalog changes"]) for v in FIXED_WAL if v not in applied}
    two = needs.get("001")
    if two is not None:
        _phase_two(two, public, legacy, conversions)
    three = needs.get("002")
    if three is not None:   # validations read; the small tables of phase 3 are created empty
        three.add(0, 0, "constraints validated (reads only)")
    return list(needs.values())


def _phase_two(need: PhaseNeed, public: dict, legacy: list[dict], conversions: dict[str, list[str]]) -> None:
    updated = RATIOS["WAL per byte of heap whose every row is updated"]
    grown = RATIOS["disk per byte of heap whose every row is updated"]
    in_copy = estimate.carried_in_copy(legacy)   # carried as their rewrite copies them: that copy is counted below
    for row in legacy:
        if row.get("legacy_log") and row["table_name"] in public and row["table_name"] not in in_copy:
            heap = public[row["table_name"]]["heap_bytes"]
            need.add(heap * grown, heap * updated, f"{row['table_name']}'s legacy columns carried into every row",
                     [row["table_name"]])
    for table, columns in sorted(conversions.items()):
        heap = public[table]["heap_bytes"] if table in public else 0
        need.add(heap * grown, heap * updated, f"{table}: {', '.join(columns)} converted in every row", [table])
    converged = sum(public[t]["heap_bytes"] for t in CORE_TABLES if t in public)
    indexes = converged * RATIOS["new indexes per byte of the converged tables' heap"]
    need.add(indexes, indexes, "indexes built on the converged tables")
    if any(r.get("holds_plaintext_keys") for r in legacy):
        rewritten = [public[t] for t in estimate.KEY_HOLDING_TABLES if t in public]
        largest = max((r["total_bytes"] for r in rewritten), default=0)   # one at a time: old and new side by side
        wal = sum(r["total_bytes"] for r in rewritten) * RATIOS["WAL per byte of a table rewritten (heap and indexes)"]
        names = [r["table_name"] for r in rewritten]
        carried = "".join(f"; {t}'s legacy columns carried as it is copied" for t in sorted(in_copy))
        need.add(largest, wal, f"tables that held plaintext keys rewritten ({', '.join(names)}{carried})", names)


def runner_need(sizes: list[dict]) -> tuple[int, str]:
    """The runner's disk for the record: the backup of the whole database and the verification's row hashes."""
    data = sum(r["data_bytes"] for r in sizes)
    rows = sum(r["rows_estimated"] for r in sizes if r["schema_name"] == "public")
    backup = data * RATIOS["backup per byte of table data (heap and TOAST)"]
    hashes = rows * RATIOS["verification's row hashes per row"]
    return int(backup + hashes + MIB), (f"the backup (pg_dump -Fc of {human_bytes(data)} of table data) and the "
                                        f"verification's row hashes ({rows:,} rows)")


# -- free space ------------------------------------------------------------------------------------

@dataclass
class Free:
    """Free space known on one disk: bytes (None: unknown), the disk's size where known, and from where."""
    bytes: int | None
    total: int | None = None
    source: str = ""


def runner_free(records_dir: Path) -> Free:
    """Free space where the record will be written (its nearest existing folder)."""
    place = Path(records_dir).resolve()
    while not place.exists():
        place = place.parent
    usage = shutil.disk_usage(place)
    return Free(usage.free, usage.total, f"the runner's disk at {place}")


def server_free(conn_factory, server: dict, given: list[tuple[int, str]]) -> Free:
    """The server's free space: the smallest of what the DBA gave and what `df` says where the role may run it."""
    known = [Free(b, None, source) for b, source in given]
    if server.get("may_run_programs") and server.get("data_directory"):
        measured = _df(conn_factory, server["data_directory"])
        if measured is not None:
            known.append(measured)
    if not known:
        return Free(None, None, "not known to this role (plain SQL has no statvfs; a superuser or a member of "
                                "pg_execute_server_program can ask df): give -p server_disk_free, or "
                                "server_disk_free in the targets file")
    return min(known, key=lambda f: f.bytes)


def _df(conn_factory, data_directory: str) -> Free | None:
    """`df -Pk` of the data directory and its pg_wal (which may be another disk), as the server's OS
    account sees them, through COPY FROM PROGRAM in a transaction that is rolled back."""
    command = f"df -Pk '{data_directory}' '{data_directory}/pg_wal'"
    try:
        conn = conn_factory()
    except psycopg2.Error:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute(DF_SQL, (command,))
            lines = [line for (line,) in cur.fetchall()][1:]
        conn.rollback()
    except psycopg2.Error:
        return None
    finally:
        conn.close()
    return free_from_df(lines)


def free_from_df(lines: list[str]) -> Free | None:
    """The disk with the least space available among `df -Pk` lines (header left out)."""
    disks = [line.split() for line in lines if len(line.split()) >= 6]
    if not disks:
        return None
    smallest = min(disks, key=lambda d: int(d[3]))
    # the size the server may fill is used + available, as df's own "use %" counts it: blocks reserved for
    # root (5 % on ext4 by default) or held back by the host are never the server's to write
    used, free = int(smallest[2]) * 1024, int(smallest[3]) * 1024
    return Free(free, used + free, f"df on the server ({smallest[5]}, {int(smallest[4].rstrip('%'))} % used)")


# -- the assessment ----------------------------------------------------------------------------------

@dataclass
class Assessment:
    """The deployment's needs against the free space known, on the server and on the runner."""
    phases: list[PhaseNeed]
    runner_bytes: int
    runner_what: str
    runner: Free
    server: Free
    wal_kept: str          # why the WAL stays on the server's disk, or how far checkpoints bound it
    max_wal_size: int
    wal_held: bool         # archiving or a replication slot keeps WAL until it is taken

    def server_bytes(self) -> int:
        """Extra disk at the deployment's peak: every phase's growth, and the WAL it keeps on the disk."""
        return sum(p.disk_bytes + (p.wal_bytes if self.wal_held else min(p.wal_bytes, self.max_wal_size))
                   for p in self.phases)

    def problems(self) -> list[str]:
        found = []
        if self.runner.bytes is not None and self.runner_bytes * MARGIN > self.runner.bytes:
            found.append(f"the runner's disk cannot hold the record: it needs {human_bytes(self.runner_bytes)} "
                         f"({self.runner_what}), {MARGIN:g}x that is {human_bytes(self.runner_bytes * MARGIN)}, and "
                         f"{self.runner.source} has {human_bytes(self.runner.bytes)} free: give --records a "
                         "folder on a larger disk")
        need, free = self.server_bytes(), self.server.bytes
        if free is not None and need * MARGIN > free:
            found.append(f"the server's disk cannot hold the deployment: it needs {human_bytes(need)} "
                         f"({MARGIN:g}x: {human_bytes(need * MARGIN)}), {self.server.source} says "
                         f"{human_bytes(free)} free: grow the disk first")
        elif free is not None and self.server.total and (self.server.total - free + need) > FULL_SHARE * self.server.total:
            found.append(f"the deployment would fill the server's disk past {FULL_SHARE:.0%} "
                         f"({human_bytes(need)} more on {human_bytes(self.server.total)}, {human_bytes(free)} free; "
                         "Supabase makes a project read-only at 95 %): grow the disk first")
        return found


def assess(conn, records_dir: Path, *, given: list[tuple[int, str]], conn_factory=None) -> Assessment:
    """The budgets of the phases still to apply against the free space known (`given`: sizes the DBA gave)."""
    sizes = fetch(conn, TABLES_SQL)
    legacy = fetch(conn, estimate.SIZES_SQL)
    conversions = estimate.conversions(conn)
    applied = {s.version for s in engine.phase_states(conn) if s.state == "applied, file matches"}
    server = fetch(conn, SERVER_SQL)[0]
    held = server["archive_mode"] in ("on", "always") or server["slots"] > 0
    runner_bytes, runner_what = runner_need(sizes)
    return Assessment(
        phases=phase_needs(sizes, legacy, conversions, applied), runner_bytes=runner_bytes, runner_what=runner_what,
        runner=runner_free(records_dir),
        server=server_free(conn_factory, server, given) if conn_factory else server_free(None, {}, given),
        wal_kept=("archiving or a replication slot keeps the WAL until it is taken: all of it counts" if held else
                  f"checkpoints recycle the WAL beyond max_wal_size ({human_bytes(server['max_wal_size'])})"),
        max_wal_size=server["max_wal_size"], wal_held=held)


def given_sizes(parameter: str | None, target: connection.Target | None) -> list[tuple[int, str]]:
    """The server's free space as the DBA gave it (a ValueError names a value that is no size)."""
    given = []
    if parameter not in (None, "", "None"):
        try:
            given.append((parse_bytes(parameter), "-p server_disk_free"))
        except ValueError as exc:
            raise ValueError(f"server_disk_free: {exc}") from None
    if target is not None and target.server_disk_free:
        given.append((parse_bytes(target.server_disk_free), f"the targets file ({target.name})"))
    return given


# -- the preflight's check, and the command's refusal -------------------------------------------------

@sql_check("-- each table's heap, data and indexes (no scan)\n" + TABLES_SQL.strip()
           + ";\n\n-- the converged tables' column types (a conversion that rewrites rows)\n" + estimate.COLUMN_TYPES_SQL.strip()
           + ";\n\n-- where WAL goes, and whether this role may ask the server's OS for its free space\n"
           + SERVER_SQL.strip() + ";\n\n-- only where it may (rolled back):\n" + DF_SQL.replace("%s", "'df -Pk <data_directory> <data_directory>/pg_wal'"),
           "disk and WAL, predicted, against the free space known")
def disk_and_wal(conn, target: connection.Target, record_dir, server_disk_free: str | None = None) -> Check:
    """The server disk and WAL each phase needs and the runner's disk the record needs, against the free
    space known; refused (error) when they do not fit with a margin, a warning where it cannot be known."""
    assessment = assess(conn, Path(record_dir), given=given_sizes(server_disk_free, target),
                        conn_factory=lambda: connection.connect(target, application_name="runbook preflight df"))
    rows = _rows(assessment)
    problems = assessment.problems()
    need = assessment.server_bytes()
    summary = (f"the server needs {human_bytes(need)} (with a margin of {MARGIN:g}x: {human_bytes(need * MARGIN)}), "
               f"the runner {human_bytes(assessment.runner_bytes)}")
    if problems:
        return Check("disk_and_wal", "error", "refused: " + "; ".join(problems), rows=rows)
    if assessment.server.bytes is None:
        return Check("disk_and_wal", "warning", f"{summary}; the server's free space is {assessment.server.source}: "
                     f"make sure it has {human_bytes(need * MARGIN)} free", rows=rows)
    return Check("disk_and_wal", "info", f"{summary}; both fit ({assessment.server.source}: "
                 f"{human_bytes(assessment.server.bytes)} free; {assessment.runner.source}: "
                 f"{human_bytes(assessment.runner.bytes)} free)", rows=rows)


def _rows(a: Assessment) -> list[dict]:
    rows = [{"where": f"server, phase {p.version}", "disk": human_bytes(p.disk_bytes), "WAL": human_bytes(p.wal_bytes),
             "for": "; ".join(p.reasons)} for p in a.phases]
    rows.append({"where": "server, all phases", "disk": human_bytes(a.server_bytes()), "WAL": a.wal_kept,
                 "for": f"free: {human_bytes(a.server.bytes) if a.server.bytes is not None else 'unknown'} "
                        f"({a.server.source})"})
    rows.append({"where": "runner", "disk": human_bytes(a.runner_bytes), "WAL": "",
                 "for": f"{a.runner_what}; free: {human_bytes(a.runner.bytes)} ({a.runner.source})"})
    return rows


def refusal(target: connection.Target, records_dir: Path, params: dict) -> str | None:
    """Why `runbook deploy` must not start (the disk does not fit), or None; raises ValueError for a
    server_disk_free that is no size. An unreachable server is left to the run's own refusal."""
    given = given_sizes(params.get("server_disk_free"), target)
    try:
        conn = connection.connect(target, application_name="runbook budgets", readonly=True, autocommit=True)
    except psycopg2.OperationalError:
        return None
    try:
        assessment = assess(conn, records_dir, given=given,
                            conn_factory=lambda: connection.connect(target, application_name="runbook budgets df"))
    finally:
        conn.close()
    problems = assessment.problems()
    return "; ".join(problems) if problems else None
