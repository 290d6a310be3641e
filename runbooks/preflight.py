"""Preflight checks: is this database ready, and is it safe, to deploy now?"""

from __future__ import annotations

from . import engine
from .checks import Check, fetch, sql_check
from .paths import PHASES

MIN_SERVER_VERSION = 150000

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


PRIVILEGES_SQL = """
select current_user as role,
       r.rolsuper as superuser,
       has_database_privilege(current_database(), 'create') as create_in_database,
       has_schema_privilege('public', 'create') as create_in_public,
       pg_get_userbyid(n.nspowner) as public_owner,
       pg_has_role(current_user, n.nspowner, 'usage') as owns_public,
       r.rolcreaterole as createrole,
       r.rolbypassrls as bypassrls
from pg_roles r, pg_namespace n
where r.rolname = current_user and n.nspname = 'public'
"""


@sql_check(PRIVILEGES_SQL, "privileges of the connecting role")
def privileges(conn) -> Check:
    row = fetch(conn, PRIVILEGES_SQL)[0]
    missing = [what for what, ok in (("create in the database (for schemas private and truthsource)",
                                      row["create_in_database"] or row["superuser"]),
                                     ("create in schema public", row["create_in_public"] or row["superuser"]),
                                     ("ownership of schema public (to restore it on rollback)",
                                      row["owns_public"] or row["superuser"])) if not ok]
    if missing:
        return Check("privileges", "error", f"role {row['role']} lacks: " + "; ".join(missing), rows=[row])
    return Check("privileges", "ok", f"role {row['role']} can deploy and roll back"
                 + (" (superuser)" if row["superuser"] else ""), rows=[row])


HISTORY_SQL = f"select version, file_name, sha256, action, applied_at, applied_by, run_id from {engine.HISTORY_TABLE} order by applied_at"


@sql_check(HISTORY_SQL, "what is applied already, and do the files still match")
def applied_phases(conn) -> Check:
    applied = engine.latest_applied(engine.read_history(conn))
    rows, changed = [], []
    for version, path in PHASES:
        on_disk = engine.sha256_file(path)
        row = applied.get(version)
        state = "pending" if row is None else "applied, file matches" if row["sha256"] == on_disk else "applied, FILE CHANGED"
        if row is not None and row["sha256"] != on_disk:
            changed.append(version)
        rows.append({"phase": version, "file": path.name, "state": state, "sha256 on disk": on_disk[:16],
                     "applied sha256": row["sha256"][:16] if row else "",
                     "applied by": row["applied_by"] if row else "", "run": row["run_id"] if row else ""})
    pending = [r["phase"] for r in rows if r["state"] == "pending"]
    if changed:
        return Check("applied_phases", "warning",
                     f"phase(s) {', '.join(changed)} changed since applied: their notebooks refuse unless forced",
                     rows=rows)
    return Check("applied_phases", "ok", f"{len(pending)} phase(s) to apply: {', '.join(pending) or 'none'}",
                 rows=rows)
