"""Rollback: put a run's preflight backup back, so the database equals its pre-deployment snapshot.

Why not ``pg_restore --clean``: it drops only the objects the *backup* knows about, so every
table, function, policy, trigger or schema the deployment created stays behind, and objects
that depend on them make the drops fail. A rollback must also leave the deployment history
alone: it records the rollback itself.

The *managed schemas* are the app schemas (not system, not ``truthsource``, not a Supabase
platform schema) that the backup has or that exist now (``public`` always counts as in the
backup: initdb creates it, so pg_dump never does). One that exists now and is in the backup is
**kept**: the schema stays -- owner, comment, privileges, other roles' default privileges in it
-- and only what is in it goes and comes back. One that exists only now (the deployment's,
e.g. ``private``) is **dropped**; one only in the backup is **created** from it.

1. Before anything changes (a refusal changes nothing):

   - the backup: sha256, table of contents and a full read (`backup.verify_backup`); the target
     is PostgreSQL 15+, the backup's database -- by name, and by the identity its ``backup.json``
     records (system identifier, oid, the uuid in ``truthsource``: see `identity`) -- and has
     every role the backup names as an owner;
   - `rollback_blockers`, the check the preflight also runs before a deployment starts: objects
     outside the managed schemas that emptying them would take along and the backup cannot put
     back (a view over an app table elsewhere; triggers, policies, foreign keys and indexes
     outside are put back, or go if the deployment made them); and for a role that is not a
     superuser: extensions in them it could not drop and re-create (untrusted ones; trusted ones
     whose owner lacks CREATE on the database or is a role it cannot act for), objects in them owned by
     roles it cannot act for (member with inherited privileges, and SET from 16), kept schemas
     it may not create in, what re-creating the outside objects needs, tables in a publication
     whose owner it cannot act for (dropped, they leave it; only its owner adds them back), INSERT
     on the history;
     and for a superuser: an extension in them owned by a role that could not create it itself
     (not a superuser, and the extension untrusted or no CREATE on the database) -- extensions are
     re-created by their owner (``SET ROLE`` around pg_restore's ``CREATE EXTENSION``), so that
     their members keep their owner and their grants their grantor;
   - the *kept entries* -- each kept schema's own SCHEMA/owner, COMMENT, ACL, and the DEFAULT
     ACL entries of roles other than the connecting one, global or in a kept schema -- are
     compared with what a fresh ``pg_dump --schema-only`` of the kept schemas writes for them.
     Unchanged, they are left alone. A kept schema whose own entries changed is dropped and
     created from the backup instead, when the role may (act for its owner and every owner in
     it, CREATE on the database); another role's changed default privileges are reset and
     restored when the role can act for it. Otherwise the plan is refused, naming what changed
     and who could put it back;
   - the archive's routines outside the managed schemas that no longer exist and that the role
     could have dropped (phase 1 drops duplicate updated-at functions wherever they live,
     ``extensions`` included) are put back with the rest.

2. The deployment history is read (`engine.read_history`); ``truthsource`` is never dropped or
   restored, so its rows survive; the script checks at the end that they are all still there.

3. One script between its own ``BEGIN`` and ``COMMIT``, run by the server's own ``psql -X -v
   ON_ERROR_STOP=1 --no-password`` (a failure anywhere rolls back all of it). Not psql's
   ``--single-transaction``: that sends COMMIT when its input ends, so a script cut short (its
   feeder killed with the runner and its kernel) would commit half a restore; this one's COMMIT is
   its last line, and a script that never reaches it is rolled back by the server:

   - the default privileges of the connecting role (global, and in the kept schemas; and of any
     role reset above) go back to the built-in ones. An object gets the default privileges of
     the role that creates it, and the connecting role creates every object here, so each one
     starts with exactly the privileges pg_dump's GRANTs are relative to; the archive's DEFAULT
     ACL entries of these roles come last and put theirs back. No other role's are touched;
   - ``DROP SCHEMA ... CASCADE`` of the dropped schemas; the kept ones are emptied: their
     extensions (``DROP EXTENSION ... CASCADE``), then every object in them that is not part of
     another one or of an extension (relations first, then sequences, types and domains,
     routines, operators, operator classes, statistics, collations, text search objects), each
     ``DROP ... CASCADE``; what is left raises an error;
   - a created ``public`` as initdb leaves it (owner ``pg_database_owner``, the standard comment,
     the initial privileges from ``pg_init_privs``): pg_dump writes only how public differs from
     that -- an ``ALTER SCHEMA public OWNER``, a comment, an ACL relative to ``pg_init_privs``;
   - the SQL of ``pg_restore -f - -L <list>``, in the archive's order: everything in the managed
     schemas (definitions, data, sequence positions, constraints, indexes, triggers, RLS,
     policies, comments, ACLs), the created schemas' own entries, their extensions (each by its
     owner of now, when another role owns it: ``SET ROLE``, ``CREATE EXTENSION``, ``RESET ROLE``), the outside
     objects put back, and the reset roles' DEFAULT ACL entries. Owners and ACLs are kept (no
     ``--no-owner``): RLS, SECURITY DEFINER functions and grants depend on them;
   - the history check and a ``rollback`` history row (version ``rollback``, the backup's file
     name and sha256, ``restored_to`` = when the backup was taken), as `engine.record_history`
     writes it.

   pg_restore streams into psql (no copy of the data on disk); if it fails halfway, psql is
   killed before its input ends (and would not commit if it read the end), so the server aborts
   the transaction. A pg_restore newer than
   the server writes ``SET transaction_timeout``, which servers before 17 do not know: that line
   is left out for them. ``lock_timeout`` bounds the wait for the drops' locks.

Callers hold `engine.run_lock` for the database while this runs, and prove the result by
comparing a snapshot with the preflight one (`snapshot.compare_snapshots(...).identical`).

This is what lets a database owner that is not a superuser roll back (Supabase's ``postgres``:
``public`` holds default privileges of ``supabase_admin``, a role it is not a member of):
nothing of a role it cannot act for is dropped or re-created; that is compared instead.

Limits: roles, database settings, event triggers, publications, casts and other database-wide
objects are left as they are; so is whatever the deployment created or altered in the platform
schemas or ``truthsource``. A re-created extension gets the server's default version. A created
``public`` has no ``pg_init_privs`` row, so later dumps spell out its whole ACL (same privileges).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import psycopg2

from . import connection, engine, pgtools
from .backup import (INFO_FILE, ArchiveListing, BackupError, TocEntry, describe_exit, read_listing,
                     redact, verify_backup)
from .identity import Identity, read_identity
from .snapshot import SYSTEM_SCHEMA_SQL, is_app_schema

DEFAULT_PUBLIC_INIT_PRIVS = ["=U/pg_database_owner"]   # initdb's, besides the owner's own
# Entries outside the managed schemas that the backup can put back once dropped with them.
RESTORABLE_OUTSIDE = {"trigger": "TRIGGER", "policy": "POLICY", "fk": "FK CONSTRAINT", "index": "INDEX"}
_EXTENSION_SQL = re.compile(r'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")+"|\S+) WITH SCHEMA ("(?:[^"]|"")+"|\S+);',
                            re.MULTILINE)
# Archive entries whose SQL pg_restore follows with ALTER ... OWNER TO their owner (and DEFAULT
# ACL entries, which say FOR ROLE their owner): restoring one means acting for that owner.
OWNED_ENTRY_TYPES = frozenset({
    "AGGREGATE", "COLLATION", "CONVERSION", "DEFAULT ACL", "DOMAIN", "FOREIGN TABLE", "FUNCTION",
    "MATERIALIZED VIEW", "OPERATOR", "OPERATOR CLASS", "OPERATOR FAMILY", "PROCEDURE", "SCHEMA", "SEQUENCE",
    "STATISTICS", "TABLE", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "TYPE", "VIEW"})
SCHEMA_LEVEL_TYPES = ("COMMENT", "ACL", "SECURITY LABEL")   # entries on a schema itself (tag 'SCHEMA name')
# The line of pg_restore's script output that introduces an entry.
_ENTRY_HEADER = re.compile(r"^-- (?:Data for )?Name: (.*); Type: (.*); Schema: (.*); Owner: (.*)$")


class RestoreError(RuntimeError):
    """The rollback did not happen; the message says why and whether anything changed."""


class RestoreRefused(RestoreError):
    """Refused before anything changed."""


class RestoreFailed(RestoreError):
    """The restore script failed; its single transaction was rolled back."""


def _unquote(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _quote_ident(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _literal(value) -> str:
    text = str(value)
    if "\x00" in text:
        raise RestoreRefused("a value for the restore script contains a NUL character")
    return "'" + text.replace("'", "''") + "'"


@dataclass
class OutsideObject:
    """An object outside the managed schemas that dropping them would take along."""

    kind: str                 # trigger | policy | fk | index | other
    identity: str             # as PostgreSQL names it
    schema: str | None
    table: str | None
    name: str | None
    toc: list[int] = field(default_factory=list)    # archive entries that put it back

    @property
    def in_backup(self) -> bool:
        return bool(self.toc)


@dataclass
class RestorePlan:
    """Everything decided and checked before anything changes."""

    backup_path: Path
    backup_sha256: str
    database: str
    server_version: str
    server_version_num: int
    current_user: str
    superuser: bool
    managed_schemas: list[str]
    dropped_schemas: list[str]        # DROP SCHEMA ... CASCADE: created by the deployment, or replaced
    kept_schemas: list[str]           # here now and in the backup: emptied, the schema itself kept
    replaced_schemas: list[str]       # kept schemas whose owner, comment or privileges changed: dropped, created again
    restored_schemas: list[str]       # managed schemas the backup has
    default_privileges_reset: list[str]   # roles whose default privileges are reset and restored
    kept_as_they_are: list[str]       # compared with the backup, unchanged, left alone
    entries: list[TocEntry]
    toc_summary: dict
    extensions: list[str]             # re-created from the backup
    outside_restored: list[OutsideObject]
    outside_dropped: list[OutsideObject]   # created after the backup: they go
    outside_recreated: list[str]      # routines outside them that the deployment dropped: back from the archive
    history_rows: list[dict]
    history_exists: bool
    prelude_sql: str
    postlude_sql: str
    pg_restore: pgtools.Tool
    psql: pgtools.Tool
    run_id: str
    operator: str
    restored_to: str
    warnings: list[str] = field(default_factory=list)
    extension_owners: dict[str, str] = field(default_factory=dict)  # re-created as their owner (SET ROLE)

    def describe(self) -> dict:
        """What the notebook shows (and the record keeps) before the restore runs."""
        return {
            "backup": str(self.backup_path), "sha256": self.backup_sha256, "database": self.database,
            "server_version": self.server_version, "connected_as": self.current_user,
            "superuser": self.superuser, "managed_schemas": self.managed_schemas,
            "dropped_schemas": self.dropped_schemas, "kept_schemas": self.kept_schemas,
            "replaced_schemas": self.replaced_schemas, "restored_schemas": self.restored_schemas,
            "default_privileges_reset": self.default_privileges_reset, "kept_as_they_are": self.kept_as_they_are,
            "archive_entries_restored": len(self.entries), "archive_entries_by_type": self.toc_summary,
            "extensions_recreated": [f"{x} (as its owner {self.extension_owners[x]})" if x in self.extension_owners
                                     else x for x in self.extensions],
            "outside_objects_restored": [o.identity for o in self.outside_restored],
            "outside_objects_dropped": [o.identity for o in self.outside_dropped],
            "outside_objects_recreated": self.outside_recreated,
            "history_rows_kept": len(self.history_rows), "restored_to": self.restored_to,
            "pg_restore": self.pg_restore.as_dict(), "psql": self.psql.as_dict(),
            "warnings": self.warnings, "prelude_sql": self.prelude_sql, "postlude_sql": self.postlude_sql,
        }


@dataclass
class RestoreResult:
    backup_path: str
    backup_sha256: str
    database: str
    run_id: str
    operator: str
    restored_to: str
    managed_schemas: list[str]
    dropped_schemas: list[str]
    kept_schemas: list[str]
    replaced_schemas: list[str]
    restored_schemas: list[str]
    default_privileges_reset: list[str]
    kept_as_they_are: list[str]
    archive_entries_restored: int
    extensions_recreated: list[str]
    outside_objects_restored: list[str]
    outside_objects_dropped: list[str]
    outside_objects_recreated: list[str]
    history_rows_kept: int
    rollback_row: dict
    seconds: float
    psql_messages: str
    pg_restore: dict
    psql: dict
    warnings: list[str]
    prelude_sql: str
    postlude_sql: str

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# -- reading the target ------------------------------------------------------------------------

_OUTSIDE_SQL = """
with recursive managed as (
  select oid from pg_namespace where nspname = any(%(schemas)s)
), closure(classid, objid, objsubid) as (
  select 'pg_namespace'::regclass::oid, oid, 0 from managed
  union
  select x.classid, x.objid, x.objsubid
  from closure c cross join lateral (
    -- what depends on it goes with it ...
    select d.classid, d.objid, d.objsubid from pg_depend d
    where d.refclassid = c.classid and d.refobjid = c.objid and (c.objsubid = 0 or d.refobjsubid = c.objsubid)
      and d.deptype in ('n', 'a', 'e', 'x', 'i', 'P', 'S')
    union all
    -- ... and what it is an internal part of (a view's rewrite rule takes the view)
    select d.refclassid, d.refobjid, d.refobjsubid from pg_depend d
    where d.classid = c.classid and d.objid = c.objid and d.objsubid = c.objsubid and d.deptype = 'i'
  ) x
), placed as (
  select c.*, case c.classid
      when 'pg_namespace'::regclass then c.objid
      when 'pg_class'::regclass then (select relnamespace from pg_class where oid = c.objid)
      when 'pg_type'::regclass then (select typnamespace from pg_type where oid = c.objid)
      when 'pg_proc'::regclass then (select pronamespace from pg_proc where oid = c.objid)
      when 'pg_constraint'::regclass then (select connamespace from pg_constraint where oid = c.objid)
      when 'pg_trigger'::regclass then (select r.relnamespace from pg_trigger t join pg_class r on r.oid = t.tgrelid where t.oid = c.objid)
      when 'pg_policy'::regclass then (select r.relnamespace from pg_policy p join pg_class r on r.oid = p.polrelid where p.oid = c.objid)
      when 'pg_rewrite'::regclass then (select r.relnamespace from pg_rewrite w join pg_class r on r.oid = w.ev_class where w.oid = c.objid)
      when 'pg_attrdef'::regclass then (select r.relnamespace from pg_attrdef a join pg_class r on r.oid = a.adrelid where a.oid = c.objid)
      when 'pg_default_acl'::regclass then (select nullif(defaclnamespace, 0) from pg_default_acl where oid = c.objid)
      when 'pg_extension'::regclass then (select extnamespace from pg_extension where oid = c.objid)
      when 'pg_amop'::regclass then (select f.opfnamespace from pg_amop a join pg_opfamily f on f.oid = a.amopfamily where a.oid = c.objid)
      when 'pg_amproc'::regclass then (select f.opfnamespace from pg_amproc a join pg_opfamily f on f.oid = a.amprocfamily where a.oid = c.objid)
      when 'pg_opclass'::regclass then (select opcnamespace from pg_opclass where oid = c.objid)
      when 'pg_opfamily'::regclass then (select opfnamespace from pg_opfamily where oid = c.objid)
      when 'pg_operator'::regclass then (select oprnamespace from pg_operator where oid = c.objid)
      when 'pg_collation'::regclass then (select collnamespace from pg_collation where oid = c.objid)
      when 'pg_conversion'::regclass then (select connamespace from pg_conversion where oid = c.objid)
      when 'pg_statistic_ext'::regclass then (select stxnamespace from pg_statistic_ext where oid = c.objid)
      when 'pg_ts_config'::regclass then (select cfgnamespace from pg_ts_config where oid = c.objid)
      when 'pg_ts_dict'::regclass then (select dictnamespace from pg_ts_dict where oid = c.objid)
      when 'pg_ts_parser'::regclass then (select prsnamespace from pg_ts_parser where oid = c.objid)
      when 'pg_ts_template'::regclass then (select tmplnamespace from pg_ts_template where oid = c.objid)
      when 'pg_publication_rel'::regclass then (select r.relnamespace from pg_publication_rel p join pg_class r on r.oid = p.prrelid where p.oid = c.objid)
      when 'pg_publication_namespace'::regclass then (select pnnspid from pg_publication_namespace where oid = c.objid)
    end as home
  from closure c
)
select p.classid::regclass::text, i.type, i.identity, n.nspname,
       -- a member of an extension that lives in a managed schema is re-created with it
       exists (select 1 from pg_depend e join pg_extension x on x.oid = e.refobjid
               where e.classid = p.classid and e.objid = p.objid and e.deptype in ('e', 'x')
                 and e.refclassid = 'pg_extension'::regclass and x.extnamespace in (select oid from managed)),
       t.tgisinternal, tr.relname, t.tgname, po.polname, pr.relname, co.contype, cr.relname, co.conname,
       ic.relname, (select ir.relname from pg_index ix join pg_class ir on ir.oid = ix.indrelid where ix.indexrelid = ic.oid),
       p.objsubid,
       -- an internal part of another object (a view's rewrite rule, a multirange's cast) follows it
       exists (select 1 from pg_depend d where d.classid = p.classid and d.objid = p.objid
               and d.objsubid = p.objsubid and d.deptype = 'i')
from placed p
cross join lateral pg_identify_object(p.classid, p.objid, p.objsubid) i
left join pg_namespace n on n.oid = p.home
left join pg_trigger t on p.classid = 'pg_trigger'::regclass and t.oid = p.objid
left join pg_class tr on tr.oid = t.tgrelid
left join pg_policy po on p.classid = 'pg_policy'::regclass and po.oid = p.objid
left join pg_class pr on pr.oid = po.polrelid
left join pg_constraint co on p.classid = 'pg_constraint'::regclass and co.oid = p.objid
left join pg_class cr on cr.oid = co.conrelid
left join pg_class ic on p.classid = 'pg_class'::regclass and ic.oid = p.objid and ic.relkind in ('i', 'I') and p.objsubid = 0
where p.home is null or p.home not in (select oid from managed)
"""


def _outside_objects(cur, schemas: list[str]) -> list[OutsideObject]:
    # the estimate of this catalog walk is far above jit_above_cost; compiling it costs 0.25 s
    cur.execute("set local jit = off")
    cur.execute(_OUTSIDE_SQL, {"schemas": schemas})
    found: list[OutsideObject] = []
    for (classid, type_, identity, schema, ext_member, tg_internal, tg_rel, tg_name, pol_name, pol_rel,
         contype, con_rel, con_name, idx_name, idx_rel, objsubid, internal_part) in cur.fetchall():
        if ext_member or schema in ("pg_toast",):
            continue  # goes and comes back with its extension / is storage of a managed table
        if internal_part:
            continue  # goes and comes back with the object it is part of (the walk finds that one too)
        if classid == "pg_trigger" and tg_internal:
            continue  # foreign-key triggers belong to their constraint
        if classid == "pg_type" and schema is not None:
            # the row type or array type of a relation follows the relation
            cur.execute("select typrelid <> 0 or typcategory = 'A' from pg_type where oid = to_regtype(%s)", (identity,))
            row = cur.fetchone()
            if row and row[0]:
                continue
        if classid == "pg_trigger":
            found.append(OutsideObject("trigger", identity, schema, tg_rel, tg_name))
        elif classid == "pg_policy":
            found.append(OutsideObject("policy", identity, schema, pol_rel, pol_name))
        elif classid == "pg_constraint" and contype == "f":
            found.append(OutsideObject("fk", identity, schema, con_rel, con_name))
        elif classid == "pg_class" and idx_name and not objsubid:
            found.append(OutsideObject("index", identity, schema, idx_rel, idx_name))
        else:
            found.append(OutsideObject("other", f"{type_} {identity}", schema, None, None))
    # a relation's rewrite rule duplicates the view it belongs to
    return sorted({o.identity: o for o in found if not o.identity.startswith("rule ")}.values(),
                  key=lambda o: o.identity)


def _toc_for_outside(obj: OutsideObject, listing: ArchiveListing) -> list[int]:
    if obj.kind not in RESTORABLE_OUTSIDE:
        return []
    wanted_type = RESTORABLE_OUTSIDE[obj.kind]
    tag = obj.name if obj.kind == "index" else f"{obj.table} {obj.name}"
    comment_tags = {"trigger": f"TRIGGER {obj.name} ON {obj.table}", "policy": f"POLICY {obj.name} ON {obj.table}",
                    "fk": f"CONSTRAINT {obj.name} ON {obj.table}", "index": f"INDEX {obj.name}"}
    main = [e.dump_id for e in listing.entries
            if e.type == wanted_type and e.namespace == obj.schema and e.tag == tag]
    if not main:
        return []
    extra = [e.dump_id for e in listing.entries
             if e.type in ("COMMENT", "SECURITY LABEL") and e.namespace == obj.schema
             and e.tag == comment_tags[obj.kind]]
    return main + extra


def _archive_sql(pg_restore: pgtools.Tool, path: Path, entries: list[TocEntry], what: str) -> str:
    """The SQL script pg_restore writes for these entries of the archive (read, never run)."""
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listfile:
        listfile.write("".join(e.line + "\n" for e in entries))
        listfile.flush()
        proc = subprocess.run([str(pg_restore.path), "-L", listfile.name, "-f", "-", str(path)],
                              capture_output=True, text=True, env=pgtools.tool_env())
    if proc.returncode != 0:
        raise RestoreRefused(f"cannot read {what} {path.name}: {redact(proc.stderr.strip())}. Nothing was changed.")
    return proc.stdout


def _extension_schemas(pg_restore: pgtools.Tool, path: Path, entries: list[TocEntry]) -> dict[str, str]:
    """{extension: schema} as the archive creates them (the listing does not say)."""
    if not entries:
        return {}
    script = _archive_sql(pg_restore, path, entries, "the extensions in")
    return {_unquote(m.group(1)): _unquote(m.group(2)) for m in _EXTENSION_SQL.finditer(script)}


def _public_baseline(init_privs: list[str] | None) -> list[str]:
    """`public` as initdb leaves it; the archive's entries then say what differs."""
    sql = ["CREATE SCHEMA public;",
           "ALTER SCHEMA public OWNER TO pg_database_owner;",
           "COMMENT ON SCHEMA public IS 'standard public schema';"]
    for item in (DEFAULT_PUBLIC_INIT_PRIVS if init_privs is None else init_privs):
        grantee, _, rest = item.partition("=")
        privileges, _, _grantor = rest.partition("/")
        if grantee == "pg_database_owner":
            continue   # the owner's own privileges are implicit
        names = {"U": "USAGE", "C": "CREATE"}
        for letter in privileges.replace("*", ""):
            grant_option = f"{letter}*" in privileges
            sql.append(f"GRANT {names[letter]} ON SCHEMA public TO {grantee or 'PUBLIC'}"
                       + (" WITH GRANT OPTION;" if grant_option else ";"))
    return sql


def _acts_for(role: str) -> str:
    """SQL: may the connecting role act for `role` (an SQL expression: name or oid)? It needs the
    role's privileges (to drop what it owns) and, from PostgreSQL 16, SET ROLE to it (ALTER ...
    OWNER TO and ALTER DEFAULT PRIVILEGES FOR ROLE ask for that; 15 asks for membership)."""
    return (f"(case when pg_catalog.current_setting('server_version_num')::int >= 160000 "
            f"then pg_catalog.pg_has_role(current_user, {role}, 'USAGE') "
            f"and pg_catalog.pg_has_role(current_user, {role}, 'SET') "
            f"else pg_catalog.pg_has_role(current_user, {role}, 'USAGE') end)")


def _text_array(values) -> str:
    return "ARRAY[" + ", ".join(_literal(v) for v in values) + "]::text[]"


# Every object that lives in the schemas {namespaces} (an SQL oid[] expression) and is not part of
# another object (array and row types, identity sequences, range constructors; a composite type is
# its pg_type row, its pg_class row is part of it) or of an extension:
# (classid, objid, owner, drop_order). Relations go first; what CASCADE takes along is gone by the
# time its turn comes. Text search parsers and templates have no owner: a superuser's (10).
_OBJECTS_IN_SCHEMAS = """
select o.classid, o.objid, o.owner, o.drop_order from (
  select 'pg_catalog.pg_class'::pg_catalog.regclass::oid as classid, c.oid as objid, c.relowner as owner,
         case c.relkind when 'S' then 2 else 1 end as drop_order
    from pg_catalog.pg_class c where c.relnamespace = any ({namespaces}) and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
  union all select 'pg_catalog.pg_type'::pg_catalog.regclass::oid, t.oid, t.typowner, 3
    from pg_catalog.pg_type t where t.typnamespace = any ({namespaces})
     and (t.typrelid = 0 or t.typtype = 'c' and (select r.relkind from pg_catalog.pg_class r where r.oid = t.typrelid) = 'c')
  union all select 'pg_catalog.pg_proc'::pg_catalog.regclass::oid, p.oid, p.proowner, 4
    from pg_catalog.pg_proc p where p.pronamespace = any ({namespaces})
  union all select 'pg_catalog.pg_operator'::pg_catalog.regclass::oid, o.oid, o.oprowner, 5
    from pg_catalog.pg_operator o where o.oprnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_opfamily'::pg_catalog.regclass::oid, f.oid, f.opfowner, 6
    from pg_catalog.pg_opfamily f where f.opfnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_opclass'::pg_catalog.regclass::oid, c.oid, c.opcowner, 6
    from pg_catalog.pg_opclass c where c.opcnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass::oid, s.oid, s.stxowner, 7
    from pg_catalog.pg_statistic_ext s where s.stxnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_collation'::pg_catalog.regclass::oid, c.oid, c.collowner, 7
    from pg_catalog.pg_collation c where c.collnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_conversion'::pg_catalog.regclass::oid, c.oid, c.conowner, 7
    from pg_catalog.pg_conversion c where c.connamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_config'::pg_catalog.regclass::oid, c.oid, c.cfgowner, 7
    from pg_catalog.pg_ts_config c where c.cfgnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_dict'::pg_catalog.regclass::oid, d.oid, d.dictowner, 8
    from pg_catalog.pg_ts_dict d where d.dictnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_parser'::pg_catalog.regclass::oid, p.oid, 10::oid, 9
    from pg_catalog.pg_ts_parser p where p.prsnamespace = any ({namespaces})
  union all select 'pg_catalog.pg_ts_template'::pg_catalog.regclass::oid, t.oid, 10::oid, 9
    from pg_catalog.pg_ts_template t where t.tmplnamespace = any ({namespaces})
) o
where not exists (select 1 from pg_catalog.pg_depend d
                  where d.classid = o.classid and d.objid = o.objid and d.objsubid = 0 and d.deptype in ('e', 'i'))
"""


def _objects_in(namespaces: str) -> str:
    return _OBJECTS_IN_SCHEMAS.replace("{namespaces}", namespaces)


def _reset_default_privileges_sql(roles: list[str], kept: list[str]) -> str:
    """The default privileges of `roles`, global and in the kept schemas, back to the built-in ones."""
    return f"""-- objects get the default privileges of the role that creates them, and the connecting role
-- creates every object here: reset its default privileges (global, and in the kept schemas) to the
-- built-in ones, so each object starts with the privileges pg_dump's GRANTs are relative to; the
-- archive's DEFAULT ACL entries of these roles come last and put theirs back
DO $reset_default_privileges$
DECLARE
  d record;
  grantee text;
  objects text;
  scope text;
BEGIN
  FOR d IN SELECT a.defaclrole, a.defaclnamespace, a.defaclobjtype, a.defaclacl, n.nspname
           FROM pg_catalog.pg_default_acl a LEFT JOIN pg_catalog.pg_namespace n ON n.oid = a.defaclnamespace
           WHERE pg_catalog.pg_get_userbyid(a.defaclrole) = ANY ({_text_array(roles)})
             AND (a.defaclnamespace = 0 OR n.nspname = ANY ({_text_array(kept)}))
           ORDER BY 1, 2, 3 LOOP
    objects := CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES' WHEN 'f' THEN 'FUNCTIONS'
                                    WHEN 'T' THEN 'TYPES' WHEN 'n' THEN 'SCHEMAS' WHEN 'L' THEN 'LARGE OBJECTS' END;
    scope := CASE WHEN d.defaclnamespace = 0 THEN '' ELSE pg_catalog.format(' IN SCHEMA %I', d.nspname) END;
    FOR grantee IN SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END
                   FROM pg_catalog.aclexplode(d.defaclacl) a LOOP
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I%s REVOKE ALL ON %s FROM %s',
                                pg_catalog.pg_get_userbyid(d.defaclrole), scope, objects, grantee);
    END LOOP;
    IF d.defaclnamespace = 0 THEN
      -- a global entry replaces the built-in default: the owner's and PUBLIC's privileges come back
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT ALL ON %s TO %I',
                                pg_catalog.pg_get_userbyid(d.defaclrole), objects, pg_catalog.pg_get_userbyid(d.defaclrole));
      IF objects = 'FUNCTIONS' THEN
        EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT EXECUTE ON FUNCTIONS TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
      ELSIF objects = 'TYPES' THEN
        EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT USAGE ON TYPES TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
      END IF;
    END IF;
  END LOOP;
END
$reset_default_privileges$;"""


def _empty_schemas_sql(kept: list[str]) -> str:
    """Drop everything in the kept schemas, keeping the schemas themselves."""
    objects = _objects_in("kept")
    return f"""-- the kept schemas stay (owner, comment, privileges, other roles' default privileges); what is in
-- them goes, whoever created it: their extensions (members and all), then every other object
DO $empty_kept_schemas$
DECLARE
  kept oid[] := ARRAY(SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = ANY ({_text_array(kept)}));
  extensions text[];
  drops text[];
  classes oid[];
  objs oid[];
  present boolean;
  leftover text;
BEGIN
  extensions := ARRAY(SELECT x.extname FROM pg_catalog.pg_extension x WHERE x.extnamespace = ANY (kept) ORDER BY 1);
  FOR k IN 1 .. coalesce(pg_catalog.array_length(extensions, 1), 0) LOOP
    EXECUTE pg_catalog.format('DROP EXTENSION %I CASCADE', extensions[k]);
  END LOOP;
  SELECT pg_catalog.array_agg(pg_catalog.format('DROP %s %s CASCADE',
                                                CASE ident.type WHEN 'statistics object' THEN 'STATISTICS'
                                                                ELSE pg_catalog.upper(ident.type) END,
                                                ident.identity) ORDER BY o.drop_order, ident.identity),
         pg_catalog.array_agg(o.classid ORDER BY o.drop_order, ident.identity),
         pg_catalog.array_agg(o.objid ORDER BY o.drop_order, ident.identity)
    INTO drops, classes, objs
    FROM ({objects}) o CROSS JOIN LATERAL pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident;
  FOR k IN 1 .. coalesce(pg_catalog.array_length(drops, 1), 0) LOOP
    -- gone already when CASCADE took it along with something dropped before
    EXECUTE pg_catalog.format('SELECT EXISTS (SELECT 1 FROM %s WHERE oid = $1)', classes[k]::pg_catalog.regclass)
      INTO present USING objs[k];
    IF present THEN
      EXECUTE drops[k];
    END IF;
  END LOOP;
  SELECT pg_catalog.string_agg(ident.type || ' ' || ident.identity, ', ' ORDER BY ident.identity) INTO leftover
    FROM ({objects}) o CROSS JOIN LATERAL pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident;
  IF leftover IS NOT NULL THEN
    RAISE EXCEPTION 'emptying the kept schemas left objects behind: %', leftover;
  END IF;
END
$empty_kept_schemas$;"""


# -- can this role roll the database back? -----------------------------------------------------

# Objects in the schemas %(schemas)s owned by roles the connecting role cannot act for: (owner, how
# many, three of them).
FOREIGN_OWNERS_SQL = f"""with app as (
  select ARRAY(select n.oid from pg_catalog.pg_namespace n where n.nspname = any (%(schemas)s::text[])) as oids
)
select pg_catalog.pg_get_userbyid(o.owner), pg_catalog.count(*),
       (pg_catalog.array_agg(ident.type || ' ' || ident.identity order by ident.type, ident.identity))[1:3]
from ({_objects_in("(select app.oids from app)::oid[]")}) o
cross join lateral pg_catalog.pg_identify_object(o.classid, o.objid, 0) ident
where not {_acts_for('o.owner')}
group by 1 order by 1"""


class _Reading:
    """Catalog reads in one read-only transaction (autocommit or not), the connection left as found."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.cur = self.conn.cursor()
        if self.conn.autocommit:
            self.cur.execute("begin read only")
        return self.cur

    def __exit__(self, *exc):
        try:
            if self.conn.autocommit:
                self.cur.execute("rollback")
            else:
                self.conn.rollback()
        finally:
            self.cur.close()


def rollback_blockers(conn) -> list[str]:
    """Why the connecting role could not roll this database back to a backup taken now: one sentence
    per blocker, naming the object and the role ([] when nothing blocks).

    The preflight reports these before a deployment starts (a deployment that cannot be rolled back
    is refused before it changes anything); `plan_restore` refuses with the same check, and with
    what only the archive can tell. See the module docstring for what a rollback does."""
    with _Reading(conn) as cur:
        cur.execute("select current_user, (select rolsuper from pg_catalog.pg_roles where rolname = current_user)")
        user, superuser = cur.fetchone()
        cur.execute(f"select n.nspname from pg_catalog.pg_namespace n where {SYSTEM_SCHEMA_SQL} order by 1")
        schemas = [r[0] for r in cur.fetchall() if is_app_schema(r[0])]
        outside = _outside_objects(cur, schemas) if schemas else []
        return _blockers(cur, user, bool(superuser), schemas, [], outside)


def _blockers(cur, user: str, superuser: bool, schemas: list[str], drop_schemas: list[str],
              outside: list[OutsideObject], archive_extensions=()) -> list[str]:
    """The live database's side of `rollback_blockers`: `schemas` are emptied and what is in them
    re-created, `drop_schemas` dropped, the restorable ones of `outside` put back."""
    blockers: list[str] = []
    unrestorable = [o for o in outside if o.kind == "other"]
    if unrestorable:
        blockers.append(f"emptying or dropping the app schemas ({', '.join(sorted([*schemas, *drop_schemas]))}) would "
                        "also drop objects outside them that the backup cannot put back: "
                        + "; ".join(o.identity for o in unrestorable)
                        + " (move or drop them first, or name the schemas to restore)")
    if superuser:
        return blockers + _extension_owner_blockers(cur, user, [*schemas, *drop_schemas])
    me = f"role {user}"
    blockers += _extension_blockers(cur, user, [*schemas, *drop_schemas], archive_extensions)
    cur.execute(FOREIGN_OWNERS_SQL, {"schemas": schemas})
    for owner, count, examples in cur.fetchall():
        blockers.append(f"{count} object(s) in the app schemas are owned by {owner}, which {me} cannot act for ("
                        + ", ".join(examples) + (", ..." if count > len(examples) else "")
                        + "): a rollback could not re-create them with their owner")
    cur.execute("""select n.nspname, pg_catalog.pg_get_userbyid(n.nspowner) from pg_catalog.pg_namespace n
                   where n.nspname = any (%s::text[]) and not pg_catalog.has_schema_privilege(n.oid, 'CREATE')
                   order by 1""", (schemas,))
    blockers += [f"schema {s} is owned by {o} and {me} may not create objects in it (no CREATE privilege): a "
                 "rollback re-creates what is in it" for s, o in cur.fetchall()]
    cur.execute(f"""select n.nspname, pg_catalog.pg_get_userbyid(n.nspowner) from pg_catalog.pg_namespace n
                    where n.nspname = any (%s::text[]) and not {_acts_for('n.nspowner')} order by 1""",
                (list(drop_schemas),))
    blockers += [f"schema {s} is owned by {o}, which {me} cannot act for: a rollback drops it"
                 for s, o in cur.fetchall()]
    for obj in outside:
        if obj.kind not in RESTORABLE_OUTSIDE:
            continue
        cur.execute(f"""select pg_catalog.pg_get_userbyid(r.relowner), pg_catalog.has_table_privilege(r.oid, 'TRIGGER'),
                               {_acts_for('r.relowner')}
                        from pg_catalog.pg_class r join pg_catalog.pg_namespace n on n.oid = r.relnamespace
                        where n.nspname = %s and r.relname = %s""", (obj.schema, obj.table))
        row = cur.fetchone()
        if row is None:
            continue
        owner, may_trigger, acts = row
        table = f"{_quote_ident(obj.schema)}.{_quote_ident(obj.table)}"
        if obj.kind == "trigger" and not may_trigger:
            blockers.append(f"trigger {obj.identity}: a rollback drops and re-creates it, which needs the TRIGGER "
                            f"privilege on {table} ({me} has none)")
        elif obj.kind != "trigger" and not acts:
            blockers.append(f"{obj.kind} {obj.identity}: a rollback drops and re-creates it, which needs acting for "
                            f"{owner}, the owner of {table}")
    cur.execute("""select pg_catalog.format('%%I on %%I.%%I', co.conname, cn.nspname, c.relname),
                          pg_catalog.format('%%I.%%I', fn.nspname, f.relname)
                   from pg_catalog.pg_constraint co
                   join pg_catalog.pg_class c on c.oid = co.conrelid join pg_catalog.pg_namespace cn on cn.oid = c.relnamespace
                   join pg_catalog.pg_class f on f.oid = co.confrelid join pg_catalog.pg_namespace fn on fn.oid = f.relnamespace
                   where co.contype = 'f' and cn.nspname = any (%(schemas)s::text[])
                     and not fn.nspname = any (%(schemas)s::text[])
                     and not pg_catalog.has_table_privilege(f.oid, 'REFERENCES')
                   order by 1""", {"schemas": schemas})
    blockers += [f"foreign key {fk} references {table}: re-creating it needs the REFERENCES privilege on {table} "
                 f"({me} has none)" for fk, table in cur.fetchall()]
    cur.execute(PUBLICATIONS_SQL, {"schemas": [*schemas, *drop_schemas]})
    blockers += [f"{what} is in publication {pub}, owned by {owner}, which {me} cannot act for: a rollback drops and "
                 f"re-creates it, and only the publication's owner may add it back (make {user} its owner, or roll "
                 "back as a superuser)" for what, pub, owner in cur.fetchall()]
    cur.execute("""select pg_catalog.has_table_privilege(c.oid, 'INSERT') from pg_catalog.pg_class c
                   join pg_catalog.pg_namespace n on n.oid = c.relnamespace
                   where n.nspname = %s and c.relname = 'deployment_history'""", (engine.HISTORY_SCHEMA,))
    row = cur.fetchone()
    if row is not None and not row[0]:
        blockers.append(f"no INSERT privilege on {engine.HISTORY_TABLE} (the rollback records itself)")
    return blockers


# Tables (and schemas) of the managed schemas in a publication (Supabase's supabase_realtime): a rollback
# drops them, which takes them out of it, and pg_restore's ALTER PUBLICATION ... ADD puts them back, which
# only the publication's owner may do.
PUBLICATIONS_SQL = f"""
select 'table ' || r.oid::regclass::text, p.pubname::text, pg_catalog.pg_get_userbyid(p.pubowner)
from pg_catalog.pg_publication_rel pr
join pg_catalog.pg_publication p on p.oid = pr.prpubid
join pg_catalog.pg_class r on r.oid = pr.prrelid
join pg_catalog.pg_namespace n on n.oid = r.relnamespace
where n.nspname = any (%(schemas)s::text[]) and not {_acts_for('p.pubowner')}
union all
select 'schema ' || pg_catalog.quote_ident(n.nspname), p.pubname::text, pg_catalog.pg_get_userbyid(p.pubowner)
from pg_catalog.pg_publication_namespace pn
join pg_catalog.pg_publication p on p.oid = pn.pnpubid
join pg_catalog.pg_namespace n on n.oid = pn.pnnspid
where n.nspname = any (%(schemas)s::text[]) and not {_acts_for('p.pubowner')}
order by 1, 2"""


# An extension is re-created by its owner (SET ROLE around CREATE EXTENSION): created by another
# role, its members get another owner and their grants another grantor, and the proof fails. A
# superuser may SET ROLE to anyone, another role only to roles it may act for. The owner itself must
# be able to create it: a superuser, or the extension needs none (its control file's superuser =
# false), or it is trusted (PostgreSQL 13+: pg_available_extension_versions.trusted) and the owner
# has CREATE on the database. Judged on the version a re-creation installs: pg_dump's CREATE EXTENSION
# names none, so the server's default one.
EXTENSION_OWNERS_SQL = f"""
select x.extname, pg_catalog.pg_get_userbyid(x.extowner), n.nspname,
       r.rolsuper
       or (coalesce(not v.superuser or v.trusted, false)
           and (not coalesce(v.superuser, true)
                or pg_catalog.has_database_privilege(x.extowner, pg_catalog.current_database(), 'CREATE'))) as may_create,
       x.extowner = (select oid from pg_catalog.pg_roles where rolname = current_user) as mine,
       {_acts_for('x.extowner')} as acts,
       coalesce(not v.superuser or v.trusted, false) as trusted
from pg_catalog.pg_extension x
join pg_catalog.pg_namespace n on n.oid = x.extnamespace
join pg_catalog.pg_roles r on r.oid = x.extowner
left join pg_catalog.pg_available_extensions a on a.name = x.extname
left join pg_catalog.pg_available_extension_versions v on v.name = a.name and v.version = a.default_version
where n.nspname = any (%s::text[])
order by 1"""
# What the connecting role would need to create the extensions only the archive has (as itself).
ARCHIVE_EXTENSIONS_SQL = """
select x.extname, coalesce(not v.superuser or v.trusted, false) as trusted,
       coalesce(not v.superuser, false) or pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')
from unnest(%s::text[]) as x(extname)
left join pg_catalog.pg_available_extensions a on a.name = x.extname
left join pg_catalog.pg_available_extension_versions v on v.name = a.name and v.version = a.default_version
order by 1"""


@dataclass
class _Extension:
    name: str
    owner: str
    schema: str
    owner_may_create: bool   # a superuser, or trusted (or needing no superuser) and CREATE on the database
    mine: bool               # owned by the connecting role
    acts: bool               # the connecting role may act for its owner (drop it, SET ROLE to it)
    trusted: bool            # a role without superuser may create it (given CREATE on the database)


def _extensions_in(cur, schemas: list[str]) -> list[_Extension]:
    cur.execute(EXTENSION_OWNERS_SQL, (list(schemas),))
    return [_Extension(name, owner, schema, bool(may), bool(mine), bool(acts), bool(trusted))
            for name, owner, schema, may, mine, acts, trusted in cur.fetchall()]


def _extension_owners(cur, schemas: list[str], superuser: bool) -> dict[str, tuple[str, str, bool]]:
    """{extension: (owner, schema, whether the owner may create it)} of the extensions in `schemas`
    that another role than the connecting one owns and that it may re-create as their owner."""
    return {x.name: (x.owner, x.schema, x.owner_may_create) for x in _extensions_in(cur, schemas)
            if not x.mine and (superuser or x.acts)}


def _extension_owner_blockers(cur, user: str, schemas: list[str]) -> list[str]:
    return [f"extension {x.name} (in {x.schema}) is owned by {x.owner}, which may not create it (not a superuser, and "
            f"the extension is not trusted or {x.owner} has no CREATE on the database): a rollback by {user} would "
            f"re-create it under another owner, and its members' grants under another grantor"
            for x in _extensions_in(cur, schemas) if not x.mine and not x.owner_may_create]


def _extension_blockers(cur, user: str, schemas: list[str], archive_extensions=()) -> list[str]:
    """For a role that is not a superuser: the extensions in `schemas` (and those only the archive
    has) that it could not drop and re-create as their owner. A trusted extension (pg_trgm, citext,
    ...) is no blocker when the role owns it (or acts for its owner) and its owner has CREATE on the
    database: PostgreSQL lets such a role drop and create it."""
    me = f"role {user}"
    blockers = []
    live = _extensions_in(cur, schemas)
    for x in live:
        where = f"extension {x.name} (in {x.schema})"
        if not x.mine and not x.acts:
            blockers.append(f"{where} is owned by {x.owner}, which {me} cannot act for: a rollback drops and "
                            "re-creates it")
        elif not x.trusted:
            blockers.append(f"{where} is not trusted: dropping and re-creating it needs a superuser")
        elif not x.owner_may_create:
            blockers.append(f"{where} is trusted, but its owner {x.owner} has no CREATE privilege on the database, "
                            "which re-creating it needs")
    only_archived = sorted(set(archive_extensions) - {x.name for x in live})
    if only_archived:
        cur.execute(ARCHIVE_EXTENSIONS_SQL, (only_archived,))
        for name, trusted, may_create in cur.fetchall():
            if not trusted:
                blockers.append(f"extension {name} (from the backup) is not trusted: creating it needs a superuser")
            elif not may_create:
                blockers.append(f"extension {name} (from the backup) is trusted, but {me} has no CREATE privilege "
                                "on the database, which creating it needs")
    return blockers


# -- what the archive keeps that the live database also has --------------------------------------

def _entry_key(e: TocEntry) -> tuple:
    return (e.type, e.namespace, e.tag, e.owner)


def _entry_texts(pg_restore: pgtools.Tool, path: Path, entries: list[TocEntry]) -> dict[tuple, str]:
    """{entry key: the SQL pg_restore writes for it (comments and psql meta-commands left out)}."""
    if not entries:
        return {}
    texts: dict[tuple, list[str]] = {}
    key = None
    for line in _archive_sql(pg_restore, path, entries, "entries of").splitlines():
        match = _ENTRY_HEADER.match(line)
        if match:
            name, type_, schema, owner = match.groups()
            key = (type_, None if schema == "-" else schema, name, owner)
            texts.setdefault(key, [])
        elif key is not None and line.strip() and not line.startswith(("--", "\\")):
            texts[key].append(line)
    return {k: "\n".join(v) for k, v in texts.items()}


def _schema_of(type_: str, namespace: str | None, tag: str) -> str | None:
    """The schema that a schema's own entry (SCHEMA, or COMMENT, ACL, SECURITY LABEL on it) is about."""
    if namespace is not None:
        return None
    if type_ == "SCHEMA":
        return _unquote(tag)
    if type_ in SCHEMA_LEVEL_TYPES and tag.startswith("SCHEMA "):
        return _unquote(tag[len("SCHEMA "):])
    return None


def _schema_of_entry(e: TocEntry) -> str | None:
    return _schema_of(e.type, e.namespace, e.tag)


def _describe_kept_entry(e_key: tuple) -> str:
    type_, namespace, tag, owner = e_key
    if type_ == "DEFAULT ACL":
        objects = tag.removeprefix("DEFAULT PRIVILEGES FOR ").lower()
        where = f"in schema {namespace}" if namespace else "(global)"
        return f"the default privileges of {owner} {where} for {objects}"
    what = {"SCHEMA": "the owner of", "COMMENT": "the comment on", "ACL": "the privileges on",
            "SECURITY LABEL": "the security label of"}[type_]
    schema = tag if type_ == "SCHEMA" else tag[len("SCHEMA "):]
    return f"{what} schema {_unquote(schema)}"


def _live_schema_dump(pg_restore: pgtools.Tool, target: connection.Target, major: int, exclude: list[str],
                      run_id: str, lock_timeout: str, directory: Path) -> tuple[Path, ArchiveListing]:
    """``pg_dump --schema-only`` of the database as it is now, the schemas `exclude` left out."""
    try:
        pg_dump = pgtools.find_companion(pg_restore, "pg_dump", major)
    except pgtools.ToolError as exc:
        raise RestoreRefused(f"{exc} Nothing was changed.") from None
    path = directory / "now.schema.dump"
    patterns = ['--exclude-schema="' + s.replace('"', '""') + '"' for s in exclude]
    proc = subprocess.run(
        [str(pg_dump.path), "--schema-only", "--format=custom", "--no-password",
         f"--lock-wait-timeout={lock_timeout}", *patterns, "--file", str(path),
         "--dbname", target.conninfo(application_name=f"runbook rollback {run_id}")],
        capture_output=True, text=True, env=pgtools.tool_env())
    if proc.returncode != 0:
        raise RestoreRefused(f"pg_dump --schema-only of the database as it is now (to compare what a rollback keeps "
                             f"with the backup) failed (exit {describe_exit(proc.returncode)}): "
                             f"{redact(proc.stderr.strip()) or 'no message'}. Nothing was changed.")
    try:
        return path, read_listing(pg_restore, path)
    except BackupError as exc:
        raise RestoreRefused(f"{exc}. Nothing was changed.") from None


def _compare_kept_entries(pg_restore: pgtools.Tool, backup_path: Path, listing: ArchiveListing,
                          target: connection.Target, major: int, existing: list[str], kept: list[str], user: str,
                          run_id: str, lock_timeout: str) -> tuple[list[tuple], list[tuple]]:
    """(unchanged, changed) keys of the kept entries -- the kept schemas' own entries and other roles'
    default privileges (global and in the kept schemas) -- comparing the backup with a fresh
    schema-only dump: what pg_dump writes for each, side by side."""
    kept_set = set(kept)

    def is_kept(e: TocEntry) -> bool:
        if e.type == "DEFAULT ACL":
            return (e.namespace is None or e.namespace in kept_set) and e.owner != user
        return _schema_of_entry(e) in kept_set

    with tempfile.TemporaryDirectory(prefix="truthsource-compare-") as tmp:
        live_path, live = _live_schema_dump(pg_restore, target, major, [s for s in existing if s not in kept_set],
                                            run_id, lock_timeout, Path(tmp))
        then = {_entry_key(e): e for e in listing.entries if is_kept(e)}
        now = {_entry_key(e): e for e in live.entries if is_kept(e)}
        then_sql = _entry_texts(pg_restore, backup_path, list(then.values()))
        now_sql = _entry_texts(pg_restore, live_path, list(now.values()))
    unchanged, changed = [], []
    for key in sorted(set(then) | set(now), key=lambda k: tuple(str(p) for p in k)):
        same = key in then and key in now and then_sql.get(key, "") == now_sql.get(key, "")
        (unchanged if same else changed).append(key)
    return unchanged, changed


def _dropped_outside_routines(conn, listing: ArchiveListing, managed: set[str], existing: list[str],
                              superuser: bool) -> list[TocEntry]:
    """The archive's functions, procedures and aggregates outside the managed schemas (and outside
    the history schema) that no longer exist, in schemas that do, owned by roles the connecting role
    acts for (so a deployment run by it could have dropped them)."""
    candidates = [e for e in listing.entries if e.type in ("FUNCTION", "PROCEDURE", "AGGREGATE")
                  and e.namespace and e.namespace not in managed and e.namespace != engine.HISTORY_SCHEMA
                  and e.namespace in existing]
    gone = []
    for e in candidates:
        with _Reading(conn) as cur:
            try:
                cur.execute(f"select pg_catalog.to_regprocedure(%(signature)s) is null, {_acts_for('%(owner)s::name')}",
                            {"signature": f"{_quote_ident(e.namespace)}.{e.tag}", "owner": e.owner})
            except psycopg2.Error:
                continue          # a signature this cannot read back: leave it alone
            missing, acts = cur.fetchone()
        if missing and (superuser or acts):
            gone.append(e)
    return gone


# -- the plan ------------------------------------------------------------------------------------

def _backup_info(backup_path: Path, sha: str) -> dict:
    """The backup.json beside the dump, if it describes this very file."""
    info = backup_path.parent / INFO_FILE
    if info.is_file():
        try:
            data = json.loads(info.read_text())
        except ValueError:
            return {}
        if data.get("sha256") == sha:
            return data
    return {}


def _restored_to_default(backup_path: Path, sha: str, listing: ArchiveListing) -> str:
    taken_at = _backup_info(backup_path, sha).get("taken_at")
    if taken_at:
        return taken_at
    created = listing.header.get("Archive created at")
    if created:
        return created
    raise RestoreRefused(f"when was {backup_path.name} taken? give restored_to (no {INFO_FILE} beside it)")


def _refusal(user: str, superuser: bool, blockers: list[str]) -> RestoreRefused:
    if superuser:
        return RestoreRefused("this restore cannot be done: " + "; ".join(blockers) + ". Nothing was changed.")
    return RestoreRefused(f"role {user} is not a superuser and cannot do this restore: " + "; ".join(blockers)
                          + ". Connect as the database owner or a superuser. Nothing was changed.")


def plan_restore(target: connection.Target, backup_path, expected_sha256: str, *, run_id: str, operator: str,
                 restored_to=None, managed_schemas: list[str] | None = None, lock_timeout: str = "30s",
                 allow_other_database: bool = False) -> RestorePlan:
    """Check everything and build the script; changes nothing. Refusals raise RestoreRefused."""
    backup_path = Path(backup_path)
    warnings: list[str] = []
    try:
        conn = connection.connect(target, application_name=f"runbook rollback {run_id}", readonly=True)
    except psycopg2.Error as exc:
        raise RestoreRefused(f"cannot connect to {target.name!r}: {redact(str(exc).strip())}") from None
    try:
        facts = connection.server_facts(conn)
        user, superuser = facts["current_user"], bool(facts["superuser"])
        major = facts["server_version_num"] // 10000
        if facts["server_version_num"] < 150000:
            raise RestoreRefused(f"the target runs PostgreSQL {facts['server_version']}; rollback needs 15 or later")

        # (a) the backup itself: sha256 first, then its table of contents and a full read
        try:
            # the newest pg_restore reads every archive; the restore itself prefers the server's own
            verification = verify_backup(backup_path, expected_sha256, full=True)
            pg_restore = pgtools.find_tool("pg_restore", major)
            try:
                listing = read_listing(pg_restore, backup_path)
            except BackupError:   # an archive written by a newer pg_dump than the server's
                pg_restore = pgtools.find_tool("pg_restore", None)
                listing = read_listing(pg_restore, backup_path)
            psql = pgtools.find_companion(pg_restore, "psql", major)
        except (BackupError, pgtools.ToolError) as exc:
            raise RestoreRefused(f"{exc} Nothing was changed.") from None
        unknown = sorted({e.line for e in listing.entries if not e.known})
        if unknown:
            raise RestoreRefused("the archive has entries of a type these runbooks do not know, so they cannot "
                                 "tell which schema they belong to: " + "; ".join(unknown[:5])
                                 + ". Nothing was changed.")
        warnings += [w for w in (pg_restore.warning,) if w]
        sha = verification.sha256

        # the very database the backup was taken from, where backup.json says which (see `identity`)
        recorded_identity = _backup_info(backup_path, sha).get("identity")
        if recorded_identity and not allow_other_database:
            then, now = Identity.from_dict(recorded_identity), read_identity(conn)
            differences = then.differences(now)
            if differences:
                raise RestoreRefused(f"{backup_path.name} is a backup of {then.describe()}; the target is "
                                     f"{now.describe()} ({'; '.join(differences)}): refusing to restore it there. "
                                     "Nothing was changed.")
        archive_db = listing.header.get("dbname")
        if archive_db and archive_db != facts["database"] and not allow_other_database:
            raise RestoreRefused(f"{backup_path.name} is a backup of database {archive_db!r}, the target is "
                                 f"{facts['database']!r}; refusing to restore it there. Nothing was changed.")
        if restored_to is None:
            restored_to = _restored_to_default(backup_path, sha, listing)
        restored_to = restored_to.isoformat() if isinstance(restored_to, datetime) else str(restored_to)

        with conn.cursor() as cur:
            cur.execute(f"select n.nspname from pg_namespace n where {SYSTEM_SCHEMA_SQL} order by 1")
            existing = [r[0] for r in cur.fetchall()]
        existing_app = [s for s in existing if is_app_schema(s)]
        backup_schemas = sorted({e.namespace for e in listing.entries if e.namespace}
                                | {e.tag for e in listing.entries if e.type == "SCHEMA" and e.namespace is None})
        backup_app = [s for s in backup_schemas if is_app_schema(s)]
        if managed_schemas is None:
            managed = sorted(set(backup_app) | set(existing_app))
        else:
            bad = [s for s in managed_schemas if not is_app_schema(s)]
            if bad:
                raise RestoreRefused(f"not app schemas, never dropped by a rollback: {', '.join(bad)} "
                                     f"(the history schema {engine.HISTORY_SCHEMA!r}, system and Supabase platform "
                                     "schemas stay). Nothing was changed.")
            managed = sorted(set(managed_schemas))
        if not managed:
            raise RestoreRefused("no app schema to restore: the backup has none and the database has none")
        # initdb creates public, so pg_dump never writes it: it always counts as in the backup
        restored_schemas = sorted(s for s in managed if s in backup_app or s == "public")
        here = [s for s in managed if s in existing]              # emptied or dropped
        kept = [s for s in here if s in restored_schemas]         # unless their own entries changed
        only_here = [s for s in here if s not in restored_schemas]

        # (b) the history: read now, kept by never touching its schema, checked at the end
        history_problem = None
        try:
            history_rows = engine.read_history(conn)
        except psycopg2.Error as exc:
            conn.rollback()
            history_rows, history_problem = [], f"cannot read the deployment history: {exc.diag.message_primary or exc}"
        with conn.cursor() as cur:
            cur.execute("select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                        "where n.nspname = %s and c.relname = 'deployment_history')", (engine.HISTORY_SCHEMA,))
            history_exists = cur.fetchone()[0]
            cur.execute("""select (select initprivs::text[] from pg_init_privs
                                   where classoid = 'pg_namespace'::regclass and objoid = n.oid)
                           from pg_namespace n where nspname = 'public'""")
            row = cur.fetchone()
            # pg_dump wrote public's ACL relative to public's initial privileges at dump time:
            # start from those when the backup recorded them. Otherwise from today's: no public
            # now, assume initdb's; public without initial privileges (re-created by an earlier
            # restore), pg_dump compared its ACL with the plain default, so start from that.
            recorded = _backup_info(backup_path, sha)
            if recorded.get("public_init_privs") is not None:
                public_init = recorded["public_init_privs"]
            else:
                public_init = None if row is None else (row[0] or [])
            outside = _outside_objects(cur, here) if here else []
            owners_now = _extension_owners(cur, here, superuser)
        conn.rollback()

        ext_entries = [e for e in listing.entries if e.type == "EXTENSION"]
        ext_schemas = _extension_schemas(pg_restore, backup_path, ext_entries)
        extensions = sorted(name for name, schema in ext_schemas.items() if schema in set(managed))
        ext_tags = {f"EXTENSION {name}" for name in extensions} | {f"EXTENSION {_quote_ident(n)}" for n in extensions}
        for obj in outside:
            obj.toc = _toc_for_outside(obj, listing)
        outside_restored = [o for o in outside if o.in_backup]
        outside_dropped = [o for o in outside if not o.in_backup and o.kind != "other"]

        # routines outside the managed schemas that the backup has, that are gone now and that this
        # role could have dropped: the deployment dropped them (phase 1 drops duplicate updated-at
        # functions wherever they live, e.g. in `extensions`); they come back from the archive
        recreated = _dropped_outside_routines(conn, listing, set(managed), existing, superuser)
        recreated_tags = {(e.namespace, f"{e.type} {e.tag}") for e in recreated}
        recreated_ids = {e.dump_id for e in recreated} | {
            e.dump_id for e in listing.entries
            if e.type in SCHEMA_LEVEL_TYPES and (e.namespace, e.tag) in recreated_tags}
        outside_recreated = [f"{e.type.lower()} {_quote_ident(e.namespace)}.{e.tag}" for e in recreated]

        # (c) what the role may do, as the live database tells: the preflight's check
        with _Reading(conn) as cur:
            blockers = ([history_problem] if history_problem else []) + _blockers(
                cur, user, superuser, kept, only_here, [o for o in outside if o.kind == "other" or o.in_backup],
                extensions)
        if blockers:
            raise _refusal(user, superuser, blockers)

        # (d) what the archive keeps and the database has too: compared, not restored
        unchanged, changed = _compare_kept_entries(pg_restore, backup_path, listing, target, major, existing, kept,
                                                   user, run_id, lock_timeout)
        with _Reading(conn) as cur:
            cur.execute("select has_database_privilege(current_database(), 'CREATE')")
            create_in_database = superuser or cur.fetchone()[0]
            roles = sorted({k[3] for k in changed if k[3]} | {e.owner for e in listing.entries if e.owner})
            cur.execute(f"select r, {_acts_for('r::name')} from unnest(%s::text[]) r "
                        "where exists (select 1 from pg_roles where rolname = r)", (roles,))
            acts = {r: superuser or ok for r, ok in cur.fetchall()}
            cur.execute(f"select n.nspname, pg_get_userbyid(n.nspowner), {_acts_for('n.nspowner')} "
                        "from pg_namespace n where n.nspname = any (%s::text[])", (kept,))
            schema_owner = {s: (o, superuser or ok) for s, o, ok in cur.fetchall()}

        replaced: list[str] = []
        for schema in kept:
            what = [_describe_kept_entry(k) for k in changed if _schema_of(k[0], k[1], k[2]) == schema]
            if not what:
                continue
            # put back by dropping the schema and creating it from the archive, if the role may
            owner, may_drop = schema_owner[schema]
            foreign = sorted({e.owner for e in listing.entries if e.owner and e.type in OWNED_ENTRY_TYPES
                              and (e.namespace == schema or _schema_of_entry(e) == schema)
                              and not acts.get(e.owner, False)})
            reasons = ([f"cannot act for its owner {owner} to drop it"] if not may_drop else []) + \
                      (["may not create schemas (no CREATE on the database)"] if not create_in_database else []) + \
                      ([f"cannot act for {', '.join(foreign)}, whose objects or default privileges the backup has "
                        "in it"] if foreign else [])
            if reasons:
                blockers.append(f"{' and '.join(what)} changed since the backup was taken; putting that back means "
                                f"dropping schema {schema} and creating it from the backup, and role {user} "
                                + "; ".join(reasons) + f" (only {owner} or a superuser could)")
            else:
                replaced.append(schema)
        kept = [s for s in kept if s not in replaced]
        dropped = sorted(only_here + replaced)
        created = [s for s in restored_schemas if s not in kept]      # from the archive (incl. replaced)

        reset_roles = {user}
        for key in changed:
            if key[0] != "DEFAULT ACL" or (key[1] is not None and key[1] not in kept):
                continue
            if acts.get(key[3], False):
                reset_roles.add(key[3])
            else:
                blockers.append(f"{_describe_kept_entry(key)} changed since the backup was taken; only {key[3]} or "
                                "a superuser can put them back")

        def left_alone(key: tuple) -> bool:
            type_, namespace, tag, owner = key
            if type_ == "DEFAULT ACL":
                return (namespace is None or namespace in kept) and owner not in reset_roles
            return _schema_of(type_, namespace, tag) in kept
        kept_as_they_are = [_describe_kept_entry(k) for k in unchanged if left_alone(k)]

        # which archive entries: what is in the managed schemas, the created schemas' own entries,
        # their extensions, the restorable outside dependents, the reset roles' default privileges
        managed_set, kept_set, created_set = set(managed), set(kept), set(created)
        outside_ids = {i for o in outside_restored for i in o.toc} | recreated_ids

        def wanted(e: TocEntry) -> bool:
            if e.type in ("ENCODING", "STDSTRINGS", "SEARCH_PATH"):
                return False            # pg_restore writes these itself
            if e.type == "DEFAULT ACL":
                if e.namespace is None or e.namespace in kept_set:
                    return e.owner in reset_roles
                return e.namespace in managed_set
            if e.namespace is not None:
                return e.namespace in managed_set or e.dump_id in outside_ids
            if e.type == "EXTENSION":
                return e.tag in extensions
            if e.type in SCHEMA_LEVEL_TYPES and e.tag in ext_tags:
                return True
            return _schema_of_entry(e) in created_set
        entries = [e for e in listing.entries if wanted(e)]
        summary = dict(sorted({t: sum(1 for e in entries if e.type == t) for t in {e.type for e in entries}}.items()))

        # (e) what the role may do, as the archive tells: refuse now rather than fail halfway
        with _Reading(conn) as cur:
            owners = sorted({e.owner for e in entries if e.owner})
            cur.execute("select r from unnest(%s::text[]) r where not exists (select 1 from pg_roles where rolname = r)",
                        (owners,))
            missing_roles = [r[0] for r in cur.fetchall()]
            if missing_roles:
                raise RestoreRefused(f"the backup names owners that do not exist on this server: "
                                     f"{', '.join(missing_roles)}; create these roles first. Nothing was changed.")
            cur.execute("""select x.extname, not exists (select 1 from pg_available_extensions a where a.name = x.extname)
                           from unnest(%s::text[]) x(extname)""", (extensions,))
            unavailable = [r[0] for r in cur.fetchall() if r[1]]
            if unavailable:
                raise RestoreRefused(f"the backup has extensions this server cannot install: {', '.join(unavailable)}. "
                                     "Nothing was changed.")
        if not superuser:
            foreign_owners = sorted({e.owner for e in entries if e.owner and e.type in OWNED_ENTRY_TYPES
                                     and not acts.get(e.owner, False)})
            blockers += [f"the backup has objects owned by {r}, which role {user} cannot act for" for r in foreign_owners]
            # ALTER PUBLICATION ... ADD: the publication's owner's to do (the entry's owner)
            blockers += [f"the backup puts {e.tag} back into a publication owned by {e.owner}, which role {user} "
                         "cannot act for" for e in entries
                         if e.type in ("PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA") and e.owner
                         and not acts.get(e.owner, False)]
            if created and not create_in_database:
                blockers.append(f"no CREATE privilege on the database (schema(s) {', '.join(created)} are created)")
            with _Reading(conn) as cur:
                for schema in sorted({e.namespace for e in recreated}):
                    cur.execute("select has_schema_privilege(%s, 'CREATE')", (schema,))
                    if not cur.fetchone()[0]:
                        names = [f"{e.type.lower()} {_quote_ident(schema)}.{e.tag}" for e in recreated
                                 if e.namespace == schema]
                        blockers.append(f"{', '.join(names)}: dropped since the backup was taken; re-creating it "
                                        f"needs the CREATE privilege on schema {schema}")
        if blockers:
            raise _refusal(user, superuser, blockers)
    finally:
        conn.close()

    if outside_dropped:
        warnings.append("created after the backup, dropped with what is in the managed schemas: "
                        + "; ".join(o.identity for o in outside_dropped))
    if outside_recreated:
        warnings.append("dropped since the backup outside the managed schemas, re-created from it: "
                        + "; ".join(outside_recreated))
    prelude = _prelude(facts["database"], backup_path.name, sha, run_id, lock_timeout, sorted(reset_roles), kept,
                       dropped, "public" in created, public_init)
    postlude = _postlude(history_rows, history_exists, backup_path.name, sha, operator, run_id, restored_to,
                         len(entries), restored_schemas)
    return RestorePlan(
        backup_path=backup_path, backup_sha256=sha, database=facts["database"],
        server_version=facts["server_version"], server_version_num=facts["server_version_num"],
        current_user=user, superuser=superuser, managed_schemas=managed, dropped_schemas=dropped,
        kept_schemas=kept, replaced_schemas=sorted(replaced), restored_schemas=restored_schemas,
        default_privileges_reset=sorted(reset_roles), kept_as_they_are=kept_as_they_are, entries=entries,
        toc_summary=summary, extensions=extensions, outside_restored=outside_restored,
        outside_dropped=outside_dropped, outside_recreated=outside_recreated, history_rows=history_rows,
        history_exists=history_exists,
        prelude_sql=prelude, postlude_sql=postlude, pg_restore=pg_restore, psql=psql, run_id=run_id,
        operator=operator, restored_to=restored_to, warnings=warnings,
        extension_owners={x: owners_now[x][0] for x in extensions if x in owners_now})


def _prelude(database, file_name, sha, run_id, lock_timeout, reset_roles, kept, dropped, create_public,
             public_init) -> str:
    lines = [f"-- TruthSource rollback of database {database} to {file_name} (sha256 {sha}), run {run_id}",
             "-- one transaction, committed by the script's last line only: input cut short is rolled back",
             "BEGIN;",
             f"SET lock_timeout = {_literal(lock_timeout)};",
             "SELECT pg_catalog.set_config('truthsource.rollback_started', pg_catalog.clock_timestamp()::text, false);",
             _reset_default_privileges_sql(reset_roles, kept)]
    if dropped:
        lines.append("-- schemas the backup does not have (or whose own owner, comment or privileges changed): "
                     "dropped with everything in them")
        lines.append("DROP SCHEMA IF EXISTS " + ", ".join(_quote_ident(s) for s in dropped) + " CASCADE;")
    if kept:
        lines.append(_empty_schemas_sql(kept))
    if create_public:
        lines.append("-- initdb creates public, so pg_dump never does: create it as initdb leaves it")
        lines += _public_baseline(public_init)
    return "\n".join(lines) + "\n"


def _postlude(history_rows, history_exists, file_name, sha, operator, run_id, restored_to, entries,
              schemas) -> str:
    lines = ["", "-- the deployment history: every row read before the restore is still there, plus this rollback"]
    if history_exists:
        ids = sorted(r["id"] for r in history_rows)
        lines.append(f"""DO $history_check$
BEGIN
  IF (SELECT pg_catalog.count(*) FROM {engine.HISTORY_TABLE} WHERE id = ANY ('{{{",".join(map(str, ids))}}}'::bigint[])) <> {len(ids)} THEN
    RAISE EXCEPTION 'deployment history rows went missing during the rollback: aborting it';
  END IF;
END
$history_check$;""")
    else:
        lines.append(engine.HISTORY_DDL.strip())
    note = (f"restored {file_name} into schema(s) {', '.join(schemas)} ({entries} archive entries); "
            f"{len(history_rows)} history rows kept")
    lines.append(
        f"INSERT INTO {engine.HISTORY_TABLE} (version, file_name, sha256, action, applied_by, duration_ms, "
        f"statements, run_id, restored_to, note)\nVALUES ('rollback', {_literal(file_name)}, {_literal(sha)}, "
        f"'rollback', {_literal(operator)}, (extract(epoch FROM pg_catalog.clock_timestamp() - "
        f"pg_catalog.current_setting('truthsource.rollback_started')::timestamptz) * 1000)::bigint, {entries}, "
        f"{_literal(run_id)}, {_literal(restored_to)}::timestamptz, {_literal(note)});")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


# -- running it --------------------------------------------------------------------------------

CREATE_EXTENSION = re.compile(rb'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")+"|\S+) WITH SCHEMA ')


def _as_extension_owner(line: bytes, owners: dict[str, str]) -> bytes:
    """pg_restore's CREATE EXTENSION line, run as the extension's owner when another role owns it."""
    match = CREATE_EXTENSION.match(line) if owners else None
    owner = match and owners.get(_unquote(match.group(1).decode()))
    if not owner:
        return line
    return (f"SET ROLE {_quote_ident(owner)};\n".encode() + line.rstrip(b"\n") + b"\nRESET ROLE;\n")


def execute_plan(plan: RestorePlan, target: connection.Target) -> RestoreResult:
    """Run the plan's script in one transaction; RestoreFailed leaves the database as it was."""
    started = time.perf_counter()
    env = pgtools.tool_env()
    # A newer pg_restore writes settings an older server does not know.
    drop_lines = set()
    if plan.pg_restore.major >= 17 and plan.server_version_num < 170000:
        drop_lines.add("SET transaction_timeout = 0;")
    with tempfile.TemporaryDirectory(prefix="truthsource-restore-") as tmp:
        listfile = Path(tmp) / "restore.list"
        listfile.write_text("".join(e.line + "\n" for e in plan.entries))
        out_path, err_path, restore_err_path = (Path(tmp) / n for n in ("psql.out", "psql.err", "pg_restore.err"))
        with open(out_path, "w") as out, open(err_path, "w") as err, open(restore_err_path, "w") as rerr:
            psql = subprocess.Popen(
                [str(plan.psql.path), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--no-password",
                 "-d", target.conninfo(application_name=f"runbook rollback {plan.run_id}"), "-f", "-"],
                stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
            restore = None
            input_complete = False
            try:
                try:
                    psql.stdin.write(plan.prelude_sql.encode())
                    restore = subprocess.Popen(
                        [str(plan.pg_restore.path), "-L", str(listfile), "-f", "-", str(plan.backup_path)],
                        stdout=subprocess.PIPE, stderr=rerr, env=env)
                    in_header = True
                    for line in restore.stdout:
                        if in_header:
                            if line.startswith((b"-- Name:", b"-- Data for Name:")):
                                in_header = False
                            elif line.rstrip(b"\n").decode(errors="replace") in drop_lines:
                                continue
                        psql.stdin.write(_as_extension_owner(line, plan.extension_owners))
                    restore.stdout.close()
                    if restore.wait() == 0:
                        psql.stdin.write(plan.postlude_sql.encode())
                        psql.stdin.close()   # end of input: psql commits, or rolls back on an error
                        input_complete = True
                except BrokenPipeError:
                    pass                     # psql stopped on an error: its transaction is rolled back
            finally:
                if not input_complete:
                    # never let psql reach the end of a partial script: killed, the server aborts it
                    psql.kill()
                    try:
                        psql.stdin.close()
                    except OSError:
                        pass
                if restore is not None and restore.poll() is None:
                    restore.kill()
                    restore.wait()
                code = psql.wait()
        messages = redact(err_path.read_text(errors="replace"))
        restore_messages = redact(restore_err_path.read_text(errors="replace"))
    seconds = time.perf_counter() - started
    if restore is not None and restore.returncode != 0 and code != 3:
        raise RestoreFailed(f"pg_restore could not read {plan.backup_path.name} "
                            f"(exit {describe_exit(restore.returncode)}): "
                            f"{restore_messages.strip() or 'no message'}. psql was stopped before the end of the "
                            "script: the transaction was rolled back and the database is as it was.")
    if code != 0 or not input_complete:
        tail = "\n".join(messages.strip().splitlines()[-15:])
        raise RestoreFailed(f"the restore script failed (psql exit {describe_exit(code)}); its single transaction was "
                            f"rolled back and the database is as it was before the rollback started.\n{tail}")

    conn = connection.connect(target, application_name=f"runbook rollback {plan.run_id}", readonly=True)
    try:
        history = engine.read_history(conn)
    finally:
        conn.close()
    kept = {r["id"] for r in plan.history_rows}
    still = {r["id"] for r in history}
    new = [r for r in history if r["id"] not in kept]
    if not kept <= still or len(new) != 1 or new[0]["action"] != "rollback" or new[0]["run_id"] != plan.run_id:
        raise RestoreError("the restore committed, but the deployment history does not read as expected: "
                           f"{len(kept - still)} rows missing, {len(new)} new rows; inspect {engine.HISTORY_TABLE}")
    return RestoreResult(
        backup_path=str(plan.backup_path), backup_sha256=plan.backup_sha256, database=plan.database,
        run_id=plan.run_id, operator=plan.operator, restored_to=plan.restored_to,
        managed_schemas=plan.managed_schemas, dropped_schemas=plan.dropped_schemas,
        kept_schemas=plan.kept_schemas, replaced_schemas=plan.replaced_schemas,
        restored_schemas=plan.restored_schemas, default_privileges_reset=plan.default_privileges_reset,
        kept_as_they_are=plan.kept_as_they_are, archive_entries_restored=len(plan.entries),
        extensions_recreated=plan.extensions,
        outside_objects_restored=[o.identity for o in plan.outside_restored],
        outside_objects_dropped=[o.identity for o in plan.outside_dropped],
        outside_objects_recreated=plan.outside_recreated, history_rows_kept=len(kept), rollback_row=new[0],
        seconds=round(seconds, 3), psql_messages=messages,
        pg_restore=plan.pg_restore.as_dict(), psql=plan.psql.as_dict(), warnings=plan.warnings,
        prelude_sql=plan.prelude_sql, postlude_sql=plan.postlude_sql)


def restore_backup(target: connection.Target, backup_path, expected_sha256: str, *, run_id: str, operator: str,
                   restored_to=None, managed_schemas: list[str] | None = None, lock_timeout: str = "30s",
                   allow_other_database: bool = False) -> RestoreResult:
    """Roll the target back to the backup (see the module docstring): plan, then one transaction."""
    plan = plan_restore(target, backup_path, expected_sha256, run_id=run_id, operator=operator,
                        restored_to=restored_to, managed_schemas=managed_schemas, lock_timeout=lock_timeout,
                        allow_other_database=allow_other_database)
    return execute_plan(plan, target)
