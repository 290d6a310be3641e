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

   - the default privileges of the connecting role (global, and in the kept schemas; of the owners
     of the extensions it re-creates as their owner; and of any role reset above) go back to the
     built-in ones. An object gets the default privileges of the role that creates it, and these
     roles create every object here, so each one starts with exactly the privileges pg_dump's
     GRANTs are relative to (an extension's owner with default privileges in its schema, as
     Supabase's ``postgres`` has in ``public``, would otherwise grant its functions to the API
     roles); the archive's DEFAULT ACL entries of these roles come last and put theirs back. No
     other role's are touched;
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

The SQL -- the catalog reads of the checks, the script around pg_restore's output -- is in
`restore_sql`; `plan_restore` is the steps above in order, passing a `_PlanContext` along.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import psycopg2

from . import connection, engine, pgtools, restore_sql
from .backup import (INFO_FILE, ArchiveListing, BackupError, TocEntry, describe_exit, read_listing,
                     redact, verify_backup)
from .identity import Identity, read_identity
from .restore_sql import (ARCHIVE_EXTENSIONS_SQL, EXTENSION_OWNERS_SQL, FOREIGN_OWNERS_SQL, OUTSIDE_SQL,
                          PUBLICATIONS_SQL, acts_for, quote_ident, unquote)
from .snapshot import SYSTEM_SCHEMA_SQL, is_app_schema

# Entries outside the managed schemas that the backup can put back once dropped with them.
RESTORABLE_OUTSIDE = {"trigger": "TRIGGER", "policy": "POLICY", "fk": "FK CONSTRAINT", "index": "INDEX"}
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
    """What the restore did: the plan it ran, and what running it showed. The plan's facts read
    through under the names the record gives them (``result.kept_schemas``,
    ``result.archive_entries_restored``: see `plan_facts`)."""

    plan: RestorePlan
    history_rows_kept: int
    rollback_row: dict
    seconds: float
    psql_messages: str

    def plan_facts(self) -> dict:
        """The plan's facts as the result reports them."""
        p = self.plan
        return {
            "backup_path": str(p.backup_path), "backup_sha256": p.backup_sha256, "database": p.database,
            "run_id": p.run_id, "operator": p.operator, "restored_to": p.restored_to,
            "managed_schemas": p.managed_schemas, "dropped_schemas": p.dropped_schemas,
            "kept_schemas": p.kept_schemas, "replaced_schemas": p.replaced_schemas,
            "restored_schemas": p.restored_schemas, "default_privileges_reset": p.default_privileges_reset,
            "kept_as_they_are": p.kept_as_they_are, "archive_entries_restored": len(p.entries),
            "extensions_recreated": p.extensions,
            "outside_objects_restored": [o.identity for o in p.outside_restored],
            "outside_objects_dropped": [o.identity for o in p.outside_dropped],
            "outside_objects_recreated": p.outside_recreated,
            "pg_restore": p.pg_restore.as_dict(), "psql": p.psql.as_dict(), "warnings": p.warnings,
            "prelude_sql": p.prelude_sql, "postlude_sql": p.postlude_sql,
        }

    def __getattr__(self, name: str):
        if name == "plan" or name.startswith("__"):   # not set yet (copy, unpickling): no plan to read
            raise AttributeError(name)
        facts = self.plan_facts()
        if name not in facts:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return facts[name]

    def as_dict(self) -> dict:
        """The plan's facts and the run's, as JSON values (what the record keeps)."""
        ran = {"history_rows_kept": self.history_rows_kept, "rollback_row": self.rollback_row,
               "seconds": self.seconds, "psql_messages": self.psql_messages}
        return json.loads(json.dumps({**self.plan_facts(), **ran}, default=str))


# -- reading the target ------------------------------------------------------------------------

def _outside_objects(cur, schemas: list[str]) -> list[OutsideObject]:
    # the estimate of this catalog walk is far above jit_above_cost; compiling it costs 0.25 s
    cur.execute("set local jit = off")
    cur.execute(OUTSIDE_SQL, {"schemas": schemas})
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
    return restore_sql.extension_schemas(_archive_sql(pg_restore, path, entries, "the extensions in"))


# -- can this role roll the database back? -----------------------------------------------------

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
                    where n.nspname = any (%s::text[]) and not {acts_for('n.nspowner')} order by 1""",
                (list(drop_schemas),))
    blockers += [f"schema {s} is owned by {o}, which {me} cannot act for: a rollback drops it"
                 for s, o in cur.fetchall()]
    for obj in outside:
        if obj.kind not in RESTORABLE_OUTSIDE:
            continue
        cur.execute(f"""select pg_catalog.pg_get_userbyid(r.relowner), pg_catalog.has_table_privilege(r.oid, 'TRIGGER'),
                               {acts_for('r.relowner')}
                        from pg_catalog.pg_class r join pg_catalog.pg_namespace n on n.oid = r.relnamespace
                        where n.nspname = %s and r.relname = %s""", (obj.schema, obj.table))
        row = cur.fetchone()
        if row is None:
            continue
        owner, may_trigger, acts = row
        table = f"{quote_ident(obj.schema)}.{quote_ident(obj.table)}"
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

class EntryKey(NamedTuple):
    """An archive entry as the kept entries are compared: the same in the backup and in a fresh dump."""

    type: str
    namespace: str | None
    tag: str
    owner: str

    @classmethod
    def of(cls, e: TocEntry) -> "EntryKey":
        return cls(e.type, e.namespace, e.tag, e.owner)

    @property
    def schema(self) -> str | None:
        """The schema that a schema's own entry (SCHEMA, or COMMENT, ACL, SECURITY LABEL on it) is about."""
        return _schema_of(self.type, self.namespace, self.tag)

    def describe(self) -> str:
        if self.type == "DEFAULT ACL":
            objects = self.tag.removeprefix("DEFAULT PRIVILEGES FOR ").lower()
            where = f"in schema {self.namespace}" if self.namespace else "(global)"
            return f"the default privileges of {self.owner} {where} for {objects}"
        what = {"SCHEMA": "the owner of", "COMMENT": "the comment on", "ACL": "the privileges on",
                "SECURITY LABEL": "the security label of"}[self.type]
        return f"{what} schema {self.schema}"


def _entry_texts(pg_restore: pgtools.Tool, path: Path, entries: list[TocEntry]) -> dict[EntryKey, str]:
    """{entry key: the SQL pg_restore writes for it (comments and psql meta-commands left out)}."""
    if not entries:
        return {}
    texts: dict[EntryKey, list[str]] = {}
    key = None
    for line in _archive_sql(pg_restore, path, entries, "entries of").splitlines():
        match = _ENTRY_HEADER.match(line)
        if match:
            name, type_, schema, owner = match.groups()
            key = EntryKey(type_, None if schema == "-" else schema, name, owner)
            texts.setdefault(key, [])
        elif key is not None and line.strip() and not line.startswith(("--", "\\")):
            texts[key].append(line)
    return {k: "\n".join(v) for k, v in texts.items()}


def _schema_of(type_: str, namespace: str | None, tag: str) -> str | None:
    """The schema that a schema's own entry (SCHEMA, or COMMENT, ACL, SECURITY LABEL on it) is about."""
    if namespace is not None:
        return None
    if type_ == "SCHEMA":
        return unquote(tag)
    if type_ in SCHEMA_LEVEL_TYPES and tag.startswith("SCHEMA "):
        return unquote(tag[len("SCHEMA "):])
    return None


def _schema_of_entry(e: TocEntry) -> str | None:
    return _schema_of(e.type, e.namespace, e.tag)


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
                          run_id: str, lock_timeout: str) -> tuple[list[EntryKey], list[EntryKey]]:
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
        then = {EntryKey.of(e): e for e in listing.entries if is_kept(e)}
        now = {EntryKey.of(e): e for e in live.entries if is_kept(e)}
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
                cur.execute(f"select pg_catalog.to_regprocedure(%(signature)s) is null, {acts_for('%(owner)s::name')}",
                            {"signature": f"{quote_ident(e.namespace)}.{e.tag}", "owner": e.owner})
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


@dataclass
class _Archive:
    """The backup as the plan reads it: checked, listed, and the tools that read it."""

    path: Path
    sha256: str
    listing: ArchiveListing
    pg_restore: pgtools.Tool
    psql: pgtools.Tool


@dataclass
class _Schemas:
    """The managed schemas, and what becomes of each (see the module docstring)."""

    existing: list[str]       # every schema of the database now, system ones left out
    managed: list[str]
    restored: list[str]       # managed schemas the backup has (public always)
    kept: list[str]           # here now and in the backup: emptied, the schema itself kept
    only_here: list[str]      # here now, not in the backup: dropped
    replaced: list[str] = field(default_factory=list)   # kept ones whose own entries changed: dropped, created again

    @property
    def here(self) -> list[str]:
        """The managed schemas that exist now: emptied or dropped."""
        return [s for s in self.managed if s in self.existing]

    @property
    def dropped(self) -> list[str]:
        return sorted(self.only_here + self.replaced)

    @property
    def created(self) -> list[str]:
        """Created from the archive (the replaced ones included)."""
        return [s for s in self.restored if s not in self.kept]

    def replace(self, schemas: list[str]) -> None:
        self.replaced = sorted(schemas)
        self.kept = [s for s in self.kept if s not in schemas]


@dataclass
class _PlanContext:
    """What the steps of `plan_restore` read and decide, passed from one step to the next."""

    conn: object
    target: connection.Target
    run_id: str
    lock_timeout: str
    facts: dict                       # connection.server_facts
    archive: _Archive | None = None
    schemas: _Schemas | None = None
    history_rows: list[dict] = field(default_factory=list)
    history_problem: str | None = None
    history_exists: bool = False
    public_init: list[str] | None = None   # public's initial privileges pg_dump wrote its ACL against
    outside: list[OutsideObject] = field(default_factory=list)
    extension_owners: dict[str, tuple[str, str, bool]] = field(default_factory=dict)   # see _extension_owners
    extensions: list[str] = field(default_factory=list)     # the archive's, in the managed schemas
    recreated: list[TocEntry] = field(default_factory=list)   # routines outside them, dropped since
    acts: dict[str, bool] = field(default_factory=dict)      # {role: the connecting role may act for it}
    create_in_database: bool = False
    reset_roles: set[str] = field(default_factory=set)
    kept_as_they_are: list[str] = field(default_factory=list)
    entries: list[TocEntry] = field(default_factory=list)   # the archive entries restored
    blockers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def user(self) -> str:
        return self.facts["current_user"]

    @property
    def superuser(self) -> bool:
        return bool(self.facts["superuser"])

    @property
    def major(self) -> int:
        return self.facts["server_version_num"] // 10000

    @property
    def outside_restored(self) -> list[OutsideObject]:
        return [o for o in self.outside if o.in_backup]

    @property
    def outside_dropped(self) -> list[OutsideObject]:
        """Created after the backup: they go."""
        return [o for o in self.outside if not o.in_backup and o.kind != "other"]

    def refuse_if_blocked(self) -> None:
        """The one refusal for what the role may not do: every blocker found so far, in one message."""
        if not self.blockers:
            return
        if self.superuser:
            raise RestoreRefused("this restore cannot be done: " + "; ".join(self.blockers) + ". Nothing was changed.")
        raise RestoreRefused(f"role {self.user} is not a superuser and cannot do this restore: "
                             + "; ".join(self.blockers) + ". Connect as the database owner or a superuser. "
                             "Nothing was changed.")


def plan_restore(target: connection.Target, backup_path, expected_sha256: str, *, run_id: str, operator: str,
                 restored_to=None, managed_schemas: list[str] | None = None, lock_timeout: str = "30s",
                 allow_other_database: bool = False) -> RestorePlan:
    """Check everything and build the script; changes nothing. Refusals raise RestoreRefused.

    The steps, in order: the server, the backup, the database it was taken from, the managed schemas,
    the live database's state, what the archive adds, what the role may do as the live database tells,
    the kept entries compared, the archive entries chosen, what the role may do as the archive tells."""
    try:
        conn = connection.connect(target, application_name=f"runbook rollback {run_id}", readonly=True)
    except psycopg2.Error as exc:
        raise RestoreRefused(f"cannot connect to {target.name!r}: {redact(str(exc).strip())}") from None
    try:
        ctx = _PlanContext(conn, target, run_id, lock_timeout, connection.server_facts(conn))
        _check_server(ctx)
        ctx.archive = _read_archive(ctx, Path(backup_path), expected_sha256)
        _check_same_database(ctx, allow_other_database)
        restored_to = _restored_to(ctx.archive, restored_to)
        ctx.schemas = _choose_schemas(ctx, managed_schemas)
        _read_live_state(ctx)
        _match_archive(ctx)
        ctx.blockers += _live_blockers(ctx)
        ctx.refuse_if_blocked()
        _settle_kept_entries(ctx)
        ctx.entries = _choose_entries(ctx)
        _check_archive_side(ctx)
        ctx.refuse_if_blocked()
    finally:
        conn.close()
    return _build_plan(ctx, operator, restored_to)


def _check_server(ctx: _PlanContext) -> None:
    if ctx.facts["server_version_num"] < 150000:
        raise RestoreRefused(f"the target runs PostgreSQL {ctx.facts['server_version']}; rollback needs 15 or later")


def _read_archive(ctx: _PlanContext, backup_path: Path, expected_sha256: str) -> _Archive:
    """The backup itself: sha256 first, then its table of contents and a full read."""
    try:
        # the newest pg_restore reads every archive; the restore itself prefers the server's own
        verification = verify_backup(backup_path, expected_sha256, full=True)
        pg_restore = pgtools.find_tool("pg_restore", ctx.major)
        try:
            listing = read_listing(pg_restore, backup_path)
        except BackupError:   # an archive written by a newer pg_dump than the server's
            pg_restore = pgtools.find_tool("pg_restore", None)
            listing = read_listing(pg_restore, backup_path)
        psql = pgtools.find_companion(pg_restore, "psql", ctx.major)
    except (BackupError, pgtools.ToolError) as exc:
        raise RestoreRefused(f"{exc} Nothing was changed.") from None
    unknown = sorted({e.line for e in listing.entries if not e.known})
    if unknown:
        raise RestoreRefused("the archive has entries of a type these runbooks do not know, so they cannot "
                             "tell which schema they belong to: " + "; ".join(unknown[:5])
                             + ". Nothing was changed.")
    ctx.warnings += [w for w in (pg_restore.warning,) if w]
    return _Archive(backup_path, verification.sha256, listing, pg_restore, psql)


def _check_same_database(ctx: _PlanContext, allow_other_database: bool) -> None:
    """The very database the backup was taken from, where backup.json says which (see `identity`)."""
    if allow_other_database:
        return
    name = ctx.archive.path.name
    recorded_identity = _backup_info(ctx.archive.path, ctx.archive.sha256).get("identity")
    if recorded_identity:
        then, now = Identity.from_dict(recorded_identity), read_identity(ctx.conn)
        differences = then.differences(now)
        if differences:
            raise RestoreRefused(f"{name} is a backup of {then.describe()}; the target is "
                                 f"{now.describe()} ({'; '.join(differences)}): refusing to restore it there. "
                                 "Nothing was changed.")
    archive_db = ctx.archive.listing.header.get("dbname")
    if archive_db and archive_db != ctx.facts["database"]:
        raise RestoreRefused(f"{name} is a backup of database {archive_db!r}, the target is "
                             f"{ctx.facts['database']!r}; refusing to restore it there. Nothing was changed.")


def _restored_to(archive: _Archive, restored_to) -> str:
    if restored_to is None:
        restored_to = _restored_to_default(archive.path, archive.sha256, archive.listing)
    return restored_to.isoformat() if isinstance(restored_to, datetime) else str(restored_to)


def _choose_schemas(ctx: _PlanContext, managed_schemas: list[str] | None) -> _Schemas:
    """The managed schemas: the app schemas of the backup and of the database, or those named."""
    with ctx.conn.cursor() as cur:
        cur.execute(f"select n.nspname from pg_namespace n where {SYSTEM_SCHEMA_SQL} order by 1")
        existing = [r[0] for r in cur.fetchall()]
    entries = ctx.archive.listing.entries
    backup_schemas = sorted({e.namespace for e in entries if e.namespace}
                            | {e.tag for e in entries if e.type == "SCHEMA" and e.namespace is None})
    backup_app = [s for s in backup_schemas if is_app_schema(s)]
    if managed_schemas is None:
        managed = sorted(set(backup_app) | {s for s in existing if is_app_schema(s)})
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
    restored = sorted(s for s in managed if s in backup_app or s == "public")
    here = [s for s in managed if s in existing]
    return _Schemas(existing, managed, restored, kept=[s for s in here if s in restored],
                    only_here=[s for s in here if s not in restored])


def _read_live_state(ctx: _PlanContext) -> None:
    """The history (read now, kept by never touching its schema, checked at the end), public's initial
    privileges, the objects outside the managed schemas, and who owns their extensions."""
    try:
        ctx.history_rows = engine.read_history(ctx.conn)
    except psycopg2.Error as exc:
        ctx.conn.rollback()
        ctx.history_problem = f"cannot read the deployment history: {exc.diag.message_primary or exc}"
    here = ctx.schemas.here
    with ctx.conn.cursor() as cur:
        cur.execute("select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                    "where n.nspname = %s and c.relname = 'deployment_history')", (engine.HISTORY_SCHEMA,))
        ctx.history_exists = cur.fetchone()[0]
        cur.execute("""select (select initprivs::text[] from pg_init_privs
                               where classoid = 'pg_namespace'::regclass and objoid = n.oid)
                       from pg_namespace n where nspname = 'public'""")
        row = cur.fetchone()
        # pg_dump wrote public's ACL relative to public's initial privileges at dump time:
        # start from those when the backup recorded them. Otherwise from today's: no public
        # now, assume initdb's; public without initial privileges (re-created by an earlier
        # restore), pg_dump compared its ACL with the plain default, so start from that.
        recorded = _backup_info(ctx.archive.path, ctx.archive.sha256)
        if recorded.get("public_init_privs") is not None:
            ctx.public_init = recorded["public_init_privs"]
        else:
            ctx.public_init = None if row is None else (row[0] or [])
        ctx.outside = _outside_objects(cur, here) if here else []
        ctx.extension_owners = _extension_owners(cur, here, ctx.superuser)
    ctx.conn.rollback()


def _match_archive(ctx: _PlanContext) -> None:
    """What the archive adds: its extensions in the managed schemas, the entries that put the outside
    objects back, and the routines outside them that the deployment dropped."""
    archive, managed = ctx.archive, set(ctx.schemas.managed)
    ext_entries = [e for e in archive.listing.entries if e.type == "EXTENSION"]
    ext_schemas = _extension_schemas(archive.pg_restore, archive.path, ext_entries)
    ctx.extensions = sorted(name for name, schema in ext_schemas.items() if schema in managed)
    for obj in ctx.outside:
        obj.toc = _toc_for_outside(obj, archive.listing)
    # routines outside the managed schemas that the backup has, that are gone now and that this
    # role could have dropped: the deployment dropped them (phase 1 drops duplicate updated-at
    # functions wherever they live, e.g. in `extensions`); they come back from the archive
    ctx.recreated = _dropped_outside_routines(ctx.conn, archive.listing, managed, ctx.schemas.existing,
                                              ctx.superuser)


def _live_blockers(ctx: _PlanContext) -> list[str]:
    """What the role may do, as the live database tells: the preflight's check."""
    with _Reading(ctx.conn) as cur:
        return ([ctx.history_problem] if ctx.history_problem else []) + _blockers(
            cur, ctx.user, ctx.superuser, ctx.schemas.kept, ctx.schemas.only_here,
            [o for o in ctx.outside if o.kind == "other" or o.in_backup], ctx.extensions)


def _settle_kept_entries(ctx: _PlanContext) -> None:
    """What the archive keeps and the database has too: compared, not restored. A kept schema whose
    own entries changed is replaced, another role's changed default privileges reset, when the role
    may; what it may not put back is a blocker."""
    archive, schemas = ctx.archive, ctx.schemas
    unchanged, changed = _compare_kept_entries(archive.pg_restore, archive.path, archive.listing, ctx.target,
                                               ctx.major, schemas.existing, schemas.kept, ctx.user, ctx.run_id,
                                               ctx.lock_timeout)
    schema_owner = _read_role_facts(ctx, changed)
    schemas.replace(_replaced_schemas(ctx, changed, schema_owner))
    ctx.reset_roles = _reset_roles(ctx, changed)

    def left_alone(key: EntryKey) -> bool:
        if key.type == "DEFAULT ACL":
            return (key.namespace is None or key.namespace in schemas.kept) and key.owner not in ctx.reset_roles
        return key.schema in schemas.kept
    ctx.kept_as_they_are = [k.describe() for k in unchanged if left_alone(k)]


def _read_role_facts(ctx: _PlanContext, changed: list[EntryKey]) -> dict[str, tuple[str, bool]]:
    """CREATE on the database, the roles the connecting role acts for (into `ctx`), and
    {kept schema: (its owner, whether the role may drop it)}."""
    superuser = ctx.superuser
    with _Reading(ctx.conn) as cur:
        cur.execute("select has_database_privilege(current_database(), 'CREATE')")
        ctx.create_in_database = superuser or cur.fetchone()[0]
        roles = sorted({k.owner for k in changed if k.owner} | {e.owner for e in ctx.archive.listing.entries if e.owner})
        cur.execute(f"select r, {acts_for('r::name')} from unnest(%s::text[]) r "
                    "where exists (select 1 from pg_roles where rolname = r)", (roles,))
        ctx.acts = {r: superuser or ok for r, ok in cur.fetchall()}
        cur.execute(f"select n.nspname, pg_get_userbyid(n.nspowner), {acts_for('n.nspowner')} "
                    "from pg_namespace n where n.nspname = any (%s::text[])", (ctx.schemas.kept,))
        return {s: (o, superuser or ok) for s, o, ok in cur.fetchall()}


def _replaced_schemas(ctx: _PlanContext, changed: list[EntryKey],
                      schema_owner: dict[str, tuple[str, bool]]) -> list[str]:
    """The kept schemas whose own entries changed, put back by dropping the schema and creating it
    from the archive -- those the role may; the others are blockers."""
    replaced = []
    for schema in ctx.schemas.kept:
        what = [k.describe() for k in changed if k.schema == schema]
        if not what:
            continue
        owner, may_drop = schema_owner[schema]
        foreign = sorted({e.owner for e in ctx.archive.listing.entries if e.owner and e.type in OWNED_ENTRY_TYPES
                          and (e.namespace == schema or _schema_of_entry(e) == schema)
                          and not ctx.acts.get(e.owner, False)})
        reasons = ([f"cannot act for its owner {owner} to drop it"] if not may_drop else []) + \
                  (["may not create schemas (no CREATE on the database)"] if not ctx.create_in_database else []) + \
                  ([f"cannot act for {', '.join(foreign)}, whose objects or default privileges the backup has "
                    "in it"] if foreign else [])
        if reasons:
            ctx.blockers.append(f"{' and '.join(what)} changed since the backup was taken; putting that back means "
                                f"dropping schema {schema} and creating it from the backup, and role {ctx.user} "
                                + "; ".join(reasons) + f" (only {owner} or a superuser could)")
        else:
            replaced.append(schema)
    return replaced


def _reset_roles(ctx: _PlanContext, changed: list[EntryKey]) -> set[str]:
    """The roles whose default privileges are reset and restored: the connecting one, the owners of the
    extensions re-created as their owner (their members must get the privileges the archive gives them,
    not what the owner's default privileges would add: Supabase's postgres grants all on functions in
    public to the API roles), and those whose kept default privileges changed, when it acts for them
    (a blocker otherwise)."""
    roles = {ctx.user} | {ctx.extension_owners[x][0] for x in ctx.extensions if x in ctx.extension_owners}
    for key in changed:
        if key.type != "DEFAULT ACL" or (key.namespace is not None and key.namespace not in ctx.schemas.kept):
            continue
        if ctx.acts.get(key.owner, False):
            roles.add(key.owner)
        else:
            ctx.blockers.append(f"{key.describe()} changed since the backup was taken; only {key.owner} or "
                                "a superuser can put them back")
    return roles


def _choose_entries(ctx: _PlanContext) -> list[TocEntry]:
    """The archive entries restored: what is in the managed schemas, the created schemas' own entries,
    their extensions, the restorable outside dependents, the reset roles' default privileges."""
    listing, schemas = ctx.archive.listing, ctx.schemas
    managed, kept, created = set(schemas.managed), set(schemas.kept), set(schemas.created)
    ext_tags = {f"EXTENSION {name}" for name in ctx.extensions} | {f"EXTENSION {quote_ident(n)}" for n in ctx.extensions}
    recreated_tags = {(e.namespace, f"{e.type} {e.tag}") for e in ctx.recreated}
    outside_ids = ({i for o in ctx.outside_restored for i in o.toc} | {e.dump_id for e in ctx.recreated}
                   | {e.dump_id for e in listing.entries
                      if e.type in SCHEMA_LEVEL_TYPES and (e.namespace, e.tag) in recreated_tags})

    def wanted(e: TocEntry) -> bool:
        if e.type in ("ENCODING", "STDSTRINGS", "SEARCH_PATH"):
            return False            # pg_restore writes these itself
        if e.type == "DEFAULT ACL":
            if e.namespace is None or e.namespace in kept:
                return e.owner in ctx.reset_roles
            return e.namespace in managed
        if e.namespace is not None:
            return e.namespace in managed or e.dump_id in outside_ids
        if e.type == "EXTENSION":
            return e.tag in ctx.extensions
        if e.type in SCHEMA_LEVEL_TYPES and e.tag in ext_tags:
            return True
        return _schema_of_entry(e) in created
    return [e for e in listing.entries if wanted(e)]


def _check_archive_side(ctx: _PlanContext) -> None:
    """What the role may do, as the archive tells: refuse now rather than fail halfway."""
    with _Reading(ctx.conn) as cur:
        owners = sorted({e.owner for e in ctx.entries if e.owner})
        cur.execute("select r from unnest(%s::text[]) r where not exists (select 1 from pg_roles where rolname = r)",
                    (owners,))
        missing_roles = [r[0] for r in cur.fetchall()]
        if missing_roles:
            raise RestoreRefused(f"the backup names owners that do not exist on this server: "
                                 f"{', '.join(missing_roles)}; create these roles first. Nothing was changed.")
        cur.execute("""select x.extname, not exists (select 1 from pg_available_extensions a where a.name = x.extname)
                       from unnest(%s::text[]) x(extname)""", (ctx.extensions,))
        unavailable = [r[0] for r in cur.fetchall() if r[1]]
        if unavailable:
            raise RestoreRefused(f"the backup has extensions this server cannot install: {', '.join(unavailable)}. "
                                 "Nothing was changed.")
    if not ctx.superuser:
        ctx.blockers += _archive_blockers(ctx)


def _archive_blockers(ctx: _PlanContext) -> list[str]:
    """For a role that is not a superuser: the archive's objects it could not re-create."""
    user, acts = ctx.user, ctx.acts
    foreign_owners = sorted({e.owner for e in ctx.entries if e.owner and e.type in OWNED_ENTRY_TYPES
                             and not acts.get(e.owner, False)})
    blockers = [f"the backup has objects owned by {r}, which role {user} cannot act for" for r in foreign_owners]
    # ALTER PUBLICATION ... ADD: the publication's owner's to do (the entry's owner)
    blockers += [f"the backup puts {e.tag} back into a publication owned by {e.owner}, which role {user} "
                 "cannot act for" for e in ctx.entries
                 if e.type in ("PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA") and e.owner
                 and not acts.get(e.owner, False)]
    created = ctx.schemas.created
    if created and not ctx.create_in_database:
        blockers.append(f"no CREATE privilege on the database (schema(s) {', '.join(created)} are created)")
    with _Reading(ctx.conn) as cur:
        for schema in sorted({e.namespace for e in ctx.recreated}):
            cur.execute("select has_schema_privilege(%s, 'CREATE')", (schema,))
            if not cur.fetchone()[0]:
                names = [f"{e.type.lower()} {quote_ident(schema)}.{e.tag}" for e in ctx.recreated
                         if e.namespace == schema]
                blockers.append(f"{', '.join(names)}: dropped since the backup was taken; re-creating it "
                                f"needs the CREATE privilege on schema {schema}")
    return blockers


def _build_plan(ctx: _PlanContext, operator: str, restored_to: str) -> RestorePlan:
    """The plan from what the steps decided, with the SQL before and after the archive's."""
    archive, schemas, facts = ctx.archive, ctx.schemas, ctx.facts
    outside_recreated = [f"{e.type.lower()} {quote_ident(e.namespace)}.{e.tag}" for e in ctx.recreated]
    if ctx.outside_dropped:
        ctx.warnings.append("created after the backup, dropped with what is in the managed schemas: "
                            + "; ".join(o.identity for o in ctx.outside_dropped))
    if outside_recreated:
        ctx.warnings.append("dropped since the backup outside the managed schemas, re-created from it: "
                            + "; ".join(outside_recreated))
    try:
        prelude = restore_sql.prelude(
            database=facts["database"], file_name=archive.path.name, sha=archive.sha256, run_id=ctx.run_id,
            lock_timeout=ctx.lock_timeout, reset_roles=sorted(ctx.reset_roles), kept=schemas.kept,
            dropped=schemas.dropped, create_public="public" in schemas.created, public_init=ctx.public_init)
        postlude = restore_sql.postlude(
            history_rows=ctx.history_rows, history_exists=ctx.history_exists, file_name=archive.path.name,
            sha=archive.sha256, operator=operator, run_id=ctx.run_id, restored_to=restored_to,
            entries=len(ctx.entries), schemas=schemas.restored)
    except restore_sql.UnsafeValue as exc:
        raise RestoreRefused(str(exc)) from None
    types = {e.type for e in ctx.entries}
    return RestorePlan(
        backup_path=archive.path, backup_sha256=archive.sha256, database=facts["database"],
        server_version=facts["server_version"], server_version_num=facts["server_version_num"],
        current_user=ctx.user, superuser=ctx.superuser, managed_schemas=schemas.managed,
        dropped_schemas=schemas.dropped, kept_schemas=schemas.kept, replaced_schemas=schemas.replaced,
        restored_schemas=schemas.restored, default_privileges_reset=sorted(ctx.reset_roles),
        kept_as_they_are=ctx.kept_as_they_are, entries=ctx.entries,
        toc_summary=dict(sorted({t: sum(1 for e in ctx.entries if e.type == t) for t in types}.items())),
        extensions=ctx.extensions, outside_restored=ctx.outside_restored, outside_dropped=ctx.outside_dropped,
        outside_recreated=outside_recreated, history_rows=ctx.history_rows, history_exists=ctx.history_exists,
        prelude_sql=prelude, postlude_sql=postlude, pg_restore=archive.pg_restore, psql=archive.psql,
        run_id=ctx.run_id, operator=operator, restored_to=restored_to, warnings=ctx.warnings,
        extension_owners={x: ctx.extension_owners[x][0] for x in ctx.extensions if x in ctx.extension_owners})


# -- running it --------------------------------------------------------------------------------

@dataclass
class _Streamed:
    """How pg_restore streaming into psql ended."""

    psql_code: int
    restore_code: int | None      # None: pg_restore was never started
    input_complete: bool          # psql read the whole script, COMMIT included
    psql_messages: str
    restore_messages: str


def execute_plan(plan: RestorePlan, target: connection.Target) -> RestoreResult:
    """Run the plan's script in one transaction; RestoreFailed leaves the database as it was."""
    started = time.perf_counter()
    streamed = _stream_restore(plan, target)
    seconds = time.perf_counter() - started
    _check_streamed(plan, streamed)
    rollback_row = _check_history(plan, target)
    return RestoreResult(plan=plan, history_rows_kept=len(plan.history_rows), rollback_row=rollback_row,
                         seconds=round(seconds, 3), psql_messages=streamed.psql_messages)


def _stream_restore(plan: RestorePlan, target: connection.Target) -> _Streamed:
    """The prelude, pg_restore's output and the postlude, fed to one psql: its script's last line
    commits, and psql is killed before it reads the end of a script cut short."""
    env = pgtools.tool_env()
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
                    _feed_archive(plan, restore.stdout, psql.stdin)
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
        return _Streamed(code, None if restore is None else restore.returncode, input_complete,
                         redact(err_path.read_text(errors="replace")),
                         redact(restore_err_path.read_text(errors="replace")))


def _feed_archive(plan: RestorePlan, script, psql_stdin) -> None:
    """pg_restore's script into psql's input, its CREATE EXTENSION lines run as the extension's owner."""
    # A newer pg_restore writes settings an older server does not know.
    drop_lines = set()
    if plan.pg_restore.major >= 17 and plan.server_version_num < 170000:
        drop_lines.add("SET transaction_timeout = 0;")
    in_header = True
    for line in script:
        if in_header:
            if line.startswith((b"-- Name:", b"-- Data for Name:")):
                in_header = False
            elif line.rstrip(b"\n").decode(errors="replace") in drop_lines:
                continue
        psql_stdin.write(restore_sql.as_extension_owner(line, plan.extension_owners))


def _check_streamed(plan: RestorePlan, streamed: _Streamed) -> None:
    """RestoreFailed unless pg_restore read the whole archive and psql ran the whole script."""
    if streamed.restore_code not in (None, 0) and streamed.psql_code != 3:
        raise RestoreFailed(f"pg_restore could not read {plan.backup_path.name} "
                            f"(exit {describe_exit(streamed.restore_code)}): "
                            f"{streamed.restore_messages.strip() or 'no message'}. psql was stopped before the end "
                            "of the script: the transaction was rolled back and the database is as it was.")
    if streamed.psql_code != 0 or not streamed.input_complete:
        tail = "\n".join(streamed.psql_messages.strip().splitlines()[-15:])
        raise RestoreFailed(f"the restore script failed (psql exit {describe_exit(streamed.psql_code)}); its single "
                            "transaction was rolled back and the database is as it was before the rollback "
                            f"started.\n{tail}")


def _check_history(plan: RestorePlan, target: connection.Target) -> dict:
    """The history after the commit: every row read before, and one new row, this rollback's (returned)."""
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
    return new[0]


def restore_backup(target: connection.Target, backup_path, expected_sha256: str, *, run_id: str, operator: str,
                   restored_to=None, managed_schemas: list[str] | None = None, lock_timeout: str = "30s",
                   allow_other_database: bool = False) -> RestoreResult:
    """Roll the target back to the backup (see the module docstring): plan, then one transaction."""
    plan = plan_restore(target, backup_path, expected_sha256, run_id=run_id, operator=operator,
                        restored_to=restored_to, managed_schemas=managed_schemas, lock_timeout=lock_timeout,
                        allow_other_database=allow_other_database)
    return execute_plan(plan, target)
