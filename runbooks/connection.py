"""Targets and connections: only through libpq's own means, never with a password in hand.

A target is a libpq service (``pg_service.conf``, ``PGSERVICEFILE`` honoured), an entry of a
targets file (TOML: host, port, dbname, user, sslmode, production, group, server_disk_free), or the
PG* environment.
Passwords come from ``.pgpass``/``PGPASSFILE``/``PGPASSWORD`` and nowhere else: a target that
carries one is refused, so no password can travel into a parameter, a notebook or a record.

A run needs a server session of its own: its exported snapshot, advisory locks and session
settings do not hold through a transaction-mode pooler (Supavisor on port 6543, PgBouncer with
``pool_mode = transaction``). ``refuse_transaction_pooler`` finds one by its behaviour and refuses
the target before anything runs.
"""

from __future__ import annotations

import configparser
import os
import secrets
import select
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.extensions

from .checks import parse_bytes
from .paths import PROJECT_ROOT

TARGETS_ENV = "RUNBOOK_TARGETS"
DEFAULT_TARGETS_FILE = "targets.toml"
CONNINFO_KEYS = ("host", "port", "dbname", "user", "sslmode")
SECRET_KEYS = ("password", "passfile_contents", "sslpassword")


class TargetError(ValueError):
    """The target cannot be used as given (unknown, ambiguous, or carries a secret)."""


class TransactionPoolerError(TargetError):
    """The target is reached through a transaction-mode pooler: its sessions are not ours."""


@dataclass(frozen=True)
class Target:
    """Where to connect, without any secret. ``kind`` is service, target or environment."""

    name: str
    kind: str
    params: dict = field(default_factory=dict)
    production: bool = False
    targets_file: str | None = None   # for kind "target": the file it came from
    group: str | None = None          # for kind "target": its group in the file (a fleet may deploy one group)
    server_disk_free: str | None = None   # for kind "target": the server's free disk as the DBA knows it ("20GB")

    def conninfo(self, **extra: str) -> str:
        """A libpq connection string; libpq adds the password from its own sources."""
        items = {"service": self.name} if self.kind == "service" else dict(self.params)
        items.update({k: v for k, v in extra.items() if v is not None})
        return " ".join(f"{k}={_quote(str(v))}" for k, v in items.items())

    def describe(self) -> dict:
        """What a record may say about the target: names and addresses, never a secret."""
        return {"kind": self.kind, "name": self.name, "production": self.production,
                **({"group": self.group} if self.group is not None else {}),
                **{k: self.params[k] for k in CONNINFO_KEYS if k in self.params}}

    def as_parameters(self) -> dict:
        """The notebook parameters that name this target (what papermill writes down)."""
        return {"target_kind": self.kind, "target_name": self.name, "targets_file": self.targets_file}


def _quote(value: str) -> str:
    if value and not any(c in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def service_file() -> Path:
    """The pg_service.conf libpq would read for a user service."""
    named = os.environ.get("PGSERVICEFILE")
    return Path(named) if named else Path.home() / ".pg_service.conf"


def from_service(name: str) -> Target:
    """A libpq service. Its file is read only to refuse passwords and to describe it."""
    params: dict = {}
    for path in (service_file(), Path(os.environ.get("PGSYSCONFDIR", "/etc/postgresql-common")) / "pg_service.conf"):
        if path.is_file():
            parser = configparser.ConfigParser(interpolation=None)
            parser.read(path)
            if parser.has_section(name):
                params = dict(parser.items(name))
                break
    else:
        raise TargetError(
            f"service {name!r} is not defined in {service_file()} (set PGSERVICEFILE to the "
            "pg_service.conf that defines it)"
        )
    _refuse_secrets(params, f"service {name!r}")
    return Target(name=name, kind="service", params={k: params[k] for k in CONNINFO_KEYS if k in params})


def targets_file_path(path: str | os.PathLike | None = None) -> Path:
    """The file given, else $RUNBOOK_TARGETS, else ./targets.toml, else the project root's
    (a notebook runs in notebooks/, the file sits at the root)."""
    named = path or os.environ.get(TARGETS_ENV)
    if named:
        return Path(named)
    here, root = Path(DEFAULT_TARGETS_FILE), PROJECT_ROOT / DEFAULT_TARGETS_FILE
    return root if not here.is_file() and root.is_file() else here


def target_names(path: str | os.PathLike | None = None) -> list[str]:
    """The entries of a targets file, in the file's order (the fleet's partitions)."""
    return list(_targets_of(targets_file_path(path)))


def _targets_of(file: Path) -> dict:
    if not file.is_file():
        raise TargetError(f"targets file {file} not found (give --targets-file or set {TARGETS_ENV})")
    try:
        return tomllib.loads(file.read_text()).get("targets", {})
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"targets file {file} is not valid TOML: {exc}") from None


def from_targets_file(name: str, path: str | os.PathLike | None = None) -> Target:
    """An entry of a targets file::

        [targets.staging]
        host = "db.example.internal"
        port = 5432
        dbname = "postgres"
        user = "postgres"
        sslmode = "require"
        production = false
        group = "eu"        # optional: a fleet may be given one group of the file (fleet.Fleet.group)
        server_disk_free = "20GB"   # optional: the server's free disk, where the role cannot see it (budgets.py)
    """
    file = targets_file_path(path)
    entries = _targets_of(file)
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise TargetError(f"target {name!r} is not in {file} (known: {known})")
    entry = dict(entries[name])
    _refuse_secrets(entry, f"target {name!r} in {file}")
    production = entry.pop("production", False)
    if not isinstance(production, bool):
        raise TargetError(f"target {name!r} in {file}: production must be true or false")
    group = entry.pop("group", None)
    if group is not None and not (isinstance(group, str) and group.strip()):
        raise TargetError(f"target {name!r} in {file}: group must be a name in quotes (group = \"eu\"), "
                          f"not {group!r}")
    disk_free = entry.pop("server_disk_free", None)
    try:
        if disk_free is not None:
            parse_bytes(disk_free)
    except ValueError as exc:
        raise TargetError(f"target {name!r} in {file}: server_disk_free: {exc}") from None
    unknown = sorted(set(entry) - set(CONNINFO_KEYS))
    if unknown:
        raise TargetError(f"target {name!r} in {file}: unknown keys {', '.join(unknown)} "
                          f"(allowed: {', '.join(CONNINFO_KEYS)}, production, group, server_disk_free)")
    for required in ("host", "dbname", "user"):
        if required not in entry:
            raise TargetError(f"target {name!r} in {file}: {required} is required")
    return Target(name=name, kind="target", params=entry, production=production,
                  targets_file=str(file.resolve()), group=group,
                  server_disk_free=None if disk_free is None else str(disk_free))


def from_environment() -> Target:
    """The PG* environment, as libpq reads it (for notebooks run by hand or under nbval)."""
    env = {"host": "PGHOST", "port": "PGPORT", "dbname": "PGDATABASE", "user": "PGUSER", "sslmode": "PGSSLMODE"}
    if os.environ.get("PGSERVICE"):
        return from_service(os.environ["PGSERVICE"])
    params = {k: os.environ[v] for k, v in env.items() if os.environ.get(v)}
    return Target(name="environment", kind="environment", params=params)


def resolve(kind: str | None, name: str | None, targets_file: str | None = None) -> Target:
    """The target a notebook's parameters name (kind None: the PG* environment)."""
    if kind in (None, "", "environment"):
        return from_environment()
    if not name:
        raise TargetError(f"target kind {kind!r} needs a name")
    if kind == "service":
        return from_service(name)
    if kind == "target":
        return from_targets_file(name, targets_file)
    raise TargetError(f"unknown target kind {kind!r} (service, target or environment)")


def _refuse_secrets(params: dict, where: str) -> None:
    found = [k for k in params if k.lower() in SECRET_KEYS]
    if found:
        raise TargetError(
            f"{where} carries a {found[0]}: secrets are never kept with a target; "
            "put the password in ~/.pgpass (or PGPASSFILE) instead"
        )


def connect(target: Target, *, application_name: str = "runbook", readonly: bool = False,
            autocommit: bool = False, connect_timeout: int = 10) -> psycopg2.extensions.connection:
    """A psycopg2 connection to the target; read-only connections refuse every write."""
    options = "-c default_transaction_read_only=on" if readonly else None
    conn = psycopg2.connect(target.conninfo(application_name=application_name,
                                            connect_timeout=str(connect_timeout),
                                            options=options))
    conn.autocommit = autocommit
    return conn


def server_facts(conn) -> dict:
    """Who and where we actually are, as the server says (for records and headers)."""
    with conn.cursor() as cur:
        cur.execute("""
            select current_database(), current_user, session_user,
                   coalesce(host(inet_server_addr()), 'local socket'), inet_server_port(),
                   current_setting('server_version'), current_setting('server_version_num')::int,
                   (select rolsuper from pg_roles where rolname = current_user)
        """)
        row = cur.fetchone()
    if not conn.autocommit:
        conn.rollback()
    keys = ("database", "current_user", "session_user", "server_address", "server_port",
            "server_version", "server_version_num", "superuser")
    return dict(zip(keys, row))


# -- connection poolers ----------------------------------------------------------------------

SUPAVISOR_TRANSACTION_PORT = 6543   # Supabase's transaction pooler; its session pooler and the database use 5432
SESSION_PROBE = "runbook.session_probe"   # a custom setting: any role may set it, it changes nothing
NEWCOMER_WAIT = 5.0   # seconds a second connection may wait for a server session of its own
DIRECT_CONNECTION_ADVICE = (
    "connect directly to the database instead (Supabase: db.<project>.supabase.co port 5432, or the "
    "session pooler on port 5432; PgBouncer: pool_mode = session, or the server's own port)")


def refuse_transaction_pooler(target: Target) -> None:
    """Raise TransactionPoolerError when the target's sessions are shared between transactions.

    A run relies on its session: the preflight's exported snapshot (backup and snapshot of one
    instant), the advisory locks that keep runs apart, lock_timeout set once. Connects twice."""
    evidence = transaction_pooler_evidence(target)
    if evidence:
        raise TransactionPoolerError(
            f"{target.kind} {target.name!r} is reached through a transaction-mode connection pooler: "
            + "; ".join(evidence) + ". Exported snapshots, advisory locks and session settings do not hold "
            "there, so nothing was run; " + DIRECT_CONNECTION_ADVICE)


def transaction_pooler_evidence(target: Target) -> list[str]:
    """What shows that the target's server sessions are not this connection's own ([] if none)."""
    conn = connect(target, application_name="runbook session check")
    try:
        return _pooler_hints(conn) + _session_behaviour(target, conn)
    finally:
        conn.close()


def _pooler_hints(conn) -> list[str]:
    """The cheap signs: the port we reached, and a server version that names a pooler."""
    hints = []
    if conn.info.port == SUPAVISOR_TRANSACTION_PORT:
        hints.append(f"port {SUPAVISOR_TRANSACTION_PORT} is Supabase's transaction pooler (Supavisor)")
    reported = conn.get_parameter_status("server_version") or ""
    if any(name in reported.lower() for name in ("bouncer", "supavisor")):
        hints.append(f"the server reports itself as {reported!r}")
    return hints


def _session_behaviour(target: Target, conn) -> list[str]:
    """A marker set in one transaction, looked for in the next, and from a second connection.

    Directly connected, a connection keeps one backend and its settings, and no other connection
    can be given that backend while it lives. Through a transaction pooler the backend goes back to
    the pool at each commit: the next transaction may run elsewhere, and a newcomer is handed it."""
    token = secrets.token_hex(8)
    first_pid, _ = _one_transaction(conn, "select pg_backend_pid(), set_config(%s, %s, false)",
                                    (SESSION_PROBE, token))
    other_pid, other_saw = _newcomer_session(target)
    later_pid, later_saw = _one_transaction(conn, "select pg_backend_pid(), current_setting(%s, true)",
                                            (SESSION_PROBE,))
    _one_transaction(conn, "select 1, set_config(%s, '', false)", (SESSION_PROBE,))  # leave no marker behind
    found = []
    if later_pid != first_pid:
        found.append(f"one connection's transactions ran in two server sessions (backend pid {first_pid}, "
                     f"then {later_pid})")
    if later_saw != token:
        found.append("a session setting made in one transaction was gone in the next")
    if other_pid is not None and (other_pid == first_pid or other_saw == token):
        found.append(f"a second connection was handed the first one's server session (backend pid {other_pid})")
    return found


def _newcomer_session(target: Target, wait_seconds: float = NEWCOMER_WAIT) -> tuple:
    """(backend pid, probe marker) as a second connection sees them; (None, None) when no server
    session was free for it in time, which is what a pool of sessions held by their clients does,
    or when the server let no second connection in (max_connections): the evidence is then silent.

    Asynchronous, so that the wait is bounded: a session pooler with one server connection would
    otherwise queue the newcomer behind our own idle session."""
    other = psycopg2.connect(target.conninfo(application_name="runbook session check"), async_=True)
    try:
        if not _ready(other, wait_seconds):
            return None, None
        with other.cursor() as cur:
            cur.execute("select pg_backend_pid(), current_setting(%s, true)", (SESSION_PROBE,))
            if not _ready(other, wait_seconds):
                return None, None
            return cur.fetchone()
    except psycopg2.OperationalError:
        return None, None
    finally:
        other.close()


def _ready(conn, wait_seconds: float) -> bool:
    """Drive an asynchronous connection until its work is done (True) or the time is up (False)."""
    give_up = time.monotonic() + wait_seconds
    while True:
        state = conn.poll()
        if state == psycopg2.extensions.POLL_OK:
            return True
        left = give_up - time.monotonic()
        if left <= 0:
            return False
        reading = state == psycopg2.extensions.POLL_READ
        select.select([conn.fileno()] if reading else [], [] if reading else [conn.fileno()], [], left)


def _one_transaction(conn, sql: str, params: tuple) -> tuple:
    """One statement in a transaction of its own, committed (the pooler may then move us)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        row = cur.fetchone()
    if not conn.autocommit:
        conn.commit()
    return row
