"""Rollback: put a run's preflight backup back, so the database equals its pre-deployment snapshot.

Why not ``pg_restore --clean``: it drops only the objects the *backup* knows about, so every
table, function, policy, trigger or schema the deployment created stays behind, and objects
that depend on them make the drops fail. A rollback must also leave the deployment history
alone: it records the rollback itself.

The strategy, in one transaction:

1. Before anything changes (a refusal changes nothing): the backup's sha256 and its table of
   contents (`backup.verify_backup`, with a full read); the target is PostgreSQL 15+, the
   database the backup was taken of, and every role the backup names as an owner exists; the
   connecting role may do it all (a superuser, or a member of the owner of every managed schema
   and of every owner in the backup, with CREATE on the database; extensions need a superuser);
   objects *outside* the managed schemas that dropping them would take along are either
   restorable from the backup (triggers, policies, foreign keys, indexes -- e.g. a trigger on
   ``auth.users`` calling a ``public`` function) or created after the backup (then they go,
   like every other object of the deployment), and anything else (a column of a platform table
   whose type lives in a managed schema, a view over an app table) is refused, named.
2. The deployment history is read (`engine.read_history`); its schema ``truthsource`` is never
   dropped or restored, so its rows survive; the script checks at the end that they are all
   still there.
3. One script, run by the target server's own ``psql -X -v ON_ERROR_STOP=1 --single-transaction
   --no-password`` (a failure anywhere rolls back all of it; the database stays exactly as it
   was):

   - global default privileges are reset to the built-in defaults, so restored objects get
     exactly the grants the backup has (the backup's own default privileges come back at the
     end of the archive);
   - ``DROP SCHEMA ... CASCADE`` of the *managed schemas*: every app schema (non-system, not
     ``truthsource``, not a Supabase platform schema) that the backup has objects in or that
     exists now. Extensions living in them go too and are re-created from the backup;
   - ``public`` is re-created as initdb leaves it (owner ``pg_database_owner``, the standard
     comment, the initial privileges read from ``pg_init_privs`` before the drop), because
     pg_dump never writes ``CREATE SCHEMA public``: on PostgreSQL 15 and 18 alike it writes
     only what differs from that initial state -- an ``ALTER SCHEMA public OWNER`` when the
     owner changed, a comment when it changed, and an ``ACL - SCHEMA public`` entry holding
     GRANTs/REVOKEs relative to ``pg_init_privs`` -- and none of these are in the schema's
     namespace, so ``pg_restore -n public`` would skip them all;
   - the SQL of ``pg_restore -f - -L <list>``: the archive entries in the managed schemas
     (definitions, data, sequence positions, constraints, indexes, triggers, RLS, policies,
     comments, ACLs, default privileges), the schema-level entries of those schemas, their
     extensions, the restorable outside dependents, and the global default privileges, in the
     archive's own order. Owners and ACLs are kept (no ``--no-owner``): RLS (the table owner
     bypasses it), SECURITY DEFINER functions and grants depend on them;
   - the history check and a ``rollback`` history row (version ``rollback``, the backup's file
     name and sha256, ``restored_to`` = when the backup was taken), as `engine.record_history`
     writes it.

   The script streams from pg_restore into psql (no copy of the data on disk). If pg_restore
   fails halfway, psql is killed before its input ends, so the server aborts the transaction
   instead of committing a partial script. A pg_restore newer than the server (an archive
   from a newer pg_dump) writes ``SET transaction_timeout``, which servers before 17 do not
   know: that header line is left out for them. ``lock_timeout`` bounds the wait for the
   drops' locks: a busy table makes the rollback fail fast, changing nothing.

Callers hold `engine.run_lock` for the database while this runs, and prove the result by
comparing a snapshot with the preflight one (`snapshot.compare_snapshots(...).identical`).

Limits: roles, database-level settings, event triggers, publications, casts and other
database-wide objects are not part of the managed schemas and are left as they are; the
platform schemas and ``truthsource`` are never touched except for restorable dependents. A
re-created extension gets the server's default version. The re-created ``public`` has no
``pg_init_privs`` row any more, so later dumps spell out its whole ACL (same privileges). A
role that is not a superuser must be a member of every role the backup names as an owner,
including the owners of default privileges (Supabase's ``postgres`` is not a member of
``supabase_admin``: such backups need a superuser to restore).
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
from .snapshot import SYSTEM_SCHEMA_SQL, is_app_schema

DEFAULT_PUBLIC_INIT_PRIVS = ["=U/pg_database_owner"]   # initdb's, besides the owner's own
# Entries outside the managed schemas that the backup can put back once dropped with them.
RESTORABLE_OUTSIDE = {"trigger": "TRIGGER", "policy": "POLICY", "fk": "FK CONSTRAINT", "index": "INDEX"}
_EXTENSION_SQL = re.compile(r'^CREATE EXTENSION IF NOT EXISTS ("(?:[^"]|"")+"|\S+) WITH SCHEMA ("(?:[^"]|"")+"|\S+);',
                            re.MULTILINE)


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
    dropped_schemas: list[str]        # managed schemas that exist now
    restored_schemas: list[str]       # managed schemas the backup has
    entries: list[TocEntry]
    toc_summary: dict
    extensions: list[str]             # re-created from the backup
    outside_restored: list[OutsideObject]
    outside_dropped: list[OutsideObject]   # created after the backup: they go
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

    def describe(self) -> dict:
        """What the notebook shows (and the record keeps) before the restore runs."""
        return {
            "backup": str(self.backup_path), "sha256": self.backup_sha256, "database": self.database,
            "server_version": self.server_version, "connected_as": self.current_user,
            "superuser": self.superuser, "managed_schemas": self.managed_schemas,
            "dropped_schemas": self.dropped_schemas, "restored_schemas": self.restored_schemas,
            "archive_entries_restored": len(self.entries), "archive_entries_by_type": self.toc_summary,
            "extensions_recreated": self.extensions,
            "outside_objects_restored": [o.identity for o in self.outside_restored],
            "outside_objects_dropped": [o.identity for o in self.outside_dropped],
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
    restored_schemas: list[str]
    archive_entries_restored: int
    extensions_recreated: list[str]
    outside_objects_restored: list[str]
    outside_objects_dropped: list[str]
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
       p.objsubid
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
         contype, con_rel, con_name, idx_name, idx_rel, objsubid) in cur.fetchall():
        if ext_member or schema in ("pg_toast",):
            continue  # goes and comes back with its extension / is storage of a managed table
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


def _extension_schemas(pg_restore: pgtools.Tool, path: Path, entries: list[TocEntry]) -> dict[str, str]:
    """{extension: schema} as the archive creates them (the listing does not say)."""
    if not entries:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".list") as listfile:
        listfile.write("".join(e.line + "\n" for e in entries))
        listfile.flush()
        proc = subprocess.run([str(pg_restore.path), "-L", listfile.name, "-f", "-", str(path)],
                              capture_output=True, text=True, env=pgtools.tool_env())
    if proc.returncode != 0:
        raise RestoreRefused(f"cannot read the extensions in {path.name}: {redact(proc.stderr.strip())}")
    return {_unquote(m.group(1)): _unquote(m.group(2)) for m in _EXTENSION_SQL.finditer(proc.stdout)}


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


RESET_GLOBAL_DEFAULT_PRIVILEGES = """
-- global default privileges back to the built-in ones while objects are re-created (the
-- archive's own ALTER DEFAULT PRIVILEGES entries come last and put the backup's back)
DO $reset_default_privileges$
DECLARE
  d record;
  grantee text;
  objects text;
BEGIN
  FOR d IN SELECT defaclrole, defaclobjtype, defaclacl FROM pg_catalog.pg_default_acl WHERE defaclnamespace = 0 LOOP
    objects := CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' WHEN 'S' THEN 'SEQUENCES' WHEN 'f' THEN 'FUNCTIONS'
                                    WHEN 'T' THEN 'TYPES' WHEN 'n' THEN 'SCHEMAS' WHEN 'L' THEN 'LARGE OBJECTS' END;
    FOR grantee IN SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee)) END
                   FROM pg_catalog.aclexplode(d.defaclacl) a LOOP
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I REVOKE ALL ON %s FROM %s',
                                pg_catalog.pg_get_userbyid(d.defaclrole), objects, grantee);
    END LOOP;
    EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT ALL ON %s TO %I',
                              pg_catalog.pg_get_userbyid(d.defaclrole), objects, pg_catalog.pg_get_userbyid(d.defaclrole));
    IF objects = 'FUNCTIONS' THEN
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT EXECUTE ON FUNCTIONS TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
    ELSIF objects = 'TYPES' THEN
      EXECUTE pg_catalog.format('ALTER DEFAULT PRIVILEGES FOR ROLE %I GRANT USAGE ON TYPES TO PUBLIC', pg_catalog.pg_get_userbyid(d.defaclrole));
    END IF;
  END LOOP;
END
$reset_default_privileges$;
"""


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
        dropped = [s for s in managed if s in existing]
        restored_schemas = sorted(s for s in managed if s in backup_app or s == "public")

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
            outside = _outside_objects(cur, dropped)

        # which archive entries: the managed schemas', their schema-level entries, their extensions
        managed_set = set(managed)
        schema_tags = {s for s in managed} | {_quote_ident(s) for s in managed}
        schema_level = {f"SCHEMA {s}" for s in schema_tags}
        ext_entries = [e for e in listing.entries if e.type == "EXTENSION"]
        ext_schemas = _extension_schemas(pg_restore, backup_path, ext_entries)
        extensions = sorted(name for name, schema in ext_schemas.items() if schema in managed_set)
        ext_tags = {f"EXTENSION {name}" for name in extensions} | {f"EXTENSION {_quote_ident(n)}" for n in extensions}

        for obj in outside:
            obj.toc = _toc_for_outside(obj, listing)
        unrestorable = [o for o in outside if o.kind == "other"]
        if unrestorable:
            raise RestoreRefused(
                "dropping the managed schemas (" + ", ".join(dropped) + ") would also drop objects outside them "
                "that the restore cannot put back: " + "; ".join(o.identity for o in unrestorable)
                + ". Move or drop them first, or name the schemas to restore (managed_schemas). Nothing was changed.")
        outside_restored = [o for o in outside if o.in_backup]
        outside_dropped = [o for o in outside if not o.in_backup]
        outside_ids = {i for o in outside_restored for i in o.toc}

        def wanted(e: TocEntry) -> bool:
            if e.type in ("ENCODING", "STDSTRINGS", "SEARCH_PATH"):
                return False            # pg_restore writes these itself
            if e.namespace is not None:
                return e.namespace in managed_set or e.dump_id in outside_ids
            if e.type == "SCHEMA":
                return e.tag in schema_tags
            if e.type in ("COMMENT", "ACL", "SECURITY LABEL"):
                return e.tag in schema_level or e.tag in ext_tags
            if e.type == "EXTENSION":
                return e.tag in extensions
            return e.type == "DEFAULT ACL"   # global default privileges (reset in the prelude)
        entries = [e for e in listing.entries if wanted(e)]
        summary = dict(sorted({t: sum(1 for e in entries if e.type == t) for t in {e.type for e in entries}}.items()))

        # (c) what the role may do: refuse now rather than fail halfway
        with conn.cursor() as cur:
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
            cur.execute("select x.extname, n.nspname from pg_extension x join pg_namespace n on n.oid = x.extnamespace "
                        "where n.nspname = any(%s) order by 1", (dropped,))
            extensions_now = cur.fetchall()
            if history_problem and facts["superuser"]:
                raise RestoreRefused(f"{history_problem}. Nothing was changed.")
            if not facts["superuser"]:
                problems = [history_problem] if history_problem else []
                if extensions or extensions_now:
                    names = sorted({e for e in extensions} | {f"{n} (in {s})" for n, s in extensions_now})
                    problems.append(f"extensions live in the managed schemas ({', '.join(names)}): dropping and "
                                    "re-creating them needs a superuser")
                cur.execute("""select n.nspname, pg_get_userbyid(n.nspowner) from pg_namespace n
                               where n.nspname = any(%s) and not pg_has_role(current_user, n.nspowner, 'MEMBER')
                               order by 1""", (dropped,))
                problems += [f"schema {s} is owned by {o}" for s, o in cur.fetchall()]
                cur.execute("select r from unnest(%s::text[]) r where not pg_has_role(current_user, r, 'MEMBER')",
                            (owners,))
                problems += [f"the backup has objects owned by {r[0]}" for r in cur.fetchall()]
                cur.execute("select has_database_privilege(current_database(), 'CREATE')")
                if not cur.fetchone()[0]:
                    problems.append("no CREATE privilege on the database (schemas are re-created)")
                cur.execute("""select distinct pg_get_userbyid(defaclrole) from pg_default_acl
                               where defaclnamespace = 0 and not pg_has_role(current_user, defaclrole, 'MEMBER')""")
                problems += [f"global default privileges of {r[0]} must be reset" for r in cur.fetchall()]
                if history_exists and not history_problem:
                    cur.execute("select has_table_privilege(%s, 'INSERT')", (engine.HISTORY_TABLE,))
                    if not cur.fetchone()[0]:
                        problems.append(f"no INSERT privilege on {engine.HISTORY_TABLE}")
                if problems:
                    raise RestoreRefused(
                        f"role {facts['current_user']} is not a superuser and cannot do this restore: "
                        + "; ".join(problems) + ". Connect as the database owner or a superuser. Nothing was changed.")
    finally:
        conn.close()

    if outside_dropped:
        warnings.append("created after the backup, dropped with the managed schemas: "
                        + "; ".join(o.identity for o in outside_dropped))
    prelude = _prelude(facts["database"], backup_path.name, sha, run_id, lock_timeout, dropped,
                       "public" in restored_schemas, public_init)
    postlude = _postlude(history_rows, history_exists, backup_path.name, sha, operator, run_id, restored_to,
                         len(entries), restored_schemas)
    return RestorePlan(
        backup_path=backup_path, backup_sha256=sha, database=facts["database"],
        server_version=facts["server_version"], server_version_num=facts["server_version_num"],
        current_user=facts["current_user"], superuser=bool(facts["superuser"]), managed_schemas=managed,
        dropped_schemas=dropped, restored_schemas=restored_schemas, entries=entries, toc_summary=summary,
        extensions=extensions, outside_restored=outside_restored, outside_dropped=outside_dropped,
        history_rows=history_rows, history_exists=history_exists, prelude_sql=prelude, postlude_sql=postlude,
        pg_restore=pg_restore, psql=psql, run_id=run_id, operator=operator, restored_to=restored_to,
        warnings=warnings)


def _prelude(database, file_name, sha, run_id, lock_timeout, dropped, recreate_public, public_init) -> str:
    lines = [f"-- TruthSource rollback of database {database} to {file_name} (sha256 {sha}), run {run_id}",
             f"SET lock_timeout = {_literal(lock_timeout)};",
             "SELECT pg_catalog.set_config('truthsource.rollback_started', pg_catalog.clock_timestamp()::text, false);",
             RESET_GLOBAL_DEFAULT_PRIVILEGES.strip()]
    if dropped:
        lines.append("-- everything in the managed schemas goes, whoever created it")
        lines.append("DROP SCHEMA IF EXISTS " + ", ".join(_quote_ident(s) for s in dropped) + " CASCADE;")
    if recreate_public:
        lines.append("-- initdb creates public, so pg_dump never does: re-create it as initdb leaves it")
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
    return "\n".join(lines) + "\n"


# -- running it --------------------------------------------------------------------------------

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
                [str(plan.psql.path), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "--no-password",
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
                        psql.stdin.write(line)
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
        restored_schemas=plan.restored_schemas, archive_entries_restored=len(plan.entries),
        extensions_recreated=plan.extensions,
        outside_objects_restored=[o.identity for o in plan.outside_restored],
        outside_objects_dropped=[o.identity for o in plan.outside_dropped],
        history_rows_kept=len(kept), rollback_row=new[0], seconds=round(seconds, 3), psql_messages=messages,
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
