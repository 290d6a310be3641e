"""Post-deployment verification: did the deployment do what the guide and the contract promise?

The guide's four tests, done so they can work and prove something:

- the updated-at trigger is exercised by real updates (``SELECT update_updated_at_column()``
  cannot work: a trigger function cannot be called directly);
- ``get_user_organization_id``, ``is_org_member`` and ``is_org_admin`` are called for
  synthetic users and organizations whose answers are known;
- ``verify_data_integrity()`` (errors fail; legacy warnings are shown) and ``get_database_stats()``;
- ``detect_suspicious_activity(...)`` for a synthetic address, organization and user, once
  benign and once with threat intelligence and failed logins behind it.

Then RLS as the real API roles (``set local role`` plus ``request.jwt.claims``, as PostgREST
does it), compliance behaviour, duplicates, advisor-style lints, the phases' checksums, row counts
against the preflight snapshot, and the guide's success criteria as a pass/fail table.

Everything that writes does so on *synthetic rows inside a transaction that is always rolled
back* (``rolled_back``): verification works on any database, not only the fixture, and leaves
nothing behind (sequences a rolled-back insert advanced stay advanced: PostgreSQL never rolls
those back). Each check function takes a connection and returns a ``Check``; a check that cannot
run (a function missing, say) returns an ``error`` Check rather than raising, so the notebook can
show the whole picture before its verdict.
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import psycopg2.extensions

from . import later_writes, preflight, records, snapshot
from .checks import Check, fetch, human_bytes
from .contract import (CLIENT_FUNCTION_NAMES, CORE_TABLES, FUNCTIONS, HISTORY_SCHEMA, INTEGRITY_SQL,
                       PLAINTEXT_KEY_COLUMNS, PLATFORM_SCHEMAS, PLATFORM_SCHEMAS_SQL, TABLES)

# -- the synthetic world -----------------------------------------------------------------------------
# Fixed, recognisable ids ("5e1f7e57": self-test) so that outputs are deterministic; they only ever
# exist inside a rolled-back transaction.

ORG_A = "5e1f7e57-0000-4000-8000-00000000000a"
ORG_B = "5e1f7e57-0000-4000-8000-00000000000b"
USERS = {
    "owner": "5e1f7e57-0000-4000-8000-0000000000a1",        # owner of A, profile in A
    "admin": "5e1f7e57-0000-4000-8000-0000000000a2",        # admin of A, profile in A
    "member": "5e1f7e57-0000-4000-8000-0000000000a3",       # member of A, profile without organization
    "viewer": "5e1f7e57-0000-4000-8000-0000000000a4",       # viewer of A, profile in A
    "other_admin": "5e1f7e57-0000-4000-8000-0000000000b1",  # admin of B, profile in B
    "drifter": "5e1f7e57-0000-4000-8000-0000000000b2",      # member of B (2000-01-02), then of A (2000-01-09); no profile
    "outsider": "5e1f7e57-0000-4000-8000-0000000000c1",     # no profile, no membership
}
PRODUCT_A = "5e1f7e57-0000-4000-8000-0000000001a0"
PRODUCT_B = "5e1f7e57-0000-4000-8000-0000000001b0"
INVENTORY_A = "5e1f7e57-0000-4000-8000-0000000002a0"
INVENTORY_B = "5e1f7e57-0000-4000-8000-0000000002b0"
KEY_A = "5e1f7e57-0000-4000-8000-0000000003a0"
KEY_B = "5e1f7e57-0000-4000-8000-0000000003b0"
THREAT_IP = "192.0.2.77"            # TEST-NET-1: never a real client
BENIGN_IP = "2001:db8:5e1f::1"      # IPv6 documentation prefix
STAMP = "2000-01-01 00:00:00+00"    # what synthetic rows are created with
MOVED_FROM = "1999-01-01 00:00:00+00"

_MEMBERSHIPS = (("owner", ORG_A, "owner", "2000-01-01"), ("admin", ORG_A, "admin", "2000-01-01"),
                ("member", ORG_A, "member", "2000-01-03"), ("viewer", ORG_A, "viewer", "2000-01-04"),
                ("other_admin", ORG_B, "admin", "2000-01-01"), ("drifter", ORG_B, "member", "2000-01-02"),
                ("drifter", ORG_A, "member", "2000-01-09"))
_PROFILES = (("owner", ORG_A), ("admin", ORG_A), ("member", None), ("viewer", ORG_A), ("other_admin", ORG_B))


def _values(rows) -> str:
    def lit(v):
        return "null" if v is None else "'" + str(v).replace("'", "''") + "'"
    return ",\n  ".join("(" + ", ".join(lit(v) for v in row) + ")" for row in rows)


SEED_SQL = f"""-- synthetic users, organizations and rows (inside a transaction that is rolled back)
insert into auth.users (id, email, aud, role) values
  {_values((uid, f"runbook-verification+{who}@example.invalid", "authenticated", "authenticated") for who, uid in USERS.items())};
insert into public.organizations (id, name, slug, updated_at) values
  ('{ORG_A}', 'Runbook verification A', 'runbook-verification-a', '{STAMP}'),
  ('{ORG_B}', 'Runbook verification B', 'runbook-verification-b', '{STAMP}');
insert into public.profiles (id, email, full_name, organization_id, updated_at) values
  {_values((USERS[who], f"runbook-verification+{who}@example.invalid", f"Verification {who}", org, STAMP) for who, org in _PROFILES)}
on conflict (id) do update set email = excluded.email, full_name = excluded.full_name,
  organization_id = excluded.organization_id, updated_at = excluded.updated_at;
insert into public.organization_members (organization_id, user_id, role, created_at, updated_at) values
  {_values((org, USERS[who], role, created, STAMP) for who, org, role, created in _MEMBERSHIPS)};
insert into public.products (id, organization_id, sku, name, price, updated_at) values
  ('{PRODUCT_A}', '{ORG_A}', 'RBV-A-001', 'Verification widget A', 1.00, '{STAMP}'),
  ('{PRODUCT_B}', '{ORG_B}', 'RBV-B-001', 'Verification widget B', 2.00, '{STAMP}');
insert into public.inventory (id, organization_id, product_id, location, quantity, reserved_quantity, updated_at) values
  ('{INVENTORY_A}', '{ORG_A}', '{PRODUCT_A}', 'runbook-verification', 10, 2, '{STAMP}'),
  ('{INVENTORY_B}', '{ORG_B}', '{PRODUCT_B}', 'runbook-verification', 20, 0, '{STAMP}');
insert into public.api_keys (id, organization_id, name, key_prefix, key_hash, created_by, updated_at) values
  ('{KEY_A}', '{ORG_A}', 'Verification key A', 'rbv_a', encode(sha256('runbook-verification-key-a'::bytea), 'hex'), '{USERS['admin']}', '{STAMP}'),
  ('{KEY_B}', '{ORG_B}', 'Verification key B', 'rbv_b', encode(sha256('runbook-verification-key-b'::bytea), 'hex'), '{USERS['other_admin']}', '{STAMP}');
insert into public.audit_logs (organization_id, user_id, action, table_name, record_id) values
  ('{ORG_A}', '{USERS['admin']}', 'runbook.verification', 'products', '{PRODUCT_A}'),
  ('{ORG_B}', '{USERS['other_admin']}', 'runbook.verification', 'products', '{PRODUCT_B}');
insert into public.security_events (organization_id, user_id, event_type, severity, ip_address) values
  ('{ORG_A}', '{USERS['admin']}', 'runbook.verification', 'low', '{BENIGN_IP}'),
  ('{ORG_B}', '{USERS['other_admin']}', 'runbook.verification', 'low', '{BENIGN_IP}');"""

UNDONE = "runbook_verification"   # the savepoint every verification transaction's work is rolled back to
SEED_REF = ("begin isolation level read committed, read write;\n"
            f"savepoint {UNDONE};\n"
            "-- the synthetic users, organizations and rows: verification.SEED_SQL, shown in full above")
# how each verification transaction ends: its work undone, the empty transaction committed
UNDO_REF = f"-- then: rollback to savepoint {UNDONE}; commit;  (nothing stays: the transaction commits empty)"

THREAT_SQL = f"""insert into public.threat_intelligence (ip_address, threat_type, severity, source, updated_at)
values ('{THREAT_IP}/32', 'runbook-verification', 'critical', 'runbook verification (synthetic)', '{STAMP}')"""


@contextmanager
def rolled_back(conn, *, lock_timeout: str = "2s", statement_timeout: str = "60s"):
    """A read-write transaction on `conn` (read-only by default in notebooks) whose work is ALWAYS undone:
    rolled back to a savepoint taken before it, and only then is the transaction, empty by now, ended
    with COMMIT (when that rollback did not happen, with ROLLBACK). Nothing it did stays, and the
    runbooks' own checks never count as rolled-back transactions in pg_stat_database, whose share of
    rollbacks maintenance judges as the app's errors.

    Short lock and statement timeouts: verification never queues behind the application.
    """
    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise RuntimeError("verification needs a connection that is not inside a transaction")
    cur = conn.cursor()
    try:
        if conn.autocommit:
            cur.execute("begin isolation level read committed, read write")
        else:
            cur.execute("set transaction isolation level read committed, read write")
        cur.execute("select set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
                    (lock_timeout, statement_timeout))
        cur.execute(f"savepoint {UNDONE}")
        yield cur
    finally:
        if not conn.closed:
            _end_undone(conn, cur)
        cur.close()


def _end_undone(conn, cur) -> None:
    """Roll the work back to the savepoint, then commit the empty transaction; if the savepoint cannot
    be rolled back to (it was never taken, the transaction is gone), roll back the whole of it."""
    try:
        cur.execute(f"rollback to savepoint {UNDONE}")
        undone = True
    except psycopg2.Error:
        undone = False
    end = "commit" if undone else "rollback"
    if conn.autocommit:
        cur.execute(end)
    else:
        conn.commit() if undone else conn.rollback()


@contextmanager
def savepoint(cur, name: str = "verification_step"):
    """A block whose effects (including SET LOCAL ROLE) are undone at its end."""
    cur.execute(f"savepoint {name}")
    try:
        yield
    finally:
        cur.execute(f"rollback to savepoint {name}")
        cur.execute(f"release savepoint {name}")


def act_as_sql(who: str, users: dict[str, str] = USERS) -> list[str]:
    """The statements that make the transaction an API request as PostgREST does: request.jwt.claims for
    the request, and set local role (`who` is anon, service_role, or a name of `users`, whose id becomes
    the claims' sub)."""
    if who in ("anon", "service_role"):
        role, claims = who, {"role": who}
    else:
        role, claims = "authenticated", {"sub": users[who], "role": "authenticated", "aud": "authenticated"}
    claims_text = json.dumps(claims).replace("'", "''")
    return [f"select set_config('request.jwt.claims', '{claims_text}', true)", f"set local role {role}"]


def act_as(cur, who: str, users: dict[str, str] = USERS) -> None:
    """Become an API role as PostgREST does (see act_as_sql)."""
    for statement in act_as_sql(who, users):
        cur.execute(statement)


def case_sql(who: str, what: str, sql: str) -> str:
    """A case as a check runs it, shown: as `who` (act_as_sql; "dba": the connecting role itself), `sql`."""
    if who == "dba":
        return f"-- as the deploying role (DBA), the connecting one: {what}\n{sql};\n"
    return f"-- as {who}: {what}\n" + "".join(s + ";\n" for s in [*act_as_sql(who), sql])


def seed(cur) -> None:
    cur.execute(SEED_SQL)


def verification_check(sql: str, title: str, name: str):
    """Like checks.sql_check, and a check that cannot run becomes an error Check (it never raises)."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(conn, *args, **kwargs):
            try:
                check = function(conn, *args, **kwargs)
            except psycopg2.Error as exc:
                message = (exc.diag.message_primary or str(exc)).strip()
                check = Check(name, "error", f"could not run: [{exc.pgcode}] {message}", title=title)
            except (snapshot.SnapshotError, OSError, ValueError) as exc:
                check = Check(name, "error", f"could not run: {exc}", title=title)
            check.sql = check.sql or sql
            return check
        wrapper.sql = sql
        wrapper.title = title
        return wrapper
    return decorate


def _label(value) -> str:
    names = {v: k for k, v in USERS.items()} | {ORG_A: "org A", ORG_B: "org B"}
    return "NULL" if value is None else names.get(str(value), str(value))


# -- 1. the phases ------------------------------------------------------------------------------------

@verification_check(preflight.HISTORY_SQL, "all three phases applied, from the files on disk", "phases_applied")
def phases_applied(conn) -> Check:
    rows = preflight.phase_states(conn)
    wrong = [f"{r['phase']} {r['state']}" for r in rows if r["state"] != "applied, file matches"]
    if wrong:
        return Check("phases_applied", "error", "not applied from the files on disk: " + "; ".join(wrong), rows=rows)
    return Check("phases_applied", "ok", f"all {len(rows)} phases applied, and the files on disk match the sha256 "
                 "the history recorded", rows=rows)


# -- 2. the guide's test 1: core functions ---------------------------------------------------------------

UPDATED_AT_TABLES_SQL = """
select quote_ident(n.nspname) || '.' || quote_ident(c.relname) as table_name,
       (select string_agg(t.tgname, ', ' order by t.tgname) from pg_trigger t
         where t.tgrelid = c.oid and not t.tgisinternal and t.tgenabled <> 'D'
           and t.tgfoid = to_regprocedure('public.update_updated_at_column()')
           and t.tgtype & 1 = 1 and t.tgtype & 2 = 2 and t.tgtype & 16 = 16) as triggers
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition
order by 1"""
# which synthetic row to touch per table
_SYNTHETIC_ROW = {
    "organizations": f"id = '{ORG_A}'",
    "profiles": f"id = '{USERS['owner']}'",
    "organization_members": f"organization_id = '{ORG_A}' and user_id = '{USERS['owner']}'",
    "products": f"id = '{PRODUCT_A}'",
    "inventory": f"id = '{INVENTORY_A}'",
    "api_keys": f"id = '{KEY_A}'",
    "threat_intelligence": f"ip_address = '{THREAT_IP}/32' and threat_type = 'runbook-verification'",
}


def row_to_touch(table: str) -> str:
    """Which row of `table` (as UPDATED_AT_TABLES_SQL names it) the check updates: its synthetic one, else any."""
    name = table.split(".")[-1].strip('"')
    return _SYNTHETIC_ROW.get(name, f"ctid = (select ctid from {table} limit 1)")


def touch_updated_at_sql(table: str) -> str:
    """The update that exercises `table`'s updated-at trigger: updated_at set back to MOVED_FROM, then
    read back (the value, whether it is now(), as text)."""
    return (f"update {table} set updated_at = '{MOVED_FROM}' where {row_to_touch(table)} "
            "returning updated_at, updated_at = now(), updated_at::text")


UPDATED_AT_SQL = (UPDATED_AT_TABLES_SQL + ";\n\n" + SEED_REF + "\n" + THREAT_SQL + ";\n\n"
                  "-- per table with updated_at, each in a savepoint: the contract's tables, their synthetic row\n"
                  + "".join(touch_updated_at_sql(f"public.{name}") + ";\n" for name in _SYNTHETIC_ROW)
                  + "-- an outline: any other table with updated_at, its name in place of <table>, one existing row\n"
                  + touch_updated_at_sql("<table>") + ";\n"
                  "-- and the guide's call, which must fail:\nselect public.update_updated_at_column();\n"
                  + UNDO_REF)


@verification_check(UPDATED_AT_SQL, "the updated-at trigger moves updated_at (a real update, rolled back)",
                    "updated_at_trigger")
def updated_at_trigger(conn) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        cur.execute(UPDATED_AT_TABLES_SQL)
        tables = cur.fetchall()
        seed(cur)
        cur.execute(THREAT_SQL)
        for table, triggers in tables:
            name = table.split(".")[-1].strip('"')
            row = {"table": table, "trigger": triggers or "NONE calling update_updated_at_column()",
                   "row": "synthetic" if name in _SYNTHETIC_ROW else "an existing row",
                   "set updated_at to": MOVED_FROM, "read back": "", "moved": "NO"}
            try:
                with savepoint(cur):
                    cur.execute(touch_updated_at_sql(table))
                    result = cur.fetchone()
            except psycopg2.Error as exc:
                row["read back"] = f"could not update: {(exc.diag.message_primary or str(exc)).strip()}"
                row["moved"] = "not exercised"
                rows.append(row)
                continue
            if result is None:
                row.update({"read back": "no row to update", "moved": "not exercised"})
            else:
                row["read back"] = "now() (this transaction's time)" if result[1] else result[2]
                row["moved"] = "yes" if result[1] else "NO"
            rows.append(row)
        guide = {"table": "(the guide's test)", "trigger": "select update_updated_at_column()", "row": "",
                 "set updated_at to": "", "read back": "", "moved": ""}
        try:
            with savepoint(cur):
                cur.execute("select public.update_updated_at_column()")
            guide.update({"read back": "it ran?!", "moved": "NO"})
        except psycopg2.Error as exc:
            guide.update({"read back": f"fails, as it must: {(exc.diag.message_primary or '').strip()}",
                          "moved": "n/a"})
        rows.append(guide)
    columns = ["table", "trigger", "row", "set updated_at to", "read back", "moved"]
    for row in rows:
        if ", " in row["trigger"] and row["row"]:   # two triggers stamping one column: a legacy duplicate left
            row["moved"] = "NO: more than one trigger"
    broken = [r["table"] for r in rows if r["moved"].startswith("NO")]
    untested = [r["table"] for r in rows if r["moved"] == "not exercised"]
    if broken:
        return Check("updated_at_trigger", "error", "updated_at does not move on update in: " + ", ".join(broken),
                     rows=rows, columns=columns)
    if not tables:
        return Check("updated_at_trigger", "error", "no table in public has updated_at", rows=rows, columns=columns)
    if untested:
        return Check("updated_at_trigger", "warning", f"moves in {len(tables) - len(untested)} tables; not exercised "
                     "(no row, or the row could not be updated): " + ", ".join(untested), rows=rows, columns=columns)
    return Check("updated_at_trigger", "ok", f"updated_at moves on update in all {len(tables)} tables that have it, "
                 "each through update_updated_at_column()", rows=rows, columns=columns)


HELPER_CASES = (
    ("get_user_organization_id", ("owner",), ORG_A, "profile's organization"),
    ("get_user_organization_id", ("member",), ORG_A, "no profile organization: the membership"),
    ("get_user_organization_id", ("drifter",), ORG_B, "no profile: the earliest membership"),
    ("get_user_organization_id", ("outsider",), None, "no profile, no membership"),
    ("is_org_member", ("member", ORG_A), True, "member"),
    ("is_org_member", ("viewer", ORG_A), True, "viewer"),
    ("is_org_member", ("other_admin", ORG_A), False, "admin of another organization"),
    ("is_org_member", ("outsider", ORG_A), False, "no membership"),
    ("is_org_admin", ("owner", ORG_A), True, "owner"),
    ("is_org_admin", ("admin", ORG_A), True, "admin"),
    ("is_org_admin", ("member", ORG_A), False, "member"),
    ("is_org_admin", ("viewer", ORG_A), False, "viewer"),
    ("is_org_admin", ("other_admin", ORG_A), False, "admin of another organization"),
)


def helper_call_sql(function: str, args: tuple) -> str:
    """A case of HELPER_CASES as the check calls it: with untyped literals, as the guide calls them."""
    values = [USERS[args[0]], *args[1:]]
    literals = ", ".join(f"'{v}'" for v in values)
    return f"select public.{function}({literals})"


HELPERS_SQL = (SEED_REF + "\n\n-- each call in a savepoint, with untyped literals, as the guide calls them:\n"
               + "".join(helper_call_sql(function, args) + ";\n" for function, args, *_ in HELPER_CASES)
               + UNDO_REF)


@verification_check(HELPERS_SQL, "get_user_organization_id, is_org_member, is_org_admin on synthetic users",
                    "helper_functions")
def helper_functions(conn) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        seed(cur)
        for function, args, expected, case in HELPER_CASES:
            values = [USERS[args[0]], *args[1:]]
            call = f"{function}({', '.join(_label(v) if i else args[0] for i, v in enumerate(values))})"
            try:
                with savepoint(cur):
                    cur.execute(helper_call_sql(function, args))
                    actual = cur.fetchone()[0]
                shown = _label(actual) if function == "get_user_organization_id" else actual
                ok = (str(actual) if actual is not None else None) == (str(expected) if expected is not None else None)
            except psycopg2.Error as exc:
                shown, ok = f"error: {(exc.diag.message_primary or str(exc)).strip()}", False
            rows.append({"call": call, "case": case,
                         "expected": _label(expected) if function == "get_user_organization_id" else expected,
                         "actual": shown, "ok": "yes" if ok else "NO"})
    failed = [r["call"] for r in rows if r["ok"] == "NO"]
    if failed:
        return Check("helper_functions", "error", "wrong answers: " + "; ".join(failed), rows=rows)
    return Check("helper_functions", "ok", f"all {len(rows)} calls answer as the contract says", rows=rows)


# -- 3. the guide's tests 2 and 3: integrity and statistics ---------------------------------------------



@verification_check(INTEGRITY_SQL, "verify_data_integrity()", "data_integrity")
def data_integrity(conn) -> Check:
    rows = fetch(conn, INTEGRITY_SQL)
    errors = [r["check_name"] for r in rows if r["status"] == "error"]
    warnings = [r["check_name"] for r in rows if r["status"] == "warning"]
    odd = [r["check_name"] for r in rows if r["status"] not in ("ok", "warning", "error")]
    if errors or odd or not rows:
        return Check("data_integrity", "error", ("errors: " + ", ".join(errors + odd)) if rows else "no rows returned",
                     rows=rows)
    if warnings:
        return Check("data_integrity", "warning", f"{len(rows) - len(warnings)} checks ok; {len(warnings)} report legacy "
                     "rows that break a rule (kept and reported; every new write is checked): " + ", ".join(warnings),
                     rows=rows)
    return Check("data_integrity", "ok", f"all {len(rows)} checks ok", rows=rows)


STATS_SQL = "select * from public.get_database_stats() order by table_name"
PUBLIC_TABLES_SQL = """select c.relname as table_name from pg_class c
where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relispartition order by 1"""


@verification_check(STATS_SQL, "get_database_stats()", "database_stats")
def database_stats(conn) -> Check:
    started = time.perf_counter()
    rows = fetch(conn, STATS_SQL)
    seconds = time.perf_counter() - started
    expected = [r["table_name"] for r in fetch(conn, PUBLIC_TABLES_SQL)]
    reported = [r["table_name"] for r in rows]
    shown = [{"table": r["table_name"], "rows": r["row_count"], "total size": human_bytes(r["total_bytes"]),
              "index size": human_bytes(r["index_bytes"]), "dead rows": r["dead_rows"],
              "seq scans": r["seq_scans"], "index scans": r["index_scans"],
              "last vacuum": r["last_vacuum"], "last analyze": r["last_analyze"]} for r in rows]
    if sorted(reported) != expected:
        missing = sorted(set(expected) - set(reported))
        extra = sorted(set(reported) - set(expected))
        return Check("database_stats", "error", f"get_database_stats() does not report one row per table in public: "
                     f"missing {missing or 'none'}, unexpected {extra or 'none'}", rows=shown)
    return Check("database_stats", "ok", f"one row for each of the {len(rows)} tables in public "
                 f"({sum(r['row_count'] or 0 for r in rows)} rows in all), in {seconds:.2f}s", rows=shown)


# -- 4. the guide's test 4: security ---------------------------------------------------------------------

FAILED_LOGINS = 5
SUSPICIOUS_SQL = (SEED_REF + "\n\n-- benign: a fresh address and user, no history\n"
                  f"select * from public.detect_suspicious_activity('{ORG_A}', '{BENIGN_IP}', '{USERS['outsider']}');\n"
                  "-- suspicious: the address is listed as critical, and the user failed to log in "
                  f"{FAILED_LOGINS} times from it\n" + THREAT_SQL + ";\n"
                  f"select public.log_security_event('login_failed', 'medium', '{ORG_A}', '{USERS['member']}', "
                  f"'{THREAT_IP}', '{{}}') from generate_series(1, {FAILED_LOGINS});\n"
                  f"select * from public.detect_suspicious_activity('{ORG_A}', '{THREAT_IP}', '{USERS['member']}');\n"
                  "select count(*) from public.security_events where event_type = 'suspicious_activity' "
                  f"and user_id = '{USERS['member']}';\n" + UNDO_REF)


@verification_check(SUSPICIOUS_SQL, "detect_suspicious_activity(org, ip, user) on synthetic activity",
                    "suspicious_activity")
def suspicious_activity(conn) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        seed(cur)
        cur.execute("select * from public.detect_suspicious_activity(%s, %s, %s)", (ORG_A, BENIGN_IP, USERS["outsider"]))
        benign = cur.fetchone()
        rows.append({"case": "fresh address and user", "is_suspicious": benign[0], "risk_score": benign[1],
                     "reasons": "; ".join(benign[2] or []) or "none", "expected": "not suspicious",
                     "ok": "yes" if benign[0] is False else "NO"})
        cur.execute(THREAT_SQL)
        cur.execute("select public.log_security_event('login_failed', 'medium', %s, %s, %s, '{}') "
                    "from generate_series(1, %s)", (ORG_A, USERS["member"], THREAT_IP, FAILED_LOGINS))
        cur.execute("select * from public.detect_suspicious_activity(%s, %s, %s)", (ORG_A, THREAT_IP, USERS["member"]))
        bad = cur.fetchone()
        cur.execute("select count(*) from public.security_events where event_type = 'suspicious_activity' and user_id = %s",
                    (USERS["member"],))
        logged = cur.fetchone()[0]
        rows.append({"case": f"listed address (critical) and {FAILED_LOGINS} failed logins", "is_suspicious": bad[0],
                     "risk_score": bad[1], "reasons": "; ".join(bad[2] or []),
                     "expected": "suspicious (risk_score >= 50), logged as a security event",
                     "ok": "yes" if bad[0] is True and bad[1] >= 50 and logged == 1 else "NO"})
        rows.append({"case": "security_events row written for it", "is_suspicious": "", "risk_score": "",
                     "reasons": f"{logged} suspicious_activity event(s)", "expected": "1",
                     "ok": "yes" if logged == 1 else "NO"})
    if any(r["ok"] == "NO" for r in rows):
        return Check("suspicious_activity", "error", "detect_suspicious_activity() does not flag (or log) as it should",
                     rows=rows)
    return Check("suspicious_activity", "ok", "benign activity scores low; a listed address with failed logins is "
                 f"flagged (risk {bad[1]}) and logged", rows=rows)


# -- 5. RLS as the API roles --------------------------------------------------------------------------------

NOTHING = "nothing"   # 0 rows, or refused with an error
SOME = "some"         # at least one row, no error
_A, _B = f"'{ORG_A}'", f"'{ORG_B}'"
RLS_CASES = (
    # (who, what, sql, expected)
    ("anon", "reads organizations A and B", f"select count(*) from public.organizations where id in ({_A}, {_B})", NOTHING),
    ("anon", "reads products of A and B", f"select count(*) from public.products where organization_id in ({_A}, {_B})", NOTHING),
    ("anon", "reads the synthetic profiles", f"select count(*) from public.profiles where id = '{USERS['owner']}'", NOTHING),
    ("anon", "inserts a product into A", f"insert into public.products (organization_id, sku, name, price) values ({_A}, 'RBV-ANON-1', 'x', 1)", NOTHING),
    ("outsider", "reads organizations A and B", f"select count(*) from public.organizations where id in ({_A}, {_B})", NOTHING),
    ("outsider", "reads products of A and B", f"select count(*) from public.products where organization_id in ({_A}, {_B})", NOTHING),
    ("member", "reads its own organization A", f"select count(*) from public.organizations where id = {_A}", 1),
    ("member", "reads organization B", f"select count(*) from public.organizations where id = {_B}", NOTHING),
    ("member", "reads products of A", f"select count(*) from public.products where organization_id = {_A}", 1),
    ("member", "reads products of B", f"select count(*) from public.products where organization_id = {_B}", NOTHING),
    ("member", "reads the members of A", f"select count(*) from public.organization_members where organization_id = {_A}", 5),
    ("member", "reads api_keys of A (admins only)", f"select count(*) from public.api_keys where organization_id = {_A}", NOTHING),
    ("member", "reads audit_logs of A (admins only)", f"select count(*) from public.audit_logs where organization_id = {_A}", NOTHING),
    ("member", "reads security_events of A (admins only)", f"select count(*) from public.security_events where organization_id = {_A}", NOTHING),
    ("member", "inserts a product into A", f"insert into public.products (organization_id, sku, name, price) values ({_A}, 'RBV-MEMBER-1', 'x', 1)", NOTHING),
    ("viewer", "reads products of A", f"select count(*) from public.products where organization_id = {_A}", 1),
    ("viewer", "inserts a product into A", f"insert into public.products (organization_id, sku, name, price) values ({_A}, 'RBV-VIEWER-1', 'x', 1)", NOTHING),
    ("viewer", "updates a product of A", f"update public.products set name = 'changed' where id = '{PRODUCT_A}'", NOTHING),
    ("viewer", "deletes inventory of A", f"delete from public.inventory where id = '{INVENTORY_A}'", NOTHING),
    ("admin", "inserts a product into A", f"insert into public.products (organization_id, sku, name, price) values ({_A}, 'RBV-ADMIN-1', 'x', 1)", 1),
    ("admin", "updates a product of A", f"update public.products set name = 'changed' where id = '{PRODUCT_A}'", 1),
    ("admin", "updates a product of B", f"update public.products set name = 'changed' where id = '{PRODUCT_B}'", NOTHING),
    ("admin", "inserts a product into B", f"insert into public.products (organization_id, sku, name, price) values ({_B}, 'RBV-ADMIN-2', 'x', 1)", NOTHING),
    ("admin", "reads api_keys of A", f"select count(*) from public.api_keys where organization_id = {_A}", 1),
    ("admin", "reads api_keys of B", f"select count(*) from public.api_keys where organization_id = {_B}", NOTHING),
    ("admin", "reads audit_logs of A", f"select count(*) from public.audit_logs where organization_id = {_A}", SOME),
    ("admin", "reads security_events of A", f"select count(*) from public.security_events where organization_id = {_A}", SOME),
    ("owner", "updates its organization A", f"update public.organizations set name = 'Renamed A' where id = {_A}", 1),
    ("service_role", "reads products of A and B (bypasses RLS)", f"select count(*) from public.products where organization_id in ({_A}, {_B})", 2),
    ("service_role", "reads api_keys of A and B", f"select count(*) from public.api_keys where organization_id in ({_A}, {_B})", 2),
)
RLS_SQL = (SEED_REF + "\n\n-- each case in a savepoint, as PostgREST runs a request:\n"
           + "".join(case_sql(who, what, sql) for who, what, sql, _ in RLS_CASES)
           + UNDO_REF)


def _expected_text(expected) -> str:
    return {NOTHING: "nothing (0 rows, or refused)", SOME: "some rows"}.get(expected, f"{expected} row(s)")


def run_case(cur, who: str, sql: str):
    """(value, error): rows counted or affected as `who`, or the error message."""
    try:
        with savepoint(cur, "rls_case"):
            act_as(cur, who)
            cur.execute(sql)
            value = cur.fetchone()[0] if cur.description else cur.rowcount
        return value, None
    except psycopg2.Error as exc:
        return None, f"refused: {(exc.diag.message_primary or str(exc)).strip()}"


def _meets(expected, value, error) -> bool:
    if expected == NOTHING:
        return error is not None or value == 0
    if error is not None:
        return False
    return value >= 1 if expected == SOME else value == expected


@verification_check(RLS_SQL, "row-level security, as anon, authenticated users and service_role", "rls_spot_checks")
def rls_spot_checks(conn) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        seed(cur)
        for who, what, sql, expected in RLS_CASES:
            value, error = run_case(cur, who, sql)
            role = who if who in ("anon", "service_role") else f"authenticated ({who})"
            rows.append({"as": role, "does": what, "expected": _expected_text(expected),
                         "actual": error or f"{value} row(s)", "ok": "yes" if _meets(expected, value, error) else "NO"})
    failed = [f"{r['as']} {r['does']}" for r in rows if r["ok"] == "NO"]
    if failed:
        return Check("rls_spot_checks", "error", f"{len(failed)} of {len(rows)} cases wrong: " + "; ".join(failed),
                     rows=rows)
    return Check("rls_spot_checks", "ok", f"all {len(rows)} cases as the contract says: anon sees nothing, members "
                 "read their own organization only, viewers never write, admins write, service_role bypasses",
                 rows=rows)


# -- 6. compliance -----------------------------------------------------------------------------------------

COMPLIANCE_CASES = (
    ("member", "exports its own data", f"select (public.export_user_data('{USERS['member']}') ->> 'user_id') = '{USERS['member']}'", True),
    ("member", "exports another user's data", f"select public.export_user_data('{USERS['admin']}') is not null", "refused"),
    ("anon", "exports a user's data", f"select public.export_user_data('{USERS['member']}') is not null", "refused"),
    ("service_role", "exports a user's data", f"select (public.export_user_data('{USERS['member']}') ->> 'user_id') = '{USERS['member']}'", True),
    ("dba", "exports a user's data", f"select (public.export_user_data('{USERS['member']}') ->> 'user_id') = '{USERS['member']}'", True),
    ("service_role", "updates audit_logs (append-only)", f"update public.audit_logs set action = 'changed' where organization_id = {_A}", "refused"),
    ("service_role", "deletes audit_logs (append-only)", f"delete from public.audit_logs where organization_id = {_A}", "refused"),
    ("admin", "updates audit_logs of A (append-only)", f"update public.audit_logs set action = 'changed' where organization_id = {_A}", "refused"),
    ("service_role", "deletes security_events (append-only)", f"delete from public.security_events where organization_id = {_A}", "refused"),
    ("dba", "dry-runs apply_data_retention() (changes nothing)",
     "select count(*) > 0 from public.apply_data_retention(true)", True),
)
PLAINTEXT_SQL = f"""select count(*) from pg_attribute where attrelid = to_regclass('public.api_keys') and attnum > 0
  and not attisdropped and attname = any(array{list(PLAINTEXT_KEY_COLUMNS)})"""
# The verification's own log rows only (its synthetic organizations and users): a live app writes logs of its
# own all along, so the logs' totals say nothing about what the refused writes and the dry run did.
_SYNTHETIC_ORGS = f"array['{ORG_A}', '{ORG_B}']::uuid[]"
_SYNTHETIC_USERS = "array[" + ", ".join(f"'{u}'" for u in USERS.values()) + "]::uuid[]"
SYNTHETIC_LOGS_SQL = "\nunion all\n".join(
    f"select '{t}' as log, count(*) as n, md5(coalesce(string_agg(l::text, ',' order by l::text), '')) as content "
    f"from public.{t} l where l.organization_id = any ({_SYNTHETIC_ORGS}) or l.user_id = any ({_SYNTHETIC_USERS})"
    for t in ("audit_logs", "security_events"))
# synthetic log rows older than any retention period: a dry run that deleted would take them
EXPIRED_LOGS_SQL = f"""insert into public.audit_logs (organization_id, user_id, action, table_name, created_at)
values ('{ORG_A}', '{USERS['admin']}', 'runbook.verification.expired', 'products', '{STAMP}');
insert into public.security_events (organization_id, user_id, event_type, severity, created_at)
values ('{ORG_A}', '{USERS['admin']}', 'runbook.verification.expired', 'low', '{STAMP}')"""
COMPLIANCE_SQL = (SEED_REF + "\n" + EXPIRED_LOGS_SQL + ";\n\n-- the verification's own log rows, before the cases "
                  "and just after the dry run (in its savepoint):\n"
                  + SYNTHETIC_LOGS_SQL + ";\n\n-- each case in a savepoint:\n"
                  + "".join(case_sql(who, what, sql) for who, what, sql, _ in COMPLIANCE_CASES)
                  + "-- then, as the connecting role:\n" + PLAINTEXT_SQL + ";\n" + UNDO_REF)


def _synthetic_logs(cur) -> dict[str, tuple[int, str]]:
    """The verification's own rows in the logs: per log, (count, hash of their content)."""
    cur.execute(SYNTHETIC_LOGS_SQL)
    return {log: (n, content) for log, n, content in cur.fetchall()}


def _logs_text(logs: dict, before: dict | None = None) -> str:
    return ", ".join(f"{n} synthetic {log} rows" + ("" if before is None or before.get(log) == (n, content)
                                                    else " (CHANGED)") for log, (n, content) in logs.items())


@verification_check(COMPLIANCE_SQL, "compliance: GDPR export, append-only logs, retention, no plaintext keys",
                    "compliance")
def compliance(conn) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        seed(cur)
        cur.execute(EXPIRED_LOGS_SQL)
        logs_before = _synthetic_logs(cur)
        logs_after = logs_before
        for who, what, sql, expected in COMPLIANCE_CASES:
            if who == "dba":
                try:
                    with savepoint(cur, "compliance_case"):
                        cur.execute(sql)
                        value, error = cur.fetchone()[0], None
                        if "(changes nothing)" in what:   # measured before the savepoint undoes it
                            logs_after = _synthetic_logs(cur)
                except psycopg2.Error as exc:
                    value, error = None, f"refused: {(exc.diag.message_primary or str(exc)).strip()}"
            else:
                value, error = run_case(cur, who, sql)
            ok = (error is not None or value == 0) if expected == "refused" else (error is None and value is expected)
            rows.append({"as": "the deploying role (DBA)" if who == "dba" else who, "does": what,
                         "expected": "refused" if expected == "refused" else "works",
                         "actual": error or ("works" if value is True else f"{value}"), "ok": "yes" if ok else "NO"})
        if logs_after == logs_before:
            logs_after = _synthetic_logs(cur)
        rows.append({"as": "", "does": "its own log rows unchanged by the refused writes and the dry run "
                                       "(the app's are not counted)",
                     "expected": _logs_text(logs_before), "actual": _logs_text(logs_after, logs_before),
                     "ok": "yes" if logs_before == logs_after else "NO"})
        cur.execute(PLAINTEXT_SQL)
        plaintext = cur.fetchone()[0]
        rows.append({"as": "", "does": "api_keys has no plaintext key column", "expected": "0 columns",
                     "actual": f"{plaintext} column(s)", "ok": "yes" if plaintext == 0 else "NO"})
    failed = [f"{r['as']} {r['does']}".strip() for r in rows if r["ok"] == "NO"]
    if failed:
        return Check("compliance", "error", "; ".join(failed), rows=rows)
    return Check("compliance", "ok", "users export only their own data, the logs are append-only, retention dry-runs "
                 "change nothing, no plaintext key is stored", rows=rows)


# -- 7. no duplicate functions or tables ---------------------------------------------------------------------


OVERLOADS_SQL = """
select p.proname as name, pg_get_function_arguments(p.oid) as arguments,
       coalesce(pg_get_function_result(p.oid), '') as result, p.prokind as kind
from pg_proc p
where p.pronamespace = 'public'::regnamespace and p.proname = any(%(names)s)
order by 1, 2"""
UPDATED_AT_FUNCTIONS_SQL = """
select p.oid::regprocedure::text as function,
       exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')
         as extension_member,
       (select count(*) from pg_trigger t where t.tgfoid = p.oid and not t.tgisinternal) as triggers
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
where p.prorettype = 'trigger'::regtype
  and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_'
  and n.nspname <> all (%(platform)s)
  and (p.prosrc ~* 'new\\s*\\.\\s*"?updated_at"?\\s*:?='
       or p.proname ~ '^(update|set|handle|touch|trigger_set|bump|refresh)_([a-z0-9_]*_)?(updated_at|modified_at|modified|timestamp|timestamps|updated|update_time|modtime|mod_time)(_[a-z0-9_]+)?$'
       or p.proname = 'moddatetime')
order by 1""".replace("%(platform)s", PLATFORM_SCHEMAS_SQL)


@verification_check(UPDATED_AT_FUNCTIONS_SQL + ";\n" + OVERLOADS_SQL, "no duplicate functions", "duplicate_functions")
def duplicate_functions(conn) -> Check:
    rows = []
    found = fetch(conn, UPDATED_AT_FUNCTIONS_SQL)
    canonical = [f for f in found if f["function"] == "update_updated_at_column()"]
    for f in found:
        if f["function"] == "update_updated_at_column()":
            rows.append({"function": "public.update_updated_at_column()", "finding": "the one updated-at function",
                         "detail": f"{f['triggers']} trigger(s)", "status": "ok"})
        else:
            rows.append({"function": f["function"], "finding": "another updated-at function",
                         "detail": f"{f['triggers']} trigger(s)" + (" (member of an extension)"
                                                                     if f["extension_member"] else ""),
                         "status": "warning" if f["extension_member"] and not f["triggers"] else "error"})
    if not canonical:
        rows.append({"function": "public.update_updated_at_column()", "finding": "missing", "detail": "",
                     "status": "error"})
    present = fetch(conn, OVERLOADS_SQL, {"names": [n for n, _, _ in FUNCTIONS]})
    for name, arguments, result in FUNCTIONS:
        mine = [p for p in present if p["name"] == name]
        exact = [p for p in mine if p["arguments"] == arguments and p["result"] == result and p["kind"] == "f"]
        others = [p for p in mine if p not in exact]
        if not exact:
            rows.append({"function": f"{name}({arguments})", "finding": "missing or with another signature",
                         "detail": "; ".join(f"{name}({p['arguments']}) returns {p['result']}" for p in mine),
                         "status": "error"})
        if others:
            rows.append({"function": f"{name}", "finding": f"{len(others)} overload(s) beside the contract's",
                         "detail": "; ".join(f"{name}({p['arguments']}) returns {p['result']}" for p in others),
                         "status": "error"})
        if exact and not others:
            rows.append({"function": f"{name}({arguments})", "finding": "exactly one, the contract's signature",
                         "detail": "", "status": "ok"})
    errors = [r for r in rows if r["status"] == "error"]
    columns = ["function", "finding", "detail", "status"]
    if errors:
        return Check("duplicate_functions", "error", "; ".join(f"{r['function']}: {r['finding']}" for r in errors),
                     rows=rows, columns=columns)
    warnings = [r for r in rows if r["status"] == "warning"]
    if warnings:
        return Check("duplicate_functions", "warning", "an extension's updated-at function is installed (unused): "
                     + ", ".join(r["function"] for r in warnings), rows=rows, columns=columns)
    return Check("duplicate_functions", "ok", f"one updated-at function; each of the contract's {len(FUNCTIONS)} "
                 "functions exists once, with its signature", rows=rows, columns=columns)


TABLES_SQL = f"""
select n.nspname as schema, c.relname as table_name, c.relkind as kind
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where c.relkind in ('r', 'p', 'v', 'm', 'f') and not c.relispartition
  and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname !~ '^pg_'
  and n.nspname <> all ({PLATFORM_SCHEMAS_SQL}) and n.nspname <> 'truthsource'
order by 1, 2"""


@verification_check(TABLES_SQL, "no duplicate tables", "duplicate_tables")
def duplicate_tables(conn) -> Check:
    tables = fetch(conn, TABLES_SQL)
    rows = []
    copy_pattern = re.compile(r"^(%s)(_old|_legacy|_backup|_bak|_copy|_new|_tmp|_v\d+|\d+)$" % "|".join(TABLES))
    for name in TABLES:
        where = sorted(f"{t['schema']}.{t['table_name']}" for t in tables if t["table_name"] == name)
        status = "ok" if where == [f"public.{name}"] else "error"
        rows.append({"table": name, "defined in": ", ".join(where) or "nowhere",
                     "finding": "exactly once, in public" if status == "ok" else
                     ("missing" if not where else "defined more than once"), "status": status})
    seen: dict[tuple[str, str], list[str]] = {}
    for t in tables:
        seen.setdefault((t["schema"], t["table_name"].lower()), []).append(t["table_name"])
    for (schema, _), names in sorted(seen.items()):
        if len(names) > 1:
            rows.append({"table": ", ".join(sorted(names)), "defined in": schema,
                         "finding": "names that differ only in case", "status": "error"})
    for t in tables:
        if copy_pattern.match(t["table_name"]):
            rows.append({"table": t["table_name"], "defined in": t["schema"],
                         "finding": "looks like a copy of a contract table (kept on purpose?)", "status": "warning"})
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        return Check("duplicate_tables", "error", "; ".join(f"{r['table']}: {r['finding']}" for r in errors), rows=rows)
    warnings = [r for r in rows if r["status"] == "warning"]
    if warnings:
        return Check("duplicate_tables", "warning", "copies of contract tables: " + ", ".join(r["table"] for r in warnings),
                     rows=rows)
    return Check("duplicate_tables", "ok", f"each of the contract's {len(TABLES)} tables exists once, in public",
                 rows=rows)


# -- 8. advisor-style lints ------------------------------------------------------------------------------------
# (lint, level, query returning (object, detail) rows). Levels: error fails the check, warning is shown, info is
# context. Modelled on Supabase's database advisors (splinter), with the contract's rules made errors.

_CONTRACT_NAMES = "array[" + ", ".join(f"'{n}'" for n, _, _ in FUNCTIONS) + "]"
_CLIENT_NAMES = "array[" + ", ".join(f"'{n}'" for n in CLIENT_FUNCTION_NAMES) + "]"
_AUTH_CALL = r"(auth\.(uid|jwt|role|email)\(\)|current_setting\()"   # splinter's list: auth.*() and current_setting()

_TABLES_ARRAY = "array[" + ", ".join(f"'{t}'" for t in TABLES) + "]"

# The scope of Supabase's advisor (splinter), in the project's own words: every schema but PostgreSQL's, the
# platform's and those extensions keep to themselves; objects that belong to an extension are its own.
# A finding on the deployment's objects (the contract's tables and functions in public, everything in private
# and in the history schema) is an error at any level; elsewhere it keeps the advisor's level, and an error there
# is judged against the preflight's baseline (_judged): a warning when it is older than the deployment.
_ADVISOR_SKIPPED = "array[" + ", ".join(f"'{s}'" for s in (
    "information_schema", "pgbouncer", "pgmq", "pgroonga", "repack", "tiger", "topology", *PLATFORM_SCHEMAS)) + "]"
_OURS_SCHEMAS = f"array['private', '{HISTORY_SCHEMA}']"
# the schemas PostgREST serves (its db_schemas setting where the database has it, else public)
_EXPOSED = ("array(select btrim(s) from unnest(string_to_array(coalesce(nullif(current_setting('pgrst.db_schemas', true), ''), "
            "'public'), ',')) as s)")


def _advised(n: str) -> str:
    """A schema (column n.nspname) in the advisor's scope."""
    return f"not ({n}.nspname = any({_ADVISOR_SKIPPED}) or {n}.nspname ~ '^(pg_|_timescaledb)')"


def _no_extension(oid: str) -> str:
    return f"not exists (select 1 from pg_depend e where e.objid = {oid} and e.deptype = 'e')"


def _ours_relation(c: str, n: str) -> str:
    return f"({n}.nspname = any({_OURS_SCHEMAS}) or ({n}.nspname = 'public' and {c}.relname = any({_TABLES_ARRAY})))"


def _level(ours: str, otherwise: str) -> str:
    """error on the deployment's objects, the advisor's own level elsewhere."""
    return f"case when {ours} then 'error' else '{otherwise}' end"


def _readable_by_api(c: str) -> str:
    return f"(has_table_privilege('anon', {c}.oid, 'SELECT') or has_table_privilege('authenticated', {c}.oid, 'SELECT'))"


# pg_graphql serves /graphql/v1: its extension, or its resolver graphql.resolve() (what graphql_public.graphql()
# calls; it goes with the extension). Either keys the pg_graphql lints: a server without pg_graphql (tests) has a
# stand-in graphql.resolve().
_GRAPHQL_SERVED = ("(exists (select 1 from pg_extension x where x.extname = 'pg_graphql') or exists (select 1 from "
                   "pg_proc g where g.pronamespace = to_regnamespace('graphql') and g.proname = 'resolve'))")
# the tables the contract has authenticated read (its "Row-level security": members read their organizations'
# rows, admins and owners the logs and keys): pg_graphql showing them to signed-in users is intended
_READ_BY_AUTHENTICATED = "array[" + ", ".join(f"'{t}'" for t in CORE_TABLES) + "]"
INTENDED_GRAPHQL_EXPOSURE = ("intended: the contract has authenticated read it (RLS narrows the rows), so pg_graphql "
                             "shows its name and columns to signed-in users")


def _api_roles(polroles: str) -> str:
    """The roles a policy (its polroles) applies to whose access RLS decides: PUBLIC stands for the API roles;
    roles that bypass RLS are left out."""
    return (f"array(select r.rolname::text from pg_roles r where not (r.rolsuper or r.rolbypassrls) and "
            f"(r.oid = any({polroles}) or (0 = any({polroles}) and r.rolname in ('anon', 'authenticated', 'service_role'))))")


# an expression that is always true as written (true, 1 = 1, whatever its parentheses and spaces); {e}: the expression
_ALWAYS_TRUE = "coalesce(regexp_replace(lower({e}), '[\\s()]', '', 'g') in ('true', '1=1'), false)"

_SECURITY_INVOKER = "exists (select 1 from unnest(coalesce({c}.reloptions, '{{}}')) o where lower(o) in " \
                    "('security_invoker=1', 'security_invoker=true', 'security_invoker=yes', 'security_invoker=on'))"
# column names that hold credentials or personal identifiers (the project's own list)
_SENSITIVE_COLUMN = (r"^(pass(word|wd|phrase)?|pwd|secret(_key)?|private_key|api_?key|auth_key|jwt|otp"
                     r"|(access|refresh|oauth|session|bearer)?_?token|session_(id|key|secret)|(recovery|backup|verification)_code"
                     r"|ssn|social_security(_number)?|(drivers?_)?licen[cs]e(_number)?|passport_(number|id)|national_id|tax_id"
                     r"|credit_card|card_number|cv[vcn]|bank_account|account_number|routing_number|iban|swift_code|bic"
                     r"|(health|medical)_record|patient_id|mac_address|imei|(pgp|gpg|ssh|license|activation)_key)$")

# table_bloat's thresholds: pages over this many times what the rows need (estimated from pg_stats' average widths
# and PostgreSQL's row and page headers), and more than this many MB wasted
BLOAT_RATIO = 70
BLOAT_WASTE_MB = 20

# The project's own advisor lints (tests/test_sql_lints.py asserts that the phases leave none of the
# errors below on any end state), plus a few warnings worth a DBA's look.
SECURITY_LINTS = (
    ("rls_disabled_in_public", "error", "RLS is enabled on every table in public and on every table the API serves",
     f"""select c.oid::regclass::text, 'row level security is off'
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and not c.relrowsecurity
          and (n.nspname = 'public' or (n.nspname = any({_EXPOSED}) and {_advised('n')} and {_readable_by_api('c')}))"""),
    ("policy_always_true", "error", "no policy is open to everyone (using/with check true, 1 = 1, or none where a write needs one)",
     f"""select format('%s on %s', p.polname, p.polrelid::regclass), 'a condition that is always true, or none',
               {_level(_ours_relation('c', 'n') + " or n.nspname = 'public'", 'warning')}
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace,
             lateral (select {_ALWAYS_TRUE.format(e='pg_get_expr(p.polqual, p.polrelid)')} as open_using,
                             {_ALWAYS_TRUE.format(e='pg_get_expr(p.polwithcheck, p.polrelid)')} as open_check) t
        where {_advised('n')}
          and (n.nspname = 'public' and (t.open_using or t.open_check)
               or c.relrowsecurity and p.polpermissive and {_api_roles('p.polroles')} && array['anon', 'authenticated']
                  and (p.polcmd in ('w', 'd', '*') and (t.open_using or p.polqual is null)
                       or t.open_check
                       or p.polwithcheck is null and (p.polcmd = 'a' or p.polcmd in ('w', '*') and t.open_using)))"""),
    ("policy_for_anon_or_public", "error", "policies are for authenticated: anon reads and writes nothing",
     """select format('%s on %s', p.polname, p.polrelid::regclass), 'applies to ' || (
               select string_agg(case when r = 0 then 'public' else pg_get_userbyid(r) end, ', ') from unnest(p.polroles) r)
        from pg_policy p join pg_class c on c.oid = p.polrelid
        where c.relnamespace = 'public'::regnamespace
          and (0 = any(p.polroles) or (select oid from pg_roles where rolname = 'anon') = any(p.polroles))"""),
    ("security_definer_search_path", "error", "SECURITY DEFINER functions pin search_path",
     """select p.oid::regprocedure::text, 'security definer with a mutable search_path'
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where n.nspname in ('public', 'private') and p.prosecdef
          and not exists (select 1 from unnest(coalesce(p.proconfig, '{}')) s where s like 'search\\_path=%')
          and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')"""),
    ("function_search_path_mutable", "error", "every function in public and private pins search_path (elsewhere: a warning; "
                                              "SECURITY DEFINER ones of public and private: the rule above)",
     f"""select p.oid::regprocedure::text, 'search_path not set on the function',
               {_level(f"n.nspname in ('public', 'private', '{HISTORY_SCHEMA}')", 'warning')}
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where {_advised('n')} and not (p.prosecdef and n.nspname in ('public', 'private'))
          and not exists (select 1 from unnest(coalesce(p.proconfig, '{{}}')) s where s like 'search\\_path=%')
          and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e')"""),
    ("security_definer_function_executable_by_api_users", "error",
     "no SECURITY DEFINER function in public or another schema the API serves is executable by anon or authenticated",
     f"""select p.oid::regprocedure::text,
               concat_ws(', ', case when has_function_privilege('anon', p.oid, 'EXECUTE') then 'anon may execute' end,
                         case when has_function_privilege('authenticated', p.oid, 'EXECUTE') then 'authenticated may execute' end)
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace
        where p.prosecdef and (n.nspname = 'public' or (n.nspname = any({_EXPOSED}) and {_advised('n')}))
          and (has_function_privilege('anon', p.oid, 'EXECUTE') or has_function_privilege('authenticated', p.oid, 'EXECUTE'))"""),
    ("contract_function_executable_by_clients", "error",
     "anon executes none of the contract's functions; authenticated only " + ", ".join(CLIENT_FUNCTION_NAMES),
     f"""select p.oid::regprocedure::text,
               concat_ws(', ', case when has_function_privilege('anon', p.oid, 'EXECUTE') then 'anon may execute' end,
                         case when has_function_privilege('authenticated', p.oid, 'EXECUTE') and not p.proname = any({_CLIENT_NAMES})
                              then 'authenticated may execute' end)
        from pg_proc p
        where p.pronamespace = 'public'::regnamespace and p.proname = any({_CONTRACT_NAMES})
          and (has_function_privilege('anon', p.oid, 'EXECUTE')
               or (has_function_privilege('authenticated', p.oid, 'EXECUTE') and not p.proname = any({_CLIENT_NAMES})))"""),
    ("private_schema_usable_by_anon", "error", "anon has no USAGE on schema private",
     """select 'schema private', 'anon has USAGE'
        from pg_namespace n where n.nspname = 'private' and has_schema_privilege('anon', n.oid, 'USAGE')"""),
    ("anon_table_privileges", "error", "anon has no privilege on the contract's tables",
     f"""select c.relname::text, 'anon has privileges'
        from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
          and c.relname = any({_TABLES_ARRAY})
          and has_table_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')"""),
    ("api_role_may_truncate", "error", "no API role may TRUNCATE a contract table (TRUNCATE bypasses RLS)",
     f"""select c.relname::text, r.rolname || ' may TRUNCATE'
        from pg_class c cross join (values ('anon'), ('authenticated'), ('service_role')) as r (rolname)
        where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
          and c.relname = any({_TABLES_ARRAY}) and has_table_privilege(r.rolname, c.oid, 'TRUNCATE')"""),
    ("rls_enabled_no_policy_but_granted", "error", "a contract table without policies grants nothing to anon or authenticated",
     f"""select c.relname::text, 'RLS on, no policy, yet granted to an API role'
        from pg_class c where c.relnamespace = 'public'::regnamespace and c.relrowsecurity
          and c.relname = any({_TABLES_ARRAY})
          and not exists (select 1 from pg_policy p where p.polrelid = c.oid)
          and (has_table_privilege('authenticated', c.oid, 'SELECT, INSERT, UPDATE, DELETE')
               or has_table_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, DELETE'))"""),
    ("security_definer_search_path_not_empty", "warning", "SECURITY DEFINER functions pin search_path to ''",
     """select p.oid::regprocedure::text, array_to_string(p.proconfig, ', ')
        from pg_proc p where p.pronamespace in ('public'::regnamespace, to_regnamespace('private')) and p.prosecdef
          and exists (select 1 from unnest(coalesce(p.proconfig, '{}')) s where s like 'search\\_path=%')
          and not 'search_path=""' = any (coalesce(p.proconfig, '{}'))"""),
    ("anon_privileges_on_other_tables", "warning", "anon has no privilege on other public tables either",
     f"""select c.relname::text, 'anon has privileges (RLS is the only barrier)'
        from pg_class c where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
          and not c.relname = any({_TABLES_ARRAY})
          and has_table_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')"""),
    ("security_definer_view", "error", "views the API serves run with the caller's rights (security_invoker)",
     f"""select c.oid::regclass::text, 'view without security_invoker, readable by anon or authenticated: it bypasses the caller''s RLS'
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'v' and n.nspname = any({_EXPOSED}) and {_advised('n')} and {_no_extension('c.oid')}
          and {_readable_by_api('c')} and not {_SECURITY_INVOKER.format(c='c')}"""),
    ("extension_in_public", "warning", "extensions live outside public",
     """select x.extname::text, 'installed in public' from pg_extension x where x.extnamespace = 'public'::regnamespace"""),
    # -- Supabase's advisor (splinter), rule by rule, written for this project: third column the row's level
    ("rls_enabled_no_policy", "info", "a table with RLS on says who may reach it: the deployment's tables have policies",
     f"""select c.oid::regclass::text, 'RLS on, no policy: only roles that bypass RLS and the owner reach it',
               {_level(_ours_relation('c', 'n'), 'info')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'r' and c.relrowsecurity and {_advised('n')} and {_no_extension('c.oid')}
          and not exists (select 1 from pg_policy p where p.polrelid = c.oid)"""),
    ("policy_exists_rls_disabled", "error", "no table has policies while its row level security is off",
     f"""select c.oid::regclass::text, 'policies ' || string_agg(p.polname, ', ' order by p.polname) || ' do nothing: RLS is off',
               {_level(_ours_relation('c', 'n'), 'error')}
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'r' and not c.relrowsecurity and {_advised('n')} and {_no_extension('c.oid')}
        group by c.oid, n.nspname, c.relname"""),
    ("auth_users_exposed", "error", "no view the API serves shows auth.users to anon or authenticated",
     f"""select distinct v.oid::regclass::text, 'reads auth.users and is readable by the API roles',
               {_level(_ours_relation('v', 'n'), 'error')}
        from pg_depend d join pg_rewrite w on w.oid = d.objid join pg_class v on v.oid = w.ev_class
             join pg_namespace n on n.oid = v.relnamespace
        where d.classid = 'pg_rewrite'::regclass and d.refobjid = to_regclass('auth.users') and d.deptype = 'n'
          and v.oid <> d.refobjid and n.nspname = any({_EXPOSED}) and {_readable_by_api('v')}
          and (v.relkind = 'm' or not {_SECURITY_INVOKER.format(c='v')}
               or not (select a.relrowsecurity from pg_class a where a.oid = d.refobjid))"""),
    ("rls_references_user_metadata", "error", "no policy trusts user_metadata (users edit it themselves)",
     f"""select format('%s on %s', p.polname, c.oid::regclass), 'reads user_metadata from the JWT',
               {_level(_ours_relation('c', 'n'), 'error')}
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where {_advised('n')}
          and coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
              ~ '(auth\\.jwt\\(\\)|request\\.jwt\\.claims).*user_metadata'"""),
    ("materialized_view_in_api", "warning", "no materialized view (it has no RLS) is readable through the API",
     f"""select c.oid::regclass::text, 'materialized view readable by anon or authenticated', {_level(_ours_relation('c', 'n'), 'warning')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'm' and n.nspname = any({_EXPOSED}) and {_readable_by_api('c')} and {_no_extension('c.oid')}"""),
    ("foreign_table_in_api", "warning", "no foreign table (it has no RLS) is readable through the API",
     f"""select c.oid::regclass::text, 'foreign table readable by anon or authenticated', {_level(_ours_relation('c', 'n'), 'warning')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind = 'f' and n.nspname = any({_EXPOSED}) and {_readable_by_api('c')} and {_no_extension('c.oid')}"""),
    ("unsupported_reg_types", "warning", "no column stores an oid alias type that pg_upgrade cannot carry",
     f"""select format('%s.%s', c.oid::regclass, a.attname), 'column of type ' || format_type(a.atttypid, null),
               {_level(_ours_relation('c', 'n'), 'warning')}
        from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
        where a.attnum > 0 and not a.attisdropped and n.nspname not in ('pg_catalog', 'information_schema', 'pgsodium')
          and n.nspname !~ '^pg_toast'
          and a.atttypid in ('regcollation'::regtype, 'regconfig'::regtype, 'regdictionary'::regtype, 'regnamespace'::regtype,
                             'regoper'::regtype, 'regoperator'::regtype, 'regproc'::regtype, 'regprocedure'::regtype)"""),
    ("fkey_to_auth_unique", "error", "no foreign key points at a unique constraint of auth (only at its primary keys)",
     f"""select format('%s on %s', k.conname, k.conrelid::regclass), 'references ' || k.confrelid::regclass || ' through a unique index',
               {_level(_ours_relation('c', 'n'), 'error')}
        from pg_constraint k join pg_class c on c.oid = k.conrelid join pg_namespace n on n.oid = c.relnamespace
             join pg_index i on i.indexrelid = k.conindid
        where k.contype = 'f' and k.confrelid in (select r.oid from pg_class r where r.relnamespace = to_regnamespace('auth'))
          and i.indisunique and not i.indisprimary"""),
    ("sensitive_columns_exposed", "error", "no table the API serves without RLS has credential or identity columns",
     f"""select c.oid::regclass::text, 'columns ' || string_agg(a.attname, ', ' order by a.attname) || ' readable without RLS',
               {_level(_ours_relation('c', 'n'), 'error')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
             join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
        where c.relkind = 'r' and not c.relrowsecurity and n.nspname = any({_EXPOSED}) and {_readable_by_api('c')}
          and replace(lower(a.attname), '-', '_') ~ '{_SENSITIVE_COLUMN}'
        group by c.oid, n.nspname, c.relname"""),
    ("pg_graphql_anon_table_exposed", "warning", "with pg_graphql, anon cannot discover the deployment's tables",
     f"""select c.oid::regclass::text, 'anon may select a column: pg_graphql shows it to anyone with the anon key',
               {_level(_ours_relation('c', 'n'), 'warning')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where {_GRAPHQL_SERVED} and c.relkind in ('r', 'v', 'm', 'f') and {_advised('n')}
          and exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                        and has_column_privilege('anon', c.oid, a.attnum, 'SELECT'))"""),
    # the contract has authenticated read its core tables: that exposure is intended, a note naming the contract
    ("pg_graphql_authenticated_table_exposed", "warning",
     "with pg_graphql, signed-in users discover only the tables the contract has them read",
     f"""select c.oid::regclass::text,
               case when n.nspname = 'public' and c.relname = any({_READ_BY_AUTHENTICATED}) then '{INTENDED_GRAPHQL_EXPOSURE}'
                    else 'authenticated may select a column: pg_graphql shows it to every signed-in user' end as detail,
               case when n.nspname = 'public' and c.relname = any({_READ_BY_AUTHENTICATED}) then 'info'
                    else {_level(_ours_relation('c', 'n'), 'warning')} end as level
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where {_GRAPHQL_SERVED} and c.relkind in ('r', 'v', 'm', 'f') and {_advised('n')}
          and exists (select 1 from pg_attribute a where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                        and has_column_privilege('authenticated', c.oid, a.attnum, 'SELECT'))"""),
    ("insecure_queue_exposed_in_api", "error", "no queue table (pgmq) is readable through pgmq_public without RLS",
     f"""select c.oid::regclass::text, 'queue table without RLS, readable by anon or authenticated, while the API serves pgmq_public'
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'pgmq' and c.relkind in ('r', 'p') and c.relname like 'q\\_%' and not c.relrowsecurity
          and {_readable_by_api('c')} and 'pgmq_public' = any({_EXPOSED})"""),
    ("extension_versions_outdated", "warning", "every extension is at the version the server installs by default",
     """select x.extname::text, format('version %s installed, %s is the default', x.extversion, a.default_version)
        from pg_extension x join pg_available_extensions a on a.name = x.extname
        where x.extversion <> a.default_version
          and exists (select 1 from pg_available_extension_versions v where v.name = x.extname and v.version = x.extversion)"""),
    # storage's buckets are data: the lint runs where storage.buckets exists and may be read (the fifth item)
    ("public_bucket_allows_listing", "warning", "no public bucket is listable (a SELECT policy open to its whole bucket)",
     f"""select 'bucket ' || b.id as bucket, 'public, and listable through the policies ' || string_agg(p.polname, ', ' order by p.polname) as detail
        from storage.buckets b cross join pg_policy p
        where b.public and p.polrelid = 'storage.objects'::regclass and p.polpermissive and p.polcmd in ('r', '*')
          and {_api_roles('p.polroles')} && array['anon', 'authenticated']
          and (p.polqual is null or {_ALWAYS_TRUE.format(e='pg_get_expr(p.polqual, p.polrelid)')}
               or regexp_replace(pg_get_expr(p.polqual, p.polrelid), '[\\s()]', '', 'g')
                  in (regexp_replace('bucket_id=' || quote_literal(b.id), '[\\s()]', '', 'g'),
                      regexp_replace('bucket_id=' || quote_literal(b.id) || '::text', '[\\s()]', '', 'g')))
        group by b.id""", "storage.buckets"),
)
PERFORMANCE_LINTS = (
    ("unindexed_foreign_key", "error", "every foreign key is covered by an index that starts with its columns, in order",
     f"""select format('%s on %s', c.conname, c.conrelid::regclass), 'columns ' || (
               select string_agg(a.attname, ', ' order by k.n) from unnest(c.conkey) with ordinality k(attnum, n)
               join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum),
               {_level(_ours_relation('t', 'n') + " or n.nspname = 'public'", 'info')}
        from pg_constraint c join pg_class t on t.oid = c.conrelid join pg_namespace n on n.oid = t.relnamespace
        where c.contype = 'f' and {_advised('n')} and {_no_extension('t.oid')}
          and not exists (select 1 from pg_index i where i.indrelid = c.conrelid and i.indisvalid
                            and (i.indkey::int2[])[0:cardinality(c.conkey) - 1] = c.conkey)"""),
    ("invalid_index", "error", "no invalid index (a failed concurrent build)",
     """select i.indexrelid::regclass::text, 'INVALID: drop and rebuild it'
        from pg_index i join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname in ('public', 'private') and not i.indisvalid"""),
    ("auth_rls_initplan", "error", "policies call auth functions and current_setting() as (select ...), once per query",
     f"""select format('%s on %s', p.polname, p.polrelid::regclass), 'auth.<function>() or current_setting() called once per row',
               {_level(_ours_relation('c', 'n') + " or n.nspname = 'public'", 'warning')}
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where c.relrowsecurity and {_advised('n')}
          and regexp_count(coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''), '{_AUTH_CALL}')
            > regexp_count(coalesce(pg_get_expr(p.polqual, p.polrelid), '') || ' ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''), 'SELECT {_AUTH_CALL}')"""),
    ("duplicate_index", "error", "no two indexes are the same",
     f"""select string_agg(i.indexrelid::regclass::text, ' = ' order by i.indexrelid::regclass::text), 'identical indexes on ' || i.indrelid::regclass,
               {_level(_ours_relation('c', 'n') + " or n.nspname = 'public'", 'warning')}
        from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
        where {_advised('n')} and {_no_extension('c.oid')}
        group by n.nspname, c.relname, i.indrelid, i.indkey::text, i.indclass::text, i.indcollation::text, i.indoption::text,
                 coalesce(pg_get_expr(i.indexprs, i.indrelid), ''), coalesce(pg_get_expr(i.indpred, i.indrelid), '')
        having count(*) > 1"""),
    ("multiple_permissive_policies", "error", "one permissive policy per table, role and command (roles RLS applies to)",
     f"""select format('%s for %s %s', t, r, cmd), string_agg(polname, ', ' order by polname), {_level('ours', 'warning')}
        from (select p.polrelid::regclass::text as t, p.polname, r, cmd,
                     {_ours_relation('c', 'n')} or n.nspname = 'public' as ours
              from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace,
                   unnest({_api_roles('p.polroles')}) as r,
                   unnest(case p.polcmd when '*' then array['select', 'insert', 'update', 'delete']
                                        when 'r' then array['select'] when 'a' then array['insert']
                                        when 'w' then array['update'] else array['delete'] end) as cmd
              where c.relkind in ('r', 'p') and {_advised('n')} and {_no_extension('c.oid')} and p.polpermissive) x
        group by t, r, cmd, ours having count(*) > 1"""),
    ("no_primary_key", "error", "every table in public, and every table of the deployment, has a primary key",
     f"""select c.oid::regclass::text, 'no primary key', {_level(_ours_relation('c', 'n') + " or n.nspname = 'public'", 'info')}
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where c.relkind in ('r', 'p') and not c.relispartition and {_advised('n')} and {_no_extension('c.oid')}
          and not exists (select 1 from pg_constraint k where k.conrelid = c.oid and k.contype = 'p')"""),
    # the state traffic leaves, not a definition: a note on any table, the deployment's too (maintenance vacuums)
    ("table_bloat", "info", f"no table holds over {BLOAT_RATIO}x the pages its rows need and over {BLOAT_WASTE_MB} MB wasted",
     f"""select oid::regclass::text, format('%s pages where its %s rows need about %s: %s wasted (vacuum full or repack it)',
                                          pages, rows, needed, pg_size_pretty(((pages - needed) * block)::bigint))
        from (select c.oid, c.relpages::numeric as pages, c.reltuples::bigint as rows, current_setting('block_size')::numeric as block,
                     ceil(c.reltuples * (24 + 4 + coalesce((select sum((1 - s.null_frac) * s.avg_width) from pg_stats s
                                                          where s.schemaname = n.nspname and s.tablename = c.relname), 0))
                          / (current_setting('block_size')::numeric - 24)) as needed
              from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where c.relkind = 'r' and c.relam = (select oid from pg_am where amname = 'heap') and c.reltuples >= 0
                and {_advised('n')} and {_no_extension('c.oid')}) t
        where pages > {BLOAT_RATIO} * greatest(needed, 1) and (pages - needed) * block > {BLOAT_WASTE_MB} * 1024 * 1024"""),
)

# splinter's lints the verification does not run, and why: shown among the rows of the check named
ADVISOR_NOT_CHECKED = {
    "performance_lints": (("unused_index", "not checked: an index no query used since the statistics were reset says "
                           "nothing on a database without traffic yet, as right after a deployment; Supabase's advisor "
                           "shows it once the app has run"),),
    "security_lints": (("auth_allow_anonymous_sign_ins", "not checked: a setting of Supabase Auth (GoTrue), not of the "
                        "database"),),
}


def _lint_sql(lints) -> str:
    return "\n\n".join(f"-- {name} ({level}): {rule}\n" + " ".join(q.split())
                       for name, level, rule, q, *_ in lints)


def _readable(conn, table: str) -> bool:
    """Whether `table` exists and the connected role may read it (a lint over its rows needs both)."""
    [row] = fetch(conn, "select coalesce(has_table_privilege(to_regclass(%(t)s), 'SELECT'), false) as readable", {"t": table})
    return row["readable"]


class LintCouldNotRun(Exception):
    """A lint's SQL failed on this database's catalog (a column it expects is missing...)."""


def _lint_rows(conn, query: str) -> list[dict]:
    """One lint's rows; a lint whose SQL the catalog cannot run raises LintCouldNotRun (the
    connection is left usable: autocommit, or the failed transaction rolled back)."""
    try:
        return fetch(conn, query)
    except psycopg2.Error as exc:
        if not conn.autocommit:
            conn.rollback()
        message = (exc.diag.message_primary or str(exc)).strip()
        raise LintCouldNotRun(f"[{exc.pgcode}] {message}" if exc.pgcode else message) from None


def _raw_findings(conn, lints) -> list[dict]:
    """Every lint's findings at the level its SQL gives ({lint, level, object, detail}), and a row per lint
    that found nothing (object ''). A lint that cannot run here is advice missing, not a finding: a row
    at level warning with `could_not_run`, and the other lints still run."""
    rows = []
    for lint, level, rule, query, *needs in lints:
        if needs and not _readable(conn, needs[0]):
            rows.append({"lint": lint, "level": level, "object": "", "detail": f"ok: no {needs[0]} here to read"})
            continue
        try:
            result = _lint_rows(conn, query)
        except LintCouldNotRun as exc:
            rows.append({"lint": lint, "level": "warning", "object": "", "detail": f"could not run: {exc}",
                         "could_not_run": True})
            continue
        # (object, detail) rows, or (object, detail, level) where the level depends on whose the object is
        found = sorted(tuple(r.values()) + (level,) for r in result)
        if not found:
            rows.append({"lint": lint, "level": level, "object": "", "detail": f"ok: {rule}"})
        for obj, detail, row_level, *_ in found:
            rows.append({"lint": lint, "level": row_level, "object": obj, "detail": detail})
    return rows


# -- the advisor's findings before the deployment (the preflight's baseline) ----------------------------------
# A finding on an object that is not the deployment's and that the preflight's baseline already had is the
# project's own, older than the deployment: a warning naming its fix, never the deployment's failure. A finding
# on the deployment's objects fails whatever the baseline says; one the baseline lacks, the deployment made.

ADVISOR_BASELINE_FILE = "advisor_baseline.json"
_CONTRACT_FUNCTION_NAMES = frozenset(f.name for f in FUNCTIONS)
# how to fix a finding on someone else's object ({q}: the object, schema-qualified)
ADVISOR_FIXES = {
    "security_definer_function_executable_by_api_users": "revoke execute on function {q} from public, anon, authenticated;",
    "security_definer_search_path": "alter function {q} set search_path = '';",
    "function_search_path_mutable": "alter function {q} set search_path = '';",
    "security_definer_search_path_not_empty": "alter function {q} set search_path = ''; (with the names it uses qualified)",
    "rls_disabled_in_public": "alter table {q} enable row level security; (and a policy for each role that reaches it)",
    "rls_enabled_no_policy": "create a policy on {q} for the roles that reach it, or revoke their privileges on it",
    "anon_privileges_on_other_tables": "revoke all on table {q} from anon;",
    "extension_in_public": "alter extension {obj} set schema extensions; (relocatable extensions)",
    "no_primary_key": "alter table {q} add primary key (...);",
    "unindexed_foreign_key": "create an index on the foreign key's columns ({detail})",
    "policy_always_true": "alter policy {obj} using (<a real condition>);",
    "policy_for_anon_or_public": "alter policy {obj} to authenticated;",
    "security_definer_view": "alter view {q} set (security_invoker = true);",
    "multiple_permissive_policies": "merge the policies ({detail}) into one, or make all but one restrictive",
    "insecure_queue_exposed_in_api": "alter table {q} enable row level security; (and policies for who may use the queue)",
    "extension_versions_outdated": "alter extension {obj} update;",
    "public_bucket_allows_listing": "drop those policies on storage.objects (a public bucket's files are fetched "
                                    "by URL without one), or make the bucket private",
    "pg_graphql_anon_table_exposed": "revoke select on table {q} from anon; (or drop extension pg_graphql if unused)",
    "pg_graphql_authenticated_table_exposed": "revoke select on table {q} from authenticated; (or drop extension "
                                              "pg_graphql if unused)",
    "table_bloat": "vacuum full {q}; (locks the table: in a maintenance window) or pg_repack",
}


def _subject(lint: str, obj: str, detail: str) -> str:
    """The object a finding is about: the relation of `policy on table`, `index = index` (in the detail) and
    `table.column`, else the object itself."""
    if lint == "duplicate_index":
        return detail.rsplit(" on ", 1)[-1]
    if lint == "unsupported_reg_types":
        return obj.rsplit(".", 1)[0]
    return obj.rsplit(" on ", 1)[-1]


_QUALIFIED = re.compile(r'^(?:("(?:[^"]|"")+"|[^".( ]+)\.)?("(?:[^"]|"")+"|[^".( ]+)')


def is_deployments(lint: str, obj: str, detail: str = "") -> bool:
    """Whether a finding is on the deployment's objects: the contract's tables and functions in public (and
    what is on them), everything in schema private and in the history schema."""
    if obj == "schema private":
        return True
    match = _QUALIFIED.match(_subject(lint, obj, detail).strip())
    if not match:
        return False
    schema, name = (None if g is None else g.strip('"').replace('""', '"') for g in match.groups())
    if schema in ("private", HISTORY_SCHEMA):
        return True
    return schema in (None, "public") and (name in TABLES or name in _CONTRACT_FUNCTION_NAMES)


def advisor_fix(lint: str, obj: str, detail: str = "") -> str:
    """The fix of a finding, as SQL where one statement does it (an unqualified object is in public)."""
    match = _QUALIFIED.match(obj)
    qualified = obj if match and match.group(1) else f"public.{obj}"
    template = ADVISOR_FIXES.get(lint, "see Supabase's database advisor for " + lint)
    return template.format(q=qualified, obj=obj, detail=detail)


def advisor_findings(conn) -> list[dict]:
    """The findings of every advisor lint, security and performance, as their SQL levels them."""
    return [r for r in _advisor_rows(conn) if r["object"]]


def _advisor_rows(conn) -> list[dict]:
    return _raw_findings(conn, SECURITY_LINTS) + _raw_findings(conn, PERFORMANCE_LINTS)


def could_not_run(rows: list[dict]) -> str:
    """The lints that could not run, each with its error ("" when every lint ran)."""
    return "; ".join(f"{r['lint']} {r['detail']}" for r in rows if r.get("could_not_run"))


@verification_check("-- every advisor lint of the verification (security_lints and performance_lints, shown there):\n"
                    + _lint_sql(SECURITY_LINTS + PERFORMANCE_LINTS) + "\n\n-- the updated-at functions phase 1 "
                    "replaces:" + UPDATED_AT_FUNCTIONS_SQL,
                    "the advisor's findings before the deployment", "advisor_baseline")
def advisor_baseline(conn, record_dir) -> Check:
    """The preflight's baseline: what the verification's advisor lints find before anything changes, kept as
    advisor_baseline.json in the run's record; the verification reports these as pre-existing."""
    every = _advisor_rows(conn)
    found, failed = [r for r in every if r["object"]], could_not_run(every)
    path = Path(record_dir) / ADVISOR_BASELINE_FILE
    records.make_folder(path.parent)
    records.write_text(path, json.dumps({"findings": found}, indent=1, sort_keys=True) + "\n")
    # legacy updated-at functions: phase 1 re-points their triggers and drops them
    replaced = {f["function"] for f in fetch(conn, UPDATED_AT_FUNCTIONS_SQL) if not f["extension_member"]}

    def whose(f: dict) -> str:
        if f["object"] in replaced:
            return "the deployment's (phase 1 replaces this updated-at function)"
        return ("the deployment's (the phases converge it)" if is_deployments(f["lint"], f["object"], f["detail"])
                else "not the deployment's")
    rows = [{"lint": f["lint"], "level": f["level"], "object": f["object"], "whose": whose(f),
             "fix": advisor_fix(f["lint"], f["object"], f["detail"]) if whose(f) == "not the deployment's" else ""}
            for f in found]
    rows += [{"lint": r["lint"], "level": "warning", "object": "", "whose": "", "fix": r["detail"]}
             for r in every if r.get("could_not_run")]
    theirs = [r for r in rows if r["whose"] == "not the deployment's" and r["level"] == "error"]
    columns = ["lint", "level", "object", "whose", "fix"]
    if theirs or failed:
        return Check("advisor_baseline", "warning", f"{len(found)} finding(s) recorded in {ADVISOR_BASELINE_FILE}"
                     + (f"; {len(theirs)} on objects that are not the deployment's would fail a verification, which "
                        "will report them as pre-existing warnings: "
                        + "; ".join(f"{r['object']} ({r['fix']})" for r in theirs) if theirs else "")
                     + (f"; advice missing, the other lints ran: {failed}" if failed else ""),
                     rows=rows, columns=columns)
    return Check("advisor_baseline", "ok", f"{len(found)} finding(s) recorded in {ADVISOR_BASELINE_FILE} (the verification "
                 "reports those still there as pre-existing)", rows=rows, columns=columns)


def load_advisor_baseline(record_dir=None, baseline_dir=None) -> tuple[set[tuple[str, str]], str] | None:
    """{(lint, object)} of the preflight's baseline (baseline_dir's, else this run's) and where it came from."""
    path = baseline_path(record_dir, baseline_dir, ADVISOR_BASELINE_FILE)
    if path is None:
        return None
    findings = json.loads(path.read_text())["findings"]
    return {(f["lint"], f["object"]) for f in findings}, f"{path.parent.name}/{path.name}"


def _judged(rows: list[dict], baseline) -> list[dict]:
    """Each finding levelled by whose it is and whether the preflight's baseline had it."""
    judged = []
    for row in rows:
        if not row["object"] or is_deployments(row["lint"], row["object"], row["detail"]):
            judged.append(row)
            continue
        fix = advisor_fix(row["lint"], row["object"], row["detail"])
        if baseline is None:
            note = "not the deployment's (no baseline tells whether it is older)"
        elif (row["lint"], row["object"]) in baseline[0]:
            note = "pre-existing, not the deployment's (the preflight's baseline has it)"
        else:
            judged.append(dict(row, detail=row["detail"] + ("; not in the preflight's baseline: made since it "
                                                              "was taken" if row["level"] == "error" else "")))
            continue
        level = "warning" if row["level"] == "error" else row["level"]
        judged.append(dict(row, level=level, detail=f"{row['detail']}; {note}; fix: {fix}"))
    return judged


def _run_lints(conn, name: str, lints, record_dir=None, baseline_dir=None) -> Check:
    baseline = load_advisor_baseline(record_dir, baseline_dir)
    rows = _judged(_raw_findings(conn, lints), baseline) + [
        {"lint": lint, "level": "info", "object": "", "detail": why} for lint, why in ADVISOR_NOT_CHECKED.get(name, ())]
    failing = [r for r in rows if r["object"] and r["level"] == "error"]
    warned = [r for r in rows if r["object"] and r["level"] == "warning"]
    older = [r for r in warned if "; fix: " in r["detail"]]
    failed = could_not_run(rows)
    missing = f"; advice missing, the other lints ran: {failed}" if failed else ""
    source = (f"against the preflight's advisor baseline {baseline[1]}" if baseline else
              f"no advisor baseline ({ADVISOR_BASELINE_FILE} of a preflight): findings on the deployment's objects "
              "fail, others are warnings")
    columns = ["lint", "level", "object", "detail"]
    if failing:
        return Check(name, "error", f"{len(failing)} finding(s) the contract forbids: "
                     + "; ".join(f"{r['lint']}: {r['object']}" for r in failing) + f" ({source})" + missing,
                     rows=rows, columns=columns)
    if warned or failed:
        fixes = "".join(f"; {r['lint']}: {r['object']} (fix: {r['detail'].rsplit('; fix: ', 1)[1]})" for r in older)
        return Check(name, "warning", f"no error ({source}); {len(warned)} warning(s)"
                     + (": " + ", ".join(sorted({r["lint"] for r in warned})) if warned else "") + fixes + missing,
                     rows=rows, columns=columns)
    notes = [r for r in rows if r["object"] and r["level"] == "info"]
    noted = (f" ({len(notes)} note(s): " + ", ".join(sorted({r["lint"] for r in notes})) + ")") if notes else ""
    return Check(name, "ok", f"all {len(lints)} lints pass" + noted, rows=rows, columns=columns)


@verification_check(_lint_sql(SECURITY_LINTS), "advisor lints: security", "security_lints")
def security_lints(conn, record_dir=None, baseline_dir=None) -> Check:
    return _run_lints(conn, "security_lints", SECURITY_LINTS, record_dir, baseline_dir)


@verification_check(_lint_sql(PERFORMANCE_LINTS), "advisor lints: performance", "performance_lints")
def performance_lints(conn, record_dir=None, baseline_dir=None) -> Check:
    return _run_lints(conn, "performance_lints", PERFORMANCE_LINTS, record_dir, baseline_dir)


# -- 9. query latency through RLS ----------------------------------------------------------------------------

LATENCY_QUERIES = (
    ("member", "its organization's products", f"select * from public.products where organization_id = {_A} order by sku limit 100"),
    ("member", "its organization's stock, with products",
     f"select i.*, p.sku from public.inventory i join public.products p on p.id = i.product_id where i.organization_id = {_A} limit 100"),
    ("member", "its organization's members", f"select * from public.organization_members where organization_id = {_A}"),
    ("member", "every product it may see", "select count(*) from public.products"),
    ("admin", "the latest audit_logs of its organization",
     f"select * from public.audit_logs where organization_id = {_A} order by created_at desc limit 50"),
    ("admin", "its organization's api keys", f"select id, name, key_prefix from public.api_keys where organization_id = {_A}"),
)
LATENCY_SQL = (SEED_REF + "\n\n-- each query in a savepoint, timed 3 times, the best kept:\n"
               + "".join(case_sql(who, what, sql) for who, what, sql in LATENCY_QUERIES) + UNDO_REF)


@verification_check(LATENCY_SQL, "query latency through RLS, as API users", "query_latency")
def query_latency(conn, max_query_ms: float = 1000) -> Check:
    rows = []
    with rolled_back(conn) as cur:
        seed(cur)
        for who, what, sql in LATENCY_QUERIES:
            best = None
            with savepoint(cur, "latency"):
                act_as(cur, who)
                for _ in range(3):
                    started = time.perf_counter()
                    cur.execute(sql)
                    cur.fetchall()
                    elapsed = (time.perf_counter() - started) * 1000
                    best = elapsed if best is None else min(best, elapsed)
            rows.append({"as": f"authenticated ({who})", "query": what, "ms (best of 3)": round(best, 1),
                         "limit ms": max_query_ms, "ok": "yes" if best <= max_query_ms else "NO"})
    slow = [r["query"] for r in rows if r["ok"] == "NO"]
    if slow:
        return Check("query_latency", "error", f"slower than {max_query_ms:g} ms (max_query_ms): " + "; ".join(slow),
                     rows=rows)
    return Check("query_latency", "ok", f"all {len(rows)} representative queries within {max_query_ms:g} ms", rows=rows)


# -- 10. no data lost ---------------------------------------------------------------------------------------

def baseline_path(record_dir, baseline_dir=None, name: str = records.SNAPSHOT_FILE) -> Path | None:
    """The preflight's file `name` (the snapshot, the advisor baseline): baseline_dir's if given, else this
    run's; None if neither has it."""
    for folder in (baseline_dir, record_dir):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


NO_SNAPSHOT = "no preflight snapshot"   # row_counts without one: "no data loss" is not proven


# An outline, not the SQL itself: which tables, and their keys, are this database's.
ROW_COUNTS_OUTLINE = ("-- an outline: every table's count(*) (snapshot.take_snapshot), compared with the preflight's "
                      "snapshot.json;\n-- then, kept for a rollback to tell writes made since "
                      "(later_writes.write_row_state), per app table,\n-- its name in place of <table> and its "
                      "primary key columns in place of <primary key columns>:\n"
                      + later_writes.ROWS_SQL.format(key="json_build_object(<primary key columns>)::text",
                                                     row_hash=snapshot.ROW_HASH_OUTLINE, table="<table>"))


@verification_check(ROW_COUNTS_OUTLINE, "row counts against the snapshot", "row_counts")
def row_counts(conn, record_dir, baseline_dir=None) -> Check:
    """Row counts now against the preflight snapshot: no table lost a row, no table is gone."""
    path = baseline_path(record_dir, baseline_dir)
    if path is None:
        where = " or ".join(str(Path(f) / records.SNAPSHOT_FILE) for f in (baseline_dir, record_dir) if f)
        return Check("row_counts", "warning", f"{NO_SNAPSHOT} ({where}): that no row was lost cannot be "
                     "proven here. Run the preflight first, or pass baseline_dir.", title="row counts against the snapshot")
    before = snapshot.load_snapshot(path)
    after = snapshot.take_snapshot(conn, checksum_row_limit=0)
    comparison = snapshot.compare_snapshots(before, after)
    rows = comparison.count_table()
    source = f"{path.parent.name}/{path.name}" + (f" (taken {before.get('taken_at')})" if before.get("taken_at") else "")
    if not comparison.ok_for_deploy:
        problems = [p for p in comparison.problems() if "LOST" in p or "gone" in p]
        return Check("row_counts", "error", "ROWS LOST against " + source + ": " + "; ".join(problems),
                     rows=rows, title="row counts against the snapshot")
    grown = [r for r in comparison.counts if r.status in ("more", "new")]
    # the post-deployment state: a rollback tells from it what writes since then it would discard
    kept = f"; {later_writes.record_row_state(conn, record_dir)}" if record_dir else ""
    return Check("row_counts", "ok", f"no table lost a row against {source}: {len(comparison.counts)} tables, "
                 f"{len(grown)} grew or are new{kept}", rows=rows, title="row counts against the snapshot")



# -- 11. the guide's success criteria -----------------------------------------------------------------------

SUCCESS_CRITERIA = (
    ("technical", "All migrations apply successfully", ("phases_applied",)),
    ("technical", "No duplicate tables or functions", ("duplicate_functions", "duplicate_tables")),
    ("technical", "All RLS policies working", ("rls_spot_checks", "security_lints")),
    ("technical", "Performance within acceptable limits", ("performance_lints", "query_latency", "database_stats")),
    ("technical", "Data integrity verified", ("data_integrity",)),
    ("business", "All existing functionality works",
     ("updated_at_trigger", "helper_functions", "suspicious_activity", "rls_spot_checks")),
    ("business", "No data loss", ("row_counts",)),
    ("business", "Security requirements met", ("rls_spot_checks", "security_lints", "suspicious_activity")),
    ("business", "Compliance requirements satisfied", ("compliance", "data_integrity")),
    ("business", "Performance requirements met", ("performance_lints", "query_latency")),
)


def success_criteria(checks: list[Check]) -> Check:
    """The guide's success criteria, each passed only when every check that proves it ran and did not fail."""
    by_name = {c.name: c for c in checks}
    rows = []
    for kind, criterion, names in SUCCESS_CRITERIA:
        missing = [n for n in names if n not in by_name]
        failed = [n for n in names if n in by_name and by_name[n].status == "error"]
        warned = [n for n in names if n in by_name and by_name[n].status == "warning"]
        unproven = [n for n in names if n in by_name and _unproven(by_name[n])]
        result = "FAIL" if missing or failed else "not proven" if unproven else "pass"
        why = "; ".join(x for x in (
            f"failed: {', '.join(failed)}" if failed else "",
            f"not run: {', '.join(missing)}" if missing else "",
            f"not proven: {', '.join(unproven)} (no preflight snapshot to compare with)" if unproven else "",
            f"warnings: {', '.join(n for n in warned if n not in unproven)}"
            if set(warned) - set(unproven) else "") if x)
        rows.append({"criteria": kind, "criterion": criterion, "proven by": ", ".join(names), "result": result,
                     "notes": why})
    failing = [r["criterion"] for r in rows if r["result"] == "FAIL"]
    if failing:
        return Check("success_criteria", "error", f"{len(failing)} of {len(rows)} criteria fail: " + "; ".join(failing),
                     rows=rows, title="the guide's success criteria")
    unproven = [r["criterion"] for r in rows if r["result"] == "not proven"]
    if unproven:   # a criterion nothing here could prove is not a pass: said, not failed
        return Check("success_criteria", "warning", f"{len(rows) - len(unproven)} of {len(rows)} criteria pass; "
                     "not proven: " + "; ".join(unproven), rows=rows, title="the guide's success criteria")
    return Check("success_criteria", "ok", f"all {len(rows)} success criteria pass (technical and business)",
                 rows=rows, title="the guide's success criteria")


def _unproven(check: Check) -> bool:
    """A check that could not prove what it is for (row counts without a snapshot)."""
    return check.name == "row_counts" and check.status == "warning" and check.summary.startswith(NO_SNAPSHOT)
