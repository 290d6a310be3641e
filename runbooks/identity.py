"""Which database is this, and which runs backed it up: the database's own witnesses.

On Supabase every project's database is named ``postgres``: a name proves nothing, and a
staging backup restored into production is the worst rollback there is. So a backup records the
*identity* of the database it was taken from, and a rollback refuses a target whose identity
differs, before anything changes:

- ``system_identifier`` (``pg_control_system()``): unique per cluster, from initdb on; a
  physical copy (a replica, a point-in-time restore) shares it, another server never does.
  PUBLIC may execute the function on PostgreSQL 15 to 18; where a platform revoked it, it is
  recorded as unknown and the other two decide;
- the database's oid: another database of the same cluster (a clone made with
  ``CREATE DATABASE ... TEMPLATE``, a database dropped and made again) has another one;
- ``truthsource.database_identity``: a random uuid the preflight writes once. A logical copy
  carries it along (pg_dump copies the row), so it is never proof alone; with the two above it
  tells this database from one that merely resembles it.

``truthsource.deployment_runs`` is the second witness of every backup a run took: its run id,
file name and sha256, written by the preflight (and a rollback's safety backup) into the
database itself, and ``finished_at`` once the run's runner ended. A record whose manifest was
never written (its runner was killed) is vouched for by this row; a run with no ``finished_at``
is an unfinished run, which the next deployment reports.

Both tables live in ``truthsource`` beside the deployment history: a rollback never restores
that schema, so they survive it exactly as the history does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import engine

IDENTITY_TABLE = f"{engine.HISTORY_SCHEMA}.database_identity"
RUNS_TABLE = f"{engine.HISTORY_SCHEMA}.deployment_runs"

IDENTITY_DDL = f"""
-- the database's identity: one row, a random uuid written once (kept across rollbacks, like the history)
create table if not exists {IDENTITY_TABLE} (
  singleton boolean primary key default true check (singleton),
  database_uuid uuid not null default gen_random_uuid(),
  created_at timestamptz not null default now(),
  created_by text not null default current_user
);
comment on table {IDENTITY_TABLE} is 'TruthSource runbooks: this database''s identity; a rollback refuses a backup of another database';
"""
RUNS_DDL = f"""
-- the second witness of every backup a run took, and whether its runner finished
create table if not exists {RUNS_TABLE} (
  run_id text primary key,
  step text not null,
  backup_file text not null,
  backup_sha256 text not null check (backup_sha256 ~ '^[0-9a-f]{{64}}$'),
  backup_taken_at timestamptz not null,
  operator text not null,
  db_role text not null default current_user,
  recorded_at timestamptz not null default now(),
  finished_at timestamptz,
  verdict text check (verdict in ('passed', 'failed'))
);
comment on table {RUNS_TABLE} is 'TruthSource runbooks: each run''s backup (sha256) and whether its runner finished';
"""
READ_SQL = f"""select current_database() as database,
       (select oid from pg_database where datname = current_database()) as database_oid,
       -- only where the role may execute it (PUBLIC may, unless a platform revoked it)
       (select system_identifier::text from pg_control_system()) as system_identifier,
       (select database_uuid::text from {IDENTITY_TABLE}) as database_uuid"""
ENSURE_SQL = (f"-- once per database, after engine.HISTORY_DDL made the schema {engine.HISTORY_SCHEMA}:\n"
              + IDENTITY_DDL.strip() + "\n" + RUNS_DDL.strip() + "\n"
              + f"insert into {IDENTITY_TABLE} (singleton) values (true) on conflict (singleton) do nothing;\n"
              + "-- what a backup records, and a rollback compares:\n" + READ_SQL + ";")
RECORD_RUN_SQL = f"""insert into {RUNS_TABLE} (run_id, step, backup_file, backup_sha256, backup_taken_at, operator)
values (%(run_id)s, %(step)s, %(backup_file)s, %(backup_sha256)s, %(backup_taken_at)s, %(operator)s)"""
FINISH_RUN_SQL = f"""update {RUNS_TABLE} set finished_at = now(), verdict = %(verdict)s
where run_id = %(run_id)s and finished_at is null"""
UNFINISHED_SQL = f"""select r.run_id, r.step, r.backup_file, r.backup_sha256, r.backup_taken_at, r.operator, r.db_role,
       r.recorded_at
from {RUNS_TABLE} r
where r.finished_at is null and r.run_id <> %(run_id)s
  -- left unfinished since the last run that finished (a later run that finished resumed it) ...
  and r.recorded_at > coalesce((select max(f.recorded_at) from {RUNS_TABLE} f where f.finished_at is not null),
                               '-infinity')
  -- ... and not rolled back since (a rollback row names the backup it restored by its sha256)
  and not exists (select 1 from {engine.HISTORY_TABLE} h
                  where h.action = 'rollback' and h.sha256 = r.backup_sha256 and h.applied_at > r.recorded_at)
order by r.recorded_at"""


@dataclass(frozen=True)
class Identity:
    """What tells one database from another; None where it could not be read."""

    database: str
    database_oid: int
    system_identifier: str | None = None
    database_uuid: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Identity":
        return cls(**{k: data.get(k) for k in ("database", "database_oid", "system_identifier", "database_uuid")})

    def describe(self) -> str:
        return (f"database {self.database} (system identifier {self.system_identifier or 'unknown'}, "
                f"oid {self.database_oid}, identity {self.database_uuid or 'none recorded'})")

    def differences(self, other: "Identity") -> list[str]:
        """How `other` (the target now) differs from this (the backup's), fact by fact; a fact this
        side never recorded cannot differ, but the oid and the system identifier always count."""
        out = []
        if self.system_identifier and other.system_identifier and self.system_identifier != other.system_identifier:
            out.append(f"system identifier {self.system_identifier} vs {other.system_identifier} (another server)")
        if self.database_oid != other.database_oid:
            out.append(f"database oid {self.database_oid} vs {other.database_oid} (another database)")
        if self.database_uuid and self.database_uuid != other.database_uuid:
            now = other.database_uuid or "none (missing, or not readable by this role)"
            out.append(f"identity {self.database_uuid} vs {now} ({IDENTITY_TABLE})")
        return out


def _table_readable(cur, table: str) -> bool:
    """The table exists and this role may read it (to_regclass raises without USAGE on the schema)."""
    schema, name = table.split(".")
    cur.execute("""select coalesce(bool_and(has_schema_privilege(n.oid, 'USAGE') and has_table_privilege(c.oid, 'SELECT')),
                                   false)
                   from pg_class c join pg_namespace n on n.oid = c.relnamespace
                   where n.nspname = %s and c.relname = %s""", (schema, name))
    return bool(cur.fetchone()[0])


def _read(cur) -> Identity:
    cur.execute("""select current_database(), (select oid from pg_database where datname = current_database()),
                          has_function_privilege('pg_control_system()', 'EXECUTE')""")
    database, oid, may_read_control = cur.fetchone()
    system_identifier = database_uuid = None
    if may_read_control:
        cur.execute("select system_identifier::text from pg_control_system()")
        system_identifier = cur.fetchone()[0]
    if _table_readable(cur, IDENTITY_TABLE):
        cur.execute(f"select database_uuid::text from {IDENTITY_TABLE}")
        row = cur.fetchone()
        database_uuid = row[0] if row else None
    return Identity(database, int(oid), system_identifier, database_uuid)


def read_identity(conn) -> Identity:
    """This database's identity (reads only; works on a read-only connection, autocommit or not)."""
    with conn.cursor() as cur:
        found = _read(cur)
    if not conn.autocommit:
        conn.rollback()
    return found


def ensure_identity(conn) -> tuple[Identity, bool]:
    """Create the identity row (and the runs table) once, in the caller's transaction, which the
    caller commits: (the identity, whether it was created now). Another role than the creator
    only reads them (it needs no privilege to alter what it does not own)."""
    engine.ensure_history(conn)
    with conn.cursor() as cur:
        for table, ddl in ((IDENTITY_TABLE, IDENTITY_DDL), (RUNS_TABLE, RUNS_DDL)):
            if not _exists(cur, table):
                cur.execute(ddl)
        created = False
        if _read(cur).database_uuid is None:
            cur.execute(f"insert into {IDENTITY_TABLE} (singleton) values (true) on conflict (singleton) do nothing")
            created = cur.rowcount == 1
        return _read(cur), created


# -- the runs' witness ------------------------------------------------------------------------

def record_run(conn, *, run_id: str, step: str, backup_file: str, backup_sha256: str, backup_taken_at: str,
               operator: str) -> None:
    """The run's backup, written into the database (in the caller's transaction)."""
    with conn.cursor() as cur:
        if not _exists(cur, RUNS_TABLE):
            engine.ensure_history(conn)
            cur.execute(RUNS_DDL)
        cur.execute(RECORD_RUN_SQL, {"run_id": run_id, "step": step, "backup_file": backup_file,
                                     "backup_sha256": backup_sha256, "backup_taken_at": backup_taken_at,
                                     "operator": operator})


def _exists(cur, table: str) -> bool:
    schema, name = table.split(".")
    cur.execute("""select exists (select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
                                  where n.nspname = %s and c.relname = %s)""", (schema, name))
    return bool(cur.fetchone()[0])


def run_witness(conn, run_id: str) -> dict | None:
    """The database's row for a run's backup (None: none, or the table is missing or unreadable)."""
    with conn.cursor() as cur:
        if not _table_readable(cur, RUNS_TABLE):
            row = None
        else:
            cur.execute(f"select * from {RUNS_TABLE} where run_id = %s", (run_id,))
            names = [d[0] for d in cur.description]
            found = cur.fetchone()
            row = dict(zip(names, found)) if found else None
    if not conn.autocommit:
        conn.rollback()
    return row


def finish_run(conn, run_id: str, verdict: str) -> bool:
    """Mark the run finished (its runner ended and sealed the record); False if it has no row."""
    with conn.cursor() as cur:
        if not _exists(cur, RUNS_TABLE):
            return False
        cur.execute(FINISH_RUN_SQL, {"run_id": run_id, "verdict": verdict})
        done = cur.rowcount == 1
    if not conn.autocommit:
        conn.commit()
    return done


def open_witnesses(conn, current_run_id: str = "") -> list[dict]:
    """Every run whose witness is not finished ({run_id, backup_sha256}), `current_run_id` left out."""
    with conn.cursor() as cur:
        if not _table_readable(cur, RUNS_TABLE):
            rows = []
        else:
            cur.execute(f"select run_id, backup_sha256 from {RUNS_TABLE} where finished_at is null and run_id <> %s "
                        "order by recorded_at", (current_run_id,))
            rows = [{"run_id": r[0], "backup_sha256": r[1]} for r in cur.fetchall()]
    if not conn.autocommit:
        conn.rollback()
    return rows


def unfinished_runs(conn, current_run_id: str = "") -> list[dict]:
    """Runs that took a backup and never finished (their runner died, or they were stepped through
    by hand and never sealed), since the last run that finished and not rolled back since; oldest
    first, `current_run_id` left out."""
    with conn.cursor() as cur:
        if not (_table_readable(cur, RUNS_TABLE) and _table_readable(cur, engine.HISTORY_TABLE)):
            rows = []
        else:
            cur.execute(UNFINISHED_SQL, {"run_id": current_run_id})
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
    if not conn.autocommit:
        conn.rollback()
    return rows


def how_to_continue(row: dict) -> str:
    """What a DBA can do about one unfinished run."""
    run_id = row["run_id"]
    return (f"run {run_id} ({row['step']}, by {row['operator']}) took its backup {row['backup_file']} at "
            f"{row['backup_taken_at']} and never finished: its runner died, or it was stepped through by hand. "
            f"To return to the state before it: runbook rollback --run {run_id} --yes (its record may be unsealed: "
            f"the database's witness vouches for the backup). To finish the deployment instead: run "
            f"runbook deploy again: phases already applied are skipped, an interrupted phase left nothing "
            f"(each runs in one transaction) and is applied again")
