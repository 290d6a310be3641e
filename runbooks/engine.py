"""The apply engine: one phase file, applied safely and written down.

- The file's statements run in ONE transaction, so a failure anywhere leaves no partial change.
  Statements marked by a ``-- runbook: no-transaction`` line (``create index concurrently``,
  batches that commit as they go) come first or last: the first ones run before that
  transaction (an expand step that prepares without changing what the app reads), the last ones
  after its commit, one by one. Plain ``psql -f`` ignores the marker and still applies the file,
  statement by statement.
- An advisory lock keeps two runners apart: the second waits (bounded) and then fails naming
  the holder. Inside, ``lock_timeout`` is short, and a transaction that cannot get a lock is
  rolled back and retried with backoff, so the phase never queues behind a long transaction
  while blocking everyone else.
- A history table in the project's own schema records every applied phase: version, file,
  sha256, when, by whom (the operator named, the OS user and the database role), how long, which
  run. A phase whose file changed since it was applied is refused unless forced; an unchanged one
  is skipped unless re-applying is asked for.
"""

from __future__ import annotations

import getpass
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pglast
import psycopg2
import psycopg2.errors
from pglast import ast
from pglast.parser import ParseError

from . import connection
from .contract import HISTORY_SCHEMA
from .paths import PHASES
from .records import sha256_of

HISTORY_TABLE = f"{HISTORY_SCHEMA}.deployment_history"
LOCK_CLASS = 0x54525554  # 'TRUT': our advisory locks never collide with an application's
RUN_LOCK = 1             # held for a whole run (preflight .. verification, rollback)
APPLY_LOCK = 2           # held while one phase file is applied
NO_TRANSACTION_MARKER = re.compile(r"^\s*--\s*runbook:\s*no-transaction\s*$", re.MULTILINE)
RETRYABLE = (psycopg2.errors.LockNotAvailable, psycopg2.errors.DeadlockDetected)

OS_USER_COMMENT = (f"comment on column {HISTORY_TABLE}.os_user is 'the operating-system user that ran runbook "
                   "(NULL in rows written before it was recorded)';")
HISTORY_DDL = f"""
create schema if not exists {HISTORY_SCHEMA};
comment on schema {HISTORY_SCHEMA} is 'TruthSource runbooks: deployment history (kept across rollbacks)';
create table if not exists {HISTORY_TABLE} (
  id bigint generated always as identity primary key,
  version text not null,
  file_name text not null,
  sha256 text not null check (sha256 ~ '^[0-9a-f]{{64}}$'),
  action text not null check (action in ('apply', 'reapply', 'forced', 'rollback')),
  applied_at timestamptz not null default now(),
  applied_by text not null,
  db_role text not null default current_user,
  os_user text,
  duration_ms bigint not null,
  statements integer not null,
  run_id text not null,
  restored_to timestamptz,
  note text,
  check ((action = 'rollback') = (restored_to is not null))
);
comment on column {HISTORY_TABLE}.restored_to is 'for a rollback: when the restored backup was taken';
comment on column {HISTORY_TABLE}.applied_by is 'the operator the run names (-p operator), else the OS user';
comment on column {HISTORY_TABLE}.db_role is 'the database role that applied it (current_user)';
{OS_USER_COMMENT}
create index if not exists deployment_history_version_idx on {HISTORY_TABLE} (version, applied_at);
revoke all on schema {HISTORY_SCHEMA} from public;
"""

# A history table made by older runbooks gains the columns added since; its old rows keep NULL there.
HISTORY_UPGRADE_DDL = f"""
alter table {HISTORY_TABLE} add column if not exists os_user text;
{OS_USER_COMMENT}
"""


class EngineError(Exception):
    """Base of everything the engine refuses or fails with."""


class FileError(EngineError, ValueError):
    """The phase file itself is unusable; nothing was run."""


class ChecksumMismatch(EngineError):
    """The file changed since it was applied, and the operator did not force it."""


class LockBusy(EngineError):
    """Another runner holds the advisory lock."""


class LockRetriesExhausted(EngineError):
    """A table lock was not granted within the retries."""


class StatementFailed(EngineError):
    """A statement failed; the transaction was rolled back."""

    def __init__(self, message: str, statement: "Statement", pgcode: str | None):
        super().__init__(message)
        self.statement = statement
        self.pgcode = pgcode


class ConnectionLost(StatementFailed):
    """The server ended the session during a statement (backend terminated, server shut down)."""


@dataclass(frozen=True)
class Statement:
    index: int          # 1-based position in the file
    line: int           # line where it starts
    text: str
    transactional: bool = True
    before_body: bool = False   # a no-transaction statement that runs before the body's transaction

    @property
    def summary(self) -> str:
        first = next((ln.strip() for ln in self.text.splitlines() if ln.strip()), "")
        return first if len(first) <= 100 else first[:97] + "..."


@dataclass
class Timing:
    index: int
    line: int
    summary: str
    seconds: float
    rowcount: int
    transactional: bool
    notices: list[str] = field(default_factory=list)


@dataclass
class ApplyResult:
    version: str
    file_name: str
    sha256: str
    status: str                  # applied | reapplied | forced | skipped
    seconds: float = 0.0
    attempts: int = 0
    timings: list[Timing] = field(default_factory=list)
    previous: dict | None = None  # the history row this run found for the version

    def as_dict(self) -> dict:
        return {"version": self.version, "file": self.file_name, "sha256": self.sha256,
                "status": self.status, "seconds": round(self.seconds, 3), "attempts": self.attempts,
                "statements": len(self.timings)}


def parse_file(path: Path) -> list[Statement]:
    """Split a phase file into statements with the real PostgreSQL parser.

    Refuses, before anything runs: a file that does not parse; transaction control inside the
    file (the engine owns the transaction); no-transaction statements between transactional ones
    (the body runs in one transaction: only statements before it or after it run on their own).
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8")
    try:
        slices = pglast.split(text, with_parser=True, only_slices=True)
    except ParseError as exc:
        offset = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        where = _line_of(text, offset) if offset is not None else "?"
        raise FileError(f"{path.name}: does not parse near line {where}: {exc.args[0]}") from None
    statements: list[Statement] = []
    previous_end = 0
    for index, piece in enumerate(slices, start=1):
        gap = text[previous_end:piece.start]
        body = text[piece]
        transactional = not NO_TRANSACTION_MARKER.search(gap)
        statement = Statement(index=index, line=_line_of(text, piece.start), text=body, transactional=transactional,
                              before_body=not transactional and all(not s.transactional for s in statements))
        node = pglast.parse_sql(body)[0].stmt
        if isinstance(node, ast.TransactionStmt):
            raise FileError(f"{path.name}:{statement.line}: transaction control ({statement.summary}) "
                            "does not belong in a phase file: the engine runs the file in one transaction")
        if statement.transactional and statements and not statements[-1].transactional \
                and any(s.transactional for s in statements):
            raise FileError(f"{path.name}:{statement.line}: a transactional statement follows a "
                            "'-- runbook: no-transaction' one after the body; marked statements come "
                            "first or last")
        statements.append(statement)
        previous_end = piece.stop
    if not statements:
        raise FileError(f"{path.name}: no SQL statements")
    return statements


def split_phase(statements: list[Statement]) -> tuple[list[Statement], list[Statement], list[Statement]]:
    """The statements run before the body's transaction, in it, and after its commit."""
    head = [s for s in statements if s.before_body]
    body = [s for s in statements if s.transactional]
    tail = [s for s in statements if not s.transactional and not s.before_body]
    return head, body, tail


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# -- history ---------------------------------------------------------------------------------

def ensure_history(conn) -> None:
    """Create the history schema and table if missing, or give a table of older runbooks the columns
    added since when this role may alter it (in the caller's transaction)."""
    with conn.cursor() as cur:
        cur.execute(f"select to_regclass('{HISTORY_TABLE}') is not null")
        if not cur.fetchone()[0]:
            cur.execute(HISTORY_DDL)
            return
        # altered only when a column is missing: ALTER TABLE takes its lock even when it adds nothing
        cur.execute(f"select pg_has_role(relowner, 'USAGE') from pg_class where oid = '{HISTORY_TABLE}'::regclass")
        if cur.fetchone()[0] and not _has_os_user(cur):
            cur.execute(HISTORY_UPGRADE_DDL)


def _has_os_user(cur) -> bool:
    cur.execute(f"""select exists (select 1 from pg_attribute where attrelid = '{HISTORY_TABLE}'::regclass
                                     and attname = 'os_user' and not attisdropped)""")
    return cur.fetchone()[0]


def read_history(conn) -> list[dict]:
    """Every history row, oldest first ([] where the project never ran)."""
    with conn.cursor() as cur:
        cur.execute(f"select to_regclass('{HISTORY_TABLE}') is not null")
        if not cur.fetchone()[0]:
            return []
        # every column: a table of older runbooks lacks the newer ones, which then read as None
        cur.execute(f"select * from {HISTORY_TABLE} order by applied_at, id")
        names = [d[0] for d in cur.description]
        return [{"os_user": None, **dict(zip(names, row))} for row in cur.fetchall()]


def latest_applied(history: list[dict]) -> dict[str, dict]:
    """Per version, the newest history row whose work is still in the database.

    A rollback restores a backup taken at `restored_to`: what was applied after that is undone.
    """
    effective: list[dict] = []
    for row in history:
        if row["action"] == "rollback":
            effective = [r for r in effective if r["applied_at"] < row["restored_to"]]
        else:
            effective.append(row)
    return {row["version"]: row for row in effective}


def record_history(conn, *, version: str, file_name: str, sha256: str, action: str, operator: str,
                   seconds: float, statements: int, run_id: str, restored_to=None,
                   note: str | None = None) -> None:
    """One history row: who, each named: the operator the run names (applied_by), the OS user
    (os_user) and the database role (db_role, current_user by the column's default)."""
    row = {"version": version, "file_name": file_name, "sha256": sha256, "action": action, "applied_by": operator,
           "duration_ms": int(seconds * 1000), "statements": statements, "run_id": run_id,
           "restored_to": restored_to, "note": note, "os_user": getpass.getuser()}
    with conn.cursor() as cur:
        if not _has_os_user(cur):
            del row["os_user"]   # a table of older runbooks that this role may not alter
        cur.execute(f"insert into {HISTORY_TABLE} ({', '.join(row)}) values ({', '.join(['%s'] * len(row))})",
                    list(row.values()))


@dataclass(frozen=True)
class PhaseState:
    """A phase file on disk against what the history says is applied."""

    version: str
    path: Path
    on_disk: str | None     # sha256 of the file, None when it is missing
    applied: dict | None    # the history row in effect, None when pending

    @property
    def state(self) -> str:
        if self.applied is None:
            return "pending" if self.on_disk else "pending, FILE MISSING"
        if self.on_disk is None:
            return "applied, FILE MISSING"
        return "applied, file matches" if self.applied["sha256"] == self.on_disk else "applied, FILE CHANGED"


def phase_states(conn, history: list[dict] | None = None) -> list[PhaseState]:
    """Every phase's state; `history`, when the caller has read it already, saves reading it again."""
    applied = latest_applied(read_history(conn) if history is None else history)
    return [PhaseState(version, path, sha256_of(path) if path.is_file() else None, applied.get(version))
            for version, path in PHASES]


# -- locks -----------------------------------------------------------------------------------

def lock_holders(conn, key: int) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute("""
            select a.pid, a.usename, a.application_name, a.client_addr::text, a.backend_start
            from pg_locks l join pg_stat_activity a using (pid)
            where l.locktype = 'advisory' and l.classid = %s and l.objid = %s and l.granted
              and l.database = (select oid from pg_database where datname = current_database())
        """, (LOCK_CLASS, key))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def describe_holders(holders: list[dict]) -> str:
    if not holders:
        return "a session that has since gone"
    return "; ".join(
        f"pid {h['pid']} ({h['application_name'] or 'no application name'}, role {h['usename']}, "
        f"from {h['client_addr'] or 'local'}, since {h['backend_start']:%Y-%m-%d %H:%M:%S %Z})"
        for h in holders)


def acquire_advisory_lock(conn, key: int, wait_seconds: float, what: str) -> None:
    """Take a session advisory lock, waiting at most `wait_seconds` (conn in autocommit)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        with conn.cursor() as cur:
            cur.execute("select pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key))
            if cur.fetchone()[0]:
                return
        if time.monotonic() >= deadline:
            raise LockBusy(f"{what} is locked by another runner: {describe_holders(lock_holders(conn, key))}; "
                           f"waited {wait_seconds:g}s. Two runs never interleave: wait for it to finish.")
        time.sleep(min(0.5, max(0.05, deadline - time.monotonic())))


def release_advisory_lock(conn, key: int) -> None:
    if not conn.closed:
        with conn.cursor() as cur:
            cur.execute("select pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))


@contextmanager
def run_lock(target: connection.Target, run_id: str, wait_seconds: float = 30):
    """Hold the database's run lock for a whole run, on a connection of its own."""
    conn = connection.connect(target, application_name=f"runbook run {run_id}", autocommit=True)
    try:
        acquire_advisory_lock(conn, RUN_LOCK, wait_seconds, f"database {target.name!r}")
        yield conn
    finally:
        conn.close()  # closing releases the session lock even if the unlock is never sent


def lock_blockers(conn) -> str:
    """Other sessions holding locks on the database's own relations (who blocked us)."""
    with conn.cursor() as cur:
        cur.execute("""
            select distinct a.pid, a.usename, a.application_name, a.state,
                   now() - coalesce(a.xact_start, a.query_start) as age, left(a.query, 80)
            from pg_locks l
            join pg_stat_activity a using (pid)
            join pg_class c on c.oid = l.relation
            join pg_namespace n on n.oid = c.relnamespace
            where l.granted and a.pid <> pg_backend_pid()
              and n.nspname not in ('pg_catalog', 'information_schema')
              and l.database = (select oid from pg_database where datname = current_database())
            order by age desc nulls last
            limit 5
        """)
        rows = cur.fetchall()
    return "; ".join(f"pid {pid} ({app or 'no application name'}, role {user}, {state}, "
                     f"for {age}): {query!r}" for pid, user, app, state, age, query in rows) or "none found now"


# -- the engine ------------------------------------------------------------------------------

@dataclass
class ApplyEngine:
    """Applies phase files to one target for one run."""

    target: connection.Target
    run_id: str
    operator: str = field(default_factory=getpass.getuser)
    lock_timeout: str = "500ms"    # below deadlock_timeout (1 s): the phase gives up a wait before the app sees a deadlock
    statement_timeout: str = "15min"
    lock_retries: int = 5
    retry_backoff: float = 1.0      # seconds, doubled per retry
    lock_wait: float = 60.0          # seconds to wait for another runner
    progress: callable = None        # progress(Timing) after each statement
    on_retry: callable = None        # on_retry(attempt, delay, reason) before each pause for a retry
    max_replica_lag: float | None = None   # seconds a replica may fall behind before the batches pause (0: never)

    @property
    def application_name(self) -> str:
        """How the server names this run's connection (pg_stat_activity), for the heartbeat."""
        return f"runbook run {self.run_id}"

    def _connect(self):
        conn = connection.connect(self.target, application_name=self.application_name)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("select set_config('lock_timeout', %s, false), set_config('statement_timeout', %s, false)",
                        (self.lock_timeout, self.statement_timeout))
            if self.max_replica_lag is not None:   # the phase files' batches read it (unset: their default)
                cur.execute("select set_config('truthsource.max_replica_lag', %s, false)",
                            (replica_lag_setting(self.max_replica_lag),))
        return conn

    def apply(self, version: str, path: Path, *, force: bool = False, reapply: bool = False) -> ApplyResult:
        """Apply one phase file. Refusals (FileError, ChecksumMismatch, LockBusy) change nothing."""
        path = Path(path)
        if not path.is_file():
            raise FileError(f"phase file {path} does not exist")
        sha = sha256_of(path)
        statements = parse_file(path)
        result = ApplyResult(version=version, file_name=path.name, sha256=sha, status="applied")
        conn = self._connect()
        try:
            acquire_advisory_lock(conn, APPLY_LOCK, self.lock_wait, f"applying phases on {self.target.name!r}")
            try:
                conn.autocommit = False
                ensure_history(conn)
                conn.commit()
                previous = latest_applied(read_history(conn)).get(version)
                conn.commit()
                result.previous = previous
                action = self._decide(version, path.name, sha, previous, force, reapply)
                if action is None:
                    result.status = "skipped"
                    return result
                result.status = {"apply": "applied", "reapply": "reapplied", "forced": "forced"}[action]
                started = time.perf_counter()
                head, body, tail = split_phase(statements)
                conn.autocommit = True
                for statement in head:
                    self._run_outside_transaction(conn, statement, result)
                conn.autocommit = False
                self._run_body(conn, body, result, finish=None if tail else (version, path.name, sha, action),
                               after=len(head))
                if tail:
                    conn.autocommit = True
                    for statement in tail:
                        self._run_outside_transaction(conn, statement, result)
                    conn.autocommit = False
                    record_history(conn, version=version, file_name=path.name, sha256=sha, action=action,
                                   operator=self.operator, seconds=time.perf_counter() - started,
                                   statements=len(statements), run_id=self.run_id)
                    conn.commit()
                result.seconds = time.perf_counter() - started
                return result
            finally:
                if not conn.closed:
                    conn.rollback()
                    conn.autocommit = True
                    release_advisory_lock(conn, APPLY_LOCK)
        finally:
            conn.close()

    def _decide(self, version, file_name, sha, previous, force, reapply) -> str | None:
        if previous is None:
            return "apply"
        if previous["sha256"] != sha:
            if not force:
                raise ChecksumMismatch(
                    f"phase {version} ({file_name}) changed since it was applied: recorded sha256 "
                    f"{previous['sha256'][:12]}… by {previous['applied_by']} at {previous['applied_at']:%Y-%m-%d %H:%M:%S %Z} "
                    f"(run {previous['run_id']}), the file on disk is {sha[:12]}…. Re-applying a changed "
                    "phase is refused unless forced (force=True / -p force true).")
            return "forced"
        return "reapply" if reapply else None

    def _run_body(self, conn, body: list[Statement], result: ApplyResult, finish, after: int = 0) -> None:
        """All transactional statements in one transaction, retried whole on lock timeouts (`after`: the
        timings of the statements run before it, kept)."""
        for attempt in range(1, self.lock_retries + 2):
            result.attempts = attempt
            result.timings = result.timings[:after]
            started = time.perf_counter()
            try:
                for statement in body:
                    self._execute(conn, statement, result)
                if finish is not None:
                    version, file_name, sha, action = finish
                    record_history(conn, version=version, file_name=file_name, sha256=sha, action=action,
                                   operator=self.operator, seconds=time.perf_counter() - started,
                                   statements=len(result.timings), run_id=self.run_id)
                conn.commit()
                return
            except RETRYABLE as exc:
                conn.rollback()
                reason = _waiting_on(exc, body[len(result.timings) - after])
                if attempt > self.lock_retries:
                    raise LockRetriesExhausted(
                        f"phase {result.version}: {reason} after {attempt} attempts with lock_timeout "
                        f"{self.lock_timeout}; sessions holding locks: {lock_blockers(conn)}. "
                        + ("The transaction was rolled back; the statements before it, which only prepare, "
                           "were committed: re-run the phase to resume." if after else "Nothing was changed.")
                    ) from None
                self._pause_before_retry(attempt, reason)

    def _execute(self, conn, statement: Statement, result: ApplyResult) -> None:
        del conn.notices[:]
        started = time.perf_counter()
        try:
            with conn.cursor() as cur:
                cur.execute(statement.text)
                rowcount = cur.rowcount
        except RETRYABLE:
            raise
        except psycopg2.Error as exc:
            if conn.closed:
                # The server ended the session: a rollback would only fail ("connection already
                # closed") and hide what the server said; the server rolled the transaction back itself.
                raise ConnectionLost(_failure(result, statement, exc, lost_from=conn), statement,
                                     exc.pgcode) from None
            conn.rollback()
            raise StatementFailed(_failure(result, statement, exc), statement, exc.pgcode) from None
        timing = Timing(statement.index, statement.line, statement.summary, time.perf_counter() - started,
                        rowcount, statement.transactional, [n.strip() for n in conn.notices])
        result.timings.append(timing)
        if self.progress:
            self.progress(timing)

    def _run_outside_transaction(self, conn, statement: Statement, result: ApplyResult) -> None:
        """A statement on its own. A concurrent index build: first drop an INVALID leftover of an earlier failed
        build, and wait for its lock past deadlock_timeout (outwait_autovacuum)."""
        node = pglast.parse_sql(statement.text)[0].stmt
        concurrent_build = isinstance(node, ast.IndexStmt) and node.concurrent
        for attempt in range(1, self.lock_retries + 2):
            try:
                if concurrent_build and node.idxname:
                    # `if not exists` would keep an invalid index that a failed build left behind
                    _drop_invalid_index(conn, node.relation.schemaname or "public", node.idxname)
                with outwait_autovacuum(conn, concurrent_build):
                    self._execute(conn, statement, result)
                return
            except RETRYABLE as exc:
                reason = _waiting_on(exc, statement)
                if attempt > self.lock_retries:
                    raise LockRetriesExhausted(
                        f"phase {result.version}: {reason} after {attempt} attempts; sessions holding locks: "
                        f"{lock_blockers(conn)}. " + _left_by(statement)
                    ) from None
                self._pause_before_retry(attempt, reason)

    def _pause_before_retry(self, attempt: int, reason: str) -> None:
        delay = self.retry_backoff * 2 ** (attempt - 1)
        if self.on_retry:
            self.on_retry(attempt, delay, reason)
        time.sleep(delay)


@contextmanager
def outwait_autovacuum(conn, applies: bool = True):
    """lock_timeout of at least three times deadlock_timeout for a statement whose lock the app never queues behind
    (SHARE UPDATE EXCLUSIVE: a concurrent build): past deadlock_timeout PostgreSQL cancels an autovacuum that
    holds the table (one on a freshly rewritten table runs for minutes), which a shorter lock_timeout never
    reaches. The session's lock_timeout is put back after (0, no limit, stays)."""
    if not applies:
        yield
        return
    with conn.cursor() as cur:
        cur.execute("""select current_setting('lock_timeout'),
                              set_config('lock_timeout', case when current_setting('lock_timeout')::interval = interval '0' then '0'
                                                              else round(extract(epoch from greatest(current_setting('lock_timeout')::interval,
                                                                   3 * current_setting('deadlock_timeout')::interval)) * 1000) || 'ms' end,
                                         false)""")
        before = cur.fetchone()[0]
    try:
        yield
    finally:
        if not conn.closed:
            with conn.cursor() as cur:
                cur.execute("select set_config('lock_timeout', %s, false)", (before,))


def replica_lag_setting(seconds: float) -> str:
    """truthsource.max_replica_lag as the batches read it: seconds ('10', '2.5'), '0' never pauses."""
    if seconds < 0:
        raise ValueError(f"max_replica_lag must be 0 (never pause) or a number of seconds, not {seconds!r}")
    return f"{seconds:.6f}".rstrip("0").rstrip(".")   # no exponent: the phase files read digits ('1e-05' is none)


def _drop_invalid_index(conn, schema: str, name: str) -> None:
    with conn.cursor() as cur:
        cur.execute("""select 1 from pg_index i join pg_class c on c.oid = i.indexrelid
                       join pg_namespace n on n.oid = c.relnamespace
                       where n.nspname = %s and c.relname = %s and not i.indisvalid""", (schema, name))
        if cur.fetchone():
            cur.execute(f'drop index concurrently if exists "{schema}"."{name}"')


def _failure(result: ApplyResult, statement: Statement, exc: psycopg2.Error, lost_from=None) -> str:
    """What the server said about a failed statement, where it was, and what is left of the phase
    (`lost_from`: the connection the server closed)."""
    diag = exc.diag
    said = _last_words(lost_from, exc) if lost_from is not None else diag.message_primary or str(exc).strip()
    detail = "".join(f"\n  {label}: {value}" for label, value in
                     (("detail", diag.message_detail), ("hint", diag.message_hint),
                      ("context", diag.context)) if value)
    return (f"phase {result.version} ({result.file_name}) statement {statement.index} at line "
            f"{statement.line} failed: " + (f"[{exc.pgcode}] " if exc.pgcode else "") + f"{said}{detail}\n"
            f"  statement: {statement.summary}\n"
            + ("The connection to the server was lost (the server ended the session). "
               if lost_from is not None else "")
            + ("The transaction was rolled back: nothing of this phase was changed."
               if statement.transactional and all(t.transactional for t in result.timings) else
               "The transaction was rolled back; the statements before it, which only prepare, were "
               "committed: re-run the phase to resume." if statement.transactional else _left_by(statement)))


def _left_by(statement: Statement) -> str:
    """What a failed statement outside the body's transaction leaves, and what to do."""
    if statement.before_body:
        return ("The phase's transaction has not begun; what ran before it only prepares and was committed: "
                "re-run the phase to resume (its statements are idempotent).")
    return "The phase's transactional part was committed; re-run the phase to resume (its statements are idempotent)."


def _last_words(conn, exc: psycopg2.Error) -> str:
    """Everything the server said before it closed the session ("FATAL: terminating connection due
    to administrator command"): libpq keeps it on the connection, psycopg2's exception only the end."""
    try:
        text = conn.info.error_message or str(exc)
    except psycopg2.Error:
        text = str(exc)
    lines = (" ".join(line.split()) for line in text.splitlines())
    # the statement is named apart: drop libpq's "LINE 1: ..." and its caret
    return " ".join(line for line in lines if line and line != "^" and not line.startswith("LINE "))


def _waiting_on(exc: psycopg2.Error, statement: Statement) -> str:
    return (f"statement {statement.index} at line {statement.line} ({statement.summary}): "
            f"{exc.diag.message_primary or exc}")
