"""Preflight checks: is this database ready, and is it safe, to deploy now?

Every check is a function of a (read-only) connection that returns a ``Check``; ``@sql_check``
gives it the SQL it runs, for the notebook to show first. Thresholds come from the notebook's
parameters. What the preflight writes: in the run's record, the ``pg_dump -Fc`` backup
(``backup/``, verified) and the snapshot (``snapshot.json``) that verification and a rollback are
later proven against; in the database, only into the project's own schema ``truthsource``, the
database's identity (once) and the run's backup as its second witness (see `identity`).
"""

from __future__ import annotations

import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from . import backup as backup_module
from . import connection, contract, engine, identity, pgtools, records, restore, signoff
from . import snapshot as snapshot_module
from .checks import Check, fetch, human_bytes, sql_check
from .contract import INTEGRITY_SQL, PLAINTEXT_KEY_COLUMNS

MIN_SERVER_VERSION = 150000

# The app schemas (as the snapshot and the restore see them): not PostgreSQL's, not Supabase's
# platform schemas, not the deployment history's.
APP_SCHEMA_FILTER = contract.app_schema_condition()


# -- server ------------------------------------------------------------------------------------

SERVER_SQL = """
select current_setting('server_version') as server_version,
       current_setting('server_version_num')::int as server_version_num,
       current_database() as database,
       pg_size_pretty(pg_database_size(current_database())) as size,
       current_setting('TimeZone') as timezone,
       pg_is_in_recovery() as in_recovery
"""


@sql_check(SERVER_SQL, "server and version")
def server_version(conn) -> Check:
    row = fetch(conn, SERVER_SQL)[0]
    if row["in_recovery"]:
        return Check("server_version", "error", "the server is a read-only standby: deploy to the primary", rows=[row])
    if row["server_version_num"] < MIN_SERVER_VERSION:
        return Check("server_version", "error",
                     f"PostgreSQL {row['server_version']} is older than 15, which the phases need", rows=[row])
    return Check("server_version", "ok", f"PostgreSQL {row['server_version']}, database {row['database']} "
                 f"({row['size']})", rows=[row])


# -- privileges ----------------------------------------------------------------------------------

PRIVILEGES_SQL = f"""
with app_schemas as (
  select n.oid, n.nspname, n.nspowner from pg_namespace n where {APP_SCHEMA_FILTER}
), owners as (
  select nspowner as owner, 'schema ' || quote_ident(nspname) as object from app_schemas
  union all
  select c.relowner, 'relation ' || c.oid::regclass::text
    from pg_class c join app_schemas s on s.oid = c.relnamespace where c.relkind in ('r', 'p', 'v', 'm', 'S', 'f')
  union all
  select p.proowner, 'function ' || p.oid::regprocedure::text
    from pg_proc p join app_schemas s on s.oid = p.pronamespace
   where not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
  union all
  select t.typowner, 'type ' || t.oid::regtype::text
    from pg_type t join app_schemas s on s.oid = t.typnamespace where t.typtype in ('e', 'd', 'r')
)
select current_user as role,
       r.rolsuper as superuser,
       has_database_privilege(current_database(), 'CREATE') as create_in_database,
       coalesce(has_schema_privilege('public', 'CREATE'), false) as create_in_public,
       (select coalesce(array_agg(distinct pg_get_userbyid(o.owner) order by pg_get_userbyid(o.owner)), '{{}}')
          from owners o where not pg_has_role(current_user, o.owner, 'MEMBER')) as foreign_owners,
       (select count(*) from owners o where not pg_has_role(current_user, o.owner, 'MEMBER')) as foreign_objects,
       (select coalesce(array_agg(x.rolname order by x.rolname), '{{}}')
          from unnest(array['anon', 'authenticated', 'service_role']) as x(rolname)
         where not exists (select 1 from pg_roles where rolname = x.rolname)) as missing_api_roles,
       (select coalesce(array_agg(x.rolname order by x.rolname), '{{}}')
          from pg_roles x
         where x.rolname in ('anon', 'authenticated', 'service_role')
           and not case when current_setting('server_version_num')::int >= 160000
                        then pg_has_role(current_user, x.oid, 'SET') else pg_has_role(current_user, x.oid, 'MEMBER') end)
         as cannot_become,
       exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname = 'auth' and p.proname = 'uid' and p.pronargs = 0) as has_auth_uid,
       (select has_schema_privilege(n.oid, 'USAGE') and has_table_privilege(c.oid, 'INSERT')
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'auth' and c.relname = 'users') as auth_users_insert
from pg_roles r where r.rolname = current_user
"""


ROLLBACK_REQUIREMENT = "nothing makes a rollback impossible"
ROLLBACK_BLOCKERS_SQL = ("""-- what would make a rollback impossible (runbooks.restore.rollback_blockers, the check the
-- rollback's plan refuses with): objects outside the app schemas that emptying them would take along
-- and the backup cannot put back (a pg_depend walk); and for a role that is not a superuser:
-- extensions in the app schemas, objects in them owned by roles it cannot act for (below), app
-- schemas it may not create objects in, the privileges that re-creating triggers, policies, indexes
-- and foreign keys outside them needs, INSERT on the deployment history
""" + restore.FOREIGN_OWNERS_SQL)


@sql_check(PRIVILEGES_SQL + ";\n\n" + ROLLBACK_BLOCKERS_SQL, "privileges of the connecting role")
def privileges(conn) -> Check:
    """What deploy, rollback and verification need of the connecting role, each named. A deployment
    that could not be rolled back is refused here, before the backup and before any phase."""
    row = fetch(conn, PRIVILEGES_SQL)[0]
    su = row["superuser"]
    foreign = row["foreign_owners"]
    rows: list[dict] = []

    def need(needed_for: str, requirement: str, ok: bool, detail: str = "") -> None:
        rows.append({"needed for": needed_for, "requirement": requirement, "ok": "yes" if ok else "NO",
                     "detail": detail})

    need("deploy", "the Supabase roles anon, authenticated, service_role exist", not row["missing_api_roles"],
         ("missing: " + ", ".join(row["missing_api_roles"]) + " (plain PostgreSQL: apply sql/support/supabase_shim.sql)")
         if row["missing_api_roles"] else "")
    need("deploy", "auth.uid() exists (Supabase's auth schema)", row["has_auth_uid"],
         "" if row["has_auth_uid"] else "plain PostgreSQL: apply sql/support/supabase_shim.sql")
    need("deploy", "CREATE on the database (schemas private and truthsource)", su or row["create_in_database"])
    need("deploy", "CREATE in schema public", su or row["create_in_public"])
    need("deploy + rollback", "member of the owner of every object in the app schemas (the phases alter them, "
         "a rollback re-creates them)", su or not foreign,
         "superuser" if su else (f"{row['foreign_objects']} object(s) owned by " + ", ".join(foreign)) if foreign else "")
    # the rollback's own check: a deployment that could not be rolled back must not start
    blockers = restore.rollback_blockers(conn)
    for blocker in blockers:
        need("rollback", ROLLBACK_REQUIREMENT, False, blocker)
    if not su and not blockers:
        need("rollback", ROLLBACK_REQUIREMENT, True, "checked: owners, extensions, schema privileges, objects "
             "outside the app schemas, the history")
    need("verification", "may SET ROLE to anon, authenticated and service_role (RLS checked as the API roles)",
         su or not row["cannot_become"], ", ".join(row["cannot_become"]))
    need("verification", "INSERT on auth.users (synthetic users, in a transaction that is rolled back)",
         su or bool(row["auth_users_insert"]))
    missing = [r for r in rows if r["ok"] == "NO" and r["requirement"] != ROLLBACK_REQUIREMENT]
    if missing or blockers:
        summary = (f"role {row['role']} lacks: " + "; ".join(f"{r['requirement']} ({r['needed for']})" for r in missing)
                   if missing else f"role {row['role']}")
        if blockers:
            summary += ("; " if missing else ": ") + "a rollback would be impossible, so the deployment is refused " \
                       "before it starts: " + "; ".join(blockers)
        return Check("privileges", "error", summary, rows=rows, columns=["needed for", "requirement", "ok", "detail"])
    return Check("privileges", "ok", f"role {row['role']} can deploy, verify and roll back"
                 + (" (superuser)" if su else " (least privilege: no superuser needed)"),
                 rows=rows, columns=["needed for", "requirement", "ok", "detail"])


# -- extensions ----------------------------------------------------------------------------------

EXTENSIONS_SQL = f"""
select x.extname as extension, x.extversion as version, n.nspname as schema,
       a.default_version as available,
       ({APP_SCHEMA_FILTER}) as in_app_schema
from pg_extension x
join pg_namespace n on n.oid = x.extnamespace
left join pg_available_extensions a on a.name = x.extname
order by x.extname
"""
REQUIRED_EXTENSIONS = ("plpgsql",)


@sql_check(EXTENSIONS_SQL, "extensions")
def extensions(conn) -> Check:
    rows = fetch(conn, EXTENSIONS_SQL)
    installed = {r["extension"] for r in rows}
    missing = [e for e in REQUIRED_EXTENSIONS if e not in installed]
    shown = [{"extension": r["extension"], "version": r["version"], "schema": r["schema"],
              "note": "; ".join(n for n in (
                  f"{r['available']} available" if r["available"] and r["available"] != r["version"] else "",
                  "in an app schema: a rollback drops and re-creates it" if r["in_app_schema"] else "") if n)}
             for r in rows]
    if missing:
        return Check("extensions", "error", "missing: " + ", ".join(missing), rows=shown)
    in_app = [r["extension"] for r in rows if r["in_app_schema"]]
    summary = f"{len(rows)} installed; the phases need only {', '.join(REQUIRED_EXTENSIONS)}"
    if in_app:
        summary += f"; in app schemas: {', '.join(in_app)} (a rollback re-creates them)"
    return Check("extensions", "ok", summary, rows=shown, columns=["extension", "version", "schema", "note"])


# -- activity: connections, long transactions, blocked sessions -----------------------------------

CONNECTIONS_SQL = """
select count(*) as connections,
       current_setting('max_connections')::int as max_connections,
       current_setting('superuser_reserved_connections')::int as reserved_for_superusers,
       count(*) filter (where a.state = 'active') as active,
       count(*) filter (where a.state in ('idle in transaction', 'idle in transaction (aborted)')) as idle_in_transaction,
       count(*) filter (where a.datname = current_database()) as in_this_database
from pg_stat_activity a
where a.backend_type = 'client backend'
"""
CONNECTIONS_BY_SQL = """
select coalesce(a.datname, '') as database, coalesce(a.usename, '') as role,
       coalesce(nullif(a.application_name, ''), '(none)') as application, coalesce(a.state, '') as state,
       count(*) as connections
from pg_stat_activity a
where a.backend_type = 'client backend'
group by 1, 2, 3, 4
order by 5 desc, 1, 2, 3, 4
"""


@sql_check(CONNECTIONS_SQL + ";\n" + CONNECTIONS_BY_SQL, "connections against max_connections")
def connections(conn, max_connection_share: float = 0.8) -> Check:
    row = fetch(conn, CONNECTIONS_SQL)[0]
    share = row["connections"] / row["max_connections"]
    rows = fetch(conn, CONNECTIONS_BY_SQL)
    summary = (f"{row['connections']} of max_connections {row['max_connections']} in use ({share:.0%}; "
               f"{row['active']} active, {row['idle_in_transaction']} idle in transaction)")
    if share > max_connection_share:
        return Check("connections", "error", summary + f": above the limit of {max_connection_share:.0%} "
                     "(max_connection_share); the deployment would compete for connections. Wait, or raise the limit "
                     "knowingly.", rows=rows)
    return Check("connections", "ok", summary + f", within {max_connection_share:.0%}", rows=rows)


LONG_TRANSACTIONS_SQL = """
select a.pid, coalesce(a.usename, '') as role, coalesce(nullif(a.application_name, ''), '(none)') as application,
       coalesce(host(a.client_addr), 'local') as client, a.state,
       round(extract(epoch from now() - a.xact_start)::numeric, 1) as open_seconds,
       coalesce(a.wait_event_type || ': ' || a.wait_event, '') as waiting_on, left(a.query, 120) as last_query
from pg_stat_activity a
where a.backend_type = 'client backend' and a.datname = current_database() and a.pid <> pg_backend_pid()
  and a.xact_start is not null and now() - a.xact_start > make_interval(secs => %(max_seconds)s)
union all
select null, p.owner::text, '(prepared transaction ' || p.gid || ')', '', 'prepared',
       round(extract(epoch from now() - p.prepared)::numeric, 1), '', ''
from pg_prepared_xacts p
where p.database = current_database() and now() - p.prepared > make_interval(secs => %(max_seconds)s)
order by open_seconds desc
"""
OLDEST_TRANSACTION_SQL = """
select round(coalesce(max(extract(epoch from now() - a.xact_start)), 0)::numeric, 1) as oldest_seconds
from pg_stat_activity a
where a.backend_type = 'client backend' and a.datname = current_database() and a.pid <> pg_backend_pid()
  and a.xact_start is not null
"""


@sql_check(LONG_TRANSACTIONS_SQL, "long transactions")
def long_transactions(conn, max_transaction_seconds: float = 300) -> Check:
    """Transactions (and prepared transactions) open longer than the limit: the phases' DDL would
    queue behind their locks, and everyone else behind the phases."""
    rows = fetch(conn, LONG_TRANSACTIONS_SQL, {"max_seconds": float(max_transaction_seconds)})
    if rows:
        return Check("long_transactions", "error",
                     f"{len(rows)} transaction(s) open longer than {max_transaction_seconds:g}s "
                     f"(max_transaction_seconds), the oldest for {rows[0]['open_seconds']}s: end them (or wait) "
                     "before deploying", rows=rows)
    oldest = fetch(conn, OLDEST_TRANSACTION_SQL)[0]["oldest_seconds"]
    return Check("long_transactions", "ok",
                 f"no transaction open longer than {max_transaction_seconds:g}s (oldest now: {oldest}s)")


BLOCKED_SQL = """
select a.pid as blocked_pid, coalesce(a.usename, '') as blocked_role,
       coalesce(nullif(a.application_name, ''), '(none)') as blocked_application,
       coalesce(w.locktype, '') as waits_for,
       round(extract(epoch from now() - coalesce(w.waitstart, a.query_start))::numeric, 1) as waiting_seconds,
       left(a.query, 100) as blocked_query,
       b.pid as blocking_pid, coalesce(b.usename, '') as blocking_role,
       coalesce(nullif(b.application_name, ''), '(none)') as blocking_application, b.state as blocking_state,
       left(b.query, 100) as blocking_query
from pg_stat_activity a
cross join lateral unnest(pg_blocking_pids(a.pid)) as blocker(pid)
left join pg_stat_activity b on b.pid = blocker.pid
left join lateral (select l.locktype, l.waitstart from pg_locks l
                   where l.pid = a.pid and not l.granted limit 1) w on true
where a.datname = current_database() and a.pid <> pg_backend_pid()
order by waiting_seconds desc nulls last, a.pid, b.pid
"""
# A wait on a row (another transaction's row lock) is the app's everyday contention and does not put
# anyone ahead of the phases on a table; a stuck row holder is the long_transactions check's to find.
ROW_WAITS = {"transactionid", "tuple"}


@sql_check(BLOCKED_SQL, "blocking locks")
def blocking_locks(conn, max_blocked_sessions: int = 0) -> Check:
    """Sessions waiting on a table-level lock another session holds, and who holds it."""
    rows = fetch(conn, BLOCKED_SQL)
    blocked = len({r["blocked_pid"] for r in rows if r["waits_for"] not in ROW_WAITS})
    on_rows = len({r["blocked_pid"] for r in rows if r["waits_for"] in ROW_WAITS})
    if blocked > max_blocked_sessions:
        return Check("blocking_locks", "error",
                     f"{blocked} session(s) waiting on locks (max_blocked_sessions {max_blocked_sessions}): the "
                     "phases would queue in the same line. Find the blocking session below and end it (or wait).",
                     rows=rows)
    if blocked:
        return Check("blocking_locks", "warning", f"{blocked} session(s) waiting on locks, within the limit of "
                     f"{max_blocked_sessions}", rows=rows)
    if on_rows:
        return Check("blocking_locks", "ok", f"no session waits on a table's lock; {on_rows} wait(s) on another "
                     "transaction's row, the app's own contention (a stuck holder is a long transaction)", rows=rows)
    return Check("blocking_locks", "ok", "no session is waiting on a lock")


# -- what is applied ------------------------------------------------------------------------------

HISTORY_SQL = f"select version, file_name, sha256, action, applied_at, applied_by, run_id from {engine.HISTORY_TABLE} order by applied_at"


def phase_states(conn) -> list[dict]:
    """Per phase: the file on disk (sha256) against what the history says is applied."""
    return [{"phase": p.version, "file": p.path.name, "state": p.state,
             "sha256 on disk": (p.on_disk or "")[:16], "applied sha256": p.applied["sha256"][:16] if p.applied else "",
             "applied by": p.applied["applied_by"] if p.applied else "",
             "run": p.applied["run_id"] if p.applied else ""} for p in engine.phase_states(conn)]


def changed_files(rows: list[dict]) -> list[str]:
    """The phase files (names) that changed on disk since they were applied, from `phase_states` rows."""
    return [r["file"] for r in rows if "CHANGED" in r["state"]]


def changed_refusal(files: list[str]) -> str:
    """Why a deployment over applied files that changed is refused, and how to go on (one wording:
    the preflight's check and `runbook deploy`'s refusal)."""
    return (f"{', '.join(files)} changed since it was applied (its sha256 on disk differs from the deployment "
            "history's): refused before anything changes. Re-applying a changed file must be said: `runbook deploy "
            "... -p force true` (by hand: force = True in the preflight's and the phase's parameters), recorded as "
            "forced; or put back the file that was applied")


@sql_check(HISTORY_SQL, "what is applied already, and do the files still match")
def applied_phases(conn, force: bool = False) -> Check:
    """Pending and applied phases; an applied file that changed since is refused here, before the
    backup and phase 1, unless `force` (then a warning: the phase re-applies it, recorded as forced)."""
    rows = phase_states(conn)
    changed = changed_files(rows)
    missing = [r["phase"] for r in rows if "MISSING" in r["state"]]
    pending = [r["phase"] for r in rows if r["state"].startswith("pending")]
    if missing:
        return Check("applied_phases", "error", f"phase file(s) of {', '.join(missing)} missing on disk", rows=rows)
    if changed and not force:
        return Check("applied_phases", "error", changed_refusal(changed), rows=rows)
    if changed:
        return Check("applied_phases", "warning", f"{', '.join(changed)} changed since applied: re-applied as "
                     "forced (force = True), the history says so", rows=rows)
    return Check("applied_phases", "ok", f"{len(pending)} phase(s) to apply: {', '.join(pending) or 'none'}",
                 rows=rows)


@sql_check(identity.UNFINISHED_SQL.replace("%(run_id)s", "<this run>"), "unfinished runs")
def unfinished_runs(conn, run_id: str = "") -> Check:
    """Runs that took their backup and never finished (their runner died): reported with how to
    resume or roll back. This deployment goes on: an interrupted phase left nothing behind (one
    transaction), applied ones are skipped, and the earlier run's backup stays usable."""
    rows = identity.unfinished_runs(conn, run_id)
    if not rows:
        return Check("unfinished_runs", "ok", "no earlier run was left unfinished")
    shown = [{"run": r["run_id"], "step": r["step"], "backup taken at": r["backup_taken_at"],
              "by": r["operator"], "what to do": identity.how_to_continue(r)} for r in rows]
    return Check("unfinished_runs", "warning",
                 f"{len(rows)} earlier run(s) never finished ({', '.join(r['run_id'] for r in rows)}): roll back with "
                 f"runbook rollback --run RUN_ID --yes, or let this deployment go on (applied phases are skipped, "
                 "an interrupted one is applied again)", rows=shown,
                 columns=["run", "step", "backup taken at", "by", "what to do"])


# -- sign-off -------------------------------------------------------------------------------------

# The guide's pre-deployment checklist, and how each item is met.
CHECKLIST = (
    ("Backup current database", None, "pg_dump -Fc below, verified with pg_restore --list and sha256"),
    ("Run migrations in test environment", None, "runbook rehearse, then runbook deploy against staging"),
    ("Verify all functions work correctly", None, "the verification notebook (04), after the phases"),
    ("Test RLS policies", None, "the verification notebook (04): as anon, authenticated and service_role"),
    ("Validate data integrity", None, "legacy rows reported below; verify_data_integrity() after phase 3"),
    ("Change approved", "approver", "sign-off parameter"),
    ("Change ticket", "change_ticket", "sign-off parameter"),
    ("Schedule maintenance window", "maintenance_window", "sign-off parameter; production is refused outside it"),
    ("Notify stakeholders", "stakeholders_notified", "sign-off parameter"),
    ("Prepare rollback plan", "rollback_plan_confirmed", "sign-off parameter; the backup below and notebook 05"),
    ("Set up monitoring", None, "the maintenance notebook (06), daily"),
)


def signoff_check(*, production: bool, approver=None, change_ticket=None, maintenance_window=None,
                  stakeholders_notified=False, rollback_plan_confirmed=False, now: datetime | None = None) -> Check:
    """The guide's checklist, signed off: required (and the window enforced) for production. The
    approver and the change ticket go to the run's record (its header card), as given or none."""
    check = _signoff_check(production=production, approver=approver, change_ticket=change_ticket,
                           maintenance_window=maintenance_window, stakeholders_notified=stakeholders_notified,
                           rollback_plan_confirmed=rollback_plan_confirmed, now=now)
    check.facts = {"signoff": {"approver": approver, "change_ticket": change_ticket,
                               "maintenance_window": maintenance_window}}
    return check


def _signoff_check(*, production: bool, approver, change_ticket, maintenance_window, stakeholders_notified,
                   rollback_plan_confirmed, now: datetime | None) -> Check:
    params = {"approver": approver, "change_ticket": change_ticket, "maintenance_window": maintenance_window,
              "stakeholders_notified": stakeholders_notified, "rollback_plan_confirmed": rollback_plan_confirmed}
    now = now or datetime.now(timezone.utc)
    try:
        # --yes is the command line's confirmation; by hand, running this cell is the confirmation
        problems = signoff.problems(params, production=production, confirmed=True, now=now)
    except signoff.SignoffError as exc:
        problems = [str(exc)]
    rows = []
    for item, name, how in CHECKLIST:
        if name is None:
            rows.append({"checklist item": item, "parameter": "", "value": "", "status": "by the runbooks", "how": how})
            continue
        value = params[name]
        given = value not in (None, "", False)
        if given and name in ("stakeholders_notified", "rollback_plan_confirmed") and value is not True:
            status = "must be true"
        elif given:
            status = "signed off"
        else:
            status = "MISSING (required for production)" if production else "not given"
        if name == "maintenance_window" and given and any("outside the maintenance window" in p for p in problems):
            status = "OUTSIDE the window now"
        rows.append({"checklist item": item, "parameter": name, "value": "" if value is None else str(value),
                     "status": status, "how": how})
    columns = ["checklist item", "parameter", "value", "status", "how"]
    if problems and production:
        return Check("signoff", "error", "production deployment refused: " + "; ".join(problems), rows=rows,
                     columns=columns)
    if problems:
        return Check("signoff", "error", "; ".join(problems), rows=rows, columns=columns)
    given = [n for n in signoff.SIGNOFF if params[n] not in (None, "", False)]
    if production:
        return Check("signoff", "ok", f"production: signed off by {approver} ({change_ticket}), inside the window "
                     f"{maintenance_window}", rows=rows, columns=columns)
    if maintenance_window:
        start, end = signoff.parse_window(maintenance_window)
        if not start <= now <= end:
            return Check("signoff", "warning", f"not production; now is outside the given window {maintenance_window}",
                         rows=rows, columns=columns)
    return Check("signoff", "info" if len(given) < len(signoff.SIGNOFF) else "ok",
                 "not production: sign-off is optional" + (f"; given: {', '.join(given)}" if given else ""),
                 rows=rows, columns=columns)


# -- legacy rows that break the new rules -----------------------------------------------------------

# validate_sku's rule, spelled as it does: a bounded repetition ({2,63}) made the regex 12x slower
SKU_RULE = "length(sku::text) between 3 and 64 and sku::text ~ '^[A-Z0-9][A-Z0-9_-]*$'"
SLUG_RULE = "^[a-z0-9]+(-[a-z0-9]+)*$"
CONTRACT_ROLES = ("owner", "admin", "member", "viewer")

# (rule, table, columns it needs, query returning (affected, sample), what happens to such rows)
# Samples never hold a secret: keys are counted, never shown. A legacy column may be of any type (an
# enum role, a varchar or citext sku): each is read as text, so the rule's query runs on every shape.
LEGACY_RULES = (
    ("SKU not valid per validate_sku (lowercase, too short, bad characters)", "products", ("sku",),
     f"select count(*), string_agg(sku::text, ', ' order by sku::text) from public.products "
     f"where not coalesce({SKU_RULE}, false)"),
    ("SKU repeated within an organization, ignoring case", "products", ("organization_id", "sku"),
     "select coalesce(sum(n), 0)::bigint, string_agg(k, ', ' order by k) from (select upper(sku::text) as k, count(*) as n "
     "from public.products group by organization_id, upper(sku::text) having count(*) > 1) d"),
    ("negative price", "products", ("price",),
     "select count(*), string_agg(coalesce(sku::text, id::text), ', ' order by coalesce(sku::text, id::text)) from public.products where price < 0"),
    ("negative stock (quantity < 0)", "inventory", ("quantity",),
     "select count(*), string_agg(id::text, ', ' order by id::text) from public.inventory where quantity < 0"),
    ("reserved quantity not between 0 and the quantity", "inventory", ("quantity", "reserved_quantity"),
     "select count(*), string_agg(id::text, ', ' order by id::text) from public.inventory "
     "where reserved_quantity < 0 or reserved_quantity > quantity"),
    ("member whose auth user is gone", "organization_members", ("user_id",),
     "select count(*), string_agg(m.user_id::text, ', ' order by m.user_id::text) from public.organization_members m "
     "where not exists (select 1 from auth.users u where u.id = m.user_id)"),
    ("profile whose auth user is gone", "profiles", ("id",),
     "select count(*), string_agg(p.id::text, ', ' order by p.id::text) from public.profiles p "
     "where not exists (select 1 from auth.users u where u.id = p.id)"),
    ("member role other than owner, admin, member, viewer", "organization_members", ("role",),
     "select count(*), string_agg(distinct coalesce(role::text, '(null)'), ', ' order by coalesce(role::text, '(null)')) from public.organization_members "
     "where role is null or role::text not in ('owner', 'admin', 'member', 'viewer')"),
    ("organization slug not valid per validate_org_slug", "organizations", ("slug",),
     f"select count(*), string_agg(coalesce(slug::text, '(null)'), ', ' order by slug::text) from public.organizations "
     f"where not coalesce(length(slug::text) between 3 and 63 and slug::text ~ '{SLUG_RULE}', false)"),
)
COLUMNS_SQL = """
select c.relname as table_name, a.attname as column_name
from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
order by 1, 2
"""
AUTH_USERS_READABLE_SQL = """
select coalesce((select has_schema_privilege(n.oid, 'USAGE') and has_table_privilege(c.oid, 'SELECT')
                   from pg_class c join pg_namespace n on n.oid = c.relnamespace
                  where n.nspname = 'auth' and c.relname = 'users'), false) as readable"""
LEGACY_SQL = ("-- when phase 3 is applied:\n" + INTEGRITY_SQL + ";\n\n-- otherwise, for each rule whose table and columns exist:\n"
              + ";\n".join(q for *_, q in LEGACY_RULES)
              + ";\n-- plaintext api keys: count of non-null values in api_keys."
              + "/".join(PLAINTEXT_KEY_COLUMNS) + " (never shown)")


@sql_check(LEGACY_SQL, "legacy rows that break the new rules")
def legacy_rule_breakers(conn) -> Check:
    """Rows the new rules refuse: kept as they are (never dropped, never silently changed), reported."""
    has = fetch(conn, "select to_regprocedure('public.verify_data_integrity()') is not null as has")[0]["has"]
    if has:
        rows = fetch(conn, INTEGRITY_SQL)
        found = [r for r in rows if r["status"] != "ok"]
        shown = [{"rule": r["check_name"], "status": r["status"], "rows": r["affected_rows"], "details": r["details"]}
                 for r in found]
        if not found:
            return Check("legacy_rule_breakers", "ok", f"verify_data_integrity(): all {len(rows)} checks ok",
                         rows=shown)
        return Check("legacy_rule_breakers", "warning",
                     f"verify_data_integrity(): {len(found)} of {len(rows)} checks report rows (kept and reported; "
                     "every new write is checked)", rows=shown, columns=["rule", "status", "rows", "details"])
    columns = {(r["table_name"], r["column_name"]) for r in fetch(conn, COLUMNS_SQL)}
    auth_users = fetch(conn, AUTH_USERS_READABLE_SQL)[0]["readable"]
    rows = []
    for rule, table, needed, query in LEGACY_RULES:
        missing_columns = not all((table, c) in columns for c in needed)
        if missing_columns or ("auth.users" in query and not auth_users):
            rows.append({"rule": rule, "table": table, "rows": None, "sample": "",
                         "what happens": "not applicable: no such table or column yet" if missing_columns
                         else "not checked: this role cannot read auth.users"})
            continue
        count, sample = next(iter(_fetch_tuple(conn, query)))
        rows.append({"rule": rule, "table": table, "rows": count, "sample": _sample(sample),
                     "what happens": "kept as it is and reported; every new write is checked" if count else ""})
    plaintext = [c for c in PLAINTEXT_KEY_COLUMNS if ("api_keys", c) in columns]
    if plaintext:
        condition = " or ".join(f'"{c}" is not null' for c in plaintext)
        count = _fetch_tuple(conn, f"select count(*) from public.api_keys where {condition}")[0][0]
        rows.append({"rule": "plaintext api keys stored", "table": "api_keys", "rows": count,
                     "sample": f"column(s) {', '.join(plaintext)} (values never shown)",
                     "what happens": "phase 2 keeps key_prefix and a sha256 key_hash, drops the plaintext and redacts "
                                     "every copy; rotate these keys" if count else ""})
    else:
        rows.append({"rule": "plaintext api keys stored", "table": "api_keys", "rows": 0, "sample": "",
                     "what happens": "no plaintext key column"})
    breaking = [r for r in rows if r["rows"]]
    columns_shown = ["rule", "table", "rows", "sample", "what happens"]
    if breaking:
        return Check("legacy_rule_breakers", "warning",
                     f"{sum(r['rows'] for r in breaking)} legacy row(s) break {len(breaking)} of the new rules: they are "
                     "kept and reported, not dropped", rows=rows, columns=columns_shown)
    return Check("legacy_rule_breakers", "ok", "no legacy row breaks the new rules", rows=rows, columns=columns_shown)


def _fetch_tuple(conn, query: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(query)
        result = cur.fetchall()
    if not conn.autocommit:
        conn.rollback()
    return result


def _sample(text: str | None, limit: int = 160) -> str:
    if not text:
        return ""
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- backup ------------------------------------------------------------------------------------------

def backup_command(target, record_dir, run_id: str, server_major: int | None = None) -> str:
    """The pg_dump command the backup step runs (libpq finds the password itself; none is here)."""
    try:
        tool = str(pgtools.find_tool("pg_dump", server_major).path)
    except pgtools.ToolError as exc:
        tool = f"pg_dump  # {exc}"
    dest = Path(record_dir) / records.BACKUP_DIR / f"<database>-{run_id}.dump"
    return (f"{tool} --format=custom --compress={backup_module.COMPRESSION} --no-password --lock-wait-timeout=60s \\\n"
            f"    --snapshot=<the exported snapshot that snapshot.json was taken on> \\\n"
            f"    --file {shlex.quote(str(dest))} \\\n    --dbname {shlex.quote(target.conninfo())}\n"
            f"pg_restore --list {shlex.quote(str(dest))}     # the archive's table of contents must read\n"
            f"pg_restore --file /dev/null {shlex.quote(str(dest))}   # and every data block decompress\n"
            f"sha256sum {shlex.quote(str(dest))}")


def show_command(text: str, title: str = "what this step runs") -> None:
    """Display shell commands in a notebook (as sql_block does for SQL)."""
    from IPython.display import display

    display({"text/markdown": f"**{title}**\n\n```sh\n{text}\n```", "text/plain": f"{title}\n{text}"}, raw=True)


def show_backup_command(run) -> None:
    """The backup command, before it runs."""
    show_command(backup_command(run.target, run.record_dir, run.run_id, run.facts.get("server_version_num", 0) // 10000),
                 "what the backup step runs")


@dataclass(frozen=True)
class Moment:
    """An exported snapshot (`backup.ExportedSnapshot`'s fields) and the backup's pg_dump already running
    on it (a `backup.DumpInProgress`, the error that kept it from starting, or None)."""

    snapshot_id: str
    taken_at: str
    public_init_privs: list[str] | None
    dump: "backup_module.DumpInProgress | Exception | None" = None


@contextmanager
def one_moment(run, *, backup: bool = False):
    """A moment of the database that the snapshot and the backup both describe exactly
    (`pg_export_snapshot()`, held open until both are taken): ``with preflight.one_moment(run) as m:``.
    With `backup`, pg_dump starts on it at once and runs while the snapshot reads the tables (they
    overlap on two cores rather than take turns); `preflight.backup` then waits for it and verifies it.
    Leaving the block stops a dump that nobody finished, and removes its partial file."""
    with backup_module.exported_snapshot(run.target, run.run_id) as exported:
        dump = None
        if backup:
            try:
                dump = backup_module.start_backup(run.target, Path(run.record_dir) / records.BACKUP_DIR, run.run_id,
                                                  snapshot=exported)
            except (backup_module.BackupError, pgtools.ToolError) as exc:
                dump = exc
        try:
            yield Moment(exported.snapshot_id, exported.taken_at, exported.public_init_privs, dump)
        finally:
            if isinstance(dump, backup_module.DumpInProgress):
                dump.cancel()


def _backup_on(target, dest: Path, run_id: str, snapshot) -> "backup_module.BackupInfo":
    """The backup of `snapshot`: the dump `one_moment(run, backup=True)` started, else one taken now."""
    dump = getattr(snapshot, "dump", None)
    if isinstance(dump, Exception):
        raise dump
    if dump is not None:
        return backup_module.finish_backup(dump)
    return backup_module.take_backup(target, dest, run_id, snapshot=snapshot)


def backup(conn, target, record_dir, run_id: str, *, take: bool = True,
           snapshot: "backup_module.ExportedSnapshot | Moment | None" = None) -> Check:
    """pg_dump -Fc with the server's own pg_dump into record_dir/backup, verified; refused to skip on
    production. With `snapshot`, pg_dump runs on that exported snapshot (or has been running on it since
    `one_moment(run, backup=True)`)."""
    if not take:
        if target.production:
            return Check("backup", "error", "take_backup=False is refused for a production target: without a backup "
                         "there is no rollback")
        return Check("backup", "warning", "no backup taken (take_backup=False): this run cannot be rolled back")
    dest = Path(record_dir) / records.BACKUP_DIR
    try:
        info = _backup_on(target, dest, run_id, snapshot)
    except (backup_module.BackupError, pgtools.ToolError) as exc:
        return Check("backup", "error", f"no usable backup: {exc}")
    relative = Path(info.path).relative_to(Path(record_dir).resolve()) if Path(info.path).is_relative_to(
        Path(record_dir).resolve()) else Path(info.path)
    rows = [
        {"fact": "file", "value": str(relative)},
        {"fact": "size", "value": f"{info.size_bytes} bytes ({human_bytes(info.size_bytes)})"},
        {"fact": "sha256", "value": info.sha256},
        {"fact": "format", "value": f"{info.format} (pg_dump -Fc)"},
        {"fact": "pg_dump", "value": f"{info.pg_dump['version']} ({info.pg_dump['origin']}) for server "
                                     f"{info.server_version}"},
        {"fact": "pg_restore --list", "value": f"{info.toc_entries} entries: "
                                               + ", ".join(f"{n} {t}" for t, n in info.toc_summary.items())},
        {"fact": "full read (every data block)", "value": "ok" if info.full_read else "skipped"},
        {"fact": "taken at (server clock)", "value": info.taken_at
         + (" — the same moment as snapshot.json (exported snapshot)" if info.snapshot_id else "")},
        {"fact": "record", "value": f"{records.BACKUP_DIR}/{backup_module.INFO_FILE}"},
    ]
    rows += [{"fact": "warning", "value": w} for w in info.warnings]
    return Check("backup", "warning" if info.warnings else "ok",
                 f"{info.file_name}: {human_bytes(info.size_bytes)}, {info.toc_entries} archive entries readable by "
                 f"pg_restore --list, sha256 {info.sha256[:16]}…", rows=rows, columns=["fact", "value"])


# -- the database's identity and the backup's second witness ------------------------------------------

def _writable(target, run_id: str):
    return connection.connect(target, application_name=f"runbook {run_id} identity"[:63])


@sql_check(identity.ENSURE_SQL, "the database's identity")
def database_identity(conn, target, run_id: str) -> Check:
    """The identity a backup records and a rollback compares (written once into truthsource, in a
    transaction of its own: the checks' connection is read-only)."""
    writer = _writable(target, run_id)
    try:
        found, created = identity.ensure_identity(writer)
        writer.commit()
    finally:
        writer.close()
    rows = [{"fact": "database", "value": found.database},
            {"fact": "system identifier (pg_control_system)",
             "value": found.system_identifier or "unknown: this role may not execute pg_control_system()"},
            {"fact": "database oid", "value": found.database_oid},
            {"fact": f"identity ({identity.IDENTITY_TABLE})", "value": found.database_uuid
             + (" (created now)" if created else "")}]
    return Check("database_identity", "ok" if found.system_identifier else "warning",
                 ("identity written now" if created else "identity as written by an earlier preflight")
                 + ": a rollback will refuse any database but this one"
                 + ("" if found.system_identifier else " (without the system identifier: the oid and the "
                    "identity decide)"), rows=rows, columns=["fact", "value"])


@sql_check(identity.RECORD_RUN_SQL, "the backup's second witness, in the database")
def witness_backup(conn, target, record_dir, run_id: str, operator: str, step: str = "00_preflight") -> Check:
    """The backup's file name and sha256, written into truthsource.deployment_runs: a rollback
    checks the file against this too (and accepts an unsealed record only with it)."""
    info_path = Path(record_dir) / records.BACKUP_DIR / backup_module.INFO_FILE
    if not info_path.is_file():
        return Check("witness_backup", "warning", "no backup was taken: nothing to witness")
    info = backup_module.BackupInfo.load(info_path)
    writer = _writable(target, run_id)
    try:
        identity.record_run(writer, run_id=run_id, step=step, backup_file=info.file_name, backup_sha256=info.sha256,
                            backup_taken_at=info.taken_at, operator=operator)
        writer.commit()
    finally:
        writer.close()
    return Check("witness_backup", "ok", f"run {run_id}: {info.file_name}, sha256 {info.sha256[:16]}… written into "
                 f"{identity.RUNS_TABLE}", rows=[{"run": run_id, "backup": info.file_name, "sha256": info.sha256}])


# -- snapshot ----------------------------------------------------------------------------------------

SNAPSHOT_SQL = """-- one repeatable-read, read-only transaction (snapshot.take_snapshot), row_security off:
begin isolation level repeatable read, read only;
-- for every table of the app schemas, whatever its size: one read, in parallel where the server allows,
-- for its row count and a checksum of its rows as a multiset (no sort: a sum of 64-bit row hashes):
""" + snapshot_module.CHECKSUM_SQL.format(row_hash=snapshot_module.ROW_HASH_OUTLINE, table="<schema>.<table>") + """;
-- for every other table outside PostgreSQL's own schemas and truthsource:
select count(*) from <schema>.<table>;
-- and the catalog of the app schemas, normalised and hashed per kind into the fingerprint:
-- """ + ", ".join(snapshot_module.OBJECT_KINDS) + """
rollback;"""


def snapshot(conn, record_dir, *, moment=None) -> Check:
    """Row counts, schema fingerprint and per-table content checksums of every app table, kept as
    record_dir/snapshot.json (as of `moment`, an exported snapshot, when given)."""
    snap = snapshot_module.take_snapshot(conn, snapshot_id=moment.snapshot_id if moment else None)
    path = snapshot_module.save_snapshot(snap, Path(record_dir) / records.SNAPSHOT_FILE)
    rows = [{"table": table, "rows": count, "content sha": (snap["content"].get(table) or "")[:12],
             "schema": "app" if snapshot_module.is_app_schema(table.split(".")[0].strip('"')) else "platform (counted)"}
            for table, count in snap["row_counts"].items()]
    checksummed = [t for t, v in snap["content"].items() if not str(v).startswith("sequence")]
    summary = (f"{len(snap['row_counts'])} tables, {sum(snap['row_counts'].values())} rows; schema fingerprint "
               f"{snap['fingerprint'][:16]}… over {', '.join(snap['app_schemas'])}; content checksums of "
               f"{len(checksummed)} tables (every app table); saved as {path.name}")
    return Check("snapshot", "ok", summary, rows=rows, columns=["table", "rows", "content sha", "schema"])


snapshot.sql = SNAPSHOT_SQL
snapshot.title = "snapshot: row counts, schema fingerprint, content checksums"


# -- what the phases will refuse, found before anything changes -------------------------------------------
#
# Each phase refuses some data and shapes only when it runs: a refusal of phase 2 after phase 1 has
# committed leaves the deployment half done. The phases' own rules are read from their files (one source
# of truth) and asked of the data here, each a scan linear in its table. What the phase files raise on
# that depends on data or shape, and where it is asked:
#   001 p2_ensure_unique   "cannot enforce ... duplicated values"           -> duplicates under a unique rule
#   001 p2_converge_table  "key columns are not converted automatically"     -> key column of another type
#   001 p2_ensure_pk       "cannot make id the primary key"                  -> NULL or duplicated ids
#   002 shape check        "existing tables are in another shape"            -> phase 3's tables in another shape
# Not predicted here (they depend on function bodies, not on rows; phase 1 stops on them before it changes
# anything): 000 "cannot retire function", 000 "updated-at consolidation stopped", 001 "the old helper
# ... answers for any user". The prerequisite checks (server version, auth.uid(), roles, earlier phases)
# are the server, privileges and applied-phases checks above.

_SPEC_LINE = re.compile(r"^\s*\('(\w+)', '(\w+)', '([^']+)', .*, (true|false), (true|false), '\{([^}]*)\}'", re.M)
_UNIQUE_RULE = re.compile(r"p2_ensure_unique\('(\w+)', '(\w+)', array\[([^\]]+)\]\)")
_PHASE3_SHAPE = re.compile(r"(select array_agg\(format\('%s\.%s is %s \(expected %s\)'.*?is distinct from x\.typ);", re.S)


def _phase_text(version: str) -> str:
    from .paths import PHASES
    return dict(PHASES)[version].read_text()


def phase2_spec() -> list[dict]:
    """Phase 2's column spec (pg_temp.p2_spec() in 001_core_schema.sql): table, column, type, key, synonyms."""
    text = _phase_text("001")
    body = text[text.index("create or replace function pg_temp.p2_spec()"):]
    body = body[:body.index("$fn$;")]
    return [{"table": t, "column": c, "type": typ, "is_key": key == "true",
             "synonyms": [s for s in syn.split(",") if s]}
            for t, c, typ, _nn, key, syn in _SPEC_LINE.findall(body)]


def phase2_unique_rules() -> list[tuple[str, str, list[str]]]:
    """Phase 2's unique rules (its "unique rules" section): (table, constraint, columns)."""
    return [(t, name, [c.strip().strip("'") for c in cols.split(",")])
            for t, name, cols in _UNIQUE_RULE.findall(_phase_text("001"))]


def phase3_shape_sql() -> str:
    """Phase 3's own check that its tables are absent or in its shape, as a query."""
    found = _PHASE3_SHAPE.search(_phase_text("002")).group(1).replace("\n    into v_problems", "")
    return found.replace("select array_agg(", "select coalesce(array_agg(", 1).replace(
        "order by x.tbl, x.col)", "order by x.tbl, x.col), '{}') as problems", 1)


TABLE_COLUMNS_SQL = """
select c.relname as table_name, a.attname as column_name, format_type(a.atttypid, a.atttypmod) as type
from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
order by 1, a.attnum
"""
REFERENCED_SQL = """
select distinct c.confrelid::regclass::text as referenced from pg_constraint c
where c.contype = 'f' and c.confrelid <> 0
"""
PK_ON_ID_SQL = """
select c.conrelid::regclass::text as tbl from pg_constraint c
where c.contype = 'p' and c.connamespace = 'public'::regnamespace
  and (select array_agg(a.attname::text) from pg_attribute a where a.attrelid = c.conrelid and a.attnum = any (c.conkey))
      = array['id']
"""
UNIQUE_INDEXES_SQL = """
select c.relname as table_name,
       array(select a.attname::text from unnest(i.indkey::smallint[]) with ordinality k(attnum, n)
             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum order by k.n) as columns
from pg_index i join pg_class c on c.oid = i.indrelid
where c.relnamespace = 'public'::regnamespace and i.indisunique and i.indisvalid
  and i.indpred is null and i.indexprs is null
"""
PLAINTEXT_TYPES = ("text", "character varying", "character")
PRECONDITIONS_COLUMNS = ["phase", "refuses", "table", "rows", "which"]


def _shown_value(text: str | None) -> str:
    return _sample(text, 200)


def _effective_column(columns: dict[str, str], spec: dict) -> str | None:
    """The value a column holds once phase 2 has converged it: the column, else the legacy synonyms it
    carries from (as text, the way the unique rule compares), or None (a new column: NULL or a default)."""
    present = [c for c in [spec["column"], *spec["synonyms"]] if c in columns]
    if not present:
        return None
    return "coalesce(" + ", ".join(f'"{c}"::text' for c in present) + ")"


def _duplicates(conn, table: str, name: str, cols: list[str], columns: dict[str, str], spec: dict) -> dict | None:
    exprs = []
    for col in cols:
        found = spec.get((table, col))
        expr = _effective_column(columns, found) if found else (f'"{col}"::text' if col in columns else None)
        if table == "api_keys" and col == "key_hash":
            plain = [c for c in PLAINTEXT_KEY_COLUMNS if columns.get(c) in PLAINTEXT_TYPES]
            hashes = [f"encode(sha256(convert_to(\"{c}\", 'UTF8')), 'hex')" for c in plain]
            expr = "coalesce(" + ", ".join(([expr] if expr else []) + hashes) + ")" if (expr or hashes) else None
        if expr is None:
            return None     # a new column: NULL in every row, no duplicates
        exprs.append(expr)
    secret = table == "api_keys"
    key = "concat_ws(', ', " + ", ".join(exprs) + ")"
    ident = '"id"::text' if "id" in columns else "ctid::text"
    where = " and ".join(f"({e}) is not null" for e in exprs)
    query = (f"select count(*), coalesce(sum(n), 0)::bigint, string_agg(shown, '; ' order by shown) from ("
             f"select {key} as k, count(*) as n, "
             + (f"'rows ' || string_agg({ident}, ', ' order by {ident})" if secret
                else f"{key} || ' (' || count(*) || ' rows)'")
             + f" as shown from public.\"{table}\" where {where} group by {', '.join(exprs)} having count(*) > 1) d")
    groups, rows, shown = _fetch_tuple(conn, query)[0]
    if not groups:
        return None
    return {"phase": "001", "refuses": f"duplicates under the unique rule {name} ({', '.join(cols)})",
            "table": table, "rows": rows,
            "which": f"{groups} duplicated value(s){' (key hashes not shown; row ids)' if secret else ''}: "
                     + _shown_value(shown)}


def _unique_refusals(conn, columns_of: dict[str, dict[str, str]], by_column: dict, skip: set[str]) -> list[dict]:
    """Duplicates under each unique rule of phase 2, on tables whose key columns it would not refuse first."""
    # a unique index on exactly those columns holds already (no scan), unless values are carried or keys hashed
    enforced = {(r["table_name"], tuple(r["columns"])) for r in fetch(conn, UNIQUE_INDEXES_SQL)}
    found = []
    for table, name, cols in phase2_unique_rules():
        present = columns_of.get(table)
        if not present or table in skip:
            continue
        carried = [c for col in cols for c in by_column.get((table, col), {}).get("synonyms", []) if c in present]
        hashed = table == "api_keys" and any(c in present for c in PLAINTEXT_KEY_COLUMNS)
        if (table, tuple(cols)) in enforced and not hashed and not carried:
            continue
        duplicate = _duplicates(conn, table, name, cols, present, by_column)
        if duplicate:
            found.append(duplicate)
    return found


def _key_type_refusals(columns_of: dict[str, dict[str, str]], referenced: set[str], spec: list[dict]) -> list[dict]:
    found = []
    for s in spec:
        actual = columns_of.get(s["table"], {}).get(s["column"])
        if not s["is_key"] or s["type"] == "any" or actual is None or actual == s["type"]:
            continue
        if (s["column"] == "id" and actual in ("bigint", "integer", "smallint")
                and f"public.{s['table']}" not in referenced and s["table"] not in referenced):
            continue    # a numeric id nothing references: phase 2 keeps it as legacy_id
        found.append({"phase": "001", "refuses": "a key column of another type (key columns are not converted "
                      "automatically)", "table": s["table"], "rows": None,
                      "which": f"{s['table']}.{s['column']} is {actual}, the contract needs {s['type']}"})
    return found


def _primary_key_refusals(conn, columns_of, pk_on_id: set[str], spec: list[dict]) -> list[dict]:
    found = []
    for table in dict.fromkeys(s["table"] for s in spec if s["column"] == "id"):
        columns = columns_of.get(table)
        id_spec = next(s for s in spec if s["table"] == table and s["column"] == "id")
        if not columns or "id" not in columns or table in pk_on_id or f"public.{table}" in pk_on_id:
            continue
        if id_spec["type"] != "any" and columns["id"] != id_spec["type"]:
            continue    # converted or refused above
        bad, sample = _fetch_tuple(conn, f"select count(*), string_agg(coalesce(id::text, 'NULL'), ', ') from ("
                                         f"select id from public.\"{table}\" group by id having count(*) > 1 "
                                         f"or id is null limit 20) d")[0]
        if bad:
            found.append({"phase": "001", "refuses": "id cannot become the primary key (NULL or duplicated ids)",
                          "table": table, "rows": bad, "which": "ids " + _shown_value(sample)})
    return found


def _phase3_shape_refusals(conn) -> list[dict]:
    problems = _fetch_tuple(conn, phase3_shape_sql())[0][0]
    return [{"phase": "002", "refuses": "an existing table in another shape than phase 3's", "table": p.split(".")[0],
             "rows": None, "which": p} for p in problems]


PRECONDITIONS_SQL = ("""-- every refusal of the phases that depends on the data or the shape, asked before anything changes
-- (the rules are read from the phase files themselves):
-- 001 unique rules, on the values each column holds once converged (legacy synonyms carried, keys hashed):
""" + "\n".join(f"select {', '.join(cols)}, count(*) from public.{t} group by {', '.join(cols)} having count(*) > 1;  -- {n}"
                for t, n, cols in phase2_unique_rules()) + """
-- 001 key columns of another type (key columns are not converted automatically):
""" + TABLE_COLUMNS_SQL.strip() + """;
-- 001 ids that cannot become the primary key, per core table without one on id:
select id from public.<table> group by id having count(*) > 1 or id is null;
-- 002 its tables absent or in its shape:
""" + phase3_shape_sql())


def _refusals_text(found: list[dict]) -> str:
    """Each refusal once, with the rows it names."""
    grouped: dict[str, list[str]] = {}
    for f in found:
        grouped.setdefault(f"{f['table']}: {f['refuses']}", []).append(f["which"])
    return "; ".join(f"{what} ({_sample(' / '.join(which), 240)})" for what, which in grouped.items())


@sql_check(PRECONDITIONS_SQL, "what the phases would refuse")
def phase_preconditions(conn) -> Check:
    """Every phase's refusals that depend on data or shape, asked now: a deployment the phases would stop
    half way is refused before the backup and before phase 1, naming the rows (never a key)."""
    rows_of = fetch(conn, TABLE_COLUMNS_SQL)
    columns_of: dict[str, dict[str, str]] = {}
    for r in rows_of:
        columns_of.setdefault(r["table_name"], {})[r["column_name"]] = r["type"]
    spec = phase2_spec()
    by_column = {(s["table"], s["column"]): s for s in spec}
    referenced = {r["referenced"] for r in fetch(conn, REFERENCED_SQL)}
    pk_on_id = {r["tbl"] for r in fetch(conn, PK_ON_ID_SQL)}
    found = _key_type_refusals(columns_of, referenced, spec)
    found += _unique_refusals(conn, columns_of, by_column, skip={f["table"] for f in found})
    found += _primary_key_refusals(conn, columns_of, pk_on_id, spec)
    found += _phase3_shape_refusals(conn)
    if found:
        return Check("phase_preconditions", "error",
                     f"the phases would stop on {len(found)} problem(s), after earlier phases had committed: "
                     "resolve them first (nothing has changed). " + _refusals_text(found), rows=found,
                     columns=PRECONDITIONS_COLUMNS)
    return Check("phase_preconditions", "ok", "no phase would refuse this database: no duplicates under the unique "
                 f"rules ({len(phase2_unique_rules())}), no key column of another type, ids fit a primary key, "
                 "phase 3's tables absent or in its shape")
