"""Troubleshooting: the guide's four common issues, diagnosed on a target, with their fixes.

Each diagnosis is a read-only check (``@diagnosis``: a ``@sql_check`` that also remembers how to
run itself again). A problem it finds is a *warning*, so that one run shows all four issues,
and it carries the fixes for it (``check.fixes``: ``Fix`` objects, each keyed to its finding):

1. **Function conflicts** — updated-at trigger functions under other names, the canonical one
   in a legacy shape, overloads or clashing definitions of the contract's function names, each
   with the triggers and policies that depend on it. Fix: re-point the triggers to
   ``public.update_updated_at_column()``, *then* drop the duplicate without ``CASCADE`` (the
   guide's ``DROP FUNCTION`` fails while triggers depend on it, and with ``CASCADE`` silently
   drops them).
2. **Table conflicts** — contract tables missing, missing required columns, wrong types, legacy
   columns (a plaintext ``key``), tables of the same name in other schemas. Fix: re-run phase 2
   (idempotent; it converges the shape without losing a row) through ``runbook deploy``, which
   takes a verified backup first. Never applied from here.
3. **Permission problems** — what the API roles and the connecting role need and lack: USAGE on
   schemas, table privileges, EXECUTE on the functions their policies and check constraints
   call; RLS enabled without a policy on a table the API roles may query. Fix: the least GRANT
   (never the guide's ``GRANT ALL PRIVILEGES ON DATABASE``).
4. **Performance** — foreign keys without an index, tables read by many sequential scans,
   unused and duplicate indexes, statistics never gathered, the top statements when
   ``pg_stat_statements`` is there. Fix: ``create index concurrently if not exists ...``
   (outside a transaction) and ``analyze``.

``apply_fixes`` runs the SQL fixes only when asked: the transactional ones in ONE transaction
(each shown before it runs; any failure rolls all of them back), then each concurrent index
build on its own. ``verify_fixes`` diagnoses again and proves each applied fix took.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

import psycopg2

from . import connection, contract
from .contract import API_ROLES, PLAINTEXT_KEY_COLUMNS
from .checks import Check, fetch, sql_check
from .notebook import sql_block
from .paths import PHASES

APP_SCHEMAS_SQL = contract.app_schema_condition()


def _literals(values) -> str:
    """Constants written into the SQL as literals (the SQL shown is the SQL that runs)."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)

CANONICAL = "public.update_updated_at_column()"

# Columns that mean the legacy shape is still there (phase 2 converges each of them).
LEGACY_COLUMNS = {
    "api_keys": {"permissions": "legacy scopes (jsonb): phase 2 carries it into scopes",
                 "is_active": "legacy flag: phase 2 carries it into revoked_at",
                 "active": "legacy flag: phase 2 carries it into revoked_at",
                 "last_used": "legacy name of last_used_at"},
    "audit_logs": {"entity_type": "first legacy shape: phase 2 carries it into table_name",
                   "entity_id": "first legacy shape: phase 2 carries it into record_id",
                   "changes": "first legacy shape: phase 2 splits it into old_data/new_data",
                   "ip": "legacy text address: phase 2 carries it into ip_address (inet)"},
}

# The least privileges the product needs (phases 1-3 grant exactly these).
CORE_WRITABLE = ("organizations", "profiles", "organization_members", "products", "inventory", "api_keys")
LOGS = ("audit_logs", "security_events")
PHASE3 = contract.PHASE3_TABLES
NEEDED_TABLE_PRIVILEGES: dict[str, dict[str, tuple[str, ...]]] = {
    "authenticated": {**{t: ("select", "insert", "update", "delete") for t in CORE_WRITABLE},
                      **{t: ("select",) for t in LOGS}},
    "service_role": {**{t: ("select", "insert", "update", "delete") for t in CORE_WRITABLE},
                     **{t: ("select", "insert") for t in LOGS},
                     **{t: ("select", "insert", "update", "delete") for t in PHASE3}},
}
NEEDED_SCHEMA_USAGE = {"anon": ("public",), "authenticated": ("public",), "service_role": ("public",)}
CLIENT_FUNCTIONS = tuple(contract.FUNCTIONS_BY_NAME[n].signature for n in contract.CLIENT_FUNCTION_NAMES)
SERVICE_FUNCTIONS = ("public.get_user_organization_id(uuid)", "public.is_org_member(uuid,uuid)",
                     "public.is_org_admin(uuid,uuid)", "public.log_security_event(text,text,uuid,uuid,inet,jsonb)",
                     "public.check_rate_limit(text,integer,interval)",
                     "public.detect_suspicious_activity(uuid,inet,uuid)", "public.get_database_stats()",
                     "public.verify_data_integrity()", "public.apply_data_retention(boolean)",
                     "public.anonymize_user(uuid)")
NEEDED_FUNCTION_EXECUTE = {"authenticated": CLIENT_FUNCTIONS,
                           "service_role": CLIENT_FUNCTIONS + SERVICE_FUNCTIONS}
# What the runbooks' maintenance and troubleshooting call as the connecting role.
OPERATOR_FUNCTIONS = ("public.verify_data_integrity()", "public.get_database_stats()",
                      "public.apply_data_retention(boolean)")


@dataclass
class Fix:
    """One fix for one finding: SQL to run, or a command to run by hand."""

    issue: str                   # function conflicts | table conflicts | permissions | performance
    key: str                     # the finding it fixes (diagnosing again must not find it)
    summary: str
    sql: str | None = None       # None: not applied here, see `command`
    command: str | None = None
    transactional: bool = True   # False: create index concurrently (runs on its own, after the rest)


def diagnosis(sql: str, title: str):
    """A read-only check that finds problems and carries their fixes; it can run itself again."""
    def decorate(function):
        checked = sql_check(sql, title)(function)

        @functools.wraps(function)
        def wrapper(conn, *args, **kwargs):
            check = checked(conn, *args, **kwargs)
            if not hasattr(check, "fixes"):
                check.fixes = []
            if not hasattr(check, "findings"):
                check.findings = []
            check.rerun = lambda other_conn: wrapper(other_conn, *args, **kwargs)
            return check
        wrapper.sql, wrapper.title = checked.sql, checked.title
        return wrapper
    return decorate


def _finish(check: Check, findings: list[str], fixes: list[Fix]) -> Check:
    check.findings = sorted(set(findings))
    check.fixes = fixes
    return check


def redo_command(target: connection.Target | None, what: str) -> str:
    """The runbook command that re-runs the phases (with preflight backup and verification)."""
    where = (f"--{target.kind} {target.name}" if target is not None and target.kind in ("service", "target")
             else "--service NAME")
    return f"runbook deploy {where} -p reapply true   # {what}"


CONTRACT_NAMES_SQL = _literals(contract.FUNCTIONS_BY_NAME)
SPEC_TABLES = contract.TABLES


# -- 1. function conflicts -------------------------------------------------------------------

FUNCTION_CONFLICTS_SQL = f"""
with fn as (
  select p.oid, format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)) as function,
         n.nspname as schema, p.proname as name, oidvectortypes(p.proargtypes) as argument_types,
         pg_get_function_identity_arguments(p.oid) as arguments, pg_get_function_result(p.oid) as result,
         p.prorettype = 'trigger'::regtype as is_trigger, p.prosecdef as security_definer,
         coalesce(array_to_string(p.proconfig, ', '), '') as settings, p.prosrc as body
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
  where {APP_SCHEMAS_SQL} and p.prokind = 'f'
    and not exists (select 1 from pg_depend e            -- extension members are the extension's business
                    where e.classid = 'pg_proc'::regclass and e.objid = p.oid and e.deptype = 'e')
)
select f.function, f.schema, f.name, f.argument_types, f.arguments, f.result, f.is_trigger, f.security_definer,
       f.settings, f.body, f.oid = to_regprocedure('{CANONICAL}') as canonical,
       exists (select 1 from fn g where g.schema = f.schema and g.name = f.name and g.oid <> f.oid) as overloaded,
       coalesce((select json_agg(json_build_object(
                   'kind', case d.classid when 'pg_trigger'::regclass then 'trigger'
                                          when 'pg_policy'::regclass then 'policy' else 'other' end,
                   'object', pg_describe_object(d.classid, d.objid, d.objsubid),
                   'trigger', quote_ident(t.tgname),
                   'table', quote_ident(tn.nspname) || '.' || quote_ident(tc.relname),
                   'canonical_name', quote_ident(left('update_' || tc.relname || '_updated_at', 63)),
                   'table_has_canonical', exists (select 1 from pg_trigger t2
                                                  where t2.tgrelid = t.tgrelid and t2.oid <> t.oid
                                                    and t2.tgfoid = to_regprocedure('{CANONICAL}')))
                   order by pg_describe_object(d.classid, d.objid, d.objsubid))
                 from pg_depend d
                 left join pg_trigger t on d.classid = 'pg_trigger'::regclass and t.oid = d.objid
                 left join pg_class tc on tc.oid = t.tgrelid
                 left join pg_namespace tn on tn.oid = tc.relnamespace
                 where d.refclassid = 'pg_proc'::regclass and d.refobjid = f.oid and d.deptype = 'n'), '[]') as dependents
from fn f
where (f.is_trigger and (f.body ~* 'updated_at' or f.name ~* '(updated_?at|modified|moddatetime)'))
   or (f.schema = 'public' and f.name in ({CONTRACT_NAMES_SQL}))
   or exists (select 1 from fn g where g.schema = f.schema and g.name = f.name and g.oid <> f.oid)
order by f.function
"""

MISSING_TRIGGERS_SQL = f"""
select format('%I.%I', n.nspname, c.relname) as table_name,
       quote_ident(left('update_' || c.relname || '_updated_at', 63)) as trigger_name
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped
where n.nspname = 'public' and c.relkind in ('r', 'p') and not c.relispartition
  and to_regprocedure('{CANONICAL}') is not null
  and not exists (select 1 from pg_trigger t where t.tgrelid = c.oid and t.tgenabled <> 'D'
                  and not t.tgisinternal and t.tgfoid = to_regprocedure('{CANONICAL}'))
order by 1
"""

@functools.cache
def canonical_definition() -> str:
    """The contract's updated-at function and its privileges, as phase 1's file defines them (the fix
    for a canonical function in a legacy shape is what the deployment would run)."""
    text = PHASES[0][1].read_text()
    create = re.search(r"^create or replace function public\.update_updated_at_column\(\)$.*?^\$\$;$", text, re.M | re.S)
    revoke = re.search(r"^revoke all on function public\.update_updated_at_column\(\) from .*;$", text, re.M)
    return create.group(0) + "\n" + revoke.group(0)


_STAMP = re.compile(r"^(declare .*?)?begin (if .*? then )?new\.\"?updated_at\"? ?:?= ?"
                    r"(now\(\)|current_timestamp|localtimestamp|clock_timestamp\(\)|statement_timestamp\(\)|"
                    r"transaction_timestamp\(\)|timezone\(.*?\));? (end if; )?return new; end;?$")


def stamps_updated_at(body: str) -> bool:
    """Does this trigger function do nothing but stamp NEW.updated_at with the current time?"""
    text = re.sub(r"--[^\n]*", " ", body or "")
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = " ".join(text.lower().replace(";", "; ").split()).replace(" ;", ";")
    return bool(_STAMP.match(text))


@diagnosis(FUNCTION_CONFLICTS_SQL + ";\n" + MISSING_TRIGGERS_SQL, "function conflicts")
def function_conflicts(conn, target: connection.Target | None = None) -> Check:
    rows_in = fetch(conn, FUNCTION_CONFLICTS_SQL)
    canonical_exists = any(r["canonical"] for r in rows_in)
    phase1 = redo_command(target, "phase 1 re-points triggers, replaces dependent policies, drops duplicates")
    rows, findings, fixes, repointed = [], [], [], set()
    for r in rows_in:
        deps = r["dependents"]
        info = False
        if r["canonical"]:
            legacy = [what for what, bad in (("SECURITY DEFINER", r["security_definer"]),
                                             ("search_path not pinned", "search_path" not in r["settings"]),
                                             ("does more or less than stamp now()", not stamps_updated_at(r["body"])))
                      if bad]
            if not legacy:
                continue
            problem = "the canonical function in a legacy shape: " + ", ".join(legacy)
            fixes.append(Fix("function conflicts", r["function"], "replace it with the contract's definition "
                             "(its triggers keep calling it)", canonical_definition()))
        elif r["is_trigger"] and stamps_updated_at(r["body"]):
            problem = "duplicate updated-at function"
            fixes += _repoint_and_drop(r, canonical_exists, phase1)
            repointed.update(d["table"] for d in deps if d["kind"] == "trigger")
        elif r["is_trigger"] and re.search(r"(updated_?at|modified|moddatetime)", r["name"], re.I):
            problem = ("named like an updated-at function but does more than stamp updated_at: re-pointing its "
                       "triggers would lose the rest; decide by hand (phase 1 stops on it too)")
            fixes.append(Fix("function conflicts", r["function"], f"read {r['function']} and decide",
                             command=f"select pg_get_functiondef('{r['function']}'::regprocedure);"))
        elif r["schema"] == "public" and r["name"] in contract.FUNCTIONS_BY_NAME:
            function = contract.FUNCTIONS_BY_NAME[r["name"]]
            arguments, result = function.identity_arguments, function.result
            if r["argument_types"] != function.argument_types:
                problem = f"overload of the contract's {r['name']}({arguments})"
            elif r["arguments"] != arguments or r["result"] != result:
                problem = (f"clashes with the contract's {r['name']}({arguments}) returns {result}: "
                           "create or replace fails (cannot change argument names or return type)")
            else:
                continue
            fixes += _drop_function(r, phase1)
        elif r["overloaded"]:
            problem = "same-name overloads (not a conflict by itself; calls with untyped literals may be ambiguous)"
            info = True
        else:
            continue
        if not info:
            findings.append(r["function"])
        rows.append({"function": r["function"], "problem": problem,
                     "dependents": "; ".join(d["object"] for d in deps) or "none", "info": info})

    for r in fetch(conn, MISSING_TRIGGERS_SQL):
        if r["table_name"] in repointed:
            continue   # the re-pointing above adds it
        key = f"{r['table_name']}: no updated-at trigger"
        findings.append(key)
        rows.append({"function": CANONICAL, "problem": f"{r['table_name']} has updated_at but no trigger calls it",
                     "dependents": "", "info": False})
        fixes.append(Fix("function conflicts", key, f"add the updated-at trigger on {r['table_name']}",
                         f"create or replace trigger {r['trigger_name']} before update on {r['table_name']} "
                         f"for each row execute function {CANONICAL};"))
    if not canonical_exists:
        key = CANONICAL + " missing"
        findings.append(key)
        rows.insert(0, {"function": CANONICAL, "problem": "missing: phase 1 is not applied", "dependents": "",
                        "info": False})
        fixes.insert(0, Fix("function conflicts", key, "apply phase 1", command=phase1))

    conflicts = [r for r in rows if not r.pop("info")]
    columns = ["function", "problem", "dependents"]
    if not conflicts:
        summary = "none: one update_updated_at_column(), no duplicate or clashing function"
        if rows:
            summary += f" ({len(rows)} same-name overload(s) listed for information)"
        return _finish(Check("function_conflicts", "info" if rows else "ok", summary, rows=rows, columns=columns),
                       findings, fixes)
    triggers = sum(r["dependents"].count("trigger ") for r in conflicts)
    return _finish(Check("function_conflicts", "warning",
                         f"{len(conflicts)} conflicting function(s) with {triggers} dependent trigger(s): "
                         "re-point the triggers, then drop without CASCADE (the fixes below)",
                         rows=rows, columns=columns), findings, fixes)


def _repoint_and_drop(r: dict, canonical_exists: bool, phase1: str) -> list[Fix]:
    if not canonical_exists:
        return [Fix("function conflicts", r["function"], f"re-point the triggers of {r['function']} and drop it",
                    command=phase1)]
    statements, blocked = [], []
    for d in r["dependents"]:
        if d["kind"] != "trigger":
            blocked.append(d["object"])
            continue
        if d["table_has_canonical"]:
            statements.append(f"drop trigger {d['trigger']} on {d['table']};  "
                              f"-- {d['table']} already has a trigger calling {CANONICAL}")
            continue
        statements.append(f"create or replace trigger {d['canonical_name']} before update on {d['table']} "
                          f"for each row execute function {CANONICAL};")
        if d["trigger"] != d["canonical_name"]:
            statements.append(f"drop trigger {d['trigger']} on {d['table']};")
    if blocked:
        return [Fix("function conflicts", r["function"],
                    f"{r['function']} is used by {', '.join(blocked)}: phase 1 replaces such dependents first",
                    command=phase1)]
    statements.append(f"drop function {r['function']};  -- no CASCADE: anything still depending on it stops the fix")
    what = (f"re-point {len(r['dependents'])} trigger(s) to {CANONICAL}, then drop {r['function']}"
            if r["dependents"] else f"drop {r['function']} (nothing depends on it)")
    return [Fix("function conflicts", r["function"], what, "\n".join(statements))]


def _drop_function(r: dict, phase1: str) -> list[Fix]:
    if r["dependents"]:
        return [Fix("function conflicts", r["function"],
                    f"{r['function']} is used by {'; '.join(d['object'] for d in r['dependents'])}: phase 1 moves it "
                    "to private (the legacy policies keep working), phase 2 installs the contract's policies and drops it", command=phase1)]
    return [Fix("function conflicts", r["function"], f"drop {r['function']} (nothing depends on it; phase 1 "
                "creates the contract's version)", f"drop function {r['function']};")]


# -- 2. table conflicts ----------------------------------------------------------------------

TABLE_COLUMNS_SQL = f"""
select c.relname as table_name, a.attname as column_name, format_type(a.atttypid, a.atttypmod) as type
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
where n.nspname = 'public' and c.relkind in ('r', 'p') and c.relname in ({_literals(SPEC_TABLES)})
order by c.relname, a.attnum
"""
DUPLICATE_TABLES_SQL = f"""
select format('%I.%I', n.nspname, c.relname) as duplicate, c.relname as table_name,
       case c.relkind when 'v' then 'view' when 'm' then 'materialized view' when 'f' then 'foreign table'
                      else 'table' end as kind
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where {APP_SCHEMAS_SQL} and n.nspname <> 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f')
  and (c.relname in ({_literals(SPEC_TABLES)})
       or exists (select 1 from pg_class p where p.relnamespace = 'public'::regnamespace
                  and p.relname = c.relname and p.relkind in ('r', 'p')))
order by 1
"""


@diagnosis(TABLE_COLUMNS_SQL + ";\n" + DUPLICATE_TABLES_SQL, "table conflicts")
def table_conflicts(conn, target: connection.Target | None = None) -> Check:
    specs = {**contract.CORE_TABLE_COLUMNS, **contract.PHASE3_TABLE_COLUMNS}
    columns: dict[str, dict[str, str]] = {}
    for r in fetch(conn, TABLE_COLUMNS_SQL):
        columns.setdefault(r["table_name"], {})[r["column_name"]] = r["type"]
    rows, findings = [], []

    def add(table, column, found, problem, serious=True):
        rows.append({"table": f"public.{table}", "column": column, "found": found, "problem": problem})
        if serious:
            findings.append(f"public.{table}.{column}" if column else f"public.{table}")

    for table, spec in contract.CORE_TABLE_COLUMNS.items():
        if table not in columns:
            add(table, "", "missing", "the contract's table is missing: phase 2 is not applied")
    for table, spec in specs.items():
        have = columns.get(table)
        if have is None:
            continue
        for column, types in spec.items():
            if column not in have:
                add(table, column, "missing", f"required column missing (expected {types[0]})")
            elif have[column] not in types:
                add(table, column, have[column], f"wrong type (expected {' or '.join(types)})")
        for column, type_ in have.items():
            if column in spec:
                continue
            if table == "api_keys" and column in PLAINTEXT_KEY_COLUMNS:
                add(table, column, type_, "PLAINTEXT API KEY column: phase 2 hashes it into key_hash and drops it")
            elif column in LEGACY_COLUMNS.get(table, {}):
                add(table, column, type_, "legacy column: " + LEGACY_COLUMNS[table][column])
    for r in fetch(conn, DUPLICATE_TABLES_SQL):
        add(r["table_name"], "", r["kind"],
            f"{r['kind']} {r['duplicate']} has the name of public.{r['table_name']}: a second definition "
            "in another shape (which one does the application use?)")
        rows[-1]["table"] = r["duplicate"]
        findings[-1] = r["duplicate"]
    fixes = []
    shape = [r for r in rows if not r["problem"].startswith(("table ", "view ", "materialized", "foreign"))
             or r["found"] == "missing"]
    if shape:
        fixes.append(Fix("table conflicts", "table shapes",
                         "re-run phase 2: idempotent, converges every contract table's shape without losing a row "
                         "(runbook deploy takes and verifies a backup first)",
                         command=redo_command(target, "phase 2 converges the table shapes")))
    for r in rows:
        if r["column"] == "" and r["found"] != "missing":
            fixes.append(Fix("table conflicts", r["table"],
                             f"compare {r['table']} with its public namesake (columns, row counts, who writes it); "
                             "carry rows over if needed, then rename it out of the way "
                             f"(alter table {r['table']} rename to ...); never drop it without a backup",
                             command=f"select count(*) from {r['table']};  -- then decide by hand"))
    if not rows:
        return _finish(Check("table_conflicts", "ok", "none: every contract table is in the contract's shape, "
                             "and no other schema defines one again", rows=rows,
                             columns=["table", "column", "found", "problem"]), findings, fixes)
    return _finish(Check("table_conflicts", "warning",
                         f"{len(rows)} conflict(s) in {len({r['table'] for r in rows})} table(s): "
                         "re-run phase 2 (command below); tables named twice need a decision",
                         rows=rows, columns=["table", "column", "found", "problem"]), findings, fixes)


# -- 3. permission problems ------------------------------------------------------------------

PRIVILEGES_SQL = """
-- (role, kind, object, privilege): what the product needs (NEEDED_* in runbooks/troubleshooting.py),
-- the functions its policies and check constraints call, and what the runbooks call as the connecting role
select o.role, o.kind, o.object, o.privilege,
       case o.kind when 'schema' then has_schema_privilege(o.role, o.object, o.privilege)
                   when 'table' then has_table_privilege(o.role, o.object, o.privilege)
                   else has_function_privilege(o.role, o.object, o.privilege) end as granted
from unnest(%(roles)s::text[], %(kinds)s::text[], %(objects)s::text[], %(privileges)s::text[])
     as o (role, kind, object, privilege)
where exists (select 1 from pg_roles r where r.rolname = o.role)
  and case o.kind when 'schema' then to_regnamespace(o.object) is not null     -- what is missing altogether
                  when 'table' then to_regclass(o.object) is not null          -- is a table or function
                  else to_regprocedure(o.object) is not null end               -- conflict, not a grant
order by 1, 2, 3, 4
"""
CALLED_FUNCTIONS_SQL = f"""
-- functions that RLS policies and check constraints call: whoever may use the table needs EXECUTE on them
select distinct role.rolname as role,
       format('%I.%I(%s)', fn_ns.nspname, p.proname, oidvectortypes(p.proargtypes)) as function,
       fn_ns.nspname as function_schema, format('%I.%I', n.nspname, c.relname) as table_name,
       pg_describe_object(d.classid, d.objid, d.objsubid) as used_by
from pg_depend d
join pg_proc p on p.oid = d.refobjid
join pg_namespace fn_ns on fn_ns.oid = p.pronamespace
left join pg_policy pol on d.classid = 'pg_policy'::regclass and pol.oid = d.objid
left join pg_constraint con on d.classid = 'pg_constraint'::regclass and con.oid = d.objid
join pg_class c on c.oid = coalesce(pol.polrelid, con.conrelid)
join pg_namespace n on n.oid = c.relnamespace
join pg_roles role on role.rolname in ({_literals(API_ROLES)})
where d.refclassid = 'pg_proc'::regclass and d.deptype = 'n' and {APP_SCHEMAS_SQL}
  and fn_ns.nspname <> 'pg_catalog'
  and (pol.oid is not null and (role.oid = any(pol.polroles) or pol.polroles = '{{0}}')
       and has_table_privilege(role.oid, c.oid, 'select, insert, update, delete')
    or con.oid is not null and has_table_privilege(role.oid, c.oid, 'insert, update'))
order by 1, 2, 4
"""
RLS_WITHOUT_POLICY_SQL = """
select format('%I.%I', n.nspname, c.relname) as table_name, r.rolname as role
from pg_class c join pg_namespace n on n.oid = c.relnamespace
join pg_roles r on r.rolname in ('anon', 'authenticated') and not r.rolbypassrls
where n.nspname = 'public' and c.relkind in ('r', 'p') and c.relrowsecurity
  and not exists (select 1 from pg_policy p where p.polrelid = c.oid)
  and has_table_privilege(r.oid, c.oid, 'select, insert, update, delete')
order by 1, 2
"""
OPERATOR_SQL = """
select current_user as role, r.rolsuper as superuser,
       pg_has_role(current_user, 'pg_read_all_stats', 'member') as reads_all_stats
from pg_roles r where r.rolname = current_user
"""


def _needed() -> list[tuple[str, str, str, str]]:
    needed = []
    for role, schemas in NEEDED_SCHEMA_USAGE.items():
        needed += [(role, "schema", s, "usage") for s in schemas]
    for role, tables in NEEDED_TABLE_PRIVILEGES.items():
        needed += [(role, "table", f"public.{t}", p) for t, privileges in tables.items() for p in privileges]
    for role, functions in NEEDED_FUNCTION_EXECUTE.items():
        needed += [(role, "function", f, "execute") for f in functions]
    return needed


def _check_privileges(conn, needed: list[tuple[str, str, str, str]]) -> list[dict]:
    if not needed:
        return []
    roles, kinds, objects, privileges = (list(x) for x in zip(*needed))
    return fetch(conn, PRIVILEGES_SQL, {"roles": roles, "kinds": kinds, "objects": objects, "privileges": privileges})


def _grant(kind: str, obj: str, privileges: list[str], role: str) -> str:
    on = {"schema": "schema", "table": "table", "function": "function"}[kind]
    return f"grant {', '.join(sorted(privileges))} on {on} {obj} to {role};"


@diagnosis(PRIVILEGES_SQL + ";\n" + CALLED_FUNCTIONS_SQL + ";\n" + RLS_WITHOUT_POLICY_SQL + ";\n" + OPERATOR_SQL,
           "permission problems")
def permission_problems(conn) -> Check:
    needed = _needed()
    called = fetch(conn, CALLED_FUNCTIONS_SQL)
    for r in called:
        needed.append((r["role"], "function", r["function"], "execute"))
        needed.append((r["role"], "schema", r["function_schema"], "usage"))
    operator = fetch(conn, OPERATOR_SQL)[0]
    needed += [(operator["role"], "function", f, "execute") for f in OPERATOR_FUNCTIONS]
    needed = sorted(set(needed))
    used_by: dict[tuple[str, str], list[str]] = {}
    for r in called:
        used_by.setdefault((r["role"], r["function"]), []).append(r["used_by"])

    rows, findings = [], []
    missing: dict[tuple[str, str, str], list[str]] = {}
    for r in _check_privileges(conn, needed):
        if r["granted"]:
            continue
        why = ("the runbooks' maintenance calls it" if r["role"] == operator["role"] and r["role"] not in API_ROLES
               else "; ".join(sorted(used_by.get((r["role"], r["object"]), [])))
               or "the product's API needs it (the phases grant it)")
        rows.append({"role": r["role"], "lacks": f"{r['privilege'].upper()} on {r['kind']} {r['object']}", "why": why})
        findings.append(f"{r['role']}: {r['privilege']} on {r['object']}")
        missing.setdefault((r["role"], r["kind"], r["object"]), []).append(r["privilege"])
    fixes = [Fix("permissions", f"{role}: " + ", ".join(sorted(privs)) + f" on {obj}",
                 f"grant {role} {', '.join(sorted(p.upper() for p in privs))} on {kind} {obj}",
                 _grant(kind, obj, privs, role)) for (role, kind, obj), privs in sorted(missing.items())]
    # per-privilege keys: every finding has a fix whose key names it
    for fix in fixes:
        role, rest = fix.key.split(": ", 1)
        privs, obj = rest.split(" on ", 1)
        fix.key = "; ".join(f"{role}: {p} on {obj}" for p in privs.split(", "))

    for r in fetch(conn, RLS_WITHOUT_POLICY_SQL):
        rows.append({"role": r["role"], "lacks": f"a policy on {r['table_name']}",
                     "why": "RLS is enabled and the role has privileges, but no policy lets a row through: "
                            "every query sees nothing (phase 2's policies, or revoke the privileges)"})
        findings.append(f"{r['role']}: no policy on {r['table_name']}")
    if not (operator["superuser"] or operator["reads_all_stats"]):
        rows.append({"role": operator["role"], "lacks": "pg_read_all_stats",
                     "why": "other sessions' queries show as <insufficient privilege> in the daily checks "
                            "(grant pg_read_all_stats to the role; informational)"})
    problems = [r for r in rows if r["lacks"] != "pg_read_all_stats"]
    if not problems:
        return _finish(Check("permission_problems", "ok" if not rows else "info",
                             f"none: anon, authenticated, service_role and {operator['role']} have what the "
                             "product needs" + ("; see the note" if rows else ""), rows=rows,
                             columns=["role", "lacks", "why"]), findings, fixes)
    return _finish(Check("permission_problems", "warning",
                         f"{len(problems)} missing privilege(s) for {', '.join(sorted({r['role'] for r in problems}))}: "
                         "the least GRANTs below fix them (never GRANT ALL PRIVILEGES ON DATABASE)",
                         rows=rows, columns=["role", "lacks", "why"]), findings, fixes)


# -- 4. performance --------------------------------------------------------------------------

FK_WITHOUT_INDEX_SQL = f"""
select format('%I.%I', n.nspname, c.relname) as table_name, c.relname, con.conname as foreign_key,
       con.confrelid::regclass::text as references_table,
       array_agg(a.attname order by k.n) as columns,
       coalesce(s.seq_scan, 0) as seq_scans, coalesce(s.seq_tup_read, 0) as rows_read_by_seq_scans,
       coalesce(s.idx_scan, 0) as index_scans, coalesce(s.n_live_tup, 0) as live_rows
from pg_constraint con
join pg_class c on c.oid = con.conrelid
join pg_namespace n on n.oid = c.relnamespace
cross join lateral unnest(con.conkey) with ordinality as k (attnum, n)
join pg_attribute a on a.attrelid = con.conrelid and a.attnum = k.attnum
left join pg_stat_user_tables s on s.relid = c.oid
where con.contype = 'f' and {APP_SCHEMAS_SQL}
  and not exists (                          -- an index whose leading columns are the key's columns
    select 1 from pg_index i
    where i.indrelid = con.conrelid and i.indisvalid and i.indpred is null
      and (select array_agg(x order by x) from unnest((string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(con.conkey)]) x)
        = (select array_agg(x order by x) from unnest(con.conkey) x))
group by n.nspname, c.relname, con.conname, con.confrelid, s.seq_scan, s.seq_tup_read, s.idx_scan, s.n_live_tup
order by 1, 3
"""
SEQ_SCAN_SQL = f"""
select quote_ident(s.schemaname) || '.' || quote_ident(s.relname) as table_name, s.seq_scan as seq_scans,
       s.seq_tup_read as rows_read_by_seq_scans, coalesce(s.idx_scan, 0) as index_scans, s.n_live_tup as live_rows,
       s.seq_tup_read / nullif(s.seq_scan, 0) as rows_per_seq_scan
from pg_stat_user_tables s join pg_namespace n on n.nspname = s.schemaname
where {APP_SCHEMAS_SQL}
  and s.seq_scan >= %(min_seq_scans)s and s.n_live_tup >= %(min_rows)s and s.seq_scan > coalesce(s.idx_scan, 0)
order by s.seq_tup_read desc, 1
"""
UNUSED_INDEXES_SQL = f"""
select format('%I.%I', s.schemaname, s.indexrelname) as index_name, format('%I.%I', s.schemaname, s.relname) as table_name,
       pg_relation_size(s.indexrelid) as bytes, s.idx_scan as scans, pg_get_indexdef(s.indexrelid) as definition
from pg_stat_user_indexes s join pg_index i on i.indexrelid = s.indexrelid
join pg_namespace n on n.nspname = s.schemaname
where {APP_SCHEMAS_SQL} and s.idx_scan = 0 and not i.indisunique and not i.indisprimary
  and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)
  and not exists (                          -- an index that covers a foreign key stays
    select 1 from pg_constraint fk where fk.contype = 'f' and fk.conrelid = i.indrelid
      and (select array_agg(x order by x) from unnest((string_to_array(i.indkey::text, ' ')::int2[])[1:cardinality(fk.conkey)]) x)
        = (select array_agg(x order by x) from unnest(fk.conkey) x))
order by 1
"""
DUPLICATE_INDEXES_SQL = f"""
select format('%I.%I', n.nspname, ci.relname) as index_name,
       (select format('%I.%I', tn.nspname, t.relname) from pg_class t join pg_namespace tn on tn.oid = t.relnamespace
         where t.oid = i.indrelid) as table_name,
       (select string_agg(format('%I.%I', n2.nspname, c2.relname), ', ' order by c2.relname)
          from pg_index j join pg_class c2 on c2.oid = j.indexrelid join pg_namespace n2 on n2.oid = c2.relnamespace
         where j.indrelid = i.indrelid and j.indexrelid <> i.indexrelid and j.indkey = i.indkey
           and j.indclass = i.indclass and coalesce(pg_get_expr(j.indexprs, j.indrelid), '') = coalesce(pg_get_expr(i.indexprs, i.indrelid), '')
           and coalesce(pg_get_expr(j.indpred, j.indrelid), '') = coalesce(pg_get_expr(i.indpred, i.indrelid), '')) as same_as
from pg_index i join pg_class ci on ci.oid = i.indexrelid join pg_namespace n on n.oid = ci.relnamespace
where {APP_SCHEMAS_SQL} and not i.indisunique and not i.indisprimary
  and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)
  and exists (select 1 from pg_index j where j.indrelid = i.indrelid and j.indexrelid <> i.indexrelid
              and j.indkey = i.indkey and j.indclass = i.indclass
              and coalesce(pg_get_expr(j.indexprs, j.indrelid), '') = coalesce(pg_get_expr(i.indexprs, i.indrelid), '')
              and coalesce(pg_get_expr(j.indpred, j.indrelid), '') = coalesce(pg_get_expr(i.indpred, i.indrelid), '')
              and (j.indisunique or j.indisprimary or j.indexrelid < i.indexrelid))
order by 1
"""
NEVER_ANALYZED_SQL = f"""
select quote_ident(s.schemaname) || '.' || quote_ident(s.relname) as table_name, s.n_live_tup as live_rows, s.n_mod_since_analyze as changed_since_analyze
from pg_stat_user_tables s join pg_namespace n on n.nspname = s.schemaname
where {APP_SCHEMAS_SQL} and s.last_analyze is null and s.last_autoanalyze is null and s.n_live_tup >= %(min_rows)s
order by 1
"""
STATEMENTS_SQL = """
select left(regexp_replace(query, '\\s+', ' ', 'g'), 160) as statement, calls,
       round(total_exec_time::numeric, 1) as total_ms, round(mean_exec_time::numeric, 2) as mean_ms, rows
from {view}
where dbid = (select oid from pg_database where datname = current_database())
order by total_exec_time desc
limit %(top)s
"""


def _index_name(relname: str, columns: list[str]) -> str:
    name = f"{relname}_{'_'.join(columns)}_idx"
    return name if len(name) <= 63 else name[:63]


def _quote(name: str) -> str:
    return name if name.isidentifier() and name == name.lower() else '"' + name.replace('"', '""') + '"'


@diagnosis(FK_WITHOUT_INDEX_SQL, "foreign keys without an index")
def foreign_keys_without_index(conn) -> Check:
    rows_in = fetch(conn, FK_WITHOUT_INDEX_SQL)
    rows, fixes = [], []
    for r in rows_in:
        index = _index_name(r["relname"], r["columns"])
        sql = (f"create index concurrently if not exists {_quote(index)} on {r['table_name']} "
               f"({', '.join(_quote(c) for c in r['columns'])});")
        rows.append({"table": r["table_name"], "foreign key": r["foreign_key"], "columns": ", ".join(r["columns"]),
                     "references": r["references_table"], "fix": sql})
        fixes.append(Fix("performance", f"{r['table_name']}.{r['foreign_key']}",
                         f"index {r['table_name']} ({', '.join(r['columns'])}) for {r['foreign_key']}", sql,
                         transactional=False))
    findings = [f.key for f in fixes]
    if not rows:
        return _finish(Check("foreign_keys_without_index", "ok", "none: every foreign key has an index on its columns",
                             rows=rows), findings, fixes)
    return _finish(Check("foreign_keys_without_index", "warning",
                         f"{len(rows)} foreign key(s) without an index: joins and deletes of the referenced rows "
                         "scan the whole table", rows=rows,
                         columns=["table", "foreign key", "columns", "references", "fix"]), findings, fixes)


@diagnosis(SEQ_SCAN_SQL, "tables read by many sequential scans")
def seq_scan_heavy_tables(conn, min_seq_scans: int = 100, min_rows: int = 1000) -> Check:
    rows = fetch(conn, SEQ_SCAN_SQL, {"min_seq_scans": min_seq_scans, "min_rows": min_rows})
    unindexed = {}
    for r in fetch(conn, FK_WITHOUT_INDEX_SQL):
        unindexed.setdefault(r["table_name"], []).append(f"{r['foreign_key']} ({', '.join(r['columns'])})")
    for r in rows:
        causes = unindexed.get(r["table_name"])
        r["likely cause"] = ("foreign key without an index: " + "; ".join(causes) if causes
                             else "look at the statements that read it (pg_stat_statements) and their plans")
    cols = ["table_name", "seq_scans", "rows_read_by_seq_scans", "index_scans", "live_rows", "rows_per_seq_scan",
            "likely cause"]
    if not rows:
        return _finish(Check("seq_scan_heavy_tables", "ok",
                             f"none: no table of {min_rows}+ rows read by {min_seq_scans}+ sequential scans "
                             "(more than by index scans)", rows=rows), [], [])
    return _finish(Check("seq_scan_heavy_tables", "warning",
                         f"{len(rows)} table(s) read mostly by sequential scans: "
                         + ", ".join(r["table_name"] for r in rows), rows=rows, columns=cols),
                   [f"seq scans: {r['table_name']}" for r in rows], [])


@diagnosis(UNUSED_INDEXES_SQL + ";\n" + DUPLICATE_INDEXES_SQL, "unused and duplicate indexes")
def unused_indexes(conn) -> Check:
    stats_since = fetch(conn, "select stats_reset from pg_stat_database where datname = current_database()")
    duplicates = fetch(conn, DUPLICATE_INDEXES_SQL)
    unused = [r for r in fetch(conn, UNUSED_INDEXES_SQL) if r["index_name"] not in {d["index_name"] for d in duplicates}]
    rows = [{"index": r["index_name"], "table": r["table_name"], "finding": "never scanned since statistics were reset",
             "suggestion": f"drop index concurrently if exists {r['index_name']};"} for r in unused]
    rows += [{"index": r["index_name"], "table": r["table_name"], "finding": f"duplicate of {r['same_as']}",
              "suggestion": f"drop index concurrently if exists {r['index_name']};"} for r in duplicates]
    rows.sort(key=lambda r: (r["index"], r["finding"]))
    since = stats_since[0]["stats_reset"] if stats_since else None
    note = f" (statistics since {since:%Y-%m-%d})" if since else ""
    if not rows:
        return _finish(Check("unused_indexes", "ok", "none: every index was used, none duplicates another" + note,
                             rows=rows), [], [])
    # how many indexes were never scanned depends on the workload (and the server version): not in the summary
    status = "warning" if duplicates else "info"
    return _finish(Check("unused_indexes", status,
                         f"{len(duplicates)} duplicate index(es); indexes never scanned{note} are listed: dropping one "
                         "is the DBA's decision after checking what needs it (a rare report, a standby)", rows=rows,
                         columns=["index", "table", "finding", "suggestion"]),
                   [f"duplicate index {r['index_name']}" for r in duplicates], [])


@diagnosis(NEVER_ANALYZED_SQL, "tables without planner statistics")
def tables_never_analyzed(conn, min_rows: int = 1000) -> Check:
    rows = fetch(conn, NEVER_ANALYZED_SQL, {"min_rows": min_rows})
    fixes = [Fix("performance", f"no statistics: {r['table_name']}", f"gather statistics on {r['table_name']}",
                 f"analyze {r['table_name']};") for r in rows]
    if not rows:
        return _finish(Check("tables_never_analyzed", "ok",
                             f"none: every table of {min_rows}+ rows has planner statistics", rows=rows), [], [])
    return _finish(Check("tables_never_analyzed", "warning",
                         f"{len(rows)} table(s) never analyzed: the planner guesses (typical right after a "
                         "migration rewrote tables)", rows=rows), [f.key for f in fixes], fixes)


@sql_check(STATEMENTS_SQL.format(view="pg_stat_statements"), "top statements (pg_stat_statements)")
def top_statements(conn, top: int = 10) -> Check:
    ext = fetch(conn, """select format('%I.pg_stat_statements', n.nspname) as view from pg_extension x
                         join pg_namespace n on n.oid = x.extnamespace where x.extname = 'pg_stat_statements'""")
    if not ext:
        return Check("top_statements", "info", "pg_stat_statements is not installed in this database: no statement "
                     "statistics (on Supabase it is on by default; elsewhere it needs shared_preload_libraries)")
    try:
        rows = fetch(conn, STATEMENTS_SQL.format(view=ext[0]["view"]), {"top": top})
    except psycopg2.Error as exc:
        return Check("top_statements", "info", f"pg_stat_statements cannot be read: {str(exc).strip()}")
    return Check("top_statements", "info", f"the {len(rows)} statements with the most total time", rows=rows)


# -- fixes -----------------------------------------------------------------------------------

def planned_fixes(checks: list[Check]) -> list[Fix]:
    """Every fix the diagnoses so far carry, in order (SQL ones first within each issue)."""
    fixes = []
    for check in checks:
        fixes += getattr(check, "fixes", [])
    return fixes


def show_fixes(fixes: list[Fix]) -> None:
    """Each fix with the SQL that `apply_fixes` would run (or the command to run by hand)."""
    if not fixes:
        print("Nothing to fix.")
        return
    for number, fix in enumerate(fixes, start=1):
        if fix.sql:
            where = "in the fixes' transaction" if fix.transactional else "on its own, outside a transaction"
            sql_block(fix.sql, f"{number}. {fix.issue}: {fix.summary} ({where})")
        else:
            sql_block(f"-- not applied here; run by hand:\n{fix.command}", f"{number}. {fix.issue}: {fix.summary}")


def apply_fixes(run, fixes: list[Fix], *, apply: bool = False, lock_timeout: str = "2s",
                statement_timeout: str = "10min") -> Check:
    """Run the SQL fixes (only when `apply`): transactional ones in one transaction, each shown
    before it runs; then each concurrent index build on its own. Commands are never run here."""
    sql_fixes = [f for f in fixes if f.sql]
    by_hand = [f for f in fixes if not f.sql]
    columns = ["#", "issue", "fix", "status"]
    if not apply:
        rows = [{"#": n, "issue": f.issue, "fix": f.summary,
                 "status": "not applied (apply_fixes = False)" if f.sql else "by hand: " + (f.command or "")}
                for n, f in enumerate(fixes, start=1)]
        return Check("apply_fixes", "info", f"nothing was changed: apply_fixes = False ({len(sql_fixes)} SQL fix(es) "
                     f"would run, {len(by_hand)} to do by hand)", rows=rows, columns=columns)
    conn = connection.connect(run.target, application_name=f"runbook troubleshooting {run.run_id}")
    status: dict[int, str] = {}
    try:
        with conn.cursor() as cur:
            cur.execute("select set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                        (lock_timeout, statement_timeout))
        conn.commit()
        in_transaction = [f for f in sql_fixes if f.transactional]
        if in_transaction:
            try:
                with conn.cursor() as cur:
                    for fix in in_transaction:
                        sql_block(fix.sql, f"running: {fix.summary}")
                        cur.execute(fix.sql)
                        status[id(fix)] = "rolled back"   # until the commit
                conn.commit()
                status.update((id(f), "applied") for f in in_transaction)
            except psycopg2.Error as exc:
                conn.rollback()
                status[id(fix)] = "FAILED: " + str(exc).strip().splitlines()[0]
                rows = [{"#": n, "issue": f.issue, "fix": f.summary, "status": status.get(id(f), "not run")}
                        for n, f in enumerate(fixes, start=1)]
                return Check("apply_fixes", "error", f"fix failed, the transaction was rolled back, nothing was "
                             f"changed: {str(exc).strip().splitlines()[0]}", rows=rows, columns=columns)
        conn.autocommit = True
        for fix in [f for f in sql_fixes if not f.transactional]:
            sql_block(fix.sql, f"running (outside a transaction): {fix.summary}")
            started = time.perf_counter()
            try:
                with conn.cursor() as cur:
                    _drop_invalid_leftover(cur, fix.sql)
                    cur.execute(fix.sql)
                status[id(fix)] = f"applied ({time.perf_counter() - started:.1f}s)"
            except psycopg2.Error as exc:
                status[id(fix)] = "FAILED: " + str(exc).strip().splitlines()[0]
    finally:
        conn.close()
    rows = [{"#": n, "issue": f.issue, "fix": f.summary, "status": status.get(id(f), "by hand: " + (f.command or ""))}
            for n, f in enumerate(fixes, start=1)]
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    if failed:
        return Check("apply_fixes", "error", f"{len(failed)} fix(es) failed (the transactional fixes were committed)",
                     rows=rows, columns=columns)
    applied = sum(1 for r in rows if r["status"].startswith("applied"))
    return Check("apply_fixes", "ok", f"{applied} fix(es) applied" + (f"; {len(by_hand)} to do by hand" if by_hand else ""),
                 rows=rows, columns=columns)


def _drop_invalid_leftover(cur, sql: str) -> None:
    """`create index concurrently if not exists` keeps an INVALID index a failed build left behind."""
    import pglast
    from pglast import ast

    node = pglast.parse_sql(sql)[0].stmt
    if isinstance(node, ast.IndexStmt) and node.idxname:
        schema = node.relation.schemaname or "public"
        cur.execute("""select format('%%I.%%I', n.nspname, c.relname) from pg_index i
                       join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
                       where n.nspname = %s and c.relname = %s and not i.indisvalid""", (schema, node.idxname))
        found = cur.fetchone()
        if found:
            cur.execute(f"drop index concurrently if exists {found[0]}")


def verify_fixes(run, checks: list[Check], outcome: Check) -> Check:
    """Diagnose again: every finding an applied fix was for must be gone."""
    if outcome.status == "info":
        return Check("fixes_verified", "info", "no fix was applied (apply_fixes = False): nothing to verify")
    applied_keys = set()
    for check in checks:
        for fix in getattr(check, "fixes", []):
            if fix.sql:
                applied_keys.update(fix.key.split("; "))
    rows = []
    for check in checks:
        if not hasattr(check, "rerun"):
            continue
        again = check.rerun(run.conn)
        still = set(again.findings)
        for key in sorted(set(check.findings)):
            if key in applied_keys:
                rows.append({"diagnosis": check.title, "finding": key, "now": "STILL THERE" if key in still else "fixed"})
            else:
                rows.append({"diagnosis": check.title, "finding": key,
                             "now": "still there: its fix is by hand (above)" if key in still else "gone"})
    broken = [r for r in rows if r["now"] == "STILL THERE"]
    if broken:
        return Check("fixes_verified", "error", f"{len(broken)} finding(s) an applied fix was for are still there",
                     rows=rows)
    left = [r for r in rows if r["now"].startswith("still")]
    return Check("fixes_verified", "warning" if left else "ok",
                 f"every applied fix took; {len(left)} finding(s) left for fixes by hand" if left
                 else "every applied fix took; nothing is left", rows=rows)
