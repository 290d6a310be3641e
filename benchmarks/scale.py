"""The deployment at production scale, measured side by side; prints ratios and asserts nothing.

    .venv/bin/python -m benchmarks.scale [--sizes 100k,1M] [--shapes legacy,variant,unseen]
        [--pg-bin /usr/lib/postgresql/15/bin] [--data-dir /var/tmp/truthsource-bench] [--timeout 900]
        [--json out.json] [--markdown out.md] [--throwaway] [--max-replica-lag 10] [--no-deploy-process]
        [--skip psql,alone]

For each size and legacy shape (--shapes: benchmarks/scale_fixture.py's, one report section each, its
ACCESS EXCLUSIVE windows among them), on fresh clones of the generated legacy database
(benchmarks/scale_fixture.py, cached as a template database):

- the three phases through the apply engine (as `runbook deploy` applies them) against raw
  `psql -1 -v ON_ERROR_STOP=1 -f` of the same file (its `-- runbook: no-transaction` tail, which
  cannot run inside -1's transaction, by a second plain psql -f: the split the engine makes);
- during each phase, app traffic: 4 clients as `authenticated` members and admins with
  request.jwt.claims set (reads of a product and of an org's page, price updates, inventory
  inserts): the longest statement, the time writes spent in statements slower than 100 ms, failed
  transactions by SQLSTATE (writes the new rules reject counted apart);
- ACCESS EXCLUSIVE windows per table, from pg_locks sampled every 50 ms;
- the preflight's snapshot + backup against raw `pg_dump -Fc`; the rollback against raw
  `pg_restore -1` of the same dump into an empty database;
- verify_data_integrity() and get_database_stats() against a count(*) of the biggest table;
- an organization's 50 products as an `authenticated` member against `service_role`;
- phases 1-2 once more through the engine with no app traffic: the deployment's own cost, each
  statement timed (the legacy app's queries take a share of the cores that grows with the data);
- with several sizes, how each figure grows, and how phase 2's slowest statements grow;
- production conditions (benchmarks/production.py): each phase's WAL beside the tables it rewrites, the
  replica's largest lag, the archive's backlog and the server's extra disk; what the app felt as the
  record keeps it; the preflight's predictions of duration, WAL and disk against what the run measured;
  and `runbook deploy` timed as the process a DBA runs, beside its floor, with where the rest goes.

`--skip psql,alone` leaves out psql's pass and the pass with no app traffic (their rows say "not run"), for a
size where every pass does not fit the time at hand (10M on the durable server takes hours with all of them).

The server is production-like by default (benchmarks/server.py): fsync, synchronous_commit and
full_page_writes on, wal_level logical, WAL archived, a hot standby streaming from it; `--throwaway`
measures on the old rehearsal server instead (fsync off: flatters every write), and every table says
which. Where the report holds legacy shapes (scale_fixture.py's), the longest ACCESS EXCLUSIVE per shape
closes it.

Every measured step has a timeout: a step that runs away is stopped (its backends terminated)
and reported as "did not finish in N s".
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):   # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import psycopg2  # noqa: E402
from prettytable import PrettyTable, TableStyle  # noqa: E402

from benchmarks import production, scale_fixture  # noqa: E402
from benchmarks.scale_fixture import Size  # noqa: E402
from runbooks import backup, connection, engine, estimate, paths, restore, runner, snapshot  # noqa: E402
from runbooks import preflight as preflight_module  # noqa: E402
from runbooks import impact, resources  # noqa: E402
from runbooks.impact import ImpactSampler  # noqa: E402
from runbooks.resources import ResourceMeter  # noqa: E402
from runbooks.verification import act_as  # noqa: E402

APP_NAME = "bench app"            # application_name of the traffic clients
SAMPLER_NAME = "bench locks"      # ... and of the pg_locks sampler: a timed-out step never stops them
RULE_SQLSTATES = ("23",)          # integrity rules (check, unique, not null, foreign key) ...
RLS_REJECTION = "row-level security"   # ... and RLS policies (42501 with this message): writes the rules reject
SLOW_SECONDS = 0.1                # an app statement slower than this counts as blocked
DEPLOY_STEPS = 5                  # `runbook deploy` runs five notebooks: it is given five steps' timeout
STATEMENTS_SHOWN = 12             # phase 2's slowest statements whose growth is shown
LEGACY_TABLES = ("organizations", "profiles", "organization_members", "products", "inventory", "audit_logs",
                 "api_keys")
GOALS = {   # the goals, shown beside the figures (never asserted)
    "phase 2 (engine)": "<= 120 s",
    "runbook deploy (the process)": "<= 1.5x its floor, <= 300 s at 1M",
    "preflight backup + snapshot / raw pg_dump": "<= 1.3x",
    "rollback / raw pg_restore": "<= 1.3x",
    "org's 50 products, authenticated / service_role": "<= 1.5x",
    "longest app wait": "<= 1 s",
    "failed app transactions": "0",
}


# -- steps with a timeout ----------------------------------------------------------------------------

@dataclass
class Step:
    """One measured step: seconds, or why there are none."""

    name: str
    seconds: float | None = None
    status: str = "ok"          # ok | timeout | error | skipped
    detail: str = ""

    def shown(self) -> str:
        if self.status == "ok":
            return f"{self.seconds:.2f} s"
        if self.status == "timeout":
            return self.detail
        return f"{self.status}: {self.detail}"[:90]


def admin_connect(pg, dbname: str = "postgres"):
    conn = psycopg2.connect(pg.conninfo(dbname), application_name="bench admin")
    conn.autocommit = True
    return conn


def admin_execute(pg, sql: str, params=None, dbname: str = "postgres") -> list[tuple]:
    conn = admin_connect(pg, dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def stop_backends(pg, dbname: str) -> None:
    """End what a runaway step runs on `dbname` (its psql, pg_dump, engine): not the app or the sampler.
    Each termination waits (up to 30 s) until the backend has gone."""
    admin_execute(pg, """select pg_terminate_backend(pid, 30000) from pg_stat_activity
                         where datname = %s and pid <> pg_backend_pid()
                           and application_name not like %s and application_name not like %s""",
                  (dbname, APP_NAME + "%", SAMPLER_NAME + "%"))


def run_step(pg, name: str, function, timeout: float, dbname: str):
    """(Step, the function's value or None). A step still running after `timeout` seconds is stopped."""
    box: dict = {}

    def work():
        try:
            box["value"] = function()
        except BaseException as exc:  # noqa: BLE001 - reported as the step's error
            box["error"] = exc

    started = time.perf_counter()
    worker = threading.Thread(target=work, name=f"step {name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        stop_backends(pg, dbname)
        worker.join(120)
        return Step(name, None, "timeout", f"did not finish in {timeout:g} s"), None
    seconds = time.perf_counter() - started
    if "error" in box:
        return Step(name, seconds, "error", _message(box["error"])), None
    return Step(name, seconds), box.get("value")


def _message(exc: BaseException) -> str:
    """One line: PostgreSQL's primary message (no LINE/caret context), else the exception's text."""
    diag = getattr(exc, "diag", None)
    text = (diag.message_primary if diag is not None and diag.message_primary else None) or str(exc)
    return " ".join(text.split())[:300]


# -- databases ---------------------------------------------------------------------------------------

def clone(pg, template: str, name: str) -> str:
    """A fresh copy of the template (file copy: seconds even for gigabytes), reachable as a service."""
    admin_execute(pg, f"drop database if exists {name} with (force)")
    admin_execute(pg, f"create database {name} template {template} strategy file_copy")
    pg.add_service(name, name)
    return name


def drop(pg, name: str) -> None:
    admin_execute(pg, f"drop database if exists {name} with (force)")


def row_counts(pg, dbname: str) -> dict[str, int]:
    conn = admin_connect(pg, dbname)
    try:
        with conn.cursor() as cur:
            counts = {}
            for table in LEGACY_TABLES:
                cur.execute(f"select count(*) from public.{table}")
                counts[table] = cur.fetchone()[0]
            # (a legacy shape without inventory.location, the variant's, gets none of the app's inserts)
            cur.execute("select count(*) from pg_attribute where attrelid = 'public.inventory'::regclass "
                        "and attname = 'location' and not attisdropped")
            has_location = cur.fetchone()[0] > 0
            cur.execute("select count(*) from public.inventory where location like 'bench-app-%'" if has_location else "select 0")
            counts["inventory inserted by the app"] = cur.fetchone()[0]
            return counts
    finally:
        conn.close()


def rows_kept(before: dict, after: dict) -> dict:
    """Every legacy table holds at least its legacy rows (the app's inserts set apart)."""
    tables = {}
    for table in LEGACY_TABLES:
        inserted = after.get("inventory inserted by the app", 0) if table == "inventory" else 0
        tables[table] = {"before": before[table], "after": after[table], "app_inserted": inserted,
                         "kept": after[table] - inserted >= before[table]}
    return {"tables": tables, "all_kept": all(t["kept"] for t in tables.values())}


# -- the phase files ---------------------------------------------------------------------------------

def phase_files(sql_rev: str | None, into: Path) -> list[tuple[str, Path]]:
    """The phases as on disk, or as committed at `sql_rev` (copied under their own names)."""
    if sql_rev is None:
        return list(paths.PHASES)
    files = []
    for version, path in paths.PHASES:
        relative = path.relative_to(paths.PROJECT_ROOT).as_posix()
        text = subprocess.run(["git", "-C", str(paths.PROJECT_ROOT), "show", f"{sql_rev}:{relative}"],
                              capture_output=True, text=True, check=True).stdout
        copy = into / path.name
        copy.write_text(text)
        files.append((version, copy))
    return files


def split_for_psql(path: Path, into: Path) -> list[tuple[Path, bool]]:
    """[(file, single_transaction)]: the no-transaction statements before the body (if any), the body for
    psql -1, then the no-transaction tail (if any): the engine's split."""
    parts = []
    for name, statements, single in zip(("head", "body", "tail"), engine.split_phase(engine.parse_file(path)),
                                        (False, True, False)):
        if statements:
            part = into / f"{path.stem}.{name}.sql"
            part.write_text("".join(f"{s.text};\n" for s in statements))
            parts.append((part, single))
    return parts


def apply_psql(pg, dbname: str, parts: list[tuple[Path, bool]]) -> None:
    """One psql session, as the engine uses one connection (the tail calls the body's pg_temp helpers):
    a single-transaction part between begin and commit (what -1 does), the others statement by statement."""
    args = [a for part, single in parts
            for a in ((["-c", "begin", "-f", str(part), "-c", "commit"]) if single else ["-f", str(part)])]
    proc = subprocess.run([str(pg.binary("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", f"service={dbname}", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"psql -f {' -f '.join(part.name for part, _ in parts)} failed: {_psql_error(proc.stderr)}")


def _psql_error(stderr: str) -> str:
    """'line 123: deadlock detected' from psql's 'psql:FILE:123: ERROR:  deadlock detected'."""
    lines = stderr.strip().splitlines()
    line = next((x for x in lines if "ERROR:" in x), lines[-1] if lines else "")
    where, _, message = line.partition("ERROR:")
    number = where.rstrip(": ").rsplit(":", 1)[-1]
    return (f"line {number}: " if number.isdigit() else "") + " ".join((message or line).split())


# -- ACCESS EXCLUSIVE windows ------------------------------------------------------------------------

class LockSampler:
    """Samples pg_locks every `interval` s: which tables someone holds ACCESS EXCLUSIVE on, and for how long."""

    SQL = """select n.nspname || '.' || c.relname
             from pg_locks l join pg_class c on c.oid = l.relation join pg_namespace n on n.oid = c.relnamespace
             where l.mode = 'AccessExclusiveLock' and l.granted and l.pid <> pg_backend_pid()
               and l.database = (select oid from pg_database where datname = current_database())
               and c.relkind in ('r', 'p')
               and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"""

    def __init__(self, pg, dbname: str, interval: float):
        self.pg, self.dbname, self.interval = pg, dbname, interval
        self.windows: dict[str, list[list[float]]] = {}   # table -> [[first seen, last seen], ...]
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock sampler", daemon=True)

    def __enter__(self) -> "LockSampler":
        self._conn = psycopg2.connect(self.pg.conninfo(self.dbname), application_name=SAMPLER_NAME)
        self._conn.autocommit = True
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self._conn.close()

    def _run(self) -> None:
        previous: set[str] = set()
        while True:
            now = time.perf_counter() - self._started
            try:
                with self._conn.cursor() as cur:
                    cur.execute(self.SQL)
                    held = {row[0] for row in cur.fetchall()}
            except psycopg2.Error:
                return
            self.samples += 1
            for table in held:
                spans = self.windows.setdefault(table, [])
                if table in previous:
                    spans[-1][1] = now
                else:
                    spans.append([now, now])
            previous = held
            if self._stop.wait(self.interval):
                return

    def summary(self) -> dict:
        """Per table: the longest window and the total, each rounded up by one sampling interval."""
        tables = {}
        for table, spans in sorted(self.windows.items()):
            lengths = [end - start + self.interval for start, end in spans]
            tables[table] = {"longest_s": round(max(lengths), 3), "total_s": round(sum(lengths), 3),
                             "windows": len(spans)}
        return {"interval_s": self.interval, "samples": self.samples, "tables": tables}


# -- app traffic -------------------------------------------------------------------------------------

def md5_uuid(text: str) -> str:
    """What the generator's md5(text)::uuid is."""
    return str(uuid.UUID(hex=hashlib.md5(text.encode()).hexdigest()))


@dataclass
class Persona:
    role: str           # member | admin
    user_id: str
    org_id: str
    products: list[str] = field(default_factory=list)


def personas(pg, dbname: str, size: Size) -> list[Persona]:
    """A member and an admin of the first and of the last organization, with some of their products."""
    found = []
    conn = admin_connect(pg, dbname)
    try:
        with conn.cursor() as cur:
            for role, r in (("member", 3), ("admin", 2)):
                for o in (1, size.orgs):
                    org = md5_uuid(f"bench-org-{o}")
                    cur.execute("select id::text from public.products where organization_id = %s order by id limit 200",
                                (org,))
                    found.append(Persona(role, md5_uuid(f"bench-user-{o}-{r}"), org, [x for (x,) in cur.fetchall()]))
    finally:
        conn.close()
    return found


OPERATIONS = {   # name -> (sql, is_write); columns that exist before and after the phases
    "read product": ("select id, sku, name, price from public.products where id = %(product)s", False),
    "org page": ("select id, sku, name, price from public.products where organization_id = %(org)s "
                 "order by sku limit 50", False),
    "price update": ("update public.products set price = %(price)s where id = %(product)s", True),
    "inventory insert": ("insert into public.inventory (organization_id, product_id, location, quantity, "
                         "reserved_quantity) values (%(org)s, %(product)s, %(location)s, 5, 0)", True),
}
ROUNDS = {"member": ("read product", "org page"),
          "admin": ("read product", "price update", "inventory insert", "org page")}


class AppTraffic:
    """`clients` threads, each an API user (set local role + request.jwt.claims), one transaction per
    statement, a short think time between them; records each statement's latency and outcome."""

    def __init__(self, pg, dbname: str, people: list[Persona], clients: int, think: float, tag: str):
        self.pg, self.dbname, self.people, self.think, self.tag = pg, dbname, people, think, tag
        self.clients = clients
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.records: list[tuple[str, float, str | None]] = []   # (operation, seconds, sqlstate or None)
        self.errors: Counter = Counter()                           # (operation, sqlstate, message) -> times
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"app {i}", daemon=True)
                         for i in range(clients)]
        self._running = [threading.Event() for _ in range(clients)]   # set after a client's first statement

    def __enter__(self) -> "AppTraffic":
        for thread in self._threads:
            thread.start()
        for running, thread in zip(self._running, self._threads):   # traffic is flowing before the phase starts
            while not running.wait(0.5) and thread.is_alive():
                pass
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        if any(t.is_alive() for t in self._threads):   # still stuck behind a lock: end them
            admin_execute(self.pg, "select pg_terminate_backend(pid) from pg_stat_activity "
                          "where datname = %s and application_name like %s", (self.dbname, APP_NAME + "%"))
            for thread in self._threads:
                thread.join(30)

    def _client(self, index: int) -> None:
        person = self.people[index % len(self.people)]
        conn = psycopg2.connect(self.pg.conninfo(self.dbname), application_name=f"{APP_NAME} {index}")
        n = 0
        try:
            while not self._stop.is_set():
                for op in ROUNDS[person.role]:
                    n += 1
                    self._one(conn, person, op, {
                        "product": person.products[n % len(person.products)], "org": person.org_id,
                        "price": round(1 + (n % 997) / 10, 2), "location": f"bench-app-{self.tag}-{index}-{n}"})
                    self._running[index].set()
                    if self._stop.wait(self.think):
                        return
        finally:
            conn.close()

    def _one(self, conn, person: Persona, op: str, params: dict) -> None:
        sql, _ = OPERATIONS[op]
        state = None
        started = time.perf_counter()
        try:
            with conn.cursor() as cur:
                act_as(cur, "me", {"me": person.user_id})
                started = time.perf_counter()
                cur.execute(sql, params)
                if cur.description:
                    cur.fetchall()
            conn.commit()
        except psycopg2.Error as exc:
            state = exc.pgcode or "connection"
            if state == "42501" and RLS_REJECTION in _message(exc):
                state = "42501 (RLS)"
            with self._lock:
                self.errors[(op, state, _message(exc)[:160])] += 1
            if conn.closed:
                raise
            conn.rollback()
        with self._lock:
            self.records.append((op, time.perf_counter() - started, state))

    def summary(self) -> dict:
        with self._lock:
            records = list(self.records)
        writes = [r for r in records if OPERATIONS[r[0]][1]]
        longest = max(records, key=lambda r: r[1], default=None)
        rejected_by_rules = lambda state: state.startswith(RULE_SQLSTATES) or state.endswith("(RLS)")  # noqa: E731
        failed = Counter(r[2] for r in records if r[2] and not rejected_by_rules(r[2]))
        rejected = Counter(r[2] for r in records if r[2] and rejected_by_rules(r[2]))
        latencies = sorted(r[1] for r in records)
        return {
            "clients": self.clients, "statements": len(records),
            "by_operation": dict(Counter(r[0] for r in records)),
            "longest_wait_s": round(longest[1], 3) if longest else None,
            "longest_wait_operation": longest[0] if longest else None,
            "p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 4) if latencies else None,
            "slow_statements": sum(1 for r in records if r[1] > SLOW_SECONDS),
            "blocked_s": round(sum(r[1] for r in records if r[1] > SLOW_SECONDS), 3),
            "writes_blocked_s": round(sum(r[1] for r in writes if r[1] > SLOW_SECONDS), 3),
            "failed": sum(failed.values()), "failed_by_sqlstate": dict(failed),
            "rejected_by_rules": sum(rejected.values()), "rejected_by_sqlstate": dict(rejected),
            "errors": [{"operation": op, "sqlstate": state, "message": message, "times": n}
                       for (op, state, message), n in sorted(self.errors.items())],
        }


# -- the measurements --------------------------------------------------------------------------------

@dataclass
class Settings:
    """How a run measures (the command line's options)."""

    clients: int = 4               # app clients during each phase
    think_ms: float = 20           # each client's pause between statements
    sample_ms: float = 50          # pg_locks sampling interval
    timeout: float = 900           # seconds any measured step may take
    sql_rev: str | None = None     # phase files as committed at this revision (None: as on disk)
    max_replica_lag: float = 10    # seconds: the batches pause while a replica is further behind
    deploy_process: bool = True    # also time `runbook deploy` as a process, beside its floor
    skip: tuple[str, ...] = ()     # passes left out: psql, alone (SKIPPABLE)


SKIPPABLE = ("psql", "alone")


def not_run(files, how: str) -> dict:
    """A pass left out (--skip): each phase's step says so, and the tables show it as not run."""
    phases = [{"phase": n, "file": path.name, "step": asdict(Step(f"phase {n} ({path.name})", status="skipped",
                                                                  detail=f"not run (--skip {how})"))}
              for n, (_, path) in enumerate(files, start=1)]
    return {"phases": phases, "rows_kept": {"tables": {}, "all_kept": None}, "converged": None}


def measure_phases(pg, dbname: str, files, size: Size, settings: Settings, how: str, work: Path) -> dict:
    """The three phases in order on one clone, by the engine or by psql, with traffic and sampler."""
    people = personas(pg, dbname, size)
    before = row_counts(pg, dbname)
    target = connection.from_service(dbname)
    run_id = f"bench-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{how}"
    phases, failed = [], None
    for number, (version, path) in enumerate(files, start=1):
        name = f"phase {number} ({path.name})"
        if failed:
            phases.append({"phase": number, "file": path.name,
                           "step": asdict(Step(name, status="skipped", detail=f"{failed} did not finish"))})
            continue
        apply = engine.ApplyEngine(target, run_id=run_id, operator="benchmark", max_replica_lag=settings.max_replica_lag,
                                   statement_timeout=statement_timeout(target, version))
        if how == "engine":
            def work_fn(version=version, path=path):
                return apply.apply(version, path)
        else:
            parts = split_for_psql(path, work)

            def work_fn(parts=parts):
                apply_psql(pg, dbname, parts)
        with LockSampler(pg, dbname, settings.sample_ms / 1000) as sampler, \
                AppTraffic(pg, dbname, people, settings.clients, settings.think_ms / 1000, f"{how}{number}") as app, \
                ResourceMeter(target) as used, (ImpactSampler(target, (apply.application_name,)) if how == "engine"
                                                else contextlib.nullcontext()) as felt:
            step, applied = run_step(pg, name, work_fn, settings.timeout, dbname)
        phases.append({"phase": number, "file": path.name, "step": asdict(step), "traffic": app.summary(),
                       "access_exclusive": sampler.summary(), "statements": statement_times(applied),
                       "resources": used.summary(), **({"impact": felt.summary()} if felt else {})})
        if step.status != "ok":
            failed = f"phase {number}"
    after = row_counts(pg, dbname)
    return {"phases": phases, "rows_kept": rows_kept(before, after), "converged": failed is None}


def measure_alone(pg, dbname: str, files, settings: Settings) -> dict:
    """The phases through the engine with nothing else running: the deployment's own cost, apart from
    what the app's queries take from the same cores (the legacy app's own queries grow with the data)."""
    target = connection.from_service(dbname)
    phases = []
    for number, (version, path) in enumerate(files, start=1):
        def work_fn(version=version, path=path):
            return engine.ApplyEngine(target, run_id=f"bench-alone-{number}", operator="benchmark",
                                      statement_timeout=statement_timeout(target, version)).apply(version, path)
        step, applied = run_step(pg, f"phase {number} ({path.name}), no app traffic", work_fn, settings.timeout, dbname)
        phases.append({"phase": number, "file": path.name, "step": asdict(step), "statements": statement_times(applied)})
        if step.status != "ok":
            break
    return {"phases": phases}


def statement_timeout(target, version: str) -> str:
    """The phase's statement_timeout as `runbook deploy` sets it (estimate.statement_timeout, grown with the
    data), not the engine's fixed default: at 10M a batch loop outlasts 15 minutes."""
    conn = connection.connect(target, application_name="bench estimate", readonly=True, autocommit=True)
    try:
        return estimate.statement_timeout(conn, version)
    finally:
        conn.close()


def statement_times(applied) -> list[dict]:
    """Each statement's line, first words and seconds, as the engine timed it (psql times none)."""
    if applied is None:
        return []
    return [{"line": t.line, "summary": t.summary, "seconds": round(t.seconds, 3), "transactional": t.transactional}
            for t in applied.timings]


def measure_preflight(pg, dbname: str, record_dir: Path, settings: Settings) -> dict:
    """The preflight's snapshot and backup on one exported moment (as notebooks/00_preflight does),
    then raw pg_dump -Fc of the same database with the server's own pg_dump."""
    target = connection.from_service(dbname)
    run_id = f"bench-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    parts: dict = {}

    def preflight():
        run = SimpleNamespace(target=target, run_id=run_id, record_dir=record_dir)
        with preflight_module.one_moment(run, backup=True) as moment:   # pg_dump runs beside the snapshot
            conn = connection.connect(target, readonly=True)
            try:
                started = time.perf_counter()
                snap = snapshot.take_snapshot(conn, snapshot_id=moment.snapshot_id)
                parts["snapshot_s"] = round(time.perf_counter() - started, 3)
            finally:
                conn.close()
            snapshot.save_snapshot(snap, record_dir / "snapshot.json")
            if isinstance(moment.dump, Exception):
                raise moment.dump
            info = backup.finish_backup(moment.dump)
        parts.update(dump_s=info.dump_seconds, verify_s=info.verify_seconds, dump_bytes=info.size_bytes,
                     checksums_skipped=[t for t, v in snap["content"].items() if str(v).startswith("skipped")])
        return info

    step, info = run_step(pg, "preflight backup + snapshot", preflight, settings.timeout, dbname)
    raw_file = record_dir / "raw.dump"
    raw, _ = run_step(pg, "raw pg_dump -Fc", lambda: subprocess.run(
        [str(pg.binary("pg_dump")), "-Fc", "-f", str(raw_file), "-d", f"service={dbname}"],
        check=True, capture_output=True), settings.timeout, dbname)
    return {"preflight": asdict(step), "parts": parts, "raw_pg_dump": asdict(raw), "run_id": run_id,
            "backup": info, "raw_file": raw_file}


def measure_rollback(pg, dbname: str, pre: dict, legacy_counts: dict, settings: Settings) -> dict:
    """runbook's rollback of the migrated clone to the preflight backup, then raw pg_restore -1 of
    the raw dump into an empty database."""
    info = pre["backup"]
    result: dict = {}
    if info is None:
        result["rollback"] = asdict(Step("rollback", status="skipped", detail="no preflight backup"))
    else:
        target = connection.from_service(dbname)
        step, _ = run_step(pg, "rollback", lambda: restore.restore_backup(
            target, info.path, info.sha256, run_id=pre["run_id"], operator="benchmark"), settings.timeout, dbname)
        result["rollback"] = asdict(step)
        if step.status == "ok":
            restored = row_counts(pg, dbname)
            result["rollback_counts_equal"] = all(restored[t] == legacy_counts[t] for t in LEGACY_TABLES)
    empty = f"{dbname}_raw_restore"
    admin_execute(pg, f"drop database if exists {empty} with (force)")
    admin_execute(pg, f"create database {empty} template template0")
    try:
        raw, _ = run_step(pg, "raw pg_restore -1", lambda: subprocess.run(
            [str(pg.binary("pg_restore")), "-1", "--exit-on-error", "-d", pg.conninfo(empty), str(pre["raw_file"])],
            check=True, capture_output=True, text=True), settings.timeout, empty)
    finally:
        drop(pg, empty)
    result["raw_pg_restore"] = asdict(raw)
    return result


def timed_query(pg, dbname: str, name: str, sql: str, settings: Settings):
    def run():
        conn = admin_connect(pg, dbname)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()
    return run_step(pg, name, run, settings.timeout, dbname)


def measure_verification(pg, dbname: str, settings: Settings) -> dict:
    biggest = admin_execute(pg, """select quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        from pg_class c join pg_namespace n on n.oid = c.relnamespace
        where n.nspname = 'public' and c.relkind = 'r' order by pg_total_relation_size(c.oid) desc limit 1""",
                            dbname=dbname)[0][0]
    integrity, rows = timed_query(pg, dbname, "verify_data_integrity()", "select * from verify_data_integrity()", settings)
    stats, stat_rows = timed_query(pg, dbname, "get_database_stats()", "select * from get_database_stats()", settings)
    scan, _ = timed_query(pg, dbname, f"count(*) of {biggest}", f"select count(*) from {biggest}", settings)
    return {"verify_data_integrity": asdict(integrity), "get_database_stats": asdict(stats),
            "seq_scan": asdict(scan), "seq_scan_table": biggest,
            "integrity_rows": [list(map(str, r[:3])) for r in rows or []],
            "stats_tables": len(stat_rows or [])}


def measure_org_products(pg, dbname: str, size: Size, repeat: int = 50) -> dict:
    """An organization's first 50 products, as a member (RLS) and as service_role (BYPASSRLS): median ms."""
    org, member = md5_uuid("bench-org-1"), md5_uuid("bench-user-1-3")
    sql = ("select id, sku, name, price from public.products where organization_id = %s "
           "order by sku limit 50")
    conn = psycopg2.connect(pg.conninfo(dbname), application_name="bench org products")
    result = {}
    try:
        for who in ("authenticated", "service_role"):
            times, rows = [], 0
            for _ in range(repeat):
                with conn.cursor() as cur:
                    act_as(cur, "me" if who == "authenticated" else who, {"me": member})
                    started = time.perf_counter()
                    cur.execute(sql, (org,))
                    rows = len(cur.fetchall())
                    times.append(time.perf_counter() - started)
                conn.rollback()
            result[who] = {"median_ms": round(statistics.median(times) * 1000, 3), "rows": rows}
    finally:
        conn.close()
    result["ratio"] = round(result["authenticated"]["median_ms"] / result["service_role"]["median_ms"], 2)
    return result


def measure_deploy(pg, template: str, tag: str, size: Size, settings: Settings, work: Path) -> dict:
    """`runbook deploy` as a DBA runs it (a process of its own), with the app's traffic throughout, and the
    floor's pieces measured on the same clone first: raw pg_dump -Fc and one sequential read of every table."""
    name = clone(pg, template, f"bench_d_{tag}")
    records = work / "deploy-records"
    try:
        people = personas(pg, name, size)
        with AppTraffic(pg, name, people, settings.clients, settings.think_ms / 1000, "deploy") as app, \
                LockSampler(pg, name, settings.sample_ms / 1000) as sampler:
            dump, _ = run_step(pg, "raw pg_dump -Fc", lambda: subprocess.run(
                [str(pg.binary("pg_dump")), "-Fc", "-f", str(work / "floor.dump"), "-d", f"service={name}"],
                check=True, capture_output=True), settings.timeout, name)
            read, _ = run_step(pg, "one sequential read of every table",
                               lambda: production.sequential_read(pg, name), settings.timeout, name)
            with ResourceMeter(connection.from_service(name)) as used:
                bound = DEPLOY_STEPS * settings.timeout   # five notebooks, each bounded like one step
                step, proc = run_step(pg, "runbook deploy", lambda: production.run_deploy(
                    production.deploy_command(name, records, settings.max_replica_lag), bound), bound + 120, name)
    finally:
        drop(pg, name)
    result = {"step": asdict(step), "floor": {"pg_dump": asdict(dump), "seq_read": asdict(read)},
              "exit_code": proc.returncode if proc is not None else None, "record": production.deploy_breakdown(records),
              "resources": used.summary(), "access_exclusive": sampler.summary(), "traffic": app.summary()}
    if proc is not None and proc.returncode != 0:
        result["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return result


def _on_clone(pg, template: str, name: str, what: str, progress, measure) -> dict:
    """measure(name) on a fresh clone of the template, dropped after."""
    clone(pg, template, name)
    try:
        progress(what)
        return measure(name)
    finally:
        drop(pg, name)


def measure_size(pg, size: Size, settings: Settings, files, progress=print, template: str | None = None,
                 shape: str = "legacy") -> dict:
    """Every figure for one size and legacy shape (see the module docstring)."""
    result: dict = {"size": {**asdict(size), "label": size.label if shape == "legacy" else f"{size.label} {shape}"},
                    "shape": shape}
    if template is None:
        template, built = scale_fixture.ensure_template(pg, size, progress=lambda *_: None, shape=shape)
        result["template"] = {"name": template, "built_s": None if built is None else round(built, 2)}
    else:
        result["template"] = {"name": template, "built_s": None}
    tag = hashlib.md5(f"{template}{time.time()}".encode()).hexdigest()[:6]
    with tempfile.TemporaryDirectory(prefix="truthsource-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        eng = clone(pg, template, f"bench_e_{tag}")
        result["clone_s"] = round(time.perf_counter() - started, 2)
        try:
            legacy = row_counts(pg, eng)
            result["counts"] = legacy
            result["predicted"] = production.predictions(eng)
            progress(f"[{size.label}] preflight: snapshot + backup, raw pg_dump")
            pre = measure_preflight(pg, eng, work, settings)
            result["preflight"] = {k: pre[k] for k in ("preflight", "parts", "raw_pg_dump")}
            progress(f"[{size.label}] phases through the engine, with app traffic")
            result["engine"] = measure_phases(pg, eng, files, size, settings, "engine", work)
            progress(f"[{size.label}] verification pieces, org products, rollback")
            result["verification"] = measure_verification(pg, eng, settings)
            result["org_products"] = measure_org_products(pg, eng, size)
            result["rollback"] = measure_rollback(pg, eng, pre, legacy, settings)
        finally:
            drop(pg, eng)
        result["psql"] = not_run(files, "psql") if "psql" in settings.skip else \
            _on_clone(pg, template, f"bench_p_{tag}", f"[{size.label}] phases by psql -1, with app traffic", progress,
                      lambda name: measure_phases(pg, name, files, size, settings, "psql", work))
        result["alone"] = not_run(files[:2], "alone") if "alone" in settings.skip else \
            _on_clone(pg, template, f"bench_q_{tag}", f"[{size.label}] phases 1-2 through the engine, no app traffic",
                      progress, lambda name: measure_alone(pg, name, files[:2], settings))
        if settings.deploy_process:
            progress(f"[{size.label}] runbook deploy as a process, with app traffic, and its floor")
            result["deploy"] = measure_deploy(pg, template, tag, size, settings, work)
    result["figures"] = figures(result)
    result["load_at_end"] = _load()
    prune(pg)
    return result


# -- the figures and their tables --------------------------------------------------------------------

def _s(step: dict) -> float | None:
    return step["seconds"] if step["status"] == "ok" else None


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def figures(r: dict) -> list[dict]:
    """The side-by-side rows: figure, ours, baseline, ratio, goal."""
    rows = []

    def add(name, ours, base, base_name, goal_key=None, ours_text=None, base_text=None):
        rows.append({"figure": name, "value": ours, "value_text": ours_text, "baseline": base,
                     "baseline_name": base_name, "baseline_text": base_text, "ratio": _ratio(ours, base),
                     "goal": GOALS.get(goal_key or name, "")})

    engine_total, psql_total = 0.0, 0.0
    for e, p in zip(r["engine"]["phases"], r["psql"]["phases"]):
        es, ps = _s(e["step"]), _s(p["step"])
        engine_total = engine_total + es if es is not None and engine_total is not None else None
        psql_total = psql_total + ps if ps is not None and psql_total is not None else None
        add(f"phase {e['phase']} ({e['file']}), engine", es, ps, "psql -1 -f",
            "phase 2 (engine)" if e["phase"] == 2 else None, _text(e["step"]), _text(p["step"]))
    add("phases 1-3, engine", engine_total, psql_total, "psql -1 -f")
    alone = next((p for p in r["alone"]["phases"] if p["phase"] == 2), None)
    with_app = r["engine"]["phases"][1]["step"]
    if alone is not None:
        add("phase 2, engine, no app traffic", _s(alone["step"]), _s(with_app), "with app traffic",
            ours_text=_text(alone["step"]), base_text=_text(with_app))
    pre = r["preflight"]
    add("preflight backup + snapshot", _s(pre["preflight"]), _s(pre["raw_pg_dump"]), "raw pg_dump -Fc",
        "preflight backup + snapshot / raw pg_dump", _text(pre["preflight"]), _text(pre["raw_pg_dump"]))
    rb = r["rollback"]
    add("rollback", _s(rb["rollback"]), _s(rb["raw_pg_restore"]), "raw pg_restore -1",
        "rollback / raw pg_restore", _text(rb["rollback"]), _text(rb["raw_pg_restore"]))
    v = r["verification"]
    scan = _s(v["seq_scan"])
    add("verify_data_integrity()", _s(v["verify_data_integrity"]), scan, f"count(*) {v['seq_scan_table']}",
        ours_text=_text(v["verify_data_integrity"]))
    add("get_database_stats()", _s(v["get_database_stats"]), scan, f"count(*) {v['seq_scan_table']}",
        ours_text=_text(v["get_database_stats"]))
    o = r["org_products"]
    add("org's 50 products, authenticated (ms)", o["authenticated"]["median_ms"], o["service_role"]["median_ms"],
        "service_role (ms)", "org's 50 products, authenticated / service_role")
    d = r.get("deploy")
    if d:
        add("runbook deploy (the process)", _s(d["step"]), production.floor_seconds(r),
            "floor: pg_dump -Fc + psql phases + a read of every table", ours_text=_text(d["step"]))
    return rows


def _text(step: dict) -> str | None:
    return None if step["status"] == "ok" else Step(**step).shown()


def _fmt(value, text=None) -> str:
    if text:
        return text
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _table(columns: list[str], rows: list[list], markdown: bool) -> str:
    table = PrettyTable(columns)
    table.align = "l"
    for row in rows:
        table.add_row(row)
    if markdown:
        table.set_style(TableStyle.MARKDOWN)
    return table.get_string()


def render(report: dict, markdown: bool = False) -> str:
    """The report as text tables (or markdown)."""
    out = []
    h = (lambda t: f"\n### {t}\n") if markdown else (lambda t: f"\n== {t} ==")
    meta = report["meta"]
    out.append(h("Setup"))
    out.append(_table(["fact", "value"], [[k, v] for k, v in _flat_meta(meta)], markdown))
    for r in report["sizes"]:
        s = r["size"]
        label = (f"{s['label']}: {s['orgs']} organizations x {s['products']} products, "
                 f"{meta['server'].get('profile_short', '')}")
        built = r["template"]["built_s"]
        out.append(h(f"{label} (template {'built in %.1f s' % built if built is not None else 'cached'}, "
                     f"clone {r['clone_s']} s)"))
        out.append(_table(["figure", "measured (s)", "baseline", "baseline (s)", "ratio", "goal"], [
            [f["figure"], _fmt(f["value"], f["value_text"]), f["baseline_name"], _fmt(f["baseline"], f["baseline_text"]),
             "-" if f["ratio"] is None else f"{f['ratio']:.2f}x", f["goal"]] for f in r["figures"]], markdown))
        out.append(h(f"{s['label']}: app traffic during each phase "
                     f"({report['meta']['settings']['clients']} clients, statements slower than {SLOW_SECONDS} s count as blocked)"))
        rows = []
        for how in ("engine", "psql"):
            for p in r[how]["phases"]:
                t = p.get("traffic")
                if not t:
                    rows.append([how, p["phase"], "-", "-", "-", "-", "-", "not run", "-"])
                    continue
                rows.append([how, p["phase"], t["statements"],
                             f"{t['longest_wait_s']} ({t['longest_wait_operation']})" if t["statements"] else "-",
                             t["p99_s"], t["blocked_s"], t["writes_blocked_s"], _counts(t["failed"], t["failed_by_sqlstate"]),
                             _counts(t["rejected_by_rules"], t["rejected_by_sqlstate"])])
        out.append(_table(["by", "phase", "statements", "longest wait (s)", "p99 (s)", "all blocked (s)",
                           "writes blocked (s)",
                           "failed (SQLSTATE)", "rejected by rules"], rows, markdown))
        errors = Counter()
        for how in ("engine", "psql"):
            for p in r[how]["phases"]:
                for e in (p.get("traffic") or {}).get("errors", []):
                    errors[(how, p["phase"], e["operation"], e["sqlstate"], e["message"])] += e["times"]
        if errors:
            out.append(("\n" if markdown else "") + _table(
                ["by", "phase", "app operation", "SQLSTATE", "error", "times"],
                [[*key, n] for key, n in sorted(errors.items())], markdown))
        out.append(h(f"{s['label']}: ACCESS EXCLUSIVE windows per table (pg_locks every "
                     f"{report['meta']['settings']['sample_ms']:g} ms; longest / total s)"))
        rows = []
        for how in ("engine", "psql"):
            for p in r[how]["phases"]:
                tables = (p.get("access_exclusive") or {}).get("tables", {})
                held = ", ".join(f"{t.removeprefix('public.')} {v['longest_s']:.2f}/{v['total_s']:.2f}"
                                 for t, v in sorted(tables.items(), key=lambda kv: -kv[1]["longest_s"]))
                rows.append([how, p["phase"], held or "none seen"])
        out.append(_table(["by", "phase", "tables held (longest / total s)"], rows, markdown))
        out += render_production(r, h, markdown)
        out.append(h(f"{s['label']}: the legacy rows after the phases (converge, lose nothing)"))
        rows = []
        for how in ("engine", "psql"):
            k = r[how]["rows_kept"]["tables"]
            if not k:
                rows.append([how] + ["not run"] * len(LEGACY_TABLES) + ["-"])
                continue
            rows.append([how] + [f"{v['before']} -> {v['after']}" + (f" (+{v['app_inserted']} app)" if v["app_inserted"] else "")
                                 for v in k.values()] + ["yes" if r[how]["rows_kept"]["all_kept"] else "NO"])
        out.append(_table(["by", *LEGACY_TABLES, "all kept"], rows, markdown))
        extra = [f"load average at the end: {r.get('load_at_end', '-')}",
                 "every phase finished through the engine" if r["engine"]["converged"] else
                 "the phases did NOT all finish through the engine: verification, the org's products and the "
                 "rollback ran on the database as the unfinished phase left it",
                 f"rollback restored the legacy row counts: {r['rollback'].get('rollback_counts_equal', '-')}",
                 f"preflight parts: {r['preflight']['parts']}",
                 f"verify_data_integrity(): {_integrity_summary(r['verification']['integrity_rows'])}"]
        out.append(("\n" if markdown else "") + "\n".join(("- " if markdown else "  ") + e for e in extra))
    if any(r.get("shape") for r in report["sizes"]):
        out.append(h("The longest ACCESS EXCLUSIVE per legacy shape (engine, any phase, any table)"))
        out.append(_table(["size", "shape", "longest (s)", "table", "phase"], shape_rows(report), markdown))
    if len(report["sizes"]) > 1:
        out.append(h("How each figure grows"))
        out.append(_table(["figure", *[r["size"]["label"] for r in report["sizes"]], "growth"],
                          growth_rows(report), markdown))
        out.append(h(f"How phase 2's slowest statements grow (engine, no app traffic; the {STATEMENTS_SHOWN} slowest at "
                     f"{report['sizes'][-1]['size']['label']}, by their line in the file)"))
        out.append(_table(["line", "statement", *[r["size"]["label"] for r in report["sizes"]], "growth"],
                          statement_growth_rows(report), markdown))
    return "\n".join(out) + "\n"


def render_production(r: dict, h, markdown: bool) -> list[str]:
    """The tables of production conditions (benchmarks/production.py): WAL, replica and disk per phase,
    what the app felt as the record keeps it, predictions against measurements, runbook deploy as a process."""
    label, out = r["size"]["label"], []
    out.append(h(f"{label}: WAL, replica and disk per phase (as every record measures them)"))
    out.append(_table(["by", "phase", "WAL", "tables it rewrites (size)", "WAL / their size", "replicas (largest lag)",
                       "archive behind (segments)", "server disk +", "temp files"],
                      production.resource_rows(r), markdown))
    notes = production.wal_notes(r)
    if notes:
        out.append(("\n" if markdown else "") + "\n".join(("- " if markdown else "  ") + n for n in notes))
    out.append(h(f"{label}: what the app felt, as the record keeps it (impact sampler) and as the clients saw it"))
    rows = [[p["phase"], impact.describe(p.get("impact")), (p.get("traffic") or {}).get("longest_wait_s", "-"),
             (p.get("traffic") or {}).get("failed", "-")] for p in r["engine"]["phases"]]
    out.append(_table(["phase", "the record", "clients: longest statement (s)", "clients: failed"], rows, markdown))
    out.append(h(f"{label}: the preflight's predictions against what the engine's run measured"))
    out.append(_table(["phase", "duration predicted (s)", "measured (s)", "measured / predicted", "WAL predicted",
                       "WAL measured", "WAL measured / predicted", "disk predicted", "disk measured (growth + temp)",
                       "disk measured / predicted"], production.prediction_rows(r), markdown))
    if r.get("deploy"):
        d = r["deploy"]
        out.append(h(f"{label}: runbook deploy as a process (with app traffic), its floor, and where the rest goes"))
        out.append(_table(["step", "seconds", "note"], production.deploy_rows(r), markdown))
        record = d.get("record") or {}
        lines = [f"exit code {d.get('exit_code')}, verdict {record.get('verdict')}"
                 + (f": {record.get('error')}" if record.get("error") else ""),
                 f"the record says: app impact: {record.get('impact_text', '-')}; {record.get('resources_text', '-')}",
                 f"the clients saw: longest statement {d['traffic'].get('longest_wait_s')} s, "
                 f"failed {_counts(d['traffic']['failed'], d['traffic']['failed_by_sqlstate'])}",
                 f"measured beside it: {resources.describe(d.get('resources'))}"]
        out.append(("\n" if markdown else "") + "\n".join(("- " if markdown else "  ") + x for x in lines))
    return out


def shape_rows(report: dict) -> list[list]:
    """Per size and shape: the longest ACCESS EXCLUSIVE window the engine's pass held, on which table."""
    rows = []
    for r in report["sizes"]:
        longest = (0.0, "-", "-")
        for p in r["engine"]["phases"]:
            for table, v in ((p.get("access_exclusive") or {}).get("tables") or {}).items():
                if v["longest_s"] > longest[0]:
                    longest = (v["longest_s"], table.removeprefix("public."), p["phase"])
        rows.append([r["size"]["label"], r.get("shape") or "legacy", f"{longest[0]:.2f}", longest[1], longest[2]])
    return rows


def _counts(total: int, by: dict) -> str:
    return f"{total} ({', '.join(f'{k}: {v}' for k, v in sorted(by.items()))})" if total else "0"


def _integrity_summary(rows: list[list[str]]) -> str:
    statuses = Counter(r[1] for r in rows)
    return ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "not run"


def growth_rows(report: dict) -> list[list]:
    sizes = report["sizes"]
    rows = [["products", *[r["size"]["products"] for r in sizes],
             f"{sizes[-1]['size']['products'] / sizes[0]['size']['products']:.1f}x"]]
    for i, f in enumerate(sizes[0]["figures"]):
        values = [r["figures"][i]["value"] for r in sizes]
        texts = [r["figures"][i]["value_text"] for r in sizes]
        rows.append([f["figure"], *[_fmt(v, t) for v, t in zip(values, texts)],
                     f"{_ratio(values[-1], values[0]):.1f}x" if _ratio(values[-1], values[0]) else "-"])
    for key in ("longest_wait_s", "blocked_s"):
        for phase in range(3):
            values = [r["engine"]["phases"][phase].get("traffic", {}).get(key) for r in sizes]
            rows.append([f"phase {phase + 1} engine, app {key}", *[_fmt(v) for v in values],
                         f"{_ratio(values[-1], values[0]):.1f}x" if _ratio(values[-1], values[0]) else "-"])
    return rows


def statement_growth_rows(report: dict, phase: int = 2) -> list[list]:
    """Phase `phase`'s slowest statements at the largest size, their seconds at each size: which step
    grows faster than the data. The locked transaction's statements are summed into one row."""
    per_size = []
    for r in report["sizes"]:
        times: dict = {}
        runs = [p for p in r["alone"]["phases"] if p["phase"] == phase]
        for t in (runs[0].get("statements", []) if runs else []):
            key = ("body", "the locked transaction (all its statements)") if t["transactional"] else (t["line"], t["summary"])
            times[key] = times.get(key, 0.0) + t["seconds"]
        per_size.append(times)
    slowest = sorted(per_size[-1], key=lambda k: -per_size[-1][k])[:STATEMENTS_SHOWN]
    rows = []
    for key in slowest:
        values = [times.get(key) for times in per_size]
        rows.append([key[0], key[1][:70], *[_fmt(v) for v in values],
                     f"{_ratio(values[-1], values[0]):.1f}x" if _ratio(values[-1], values[0]) else "-"])
    return rows


def _flat_meta(meta: dict):
    for key, value in meta.items():
        if isinstance(value, dict):
            for k, v in value.items():
                yield f"{key}.{k}", v
        else:
            yield key, value


# -- the run -----------------------------------------------------------------------------------------

def git_facts(sql_rev: str | None) -> dict:
    """Which phase files were measured: a commit's, or the working tree's (and whether it differs)."""
    def git(*args):
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None
    rev = sql_rev or "HEAD"
    subject = git("log", "-1", "--format=%s", rev) or ""
    facts = {"commit": git("rev-parse", "--short", rev),
             "subject": subject if len(subject) <= 80 else subject[:77] + "..."}
    if sql_rev:
        facts["sql_from"] = f"commit {facts['commit']} (git show)"
    else:
        dirty = bool(git("status", "--porcelain", "--", "sql"))
        facts["sql_from"] = "working tree" + (" (with uncommitted changes to sql/)" if dirty else "")
    # the Python package is always the working tree's
    dirty = bool(git("status", "--porcelain", "--", "runbooks"))
    facts["runbooks_from"] = "working tree" + (" (with uncommitted changes to runbooks/)" if dirty else "")
    return facts


def machine_facts() -> dict:
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "memory": memory, "cpu": cpu, "os": platform.platform(),
            "load_at_start": _load()}


def _load() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_benchmark(pg, sizes: list[Size], settings: Settings, progress=print,
                  template: str | None = None, shapes: tuple[str, ...] = ("legacy",)) -> dict:
    """Every figure for every size and legacy shape on a started server (its client environment set).
    `template` names an already generated database to clone instead of the size's cached template."""
    from benchmarks.server import profile

    with tempfile.TemporaryDirectory(prefix="truthsource-bench-sql-") as tmp:
        files = phase_files(settings.sql_rev, Path(tmp))
        server_version = admin_execute(pg, "select current_setting('server_version')")[0][0]
        meta = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_facts(),
            "server": {"version": server_version, "bin": str(pg.bin_dir), "profile": profile(pg),
                       "profile_short": short_profile(pg)},
            "git": git_facts(settings.sql_rev),
            "sql_sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for _, p in files},
            "settings": {"clients": settings.clients, "think_ms": settings.think_ms, "sample_ms": settings.sample_ms,
                         "timeout_s": settings.timeout, "max_replica_lag_s": settings.max_replica_lag},
        }
        report = {"meta": meta, "sizes": []}
        for size in sizes:
            for shape in shapes:
                report["sizes"].append(measure_size(pg, size, settings, files, progress, template, shape))
    return report


def short_profile(pg) -> str:
    if not getattr(pg, "durable", False):
        return "THROWAWAY server (fsync off)"
    replicas = len(getattr(pg, "replicas", []))
    return f"durable server, {replicas} streaming replica{'s' if replicas != 1 else ''}"


def prepare(pg, sizes: list[Size], progress=print, shapes: tuple[str, ...] = ("legacy",)) -> None:
    """Every template generated (or found) first, then, on a durable server, the streaming replica started:
    its pg_basebackup copies the templates too, and none is generated while it streams."""
    for size in sizes:
        for shape in shapes:
            _, built = scale_fixture.ensure_template(pg, size, progress=progress, shape=shape)
            if built is not None:
                progress(f"[{size.label} {shape}] template built in {built:.1f} s")
    prune(pg)
    if getattr(pg, "durable", False):
        started = time.perf_counter()
        progress("starting the streaming replica (pg_basebackup of the cluster)")
        pg.start_replica()
        progress(f"replica streaming after {time.perf_counter() - started:.1f} s")


def prune(pg) -> None:
    """Empty the WAL archive between measurements (nothing restores from it here)."""
    from benchmarks.server import prune_archive

    prune_archive(pg)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.server import start_server
    from runbooks.embedded import EmbeddedPostgresError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M", help="comma-separated: tiny, 100k, 1M, 10M or ORGSxPRODUCTS (default 1M)")
    parser.add_argument("--shapes", default="legacy", help="comma-separated legacy shapes (benchmarks/scale_fixture.py: "
                                                           "legacy, variant, unseen, or transforms joined by '+'; default legacy)")
    parser.add_argument("--pg-bin", help="PostgreSQL bin directory (default: the embedded wheel's)")
    parser.add_argument("--data-dir", help="keep the server's cluster (and the templates) here between runs, "
                                           "e.g. /var/tmp/truthsource-bench")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each measured step may take (default 900)")
    parser.add_argument("--clients", type=int, default=4, help="app clients during each phase (default 4)")
    parser.add_argument("--think-ms", type=float, default=20, help="each client's pause between statements (default 20)")
    parser.add_argument("--sample-ms", type=float, default=50, help="pg_locks sampling interval (default 50)")
    parser.add_argument("--sql-rev", help="apply the phase files as committed at this git revision (default: as on disk)")
    parser.add_argument("--throwaway", action="store_true",
                        help="the throwaway server (fsync, synchronous_commit, full_page_writes off; no archive, no "
                             "replica) instead of the durable one with a streaming replica: flatters every write")
    parser.add_argument("--max-replica-lag", type=float, default=10,
                        help="seconds a replica may fall behind before the batches pause (default 10; 0: never)")
    parser.add_argument("--no-deploy-process", action="store_true",
                        help="skip timing `runbook deploy` as a process beside its floor")
    parser.add_argument("--skip", default="", help="comma-separated passes to leave out: psql, alone (see above)")
    parser.add_argument("--json", help="write the whole report as JSON here")
    parser.add_argument("--markdown", help="write the tables as markdown here")
    args = parser.parse_args(argv)
    try:
        sizes = list(dict.fromkeys(scale_fixture.parse_size(s) for s in args.sizes.split(",") if s.strip()))
        if not sizes:
            raise ValueError("--sizes names no size")
        shapes = tuple(dict.fromkeys(scale_fixture.parse_shape(s)[0] for s in args.shapes.split(",") if s.strip())) or ("legacy",)
        if args.timeout <= 0 or args.clients < 1 or args.think_ms < 0 or args.sample_ms <= 0 or args.max_replica_lag < 0:
            raise ValueError("--timeout and --sample-ms must be positive, --clients at least 1, --think-ms and "
                             "--max-replica-lag >= 0")
        skip = tuple(dict.fromkeys(x.strip() for x in args.skip.split(",") if x.strip()))
        if set(skip) - set(SKIPPABLE):
            raise ValueError(f"--skip {args.skip!r}: use {', '.join(SKIPPABLE)}")
        if args.sql_rev:
            subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{args.sql_rev}^{{commit}}"],
                           check=True, capture_output=True)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError:
        print(f"error: --sql-rev {args.sql_rev!r} is no git revision of {ROOT}", file=sys.stderr)
        return 2
    settings = Settings(clients=args.clients, think_ms=args.think_ms, sample_ms=args.sample_ms,
                        timeout=args.timeout, sql_rev=args.sql_rev, max_replica_lag=args.max_replica_lag,
                        deploy_process=not args.no_deploy_process, skip=skip)
    try:
        pg = start_server(args.pg_bin, args.data_dir, throwaway=args.throwaway)
    except EmbeddedPostgresError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        with runner.environment(pg.client_env()):
            prepare(pg, sizes, progress=say, shapes=shapes)
            report = run_benchmark(pg, sizes, settings, progress=say, shapes=shapes)
    finally:
        pg.stop()
    if args.json:   # first: a long run's figures survive whatever happens to the tables
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(render(report))
    if args.markdown:
        Path(args.markdown).write_text(render(report, markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
