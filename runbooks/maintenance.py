"""Maintenance: the guide's daily, weekly and monthly tasks, as checks a notebook runs.

One notebook (``06_maintenance``) holds all three cadences; ``start(run, cadence)`` returns a
``Plan`` whose ``section(...)`` runs a cadence's cells or skips them visibly (each skipped cell
says so, and the verdict lists the skipped cadences).

Everything here reads, on the notebook's read-only connection, except three writes, each made
through its own connection in its own transaction:

- ``apply_retention`` (weekly, only with ``apply_retention = True``): ``apply_data_retention(false)``
  in a repeatable-read transaction that first counts what the policies would delete, refuses
  above a limit, and rolls back unless exactly that was deleted;
- ``backup_verification`` (monthly): a fresh ``pg_dump -Fc`` into the run's record folder,
  verified with ``backup.verify_backup``, and written as one row of ``backup_verifications``.

- ``database_activity`` (daily): the counters it read, one row of ``truthsource.maintenance_runs``.

Counters in ``pg_stat_database`` grow from the last statistics reset, often the server's start: a
share of rollbacks since then is not a figure of the day. The daily check keeps each reading in
the database's own history (``truthsource.maintenance_runs``, and in the record as
``maintenance/database_activity.json``) and judges the rates over the interval since the last
daily run of the same database (same oid, same statistics reset); the first one records the
baseline and judges no rate. The runbooks' own transactions that undo their work by design (the
verification's cases, the snapshots' consistent reads) end with COMMIT (verification.rolled_back,
snapshot._consistent_read), so the rolled-back share counts the app's failures, not the runbooks'.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import psycopg2.errors
import psycopg2.extras

from . import backup, connection, contract, pgtools, records, troubleshooting
from .checks import Check, fetch, sql_check
from .troubleshooting import APP_SCHEMAS_SQL

CADENCES = ("daily", "weekly", "monthly")
TASKS = {
    "daily": "error and performance signals (pg_stat_database), long-running queries, blocked sessions, "
             "connection use, dead rows, data integrity, security events",
    "weekly": "retention (dry run unless apply_retention = True), audit log review, policy review, index usage",
    "monthly": "full integrity check, security audit, performance analysis, backup verification",
}
ACTIVITY_FILE = Path("maintenance") / "database_activity.json"
# Output metadata of what a skipped cadence displays ({"cadence": skipped, "current": this run's}):
# the HTML record collapses those cells into one line (pages.collapse_skipped_cadences). Metadata,
# not a MIME type: nbval does not compare it, and JupyterLab shows the text as ever.
SKIPPED_METADATA = "truthsource_skipped"
# Roles that Supabase itself runs with superuser or BYPASSRLS (besides the bootstrap superuser).
SUPABASE_PRIVILEGED_ROLES = ("postgres", "supabase_admin", "supabase_auth_admin", "supabase_storage_admin",
                             "supabase_replication_admin", "supabase_read_only_user", "supabase_realtime_admin",
                             "supabase_etl_admin", "service_role", "dashboard_user")
SECRET_COLUMN = re.compile(r"^(key|api_key|apikey|secret|secret_key|client_secret|token|access_token|refresh_token|"
                           r"password|passwd|plaintext_key|plain_key|raw_key|key_value|private_key)$", re.I)
NOT_SECRETS = {"public.rate_limits.key"}     # a rate-limit bucket name (ip:..., user:...)


def _display(obj, **kwargs) -> None:
    from IPython.display import display

    display(obj, **kwargs)


def _utc_day(column: str) -> str:
    return f"to_char({column} at time zone 'UTC', 'YYYY-MM-DD')"


# -- cadences --------------------------------------------------------------------------------

def skipped_metadata(cadence: str, current: str) -> dict:
    return {SKIPPED_METADATA: {"cadence": cadence, "current": current}}


@dataclass
class Section:
    """A cadence's cells: they run when it is this run's cadence, and say so when skipped."""

    run: object
    cadence: str
    current: str

    @property
    def active(self) -> bool:
        return self.cadence == self.current

    def _skipped(self) -> None:
        _display({"text/plain": f"skipped: a {self.cadence} task (this run's cadence is {self.current})"}, raw=True,
                 metadata=skipped_metadata(self.cadence, self.current))

    def show_sql(self, source, title: str | None = None) -> None:
        if self.active:
            self.run.show_sql(source, title)
        else:
            self._skipped()

    def check(self, function, *args, **kwargs) -> Check | None:
        if not self.active:
            self._skipped()
            return None
        return self.run.check(function, *args, **kwargs)

    def plot(self, function, *args, **kwargs) -> None:
        if not self.active:
            self._skipped()
            return
        function(self.run.conn, *args, **kwargs)


@dataclass
class Plan:
    run: object
    cadence: str

    def section(self, cadence: str) -> Section:
        """Announce a cadence's part of the notebook; a skipped one is listed in the verdict."""
        from IPython.display import Markdown

        if cadence not in CADENCES:
            raise ValueError(f"unknown cadence {cadence!r}")
        section = Section(self.run, cadence, self.cadence)
        if section.active:
            _display(Markdown(f"**{cadence.capitalize()} tasks: running** (cadence = {self.cadence!r})"))
        else:
            _display(Markdown(f"**{cadence.capitalize()} tasks: skipped** — this run's cadence is {self.cadence!r}; "
                              f"every cell of this part says so and runs nothing."),
                     metadata=skipped_metadata(cadence, self.cadence))
            self.run.checks.append(Check(f"{cadence}_tasks", "info", f"skipped: this run's cadence is {self.cadence}",
                                         title=f"{cadence} tasks"))
        return section


def start(run, cadence: str) -> Plan:
    """Check the cadence and show which tasks this run does."""
    if cadence not in CADENCES:
        raise ValueError(f"cadence must be one of {', '.join(CADENCES)}, not {cadence!r}")
    from .notebook import table

    _display(table([{"cadence": c, "tasks": TASKS[c], "this run": "runs" if c == cadence else "skipped"}
                    for c in CADENCES]))
    return Plan(run, cadence)


# -- every cadence: the database is migrated -------------------------------------------------

MIGRATED_SQL = """select version, file_name, sha256, action, applied_at, applied_by, run_id
from truthsource.deployment_history order by applied_at"""


@sql_check(MIGRATED_SQL, "the three phases are applied")
def migrated(conn) -> Check:
    from . import engine

    rows = [{"phase": p.version, "file": p.path.name, "state": p.state} for p in engine.phase_states(conn)]
    pending = [r["phase"] for r in rows if r["state"].startswith("pending")]
    if pending:
        return Check("migrated", "error", f"phase(s) {', '.join(pending)} not applied: maintenance runs on a migrated "
                     "database (runbook deploy first)", rows=rows)
    changed = [r["phase"] for r in rows if r["state"].startswith("applied, FILE")]
    if changed:
        return Check("migrated", "warning", f"phase(s) {', '.join(changed)} changed on disk since applied", rows=rows)
    return Check("migrated", "ok", "all three phases applied, and the files on disk match", rows=rows)


# -- daily -----------------------------------------------------------------------------------

ACTIVITY_SQL = """
select d.datid, d.datname as database, d.xact_commit as commits, d.xact_rollback as rollbacks,
       d.deadlocks, d.conflicts, d.temp_files, d.temp_bytes, d.blks_hit, d.blks_read,
       coalesce(d.checksum_failures, 0) as checksum_failures, d.stats_reset,
       to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') as read_at
from pg_stat_database d where d.datname = current_database()
"""
_COUNTERS = ("commits", "rollbacks", "deadlocks", "conflicts", "temp_files", "temp_bytes", "blks_hit", "blks_read",
             "checksum_failures")


MAINTENANCE_TABLE = "truthsource.maintenance_runs"
MAINTENANCE_DDL = f"""
-- each maintenance run's reading of pg_stat_database: the next run of its cadence judges the interval between
create table if not exists {MAINTENANCE_TABLE} (
  run_id text primary key,
  cadence text not null check (cadence in ('daily', 'weekly', 'monthly')),
  datid oid not null,
  stats_reset timestamptz,
  read_at timestamptz not null,
  counters jsonb not null,
  recorded_by text not null default current_user
);
comment on table {MAINTENANCE_TABLE} is 'TruthSource runbooks: each maintenance run''s pg_stat_database counters'"""
LAST_READING_SQL = f"""select run_id, to_char(read_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"') as read_at, counters
from {MAINTENANCE_TABLE}
where cadence = %(cadence)s and datid = %(datid)s and stats_reset is not distinct from %(stats_reset)s
  and run_id <> %(run_id)s
order by read_at desc limit 1"""
RECORD_READING_SQL = f"""insert into {MAINTENANCE_TABLE} (run_id, cadence, datid, stats_reset, read_at, counters)
values (%(run_id)s, %(cadence)s, %(datid)s, %(stats_reset)s, %(read_at)s, %(counters)s)
on conflict (run_id) do update set read_at = excluded.read_at, counters = excluded.counters"""


def last_reading(conn, cadence: str, row: dict, run_id: str) -> dict | None:
    """The last reading of this database's counters by a maintenance run of `cadence` (same statistics
    reset), from the history; None when there is none (or the history cannot be read)."""
    try:
        # asked first, so that a database without the table yet does not count a failed statement
        if not fetch(conn, f"select to_regclass('{MAINTENANCE_TABLE}') is not null as kept")[0]["kept"]:
            return None
        found = fetch(conn, LAST_READING_SQL, {"cadence": cadence, "datid": row["datid"],
                                               "stats_reset": row["stats_reset"], "run_id": run_id})
    except psycopg2.Error:   # not readable by this role
        if not conn.autocommit:
            conn.rollback()
        return None
    return found[0] if found else None


def keep_reading(run, cadence: str, row: dict, current: dict) -> str | None:
    """This run's reading into the history, on a connection of its own; None, or why it could not."""
    from . import engine

    write = connection.connect(run.target, application_name=f"runbook maintenance {run.run_id}"[:63])
    try:
        engine.ensure_history(write)
        with write.cursor() as cur:
            cur.execute(f"select to_regclass('{MAINTENANCE_TABLE}') is null")
            if cur.fetchone()[0]:
                cur.execute(MAINTENANCE_DDL)
            cur.execute(RECORD_READING_SQL, {"run_id": run.run_id, "cadence": cadence, "datid": row["datid"],
                                             "stats_reset": row["stats_reset"], "read_at": row["read_at"],
                                             "counters": json.dumps(current)})
        write.commit()
        return None
    except psycopg2.Error as exc:
        write.rollback()
        return (exc.diag.message_primary or str(exc)).strip()
    finally:
        write.close()


def _activity_signals(delta: dict, judged: bool, max_rollback_ratio: float, min_cache_hit_ratio: float,
                      max_temp_bytes: int) -> list[tuple]:
    """(signal, value, threshold, status) of the counters' deltas; rates and counts are judged only over
    an interval (`judged`): a checksum failure is an error whenever it happened."""
    transactions = delta["commits"] + delta["rollbacks"]
    blocks = delta["blks_hit"] + delta["blks_read"]
    rollback_ratio = delta["rollbacks"] / transactions if transactions else 0.0
    hit_ratio = delta["blks_hit"] / blocks if blocks else 1.0

    def judge(bad: bool) -> str:
        return ("warning" if bad else "ok") if judged else "not judged"
    return [
        ("checksum failures", delta["checksum_failures"], "0", "error" if delta["checksum_failures"] else "ok"),
        ("deadlocks", delta["deadlocks"], "0", judge(delta["deadlocks"] > 0)),
        ("recovery conflicts (standbys)", delta["conflicts"], "0", judge(delta["conflicts"] > 0)),
        ("rolled-back share of transactions", f"{rollback_ratio:.2%} of {transactions}", f"<= {max_rollback_ratio:.0%}",
         judge(transactions >= 100 and rollback_ratio > max_rollback_ratio)),
        ("buffer cache hit ratio", f"{hit_ratio:.2%} of {blocks} blocks", f">= {min_cache_hit_ratio:.0%}",
         judge(blocks >= 10_000 and hit_ratio < min_cache_hit_ratio)),
        ("temporary files (sorts and hashes spilling to disk)", f"{delta['temp_files']} ({delta['temp_bytes']} bytes)",
         f"<= {max_temp_bytes} bytes", judge(delta["temp_bytes"] > max_temp_bytes)),
    ]


@sql_check(ACTIVITY_SQL + ";\n-- the last daily run's reading of the same database, from the history:\n"
           + LAST_READING_SQL + ";\n-- and this run's, kept for the next one (a connection of its own):\n"
           + RECORD_READING_SQL, "error and performance signals (pg_stat_database)")
def database_activity(conn, run, *, cadence: str = "daily", max_rollback_ratio: float = 0.05,
                      min_cache_hit_ratio: float = 0.95, max_temp_bytes: int = 1_000_000_000) -> Check:
    """pg_stat_database's signals over the interval since the last run of `cadence` on this database,
    kept in the history (the first run records the baseline and judges no rate)."""
    row = fetch(conn, ACTIVITY_SQL)[0]
    reset = row["stats_reset"].isoformat() if row["stats_reset"] else None
    current = {k: row[k] for k in _COUNTERS}
    previous = last_reading(conn, cadence, row, run.run_id)
    not_kept = keep_reading(run, cadence, row, current)
    records.make_folder((Path(run.record_dir) / ACTIVITY_FILE).parent)
    records.write_text(Path(run.record_dir) / ACTIVITY_FILE, json.dumps(
        {"datid": row["datid"], "stats_reset": reset, "read_at": row["read_at"], "run_id": run.run_id,
         "cadence": cadence, "previous": previous, "counters": current}, indent=1, sort_keys=True, default=str) + "\n")
    if previous:
        window = f"since the {cadence} run {previous['run_id']} ({previous['read_at']})"
        delta = {k: current[k] - previous["counters"].get(k, 0) for k in _COUNTERS}
    else:
        window = (f"since statistics were reset ({reset[:10] if reset else 'never: since the cluster began'}): no "
                  f"earlier {cadence} run of this database in {MAINTENANCE_TABLE}, so this reading is the baseline "
                  f"and rates are judged from the next {cadence} run on")
        delta = current
    rows = [{"signal": "window", "value": window, "threshold": "", "status": ""}]
    rows += [{"signal": s, "value": v, "threshold": t, "status": st}
             for s, v, t, st in _activity_signals(delta, bool(previous), max_rollback_ratio, min_cache_hit_ratio,
                                                  max_temp_bytes)]
    if not_kept:
        rows.append({"signal": "kept in the history", "value": f"no: {not_kept}", "threshold": "", "status": "warning"})
    worst = "error" if any(r["status"] == "error" for r in rows) else \
        "warning" if any(r["status"] == "warning" for r in rows) else "ok"
    flagged = [r["signal"] for r in rows if r["status"] in ("warning", "error")]
    summary = ((", ".join(flagged) if flagged else "no errors, nothing above its threshold")
               + (f" (since the previous {cadence} run, {previous['run_id']})" if previous else
                  f" (first {cadence} run of this database: baseline recorded, rates judged from the next one)")
               + ". Server logs are read where the platform keeps them (Supabase: Logs Explorer).")
    return Check("database_activity", worst, summary, rows=rows, columns=["signal", "value", "threshold", "status"])


LONG_RUNNING_SQL = """
select pid, usename as role, application_name as application, state,
       date_trunc('second', now() - xact_start) as transaction_age,
       date_trunc('second', now() - query_start) as query_age,
       wait_event_type, wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), 120) as query
from pg_stat_activity
where backend_type = 'client backend' and pid <> pg_backend_pid() and datname = current_database()
  and state <> 'idle'
  and greatest(now() - xact_start, now() - query_start) > make_interval(secs => %(max_seconds)s)
order by greatest(now() - xact_start, now() - query_start) desc
"""


@sql_check(LONG_RUNNING_SQL, "long-running queries and transactions")
def long_running(conn, *, max_seconds: int = 300) -> Check:
    rows = fetch(conn, LONG_RUNNING_SQL, {"max_seconds": max_seconds})
    if not rows:
        return Check("long_running", "ok", f"none: no query or transaction has run longer than {max_seconds}s")
    idle = sum(1 for r in rows if r["state"] == "idle in transaction")
    return Check("long_running", "warning",
                 f"{len(rows)} session(s) longer than {max_seconds}s ({idle} idle in transaction: they hold locks "
                 "and stop vacuum); pg_cancel_backend(pid) / pg_terminate_backend(pid) after asking their owner",
                 rows=rows)


BLOCKED_SQL = """
select pid, usename as role, application_name as application, pg_blocking_pids(pid) as blocked_by,
       wait_event_type, wait_event, date_trunc('second', now() - query_start) as waiting_for,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 120) as query
from pg_stat_activity
where cardinality(pg_blocking_pids(pid)) > 0
order by query_start
"""


@sql_check(BLOCKED_SQL, "blocked sessions")
def blocked_sessions(conn, *, max_blocked: int = 0) -> Check:
    rows = fetch(conn, BLOCKED_SQL)
    if not rows:
        return Check("blocked_sessions", "ok", "none: no session waits on a lock")
    status = "warning" if len(rows) > max_blocked else "info"
    return Check("blocked_sessions", status, f"{len(rows)} session(s) wait on a lock held by another "
                 f"(more than {max_blocked} warns): look at the blockers first", rows=rows)


CONNECTIONS_SQL = """
select coalesce(state, 'background') as state, count(*) as sessions,
       current_setting('max_connections')::int as max_connections,
       current_setting('superuser_reserved_connections')::int as reserved_for_superusers
from pg_stat_activity
where backend_type = 'client backend'
group by 1 order by 1
"""


@sql_check(CONNECTIONS_SQL, "connection use")
def connection_usage(conn, *, max_share: float = 0.8) -> Check:
    rows = fetch(conn, CONNECTIONS_SQL)
    used = sum(r["sessions"] for r in rows)
    limit = (rows[0]["max_connections"] - rows[0]["reserved_for_superusers"]) if rows else 1
    share = used / limit if limit else 1.0
    table_rows = [{"state": r["state"], "sessions": r["sessions"]} for r in rows]
    table_rows.append({"state": f"in use of {limit} (max_connections less the superusers' reserve)",
                       "sessions": f"{used} ({share:.0%})"})
    if share > max_share:
        return Check("connection_usage", "warning", f"{share:.0%} of the connections in use, above {max_share:.0%}: "
                     "use the pooler, look for leaks", rows=table_rows)
    return Check("connection_usage", "ok", f"below {max_share:.0%} of the connections in use", rows=table_rows)


DEAD_ROWS_SQL = f"""
select quote_ident(s.schemaname) || '.' || quote_ident(s.relname) as table_name, s.n_live_tup as live_rows,
       s.n_dead_tup as dead_rows, round(s.n_dead_tup::numeric / nullif(s.n_live_tup + s.n_dead_tup, 0), 3) as dead_share,
       s.last_vacuum, s.last_autovacuum
from pg_stat_user_tables s join pg_namespace n on n.nspname = s.schemaname
where {APP_SCHEMAS_SQL} and s.n_dead_tup >= %(min_dead)s
  and s.n_dead_tup::numeric / nullif(s.n_live_tup + s.n_dead_tup, 0) > %(max_share)s
order by s.n_dead_tup desc, 1
"""


@sql_check(DEAD_ROWS_SQL, "dead rows (vacuum keeping up?)")
def dead_rows(conn, *, max_share: float = 0.2, min_dead: int = 1000) -> Check:
    rows = fetch(conn, DEAD_ROWS_SQL, {"max_share": max_share, "min_dead": min_dead})
    if not rows:
        return Check("dead_rows", "ok", f"none: no table has {min_dead}+ dead rows making up more than {max_share:.0%}")
    for r in rows:
        r["suggestion"] = f"vacuum (analyze) {r['table_name']};"
    return Check("dead_rows", "warning", f"{len(rows)} table(s) where autovacuum falls behind: vacuum them in a quiet "
                 "hour and look at what holds old snapshots (long transactions, replication slots)", rows=rows)


# verify_data_integrity() as contract.INTEGRITY_SQL asks it, errors first: maintenance reads the worst first
INTEGRITY_BY_SEVERITY_SQL = """
select check_name, status, affected_rows, details
from public.verify_data_integrity()
order by case status when 'error' then 1 when 'warning' then 2 else 3 end, check_name
"""


@sql_check(INTEGRITY_BY_SEVERITY_SQL, "data integrity (verify_data_integrity())")
def integrity(conn, *, full: bool = False) -> Check:
    name = "full_integrity" if full else "integrity"
    title = "full data integrity check" if full else "data integrity"
    if fetch(conn, "select to_regprocedure('public.verify_data_integrity()') is null as missing")[0]["missing"]:
        return Check(name, "error", "verify_data_integrity() does not exist: phase 3 is not applied", title=title)
    try:
        rows = fetch(conn, INTEGRITY_BY_SEVERITY_SQL)
    except psycopg2.errors.InsufficientPrivilege:
        return Check(name, "error", "the connecting role may not execute verify_data_integrity(): connect as the "
                     "owner (the DBA) or grant execute on it to this role", title=title)
    counts = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "warning", "error")}
    status = "error" if counts["error"] else "warning" if counts["warning"] else "ok"
    shown = rows if full else [r for r in rows if r["status"] != "ok"]
    summary = (f"{len(rows)} checks: {counts['ok']} ok, {counts['warning']} warning(s) (legacy rows kept and reported; "
               f"every new write is checked), {counts['error']} error(s)")
    if not full and counts["ok"]:
        summary += f"; the {counts['ok']} ok check(s) are not listed"
    return Check(name, status, summary, title=title, rows=shown,
                 columns=["check_name", "status", "affected_rows", "details"])


SECURITY_EVENTS_SQL = f"""
select severity, event_type, count(*) as events,
       {_utc_day('min(created_at)')} as first_day, {_utc_day('max(created_at)')} as last_day
from public.security_events
where created_at > now() - make_interval(hours => %(hours)s)
group by severity, event_type
order by case severity when 'critical' then 1 when 'high' then 2 when 'medium' then 3 else 4 end, event_type
"""


@sql_check(SECURITY_EVENTS_SQL, "security events")
def security_events(conn, *, hours: int = 24, fail_on_critical: bool = True) -> Check:
    rows = fetch(conn, SECURITY_EVENTS_SQL, {"hours": hours})
    by = {s: sum(r["events"] for r in rows if r["severity"] == s) for s in ("critical", "high", "medium", "low")}
    total = sum(by.values())
    counts = ", ".join(f"{n} {s}" for s, n in by.items() if n) or "none"
    if by["critical"]:
        return Check("security_events", "error" if fail_on_critical else "warning",
                     f"{by['critical']} CRITICAL event(s) in the last {hours}h ({counts}): investigate now", rows=rows)
    if by["high"]:
        return Check("security_events", "warning", f"{by['high']} high-severity event(s) in the last {hours}h "
                     f"({counts})", rows=rows)
    return Check("security_events", "ok", f"{total} event(s) in the last {hours}h, none high or critical"
                 + (f" ({counts})" if total else ""), rows=rows)


SECURITY_EVENTS_PER_DAY_SQL = f"""
select {_utc_day('created_at')} as day, severity, count(*) as events
from public.security_events
where created_at > now() - make_interval(days => %(days)s)
group by 1, 2 order by 1, 2
"""


def plot_security_events(conn, days: int = 30) -> bytes | None:
    """Security events per day by severity (a stacked bar chart)."""
    rows = fetch(conn, SECURITY_EVENTS_PER_DAY_SQL, {"days": days})
    if not rows:
        print(f"No security events in the last {days} days: nothing to plot.")
        return None
    series = {}
    for r in rows:
        series.setdefault(r["severity"], {})[r["day"]] = r["events"]
    order = [s for s in ("low", "medium", "high", "critical") if s in series]
    colors = {"low": "#9ecae1", "medium": "#fdae6b", "high": "#e6550d", "critical": "#a50f15"}
    return _bar_chart(_last_days(days), {s: series[s] for s in order}, colors,
               f"Security events per day, last {days} days (UTC)", "events")


# -- weekly ----------------------------------------------------------------------------------

RETENTION_PLAN_SQL = """
select p.table_name, p.timestamp_column, p.retention_period::text as keep_for, p.is_enabled as enabled,
       r.rows_affected as rows_past_retention
from public.data_retention_policies p
left join public.apply_data_retention(true) r on r.table_name = p.table_name   -- true: a dry run, counts only
order by p.table_name
"""


@sql_check(RETENTION_PLAN_SQL, "retention: what the policies would delete (dry run)")
def retention_plan(conn) -> Check:
    rows = fetch(conn, RETENTION_PLAN_SQL)
    if not rows:
        return Check("retention_plan", "warning", "data_retention_policies is empty: logs are kept forever")
    due = [r for r in rows if r["rows_past_retention"]]
    total = sum(r["rows_past_retention"] or 0 for r in rows)
    summary = (f"dry run: {total} row(s) past retention in {len(due)} table(s)" if total
               else f"dry run: nothing past retention ({len(rows)} policies)")
    return Check("retention_plan", "ok", summary, rows=rows)


RETENTION_APPLY_SQL = """
begin isolation level repeatable read;
select table_name, rows_affected from public.apply_data_retention(true) order by table_name;   -- the plan
select table_name, rows_affected from public.apply_data_retention(false) order by table_name;  -- the deletes
commit;  -- only when the deletes are exactly the plan (and within retention_max_rows); else rollback
"""


@sql_check(RETENTION_APPLY_SQL, "retention: apply the policies")
def apply_retention(conn, run, *, apply: bool = False, max_rows: int | None = 100_000,
                    lock_timeout: str = "5s", statement_timeout: str = "30min") -> Check:
    if not apply:
        return Check("retention_apply", "info", "dry run: nothing deleted (apply_retention = False); the plan above "
                     "is what apply_retention = True would delete")
    write = connection.connect(run.target, application_name=f"runbook maintenance {run.run_id}")
    try:
        write.set_session(isolation_level="REPEATABLE READ")
        with write.cursor() as cur:
            cur.execute("select set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                        (lock_timeout, statement_timeout))
            cur.execute("select table_name, rows_affected from public.apply_data_retention(true) order by table_name")
            planned = dict(cur.fetchall())
            total = sum(planned.values())
            if max_rows is not None and total > max_rows:
                write.rollback()
                return Check("retention_apply", "error", f"refused: {total} rows would be deleted, more than "
                             f"retention_max_rows = {max_rows}; nothing was deleted (raise the limit after reading "
                             "the plan)", rows=[{"table_name": t, "planned": n} for t, n in planned.items()])
            cur.execute("select table_name, rows_affected from public.apply_data_retention(false) order by table_name")
            deleted = dict(cur.fetchall())
        rows = [{"table_name": t, "planned": planned.get(t), "deleted": deleted.get(t)}
                for t in sorted(set(planned) | set(deleted))]
        if deleted != planned:
            write.rollback()
            return Check("retention_apply", "error", "the deletes differ from the plan: rolled back, nothing deleted",
                         rows=rows)
        write.commit()
    except psycopg2.Error as exc:
        write.rollback()
        return Check("retention_apply", "error", f"retention failed, rolled back, nothing deleted: "
                     f"{str(exc).strip().splitlines()[0]}")
    finally:
        write.close()
    return Check("retention_apply", "ok", f"deleted {sum(deleted.values())} row(s) past retention, exactly the plan "
                 "(each table's run is recorded in audit_logs)", rows=rows)


AUDIT_REVIEW_SQL = f"""
select coalesce(table_name, '-') as table_name, action, count(*) as rows,
       {_utc_day('min(created_at)')} as first_day, {_utc_day('max(created_at)')} as last_day
from public.audit_logs
where created_at > now() - make_interval(days => %(days)s)
group by 1, 2 order by 1, 2
"""


@sql_check(AUDIT_REVIEW_SQL, "audit log review")
def audit_log_review(conn, *, days: int = 7) -> Check:
    rows = fetch(conn, AUDIT_REVIEW_SQL, {"days": days})
    total = sum(r["rows"] for r in rows)
    if not rows:
        return Check("audit_log_review", "info", f"no audit rows in the last {days} days (a quiet week, or the audit "
                     "triggers are off: the next check says)")
    deletes = sum(r["rows"] for r in rows if r["action"] == "delete")
    return Check("audit_log_review", "info", f"{total} audit row(s) in the last {days} days over {len(rows)} "
                 f"(table, action) pair(s); {deletes} delete(s)", rows=rows)


AUDIT_TRAIL_SQL = """
select x.table_name, x.trigger_name, x.purpose,
       case when t.oid is null then 'MISSING' when t.tgenabled = 'D' then 'DISABLED' else 'enabled' end as state
from (values ('public.organizations', 'audit_row_change', 'audit trail'),
             ('public.organization_members', 'audit_row_change', 'audit trail'),
             ('public.products', 'audit_row_change', 'audit trail'),
             ('public.inventory', 'audit_row_change', 'audit trail'),
             ('public.api_keys', 'audit_row_change', 'audit trail'),
             ('public.audit_logs', 'audit_logs_append_only', 'append-only'),
             ('public.audit_logs', 'audit_logs_append_only_truncate', 'append-only'),
             ('public.security_events', 'security_events_append_only', 'append-only'),
             ('public.security_events', 'security_events_append_only_truncate', 'append-only'))
     as x (table_name, trigger_name, purpose)
left join pg_trigger t on t.tgrelid = to_regclass(x.table_name) and t.tgname = x.trigger_name
order by 1, 2
"""


@sql_check(AUDIT_TRAIL_SQL, "the audit trail is whole")
def audit_trail(conn) -> Check:
    rows = fetch(conn, AUDIT_TRAIL_SQL)
    broken = [r for r in rows if r["state"] != "enabled"]
    if broken:
        return Check("audit_trail", "error", f"{len(broken)} audit or append-only trigger(s) missing or disabled: "
                     "changes go unrecorded or logs can be rewritten (re-run phase 2 and 3)", rows=rows)
    return Check("audit_trail", "ok", "every audit and append-only trigger is there and enabled", rows=rows)


AUDIT_PER_DAY_SQL = f"""
select {_utc_day('created_at')} as day, coalesce(table_name, '-') as table_name, count(*) as rows
from public.audit_logs
where created_at > now() - make_interval(days => %(days)s)
group by 1, 2 order by 1, 2
"""


def plot_audit_volume(conn, days: int = 30) -> bytes | None:
    """Audit rows per day, by table (a stacked bar chart)."""
    rows = fetch(conn, AUDIT_PER_DAY_SQL, {"days": days})
    if not rows:
        print(f"No audit rows in the last {days} days: nothing to plot.")
        return None
    series = {}
    for r in rows:
        series.setdefault(r["table_name"], {})[r["day"]] = r["rows"]
    return _bar_chart(_last_days(days), dict(sorted(series.items())), {},
               f"Audit log rows per day, last {days} days (UTC)", "rows")


RLS_COVERAGE_SQL = """
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name, c.relrowsecurity as rls,
       (select count(*) from pg_policy p where p.polrelid = c.oid) as policies,
       coalesce((select string_agg(r.rolname, ', ' order by r.rolname) from pg_roles r
                  where r.rolname in ('anon', 'authenticated')
                    and has_table_privilege(r.oid, c.oid, 'select, insert, update, delete')), '') as api_roles_with_privileges
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = 'public' and c.relkind in ('r', 'p')
order by 1
"""


@sql_check(RLS_COVERAGE_SQL, "row-level security on every table")
def rls_coverage(conn) -> Check:
    rows = fetch(conn, RLS_COVERAGE_SQL)
    for r in rows:
        if not r["rls"]:
            r["note"] = "RLS OFF: " + ("the API roles read and write every row" if r["api_roles_with_privileges"]
                                       else "closed only by grants")
        elif r["policies"] == 0:
            r["note"] = ("no policy: the API roles see nothing though they have privileges" if r["api_roles_with_privileges"]
                         else "service_role only (no API grants, no policies)")
        else:
            r["note"] = ""
    off = [r["table_name"] for r in rows if not r["rls"]]
    if off:
        return Check("rls_coverage", "error", f"RLS is off on {', '.join(off)}: the contract wants it on every table "
                     "in public (alter table ... enable row level security, with policies: phase 2)", rows=rows)
    empty = [r["table_name"] for r in rows if r["policies"] == 0 and r["api_roles_with_privileges"]]
    if empty:
        return Check("rls_coverage", "warning", f"RLS on everywhere; {', '.join(empty)} granted to API roles without "
                     "any policy", rows=rows)
    return Check("rls_coverage", "ok", f"RLS on all {len(rows)} tables in public", rows=rows)


POLICIES_SQL = f"""
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name, p.polname as policy,
       case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update'
                     when 'd' then 'delete' else 'all' end as command,
       p.polpermissive as permissive,
       case when p.polroles = '{{0}}' then 'public'
            else array_to_string(array(select r.rolname from pg_roles r where r.oid = any(p.polroles) order by 1), ', ')
       end as roles,
       pg_get_expr(p.polqual, p.polrelid) as using_expression,
       pg_get_expr(p.polwithcheck, p.polrelid) as check_expression
from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
where {APP_SCHEMAS_SQL}
order by 1, 2
"""
_AUTH_CALL = re.compile(r"auth\.(uid|jwt|role)\(\)")
_WRAPPED_AUTH_CALL = re.compile(r"SELECT auth\.(uid|jwt|role)\(\)")


def _always_true(expression: str | None) -> bool:
    return expression is not None and expression.replace("(", "").replace(")", "").strip().lower() == "true"


@sql_check(POLICIES_SQL, "policy review")
def policy_review(conn) -> Check:
    policies = fetch(conn, POLICIES_SQL)
    rows, errors = [], 0
    for p in policies:
        roles = [r.strip() for r in p["roles"].split(",")]
        exposed = {"public", "anon", "authenticated"} & set(roles)
        findings = []
        if exposed and p["permissive"] and (_always_true(p["using_expression"]) or _always_true(p["check_expression"])):
            findings.append("OPEN: always true for " + ", ".join(sorted(exposed)))
            errors += 1
        if "public" in roles:
            findings.append("applies to every role, anon included (name the role: to authenticated)")
        elif "anon" in roles:
            findings.append("a policy for anon (the contract: anon reads and writes nothing)")
        text = " ".join(e for e in (p["using_expression"], p["check_expression"]) if e)
        unwrapped = len(_AUTH_CALL.findall(text)) - len(_WRAPPED_AUTH_CALL.findall(text))
        if unwrapped > 0:
            findings.append(f"{unwrapped} auth.*() call(s) not wrapped as (select auth.uid()): evaluated per row")
        if findings:
            rows.append({"table": p["table_name"], "policy": p["policy"], "command": p["command"],
                         "roles": p["roles"], "finding": "; ".join(findings)})
    if errors:
        return Check("policy_review", "error", f"{errors} open (always true) polic(ies) for the API roles among "
                     f"{len(policies)}: anyone reads or writes those rows", rows=rows)
    if rows:
        return Check("policy_review", "warning", f"{len(rows)} of {len(policies)} policies need a look", rows=rows)
    return Check("policy_review", "ok", f"{len(policies)} policies: none open, none for anon or public, every "
                 "auth.*() call wrapped in (select ...)")


# -- monthly: full integrity -----------------------------------------------------------------

INVALID_INDEXES_SQL = f"""
select format('%I.%I', n.nspname, c.relname) as index_name, i.indrelid::regclass::text as table_name,
       i.indisvalid as valid, i.indisready as ready
from pg_index i join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
where {APP_SCHEMAS_SQL} and (not i.indisvalid or not i.indisready)
order by 1
"""


@sql_check(INVALID_INDEXES_SQL, "invalid indexes (failed concurrent builds)")
def invalid_indexes(conn) -> Check:
    rows = fetch(conn, INVALID_INDEXES_SQL)
    if not rows:
        return Check("invalid_indexes", "ok", "none: every index is valid")
    for r in rows:
        r["fix"] = f"drop index concurrently if exists {r['index_name']};  -- then build it again concurrently"
    return Check("invalid_indexes", "warning", f"{len(rows)} invalid index(es): left by failed concurrent builds; "
                 "writes still maintain them, queries never use them", rows=rows)


AMCHECK_SQL = f"""
select format('%I.%I', n.nspname, c.relname) as index_name,
       format('%I.bt_index_check(%s, false)', x.nspname, c.oid) as call
from pg_index i join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
join pg_am am on am.oid = c.relam and am.amname = 'btree'
cross join (select e.extnamespace::regnamespace::text as nspname from pg_extension e where e.extname = 'amcheck') x
where {APP_SCHEMAS_SQL} and i.indisvalid and c.relpersistence <> 't'
order by 1
"""


@sql_check(AMCHECK_SQL, "index structure (amcheck)")
def amcheck_indexes(conn) -> Check:
    indexes = fetch(conn, AMCHECK_SQL)
    if not indexes:
        installed = fetch(conn, "select exists (select 1 from pg_extension where extname = 'amcheck') as installed")
        if not installed[0]["installed"]:
            return Check("amcheck", "info", "amcheck is not installed: index structure not verified (create extension "
                         "amcheck to enable it; this notebook creates nothing)")
        return Check("amcheck", "ok", "no btree index to check")
    corrupt = []
    for r in indexes:
        try:
            fetch(conn, f"select {r['call']}")
        except psycopg2.Error as exc:
            corrupt.append({"index": r["index_name"], "problem": str(exc).strip().splitlines()[0]})
    if corrupt:
        return Check("amcheck", "error", f"{len(corrupt)} of {len(indexes)} btree index(es) fail bt_index_check: "
                     "REINDEX them (and find out why)", rows=corrupt)
    return Check("amcheck", "ok", f"{len(indexes)} btree index(es) pass bt_index_check")


SEQUENCES_SQL = f"""
select format('%I.%I', s.schemaname, s.sequencename) as sequence, s.data_type::text as type, s.last_value,
       s.max_value, round(100.0 * s.last_value / s.max_value, 2) as used_percent
from pg_sequences s join pg_namespace n on n.nspname = s.schemaname
where {APP_SCHEMAS_SQL} and s.last_value is not null and s.increment_by > 0 and not s.cycle
  and s.last_value::numeric / s.max_value > 0.5
order by 5 desc, 1
"""


@sql_check(SEQUENCES_SQL, "sequence headroom")
def sequence_headroom(conn, *, max_used: float = 0.8) -> Check:
    rows = fetch(conn, SEQUENCES_SQL)
    if not rows:
        return Check("sequence_headroom", "ok", "no sequence has used half of its range")
    near = [r for r in rows if r["used_percent"] / 100 > max_used]
    return Check("sequence_headroom", "warning" if near else "info",
                 f"{len(rows)} sequence(s) past half of their range, {len(near)} past {max_used:.0%}: "
                 "move the column to bigint before it runs out", rows=rows)


# -- monthly: security audit -----------------------------------------------------------------

PRIVILEGED_ROLES_SQL = """
select r.rolname as role, r.rolsuper as superuser, r.rolbypassrls as bypass_rls, r.rolcreaterole as create_role,
       r.rolreplication as replication, r.rolcanlogin as can_login, r.oid = 10 as bootstrap
from pg_roles r
where (r.rolsuper or r.rolbypassrls) and r.rolname !~ '^pg_'
order by 1
"""


@sql_check(PRIVILEGED_ROLES_SQL, "roles that bypass row-level security")
def privileged_roles(conn, *, expected=None) -> Check:
    if isinstance(expected, str):
        expected = [e.strip() for e in expected.split(",") if e.strip()]
    allowed = set(expected if expected is not None else SUPABASE_PRIVILEGED_ROLES)
    allowed.add(fetch(conn, "select current_user as me")[0]["me"])
    rows = fetch(conn, PRIVILEGED_ROLES_SQL)
    for r in rows:
        bootstrap = r.pop("bootstrap")
        r["expected"] = "yes" if r["role"] in allowed or bootstrap else "NO"
    unexpected = [r["role"] for r in rows if r["expected"] == "NO"]
    if unexpected:
        return Check("privileged_roles", "warning", f"{len(unexpected)} unexpected role(s) with superuser or BYPASSRLS: "
                     f"{', '.join(unexpected)} (they read every tenant's rows)", rows=rows)
    return Check("privileged_roles", "ok", f"{len(rows)} role(s) with superuser or BYPASSRLS, all expected", rows=rows)


DEFINER_SQL = f"""
select format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)) as function,
       pg_get_userbyid(p.proowner) as owner, coalesce(array_to_string(p.proconfig, ', '), '') as settings
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where {APP_SCHEMAS_SQL} and p.prosecdef
  and not exists (select 1 from unnest(coalesce(p.proconfig, '{{}}')) s where s like 'search_path=%')
order by 1
"""


@sql_check(DEFINER_SQL, "SECURITY DEFINER functions without a pinned search_path")
def definer_search_path(conn) -> Check:
    rows = fetch(conn, DEFINER_SQL)
    if not rows:
        return Check("definer_search_path", "ok", "none: every SECURITY DEFINER function pins its search_path")
    for r in rows:
        r["fix"] = f"alter function {r['function']} set search_path = '';  -- after qualifying every name in its body"
    return Check("definer_search_path", "error", f"{len(rows)} SECURITY DEFINER function(s) run with the caller's "
                 "search_path: a caller's object can take the place of the one meant (privilege escalation)", rows=rows)


EXPOSED_FUNCTIONS_SQL = f"""
select format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)) as function,
       p.prosecdef as security_definer,
       has_function_privilege('anon', p.oid, 'execute') as anon,
       has_function_privilege('authenticated', p.oid, 'execute') as authenticated
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where {APP_SCHEMAS_SQL} and p.prokind in ('f', 'p') and p.prorettype <> 'trigger'::regtype
  and (has_function_privilege('anon', p.oid, 'execute') or has_function_privilege('authenticated', p.oid, 'execute'))
order by 1
"""
# Called by public.export_user_data() (SECURITY INVOKER) on behalf of the user.
CLIENT_HELPERS = ("private.export_user_data(uuid)",)


def _norm(signature: str) -> str:
    return signature.replace(" ", "")


@sql_check(EXPOSED_FUNCTIONS_SQL, "functions the API roles can execute")
def function_exposure(conn) -> Check:
    rows = fetch(conn, EXPOSED_FUNCTIONS_SQL)
    called = {_norm(r["function"]) for r in fetch(conn, troubleshooting.CALLED_FUNCTIONS_SQL) if r["role"] == "authenticated"}
    for_clients = {_norm(f) for f in troubleshooting.CLIENT_FUNCTIONS + CLIENT_HELPERS} | called
    service_only = {_norm(f) for f in troubleshooting.SERVICE_FUNCTIONS}
    findings, errors = [], 0
    for r in rows:
        name = _norm(r["function"])
        who = ", ".join(role for role in ("anon", "authenticated") if r[role])
        if name in service_only:
            finding, errors = f"not for clients, yet executable by {who}", errors + 1
        elif r["anon"]:
            finding = "executable by anon (the contract: anon reads and writes nothing)"
        elif name not in for_clients:
            finding = ("SECURITY DEFINER and executable by authenticated: is it meant for clients?" if r["security_definer"]
                       else "executable by authenticated: is it meant for clients?")
        else:
            continue
        findings.append({"function": r["function"], "security definer": r["security_definer"], "finding": finding,
                         "fix": f"revoke execute on function {r['function']} from public, anon, authenticated;"})
    summary = f"{len(rows)} function(s) executable by anon or authenticated"
    if errors:
        return Check("function_exposure", "error", f"{summary}; {errors} of them are for service_role only",
                     rows=findings)
    if findings:
        return Check("function_exposure", "warning", f"{summary}; {len(findings)} not known to be for clients",
                     rows=findings)
    return Check("function_exposure", "ok", f"{summary}: each is for clients (the policies' helpers, "
                 "export_user_data, the validators)")


TABLE_EXPOSURE_SQL = """
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name, c.relname, r.rolname as role,
       array_to_string(array(select p from unnest(array['select', 'insert', 'update', 'delete', 'truncate',
                                                         'references', 'trigger']) p
                             where has_table_privilege(r.oid, c.oid, p)), ', ') as privileges
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_roles r on r.rolname in ('anon', 'authenticated')
where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm')
order by 1, 3
"""


@sql_check(TABLE_EXPOSURE_SQL, "what the API roles may do to tables")
def table_exposure(conn) -> Check:
    rows = fetch(conn, TABLE_EXPOSURE_SQL)
    needed = troubleshooting.NEEDED_TABLE_PRIVILEGES["authenticated"]
    known = set(contract.TABLES)
    findings = []
    for r in rows:
        have = [p for p in r["privileges"].split(", ") if p]
        if not have:
            continue
        if r["role"] == "anon":
            extra = have
        elif r["relname"] in known:
            extra = [p for p in have if p not in needed.get(r["relname"], ())]
        else:
            extra = [p for p in have if p in ("truncate", "references", "trigger")]
        if extra:
            findings.append({"table": r["table_name"], "role": r["role"], "more than needed": ", ".join(extra),
                             "fix": f"revoke {', '.join(extra)} on table {r['table_name']} from {r['role']};"})
    if findings:
        return Check("table_exposure", "error", f"{len(findings)} grant(s) beyond the contract (anon nothing; "
                     "authenticated never TRUNCATE, which bypasses RLS; the logs append-only)", rows=findings)
    return Check("table_exposure", "ok", "anon has no privilege on any table in public; authenticated has exactly "
                 "what the product needs (RLS narrows it)")


API_KEYS_SQL = f"""
select coalesce(o.slug, '-') as organization, k.name, coalesce(k.key_prefix, '') as key_prefix,
       {_utc_day('k.created_at')} as created, coalesce({_utc_day('k.last_used_at')}, 'never') as last_used,
       coalesce({_utc_day('k.expires_at')}, '') as expires, coalesce({_utc_day('k.revoked_at')}, '') as revoked,
       k.revoked_at is null and k.expires_at < now() as expired_not_revoked,
       k.revoked_at is null and k.created_at < now() - make_interval(days => %(max_age_days)s) as needs_rotation,
       k.revoked_at is null and k.last_used_at is null
         and k.created_at < now() - make_interval(days => %(unused_days)s) as never_used,
       k.revoked_at is null and k.last_used_at < now() - make_interval(days => %(unused_days)s) as unused
from public.api_keys k left join public.organizations o on o.id = k.organization_id
order by 1, 2, k.id
"""


@sql_check(API_KEYS_SQL, "API keys: rotation, expiry, use")
def api_key_hygiene(conn, *, max_age_days: int = 365, unused_days: int = 90) -> Check:
    keys = fetch(conn, API_KEYS_SQL, {"max_age_days": max_age_days, "unused_days": unused_days})
    rows = []
    for k in keys:
        findings = [text for flag, text in (
            ("expired_not_revoked", "expired but not revoked"),
            ("needs_rotation", f"older than {max_age_days} days: rotate"),
            ("never_used", f"never used (created over {unused_days} days ago): revoke?"),
            ("unused", f"unused for over {unused_days} days: revoke?")) if k[flag]]
        rows.append({"organization": k["organization"], "name": k["name"], "prefix": k["key_prefix"],
                     "created": k["created"], "last used": k["last_used"], "expires": k["expires"],
                     "revoked": k["revoked"], "findings": "; ".join(findings)})
    flagged = [r for r in rows if r["findings"]]
    active = sum(1 for r in rows if not r["revoked"])
    if flagged:
        return Check("api_key_hygiene", "warning", f"{len(flagged)} of {active} active key(s) need attention "
                     "(rotate: issue a new key, then revoke the old one)", rows=rows)
    return Check("api_key_hygiene", "ok", f"{active} active key(s), all rotated, used and unexpired", rows=rows)


SECRET_COLUMNS_SQL = f"""
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name, a.attname as column_name,
       format_type(a.atttypid, a.atttypmod) as type
from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
where {APP_SCHEMAS_SQL} and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped
  and a.attname ~* '{SECRET_COLUMN.pattern}'
order by 1, 2
"""
LONG_PREFIX_SQL = """select count(*) as keys from public.api_keys where length(key_prefix) > 16"""


@sql_check(SECRET_COLUMNS_SQL + ";\n" + LONG_PREFIX_SQL, "plaintext secrets")
def plaintext_secrets(conn) -> Check:
    rows = [r for r in fetch(conn, SECRET_COLUMNS_SQL) if f"{r['table_name']}.{r['column_name']}" not in NOT_SECRETS]
    long_prefixes = fetch(conn, LONG_PREFIX_SQL)[0]["keys"] if fetch(
        conn, "select to_regclass('public.api_keys') is not null as present")[0]["present"] else 0
    errors = [r for r in rows if r["table_name"] == "public.api_keys"]
    for r in rows:
        r["finding"] = ("PLAINTEXT API KEY column (the contract: never stored; phase 2 hashes and drops it)"
                        if r in errors else "named like a secret: is it hashed or encrypted?")
    if long_prefixes:
        rows.append({"table_name": "public.api_keys", "column_name": "key_prefix", "type": "text",
                     "finding": f"{long_prefixes} key_prefix value(s) longer than 16 characters: most of a key?"})
    if errors:
        return Check("plaintext_secrets", "error", "api_keys stores plaintext keys", rows=rows)
    if rows:
        return Check("plaintext_secrets", "warning", f"{len(rows)} column(s) to look at", rows=rows)
    return Check("plaintext_secrets", "ok", "no plaintext key column; api keys are key_prefix and key_hash only")


# -- monthly: performance --------------------------------------------------------------------

STATS_SQL = """
select table_name, row_count, pg_size_pretty(total_bytes) as total_size, pg_size_pretty(index_bytes) as index_size,
       seq_scans, index_scans, dead_rows, last_vacuum, last_analyze
from public.get_database_stats()
order by total_bytes desc, table_name
limit %(top)s
"""


@sql_check(STATS_SQL, "tables by size (get_database_stats())")
def database_stats(conn, *, top: int = 20) -> Check:
    try:
        rows = fetch(conn, STATS_SQL, {"top": top})
    except psycopg2.errors.UndefinedFunction:
        return Check("database_stats", "error", "get_database_stats() does not exist: phase 3 is not applied")
    return Check("database_stats", "info", f"the {len(rows)} largest tables in public, with their scans and dead rows",
                 rows=rows)


BLOAT_SQL = f"""
-- an estimate from the planner's statistics (pg_stats): rows x average row width against the pages used
with tables as (
  select c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname) as relation, 'table' as kind,
         c.reltuples, c.relpages, current_setting('block_size')::numeric as block_size,
         coalesce((select substring(o from '^fillfactor=([0-9]+)$')::numeric from unnest(c.reloptions) o
                    where o ~ '^fillfactor='), 100) as fillfactor,
         (select sum((1 - s.null_frac) * s.avg_width) from pg_stats s
           where s.schemaname = n.nspname and s.tablename = c.relname) + 28 as row_bytes
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
  where {APP_SCHEMAS_SQL} and c.relkind in ('r', 'm') and c.reltuples > 0
), indexes as (
  select ci.oid, quote_ident(n.nspname) || '.' || quote_ident(ci.relname) as relation, 'index' as kind,
         ci.reltuples, ci.relpages, current_setting('block_size')::numeric as block_size, 90 as fillfactor,
         (select sum((1 - s.null_frac) * s.avg_width) from pg_attribute a
            join pg_stats s on s.schemaname = n.nspname and s.tablename = ct.relname and s.attname = a.attname
           where a.attrelid = ct.oid and a.attnum = any(string_to_array(i.indkey::text, ' ')::int2[])) + 12 as row_bytes
  from pg_index i join pg_class ci on ci.oid = i.indexrelid join pg_class ct on ct.oid = i.indrelid
  join pg_namespace n on n.oid = ci.relnamespace join pg_am am on am.oid = ci.relam and am.amname = 'btree'
  where {APP_SCHEMAS_SQL} and ci.reltuples > 0 and i.indexprs is null
), estimates as (
  select relation, kind, relpages * block_size as bytes,
         ceil(reltuples::numeric * row_bytes::numeric / (block_size * fillfactor / 100)) * block_size as expected_bytes
  from (select * from tables union all select * from indexes) x
  where row_bytes is not null
)
select relation, kind, pg_size_pretty(bytes) as size, pg_size_pretty(greatest(bytes - expected_bytes, 0)) as bloat,
       round(greatest(bytes - expected_bytes, 0) / nullif(bytes, 0), 2) as bloat_share,
       greatest(bytes - expected_bytes, 0) as bloat_bytes
from estimates
where greatest(bytes - expected_bytes, 0) >= %(min_bytes)s
  and greatest(bytes - expected_bytes, 0) / nullif(bytes, 0) > %(max_share)s
order by bloat_bytes desc, relation
"""


@sql_check(BLOAT_SQL, "table and index bloat (estimate)")
def bloat_estimates(conn, *, min_bytes: int = 10_000_000, max_share: float = 0.5) -> Check:
    rows = fetch(conn, BLOAT_SQL, {"min_bytes": min_bytes, "max_share": max_share})
    if not rows:
        return Check("bloat", "ok", f"no table or index is estimated to waste {min_bytes} bytes and more than "
                     f"{max_share:.0%} of its size (estimates need analyzed tables)")
    for r in rows:
        r["remedy"] = ("reindex index concurrently " + r["relation"] + ";" if r["kind"] == "index"
                       else "pg_repack, or VACUUM FULL in a maintenance window (it locks the table)")
    return Check("bloat", "warning", f"{len(rows)} relation(s) estimated bloated", rows=rows)


TABLE_SIZES_SQL = f"""
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name,
       pg_relation_size(c.oid) as table_bytes, pg_indexes_size(c.oid) as index_bytes,
       pg_total_relation_size(c.oid) - pg_relation_size(c.oid) - pg_indexes_size(c.oid) as toast_bytes
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where {APP_SCHEMAS_SQL} and c.relkind in ('r', 'p', 'm')
order by pg_total_relation_size(c.oid) desc, 1
limit %(top)s
"""


def plot_table_sizes(conn, top: int = 15) -> bytes | None:
    """The largest tables: heap, indexes and TOAST (a horizontal stacked bar chart)."""
    rows = fetch(conn, TABLE_SIZES_SQL, {"top": top})
    if not rows:
        print("No tables: nothing to plot.")
        return None
    from matplotlib.figure import Figure

    rows = rows[::-1]
    fig = Figure(figsize=(8, 0.35 * len(rows) + 1.2))
    ax = fig.subplots()
    names = [r["table_name"] for r in rows]
    left = [0.0] * len(rows)
    for key, label, color in (("table_bytes", "table", "#3182bd"), ("index_bytes", "indexes", "#9ecae1"),
                              ("toast_bytes", "TOAST", "#fdae6b")):
        values = [r[key] / 1024 / 1024 for r in rows]
        ax.barh(names, values, left=left, label=label, color=color)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("MiB")
    ax.set_title(f"The {len(rows)} largest tables")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _show(fig)


# -- monthly: backup verification ------------------------------------------------------------

RECORD_SQL = """
insert into public.backup_verifications (run_id, backup_label, backup_format, backup_sha256, backup_bytes,
                                         toc_entries, status, details, verified_by)
values (%(run_id)s, %(label)s, 'custom', %(sha256)s, %(bytes)s, %(toc_entries)s, %(status)s, %(details)s, %(verified_by)s)
returning id, verified_at
"""
BACKUP_SQL = """-- pg_dump --format=custom --file <record>/backup/<database>-<run id>.dump   (the server's own pg_dump)
-- pg_restore --list <file>        (the archive's table of contents)
-- sha256 of the file, and pg_restore --file /dev/null <file>   (every data block read through)
""" + RECORD_SQL


def record_backup_verification(target: connection.Target, *, run_id: str, operator: str, label: str, sha256: str,
                                size: int | None, toc_entries: int | None, status: str, details: dict) -> dict:
    """One row of backup_verifications, in its own transaction; returns its id and verified_at."""
    conn = connection.connect(target, application_name=f"runbook maintenance {run_id}")
    try:
        with conn.cursor() as cur:
            cur.execute("select set_config('lock_timeout', '5s', true)")
            cur.execute(RECORD_SQL, {"run_id": run_id, "label": label, "sha256": sha256, "bytes": size,
                                     "toc_entries": toc_entries, "status": status,
                                     "details": psycopg2.extras.Json(details), "verified_by": operator})
            row_id, verified_at = cur.fetchone()
        conn.commit()
        return {"id": str(row_id), "verified_at": verified_at}
    finally:
        conn.close()


@sql_check(BACKUP_SQL, "backup verification")
def backup_verification(conn, run, *, take: bool = True) -> Check:
    if not take:
        return Check("backup_verification", "info", "take_backup = False: no backup taken or verified this run")
    dest = Path(run.record_dir) / "backup"
    try:
        info = backup.take_backup(run.target, dest, run.run_id, full=False)
    except (backup.BackupError, pgtools.ToolError) as exc:
        return Check("backup_verification", "error", f"the backup could not be taken: {exc}")
    details = {"record_file": f"backup/{info.file_name}", "database": info.database, "taken_at": info.taken_at,
               "finished_at": info.finished_at, "server_version": info.server_version,
               "pg_dump": info.pg_dump.get("version"), "operator": run.operator,
               "command": "runbook maintain monthly", "db_role": run.facts.get("current_user")}
    try:
        verified = backup.verify_backup(info.path, info.sha256, full=True,
                                        server_major=info.server_version_num // 10000)
        status, error = "passed", None
        details.update(toc_summary=verified.toc_summary, full_read=verified.full_read,
                       pg_restore=verified.pg_restore.get("version"), verify_seconds=verified.seconds)
    except backup.BackupError as exc:
        status, error = "failed", str(exc)
        details["error"] = error
    row = record_backup_verification(run.target, run_id=run.run_id, operator=run.operator, label=info.file_name,
                                     sha256=info.sha256, size=info.size_bytes, toc_entries=info.toc_entries,
                                     status=status, details=details)
    rows = [{"file": details["record_file"], "bytes": info.size_bytes, "sha256": info.sha256,
             "toc entries": info.toc_entries, "full read": details.get("full_read", False),
             "pg_dump": details["pg_dump"], "backup_verifications id": row["id"]}]
    if error:
        return Check("backup_verification", "error", f"the fresh backup does NOT verify (recorded as failed): {error}",
                     rows=rows)
    return Check("backup_verification", "ok", "a fresh pg_dump -Fc reads back whole (table of contents and every "
                 "data block); recorded in backup_verifications", rows=rows)


BACKUP_HISTORY_SQL = """
select to_char(verified_at at time zone 'UTC', 'YYYY-MM-DD HH24:MI"Z"') as verified_at, run_id, backup_label,
       status, backup_bytes, toc_entries, verified_by
from public.backup_verifications
order by backup_verifications.verified_at desc
limit %(limit)s
"""


@sql_check(BACKUP_HISTORY_SQL, "backup verification history")
def backup_history(conn, *, limit: int = 12) -> Check:
    rows = fetch(conn, BACKUP_HISTORY_SQL, {"limit": limit})
    failed = [r for r in rows if r["status"] != "passed"]
    if failed:
        return Check("backup_history", "warning", f"{len(failed)} of the last {len(rows)} verifications failed",
                     rows=rows)
    return Check("backup_history", "info", f"the last {len(rows)} verification(s), newest first", rows=rows)


# -- plots -----------------------------------------------------------------------------------

def _last_days(days: int) -> list[str]:
    """Every day of the window (UTC), so that a quiet day shows as a gap, not as nothing."""
    today = datetime.now(timezone.utc).date()
    return [(today - timedelta(days=n)).isoformat() for n in range(days, -1, -1)]


def _bar_chart(days: list[str], series: dict[str, dict[str, int]], colors: dict[str, str], title: str,
               ylabel: str) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    bottom = [0] * len(days)
    for name, values in series.items():
        heights = [values.get(d, 0) for d in days]
        ax.bar(days, heights, bottom=bottom, label=name, color=colors.get(name))
        bottom = [a + b for a, b in zip(bottom, heights)]
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _show(fig)


def _show(fig) -> bytes:
    """Inline PNG, whatever matplotlib backend the kernel has; returns the PNG."""
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    _display(Image(data=buffer.getvalue(), format="png"))
    return buffer.getvalue()
