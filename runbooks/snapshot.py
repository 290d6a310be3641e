"""Snapshots of a database, to prove that nothing was lost and that a rollback put it back.

A snapshot holds, read in one repeatable-read, read-only transaction:

- ``row_counts``: an exact ``count(*)`` of every table in every non-system schema except the
  project's history schema (``truthsource``), Supabase's own schemas included: a deployment
  must not lose a row anywhere.
- ``fingerprint``: sha256 over a normalised description of the *app schemas* (every non-system
  schema except ``truthsource`` and the Supabase platform schemas): schemas, tables, columns,
  constraints, indexes, functions, triggers, policies, RLS flags, grants, default privileges,
  sequences, views, types, extensions and comments. Nothing in it is an OID or depends on
  one, and every name is schema-qualified (``search_path`` is empty while it is read), so two
  databases with the same objects have the same fingerprint even when one was rebuilt from a
  dump. ``fingerprint_parts`` has one hash per kind, and ``objects`` the normalised lines
  themselves, so a mismatch says which kind differs and a diff shows the lines.
- ``content``: per app-schema table, a checksum of its rows as a multiset (``checksum_method``
  ``rowsum-hash64``): each row's 64-bit hash (``row_hash``: PostgreSQL's own hash of the row's
  values, ``hash_record_extended``) is summed over the table (exactly: the sum is a numeric), and
  the row count and the sum are hashed into the table's checksum. A sum does not depend on the
  order of the rows, so nothing is sorted, and it counts duplicates ({a, a, b} and {a, b, b}
  differ, which an xor would not see). Sequence positions are part of the content too.

  The hash is of the values, not of their text: ``1.0`` and ``1.00`` in a ``numeric`` column hash
  alike (they are equal), a changed value does not. A column whose type's hash is not of its value
  alone (an enum hashes its OID, which a restore renumbers; a domain, a composite or an extension's
  type may have no hash at all) is hashed as its text form, so a checksum taken before a dump and
  after its restore agree.

**What it costs.** One read of each table, nothing sorted, nothing skipped by size: for an app
table one sequential scan yields both its ``count(*)`` and its checksum, in parallel where the
server allows (the sum is a parallel aggregate); a platform table costs one ``count(*)``. Hashing
values skips writing each row's text form, which cost 4x more (the md5 of the text that snapshots
of ``rowsum-md5`` took: 2.7 s against 0.6 s for a million audit rows); the benchmark
measures both the checksum and a bare ``count(*)``. ``checksum_row_limit`` (default: none) is for
callers that want counts alone (the phases' and verification's change checks pass 0); what it
leaves out says ``skipped: N rows``.

Snapshots of older records hold checksums of other methods (format 1 ``md5-sorted``: an md5 of
the rows' md5s in text order, which sorted the whole table; ``rowsum-md5``: a sum of md5s of each
row's text). They still load and compare: counts and fingerprint as ever, and a table's content
checksums taken by different methods are reported as not comparable (``content_incomparable``)
rather than as a difference.

Tables in ``WORK_QUEUES`` are the deployment's own transient queues: fewer rows there is the
queue draining (status ``drained``, a fact), never rows lost.

Counting with ``row_security = off`` makes a role that is subject to RLS fail loudly rather
than count only the rows it may see.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2.extensions
from psycopg2 import sql

from . import records
from .contract import HISTORY_SCHEMA, PLATFORM_SCHEMAS, is_app_schema  # noqa: F401 (is_app_schema: read here by others)

SNAPSHOT_FORMAT = 2
# How "content" checksums a table (module docstring). Format 1 snapshots carry no method: theirs
# was LEGACY_CHECKSUM_METHOD, whose values cannot be compared with this one's.
CHECKSUM_METHOD = "rowsum-hash64"
LEGACY_CHECKSUM_METHOD = "md5-sorted"
# The deployment's own transient work queues, schema-qualified as in row_counts. A phase fills one
# and a later step of it empties it (private.pending_rewrites: the tables 001_core_schema.sql
# rewrites after its commit, emptied as each is done; private.pending_backfills: the logs' legacy
# columns it carries after its commit), so a re-run after an interruption finds it drained: fewer
# rows in a queue is work done, not data lost. Add a queue here when a phase adds one. An online rewrite
# that was interrupted also leaves its copy and its log (private.p2_rewrite_<oid>, private.p2_rewrite_log_<oid>):
# gone once a re-run finishes the rewrite, as a queue drains.
WORK_QUEUES = frozenset({"private.pending_rewrites", "private.pending_backfills", "private.backfill_stashes",
                         "private.backfill_leftovers"})
WORK_QUEUE_PREFIXES = ("private.p2_rewrite_",)
SYSTEM_SCHEMA_SQL = ("n.nspname not in ('pg_catalog', 'information_schema') "
                     "and n.nspname !~ '^pg_(toast|temp_|toast_temp_)'")
COUNT_STATUSES = ("same", "more", "FEWER", "MISSING", "new", "drained")


class SnapshotError(RuntimeError):
    """The snapshot could not be taken or read."""


def _all(cur, query, params=None) -> list[tuple]:
    cur.execute(query, params)
    return cur.fetchall()


def data_schemas(cur) -> list[str]:
    """Every non-system schema except the history schema (where rows are counted)."""
    return [r[0] for r in _all(cur, f"""select n.nspname from pg_namespace n
                                         where {SYSTEM_SCHEMA_SQL} and n.nspname <> %s
                                         order by 1""", (HISTORY_SCHEMA,))]


def app_schemas(cur) -> list[str]:
    """The schemas the product owns: non-system, not the history schema, not Supabase's."""
    return [s for s in data_schemas(cur) if s not in PLATFORM_SCHEMAS]


@contextmanager
def _consistent_read(conn, lock_timeout: str, snapshot_id: str | None = None):
    """One repeatable-read, read-only transaction with deterministic output settings (on an
    exported snapshot when given: then it sees exactly what a pg_dump on that snapshot sees)."""
    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        raise SnapshotError("take_snapshot needs a connection that is not inside a transaction "
                            "(commit or roll back first)")
    cur = conn.cursor()
    read = False
    try:
        if conn.autocommit:
            cur.execute("begin isolation level repeatable read, read only")
        else:
            cur.execute("set transaction isolation level repeatable read, read only")
        if snapshot_id:
            cur.execute("set transaction snapshot %s", (snapshot_id,))
        # JIT off: the catalog queries look expensive to the planner, and compiling them costs
        # more than running them
        cur.execute("""select set_config('search_path', '', true), set_config('DateStyle', 'ISO, YMD', true),
                              set_config('TimeZone', 'UTC', true), set_config('IntervalStyle', 'postgres', true),
                              set_config('extra_float_digits', '1', true), set_config('bytea_output', 'hex', true),
                              set_config('lc_monetary', 'C', true), set_config('row_security', 'off', true),
                              set_config('lock_timeout', %s, true), set_config('jit', 'off', true)""",
                    (lock_timeout,))
        yield cur
        read = True
    finally:
        # A read-only transaction that read what it wanted ends with COMMIT (it changed nothing): ended by
        # ROLLBACK it would count as a failed one in pg_stat_database, which maintenance judges.
        if not conn.closed:
            if conn.autocommit:
                cur.execute("commit" if read else "rollback")   # psycopg2 does not know of the transaction we began
            else:
                conn.commit() if read else conn.rollback()
        cur.close()


# -- the catalog description -----------------------------------------------------------------
# Each query returns (line,) rows; APP_SCHEMAS is the array of app schemas. Extension members are
# described by their extension (name, version), not one by one.

_NOT_EXTENSION_MEMBER = """not exists (select 1 from pg_depend e where e.classid = {cls}::regclass
                             and e.objid = {oid} and e.deptype = 'e')"""
_ACL_LINES = """
    select format('%s %s: %s %s%s (granted by %s)', kind, obj,
                  case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end,
                  a.privilege_type, case when a.is_grantable then ' WITH GRANT OPTION' else '' end,
                  pg_get_userbyid(a.grantor))
    from acls, aclexplode(acls.acl) a
    where a.grantee <> a.grantor  -- an owner's own privileges are implicit (and MAINTAIN exists only from 17)"""

CATALOG_QUERIES: dict[str, str] = {
    "schemas": """
        select format('%s owner=%s', quote_ident(n.nspname), pg_get_userbyid(n.nspowner))
        from pg_namespace n where n.nspname = any(APP_SCHEMAS)""",
    "tables": """
        select format('%s kind=%s owner=%s persistence=%s options=%s partition_key=%s partition_of=%s',
                      c.oid::regclass, c.relkind, pg_get_userbyid(c.relowner), c.relpersistence,
                      coalesce(array_to_string(c.reloptions, ','), ''),
                      case when c.relkind = 'p' then pg_get_partkeydef(c.oid) else '' end,
                      coalesce((select i.inhparent::regclass::text || ' ' || pg_get_expr(c.relpartbound, c.oid)
                                from pg_inherits i where i.inhrelid = c.oid and c.relispartition), ''))
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS) and c.relkind in ('r', 'p', 'f')""",
    "columns": """
        select format('%s #%s %s %s%s%s%s%s%s', c.oid::regclass,
                      row_number() over (partition by c.oid order by a.attnum), quote_ident(a.attname),
                      format_type(a.atttypid, a.atttypmod),
                      case when a.attnotnull then ' not null' else '' end,
                      coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), ''),
                      case a.attidentity when 'a' then ' generated always as identity'
                                         when 'd' then ' generated by default as identity' else '' end,
                      case when a.attgenerated <> '' then ' generated ' || a.attgenerated::text else '' end,
                      case when a.attcollation <> t.typcollation
                           then ' collate ' || (select quote_ident(collname) from pg_collation where oid = a.attcollation)
                           else '' end)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
        join pg_type t on t.oid = a.atttypid
        left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
        where n.nspname = any(APP_SCHEMAS) and c.relkind in ('r', 'p', 'f', 'v', 'm', 'c')""",
    "constraints": """
        select format('%s on %s: %s', quote_ident(co.conname),
                      case when co.conrelid <> 0 then co.conrelid::regclass::text else co.contypid::regtype::text end,
                      pg_get_constraintdef(co.oid, true))
        from pg_constraint co join pg_namespace n on n.oid = co.connamespace
        where n.nspname = any(APP_SCHEMAS)
          and co.contype <> 'n'  -- NOT NULL: a column's nullability already says it (and 18 lists it here)""",
    "indexes": """
        select pg_get_indexdef(i.indexrelid) || case when i.indisvalid then '' else ' INVALID' end
                 || case when i.indisclustered then ' CLUSTERED' else '' end
        from pg_index i join pg_class c on c.oid = i.indexrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS)""",
    "functions": f"""
        select format('%s.%s(%s) returns %s kind=%s language=%s security_definer=%s volatility=%s strict=%s '
                      'leakproof=%s parallel=%s config=%s owner=%s arguments=(%s) body_md5=%s',
                      quote_ident(n.nspname), quote_ident(p.proname), pg_get_function_identity_arguments(p.oid),
                      coalesce(pg_get_function_result(p.oid), 'void'), p.prokind, l.lanname, p.prosecdef,
                      p.provolatile, p.proisstrict, p.proleakproof, p.proparallel,
                      coalesce(array_to_string(p.proconfig, ','), ''), pg_get_userbyid(p.proowner),
                      pg_get_function_arguments(p.oid),
                      md5(coalesce(pg_get_function_sqlbody(p.oid), p.prosrc, '')))
        from pg_proc p join pg_namespace n on n.oid = p.pronamespace join pg_language l on l.oid = p.prolang
        where n.nspname = any(APP_SCHEMAS) and {_NOT_EXTENSION_MEMBER.format(cls="'pg_proc'", oid='p.oid')}""",
    "triggers": """
        select pg_get_triggerdef(t.oid, true) || ' enabled=' || t.tgenabled::text
        from pg_trigger t join pg_class c on c.oid = t.tgrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS) and not t.tgisinternal""",
    "policies": """
        select format('%s on %s: %s for %s to %s using (%s) with check (%s)', quote_ident(p.polname),
                      p.polrelid::regclass, case when p.polpermissive then 'permissive' else 'restrictive' end,
                      case p.polcmd when 'r' then 'select' when 'a' then 'insert' when 'w' then 'update'
                                    when 'd' then 'delete' else 'all' end,
                      (select string_agg(case when r = 0 then 'public' else pg_get_userbyid(r) end, ','
                                         order by case when r = 0 then 'public' else pg_get_userbyid(r) end)
                       from unnest(p.polroles) r),
                      coalesce(pg_get_expr(p.polqual, p.polrelid), ''),
                      coalesce(pg_get_expr(p.polwithcheck, p.polrelid), ''))
        from pg_policy p join pg_class c on c.oid = p.polrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS)""",
    "rls": """
        select format('%s row_level_security=%s forced=%s', c.oid::regclass, c.relrowsecurity, c.relforcerowsecurity)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS) and c.relkind in ('r', 'p')""",
    # A NULL ACL means the default: compare what is granted, not how it is spelled.
    "grants": f"""
        with acls(kind, obj, acl) as (
          select 'SCHEMA', quote_ident(n.nspname), coalesce(n.nspacl, acldefault('n', n.nspowner))
          from pg_namespace n where n.nspname = any(APP_SCHEMAS)
          union all
          select case c.relkind when 'S' then 'SEQUENCE' else 'TABLE' end, c.oid::regclass::text,
                 coalesce(c.relacl, acldefault((case c.relkind when 'S' then 's' else 'r' end)::"char", c.relowner))
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = any(APP_SCHEMAS) and c.relkind in ('r', 'p', 'f', 'v', 'm', 'S')
          union all
          select 'COLUMN', a.attrelid::regclass::text || '.' || quote_ident(a.attname), a.attacl
          from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
          where n.nspname = any(APP_SCHEMAS) and a.attacl is not null and not a.attisdropped
          union all
          select 'FUNCTION', format('%s.%s(%s)', quote_ident(n.nspname), quote_ident(p.proname),
                                    pg_get_function_identity_arguments(p.oid)),
                 coalesce(p.proacl, acldefault('f', p.proowner))
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname = any(APP_SCHEMAS)
          union all
          select 'TYPE', t.oid::regtype::text, coalesce(t.typacl, acldefault('T', t.typowner))
          from pg_type t join pg_namespace n on n.oid = t.typnamespace
          where n.nspname = any(APP_SCHEMAS) and t.typtype in ('e', 'd', 'r', 'm', 'b')
            and not exists (select 1 from pg_type e where e.typarray = t.oid)
        ) {_ACL_LINES}""",
    "default_privileges": """
        select format('for role %s in schema %s on %s: %s %s%s (granted by %s)', pg_get_userbyid(d.defaclrole),
                      coalesce(quote_ident(n.nspname), '*'), d.defaclobjtype,
                      case when a.grantee = 0 then 'PUBLIC' else pg_get_userbyid(a.grantee) end,
                      a.privilege_type, case when a.is_grantable then ' WITH GRANT OPTION' else '' end,
                      pg_get_userbyid(a.grantor))
        from pg_default_acl d left join pg_namespace n on n.oid = d.defaclnamespace,
             aclexplode(d.defaclacl) a
        where d.defaclnamespace = 0 or n.nspname = any(APP_SCHEMAS)""",
    "sequences": """
        select format('%s type=%s start=%s increment=%s min=%s max=%s cache=%s cycle=%s owned_by=%s',
                      c.oid::regclass, s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax,
                      s.seqcache, s.seqcycle,
                      coalesce((select d.refobjid::regclass::text || '.' || quote_ident(a.attname)
                                from pg_depend d join pg_attribute a on a.attrelid = d.refobjid and a.attnum = d.refobjsubid
                                where d.classid = 'pg_class'::regclass and d.objid = c.oid
                                  and d.refclassid = 'pg_class'::regclass and d.deptype in ('a', 'i')
                                limit 1), ''))
        from pg_sequence s join pg_class c on c.oid = s.seqrelid join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS)""",
    "views": """
        select format('%s kind=%s owner=%s options=%s: %s', c.oid::regclass, c.relkind, pg_get_userbyid(c.relowner),
                      coalesce(array_to_string(c.reloptions, ','), ''),
                      regexp_replace(btrim(pg_get_viewdef(c.oid, true)), '\\s+', ' ', 'g'))
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = any(APP_SCHEMAS) and c.relkind in ('v', 'm')""",
    "types": f"""
        select format('%s kind=%s owner=%s %s', t.oid::regtype, t.typtype, pg_get_userbyid(t.typowner),
                      case t.typtype
                        when 'e' then 'labels=' || (select string_agg(quote_literal(e.enumlabel), ',' order by e.enumsortorder)
                                                    from pg_enum e where e.enumtypid = t.oid)
                        when 'd' then format('base=%s not_null=%s default=%s', format_type(t.typbasetype, t.typtypmod),
                                             t.typnotnull, coalesce(t.typdefault, ''))
                        when 'r' then 'subtype=' || (select r.rngsubtype::regtype::text from pg_range r where r.rngtypid = t.oid)
                        else '' end)
        from pg_type t join pg_namespace n on n.oid = t.typnamespace
        where n.nspname = any(APP_SCHEMAS) and t.typtype in ('e', 'd', 'r', 'b')
          and not exists (select 1 from pg_type e where e.typarray = t.oid)
          and {_NOT_EXTENSION_MEMBER.format(cls="'pg_type'", oid='t.oid')}""",
    "extensions": """
        select format('%s version=%s schema=%s', quote_ident(x.extname), x.extversion, quote_ident(n.nspname))
        from pg_extension x join pg_namespace n on n.oid = x.extnamespace
        where n.nspname = any(APP_SCHEMAS)""",
    "comments": """
        select format('%s %s: %s', i.type, i.identity, regexp_replace(d.description, '\\s+', ' ', 'g'))
        from pg_description d, pg_identify_object(d.classoid, d.objoid, d.objsubid) i
        where i.schema = any(APP_SCHEMAS)
           or (d.classoid = 'pg_namespace'::regclass and i.identity = any(APP_SCHEMAS_QUOTED))""",
}
OBJECT_KINDS = tuple(CATALOG_QUERIES)


def describe_catalog(cur, schemas: list[str]) -> dict[str, list[str]]:
    """{kind: sorted normalised lines} for the given schemas."""
    cur.execute("""select set_config('truthsource.snapshot_schemas', %s::text[]::text, true),
                          set_config('truthsource.snapshot_schemas_quoted',
                                     array(select quote_ident(s) from unnest(%s::text[]) s)::text, true)""",
                (schemas, schemas))
    objects = {}
    for kind, query in CATALOG_QUERIES.items():
        query = (query.replace("APP_SCHEMAS_QUOTED", "current_setting('truthsource.snapshot_schemas_quoted')::text[]")
                      .replace("APP_SCHEMAS", "current_setting('truthsource.snapshot_schemas')::text[]"))
        objects[kind] = sorted(r[0] for r in _all(cur, query))
    return objects


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_of(objects: dict[str, list[str]]) -> tuple[str, dict[str, str]]:
    parts = {kind: _sha("\n".join(lines)) for kind, lines in sorted(objects.items())}
    return _sha("\n".join(f"{kind}:{digest}" for kind, digest in parts.items())), parts


# -- taking one ------------------------------------------------------------------------------

# Types whose hash is of their value alone (module docstring), as format_type names them; their
# arrays too. Any other column is hashed as its text.
HASHED_BY_VALUE = ("smallint", "integer", "bigint", "numeric", "real", "double precision", "boolean",
                   "text", "character varying", "character", "uuid", "date", "time without time zone",
                   "time with time zone", "timestamp without time zone", "timestamp with time zone",
                   "interval", "jsonb", "bytea", "inet", "cidr", "macaddr")
HASH_COLUMNS_SQL = """select a.attname, regexp_replace(format_type(a.atttypid, null), '\\[\\]$', '') = any(%s)
from pg_attribute a
where a.attrelid = %s::regclass and a.attnum > 0 and not a.attisdropped
order by a.attnum"""
ROW_HASH_OUTLINE = "hash_record_extended(row(<each column, or its ::text>), 0)"


def row_hash(cur, ident: sql.Composable, alias: str = "r") -> sql.Composed:
    """The 64-bit hash of a row of table `ident` read as `alias` (module docstring)."""
    cur.execute(HASH_COLUMNS_SQL, (list(HASHED_BY_VALUE), ident.as_string(cur)))
    columns = [sql.SQL("{}.{}" if by_value else "{}.{}::text").format(sql.Identifier(alias), sql.Identifier(name))
               for name, by_value in cur.fetchall()]
    return sql.SQL("hash_record_extended(row({}), 0)").format(sql.SQL(", ").join(columns))


# One read of a table: its row count and checksum (module docstring). No ORDER BY, no sort: the
# sum is a parallel aggregate (over an int128 state where the server has one), and the row count
# comes from the same scan.
CHECKSUM_SQL = """select count(*), md5(format('%s:%s', count(*), coalesce(sum({row_hash}), 0)))
from {table} as r"""


def count_rows(cur, ident) -> int:
    """count(*) of one table."""
    cur.execute(sql.SQL("select count(*) from {}").format(ident))
    return cur.fetchone()[0]


def _count_and_checksum(cur, ident) -> tuple[int, str]:
    cur.execute(sql.SQL(CHECKSUM_SQL).format(row_hash=row_hash(cur, ident), table=ident))
    return cur.fetchone()


def take_snapshot(conn, *, checksum_row_limit: int | None = None, lock_timeout: str = "30s",
                  snapshot_id: str | None = None) -> dict:
    """Row counts, schema fingerprint and content checksums of the database `conn` is on
    (as of an exported snapshot, `pg_export_snapshot()`, when one is given).

    Every app table is checksummed unless `checksum_row_limit` is given: then tables of more rows
    are only counted (0: counts alone, for a change check that compares nothing else)."""
    with _consistent_read(conn, lock_timeout, snapshot_id) as cur:
        database, server_version, taken_at = _all(cur, """
            select current_database(), current_setting('server_version'),
                   to_char(clock_timestamp(), 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""")[0]
        counted = data_schemas(cur)
        apps = [s for s in counted if is_app_schema(s)]
        tables = _all(cur, f"""
            select n.nspname, c.relname, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where {SYSTEM_SCHEMA_SQL} and n.nspname <> %s and c.relkind in ('r', 'p')
            order by 1, 2""", (HISTORY_SCHEMA,))
        row_counts: dict[str, int] = {}
        content: dict[str, str] = {}
        for schema, name, key in tables:
            ident = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))
            if schema not in apps:
                row_counts[key] = count_rows(cur, ident)
            elif checksum_row_limit is None:
                row_counts[key], content[key] = _count_and_checksum(cur, ident)
            else:
                row_counts[key] = count = count_rows(cur, ident)
                content[key] = (f"skipped: {count} rows" if count > checksum_row_limit
                                else _count_and_checksum(cur, ident)[1])
        for key, last_value, is_called in _all(cur, """
                select quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value,
                       last_value is not null
                from pg_sequences where schemaname = any(%s)""", (apps,)):
            content[key] = f"sequence last_value={last_value} is_called={str(is_called).lower()}"
        objects = describe_catalog(cur, apps)
    fingerprint, parts = fingerprint_of(objects)
    return {
        "format": SNAPSHOT_FORMAT,
        "taken_at": taken_at,
        "database": database,
        "server_version": server_version,
        "app_schemas": apps,
        "counted_schemas": counted,
        "checksum_method": CHECKSUM_METHOD,
        "checksum_row_limit": checksum_row_limit,
        "row_counts": dict(sorted(row_counts.items())),
        "fingerprint": fingerprint,
        "fingerprint_parts": parts,
        "objects": objects,
        "content": dict(sorted(content.items())),
    }


def save_snapshot(snap: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    records.make_folder(path.parent)
    records.write_text(path, json.dumps(snap, indent=1, sort_keys=True) + "\n")
    return path


def load_snapshot(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        snap = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None
    missing = [k for k in ("row_counts", "fingerprint", "fingerprint_parts", "objects", "content") if k not in snap]
    if missing:
        raise SnapshotError(f"{path} is not a snapshot (missing {', '.join(missing)})")
    return snap


# -- comparing two ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CountRow:
    table: str
    before: int | None
    after: int | None
    status: str          # same | more | FEWER (rows lost) | MISSING (table gone) | new | drained (a work queue)

    @property
    def delta(self) -> int | None:
        return None if self.before is None or self.after is None else self.after - self.before


@dataclass
class Comparison:
    """Before against after: row counts, fingerprint, per-kind differences, content."""

    counts: list[CountRow]
    fingerprint_equal: bool
    differing_kinds: list[str]
    differences: dict[str, dict[str, list[str]]]      # kind -> {"added": [...], "removed": [...]}
    content_differences: dict[str, tuple[str | None, str | None]]
    content_unverified: list[str] = field(default_factory=list)   # skipped (over a row limit) on a side
    content_incomparable: list[str] = field(default_factory=list)  # checksummed by different methods
    checksum_methods: tuple[str, str] = (CHECKSUM_METHOD, CHECKSUM_METHOD)   # before, after

    @property
    def lost_rows(self) -> list[CountRow]:
        return [r for r in self.counts if r.status == "FEWER"]

    @property
    def drained_queues(self) -> list[CountRow]:
        return [r for r in self.counts if r.status == "drained"]

    @property
    def missing_tables(self) -> list[CountRow]:
        return [r for r in self.counts if r.status == "MISSING"]

    @property
    def ok_for_deploy(self) -> bool:
        """No table lost a row and no table is gone (new tables and rows are what deploys do)."""
        return not self.lost_rows and not self.missing_tables

    @property
    def counts_equal(self) -> bool:
        return all(r.status == "same" for r in self.counts)

    @property
    def identical(self) -> bool:
        """Same objects, same row counts, same content: what a rollback must achieve."""
        return self.fingerprint_equal and self.counts_equal and not self.content_differences

    def problems(self) -> list[str]:
        """One sentence per difference, worst first."""
        out = [f"{r.table}: {r.before} -> {r.after} rows ({r.delta:+d}): ROWS LOST" for r in self.lost_rows]
        out += [f"{r.table}: table is gone (had {r.before} rows)" for r in self.missing_tables]
        out += [f"{r.table}: new table ({r.after} rows)" for r in self.counts if r.status == "new"]
        out += [f"{r.table}: {r.before} -> {r.after} rows ({r.delta:+d})" for r in self.counts if r.status == "more"]
        out += [f"{r.table}: {r.before} -> {r.after or 0} rows ({(r.after or 0) - r.before:+d}): work queue drained (not a loss)"
                for r in self.drained_queues]
        for kind in self.differing_kinds:
            diff = self.differences[kind]
            out.append(f"{kind} differ: {len(diff['added'])} added, {len(diff['removed'])} removed")
        out += [f"{table}: content differs" for table in self.content_differences]
        return out

    def notes(self) -> list[str]:
        """What the comparison could not check, in sentences (not differences)."""
        out = []
        if self.content_incomparable:
            before, after = self.checksum_methods
            out.append(f"content of {len(self.content_incomparable)} tables not compared: their checksums were "
                       f"taken by different methods ({before} before, {after} after); counts and schema are compared")
        if self.content_unverified:
            out.append(f"content of {len(self.content_unverified)} tables not compared: not checksummed "
                       f"(over a row limit): {', '.join(self.content_unverified)}")
        return out

    def count_table(self) -> list[dict]:
        """Rows for a pass/fail table in a notebook."""
        return [{"table": r.table, "before": r.before, "after": r.after, "delta": r.delta, "status": r.status}
                for r in self.counts]

    def as_dict(self) -> dict:
        return {
            "identical": self.identical, "ok_for_deploy": self.ok_for_deploy,
            "fingerprint_equal": self.fingerprint_equal, "differing_kinds": self.differing_kinds,
            "counts": self.count_table(), "differences": self.differences,
            "content_differences": {k: list(v) for k, v in self.content_differences.items()},
            "content_unverified": self.content_unverified, "content_incomparable": self.content_incomparable,
            "checksum_methods": list(self.checksum_methods), "problems": self.problems(), "notes": self.notes(),
        }


def checksum_method(snap: dict) -> str:
    """How a snapshot's content checksums were taken (format 1 snapshots do not say: theirs)."""
    return snap.get("checksum_method", LEGACY_CHECKSUM_METHOD)


def is_work_queue(table: str) -> bool:
    """One of the deployment's own transient tables (WORK_QUEUES, WORK_QUEUE_PREFIXES)."""
    return table in WORK_QUEUES or table.startswith(WORK_QUEUE_PREFIXES)


def _count_status(table: str, before: int | None, after: int | None) -> str:
    if after is None:
        return "drained" if is_work_queue(table) else "MISSING"
    if before is None:
        return "new"
    if after < before:
        return "drained" if is_work_queue(table) else "FEWER"
    return "same" if after == before else "more"


def _is_skipped(value: str | None) -> bool:
    return value is not None and value.startswith("skipped:")


def _is_table_checksum(value: str | None) -> bool:
    return value is not None and not value.startswith(("skipped:", "sequence "))


def compare_snapshots(before: dict, after: dict) -> Comparison:
    counts = [CountRow(table, before["row_counts"].get(table), after["row_counts"].get(table),
                       _count_status(table, before["row_counts"].get(table), after["row_counts"].get(table)))
              for table in sorted(set(before["row_counts"]) | set(after["row_counts"]))]

    differences: dict[str, dict[str, list[str]]] = {}
    for kind in sorted(set(before["objects"]) | set(after["objects"])):
        old, new = set(before["objects"].get(kind, [])), set(after["objects"].get(kind, []))
        if old != new:
            differences[kind] = {"added": sorted(new - old), "removed": sorted(old - new)}
    differing = sorted(k for k in set(before["fingerprint_parts"]) | set(after["fingerprint_parts"])
                       if before["fingerprint_parts"].get(k) != after["fingerprint_parts"].get(k))

    methods = (checksum_method(before), checksum_method(after))
    content_diff: dict[str, tuple[str | None, str | None]] = {}
    unverified, incomparable = [], []
    for table in sorted(set(before["content"]) | set(after["content"])):
        b, a = before["content"].get(table), after["content"].get(table)
        if _is_skipped(b) or _is_skipped(a):
            unverified.append(table)      # a changed row count is reported by the counts
        elif methods[0] != methods[1] and _is_table_checksum(b) and _is_table_checksum(a):
            incomparable.append(table)
        elif b != a:
            content_diff[table] = (b, a)
    return Comparison(counts, before["fingerprint"] == after["fingerprint"], differing, differences,
                      content_diff, unverified, incomparable, methods)
