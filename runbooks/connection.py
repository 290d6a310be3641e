"""Targets and connections: only through libpq's own means, never with a password in hand.

A target is a libpq service (``pg_service.conf``, ``PGSERVICEFILE`` honoured), an entry of a
targets file (TOML: host, port, dbname, user, sslmode, production), or the PG* environment.
Passwords come from ``.pgpass``/``PGPASSFILE``/``PGPASSWORD`` and nowhere else: a target that
carries one is refused, so no password can travel into a parameter, a notebook or a record.
"""

from __future__ import annotations

import configparser
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import psycopg2.extensions

TARGETS_ENV = "RUNBOOK_TARGETS"
DEFAULT_TARGETS_FILE = "targets.toml"
CONNINFO_KEYS = ("host", "port", "dbname", "user", "sslmode")
SECRET_KEYS = ("password", "passfile_contents", "sslpassword")


class TargetError(ValueError):
    """The target cannot be used as given (unknown, ambiguous, or carries a secret)."""


@dataclass(frozen=True)
class Target:
    """Where to connect, without any secret. ``kind`` is service, target or environment."""

    name: str
    kind: str
    params: dict = field(default_factory=dict)
    production: bool = False
    targets_file: str | None = None   # for kind "target": the file it came from

    def conninfo(self, **extra: str) -> str:
        """A libpq connection string; libpq adds the password from its own sources."""
        items = {"service": self.name} if self.kind == "service" else dict(self.params)
        items.update({k: v for k, v in extra.items() if v is not None})
        return " ".join(f"{k}={_quote(str(v))}" for k, v in items.items())

    def describe(self) -> dict:
        """What a record may say about the target: names and addresses, never a secret."""
        return {"kind": self.kind, "name": self.name, "production": self.production,
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
    return Path(path or os.environ.get(TARGETS_ENV) or DEFAULT_TARGETS_FILE)


def from_targets_file(name: str, path: str | os.PathLike | None = None) -> Target:
    """An entry of a targets file::

        [targets.staging]
        host = "db.example.internal"
        port = 5432
        dbname = "postgres"
        user = "postgres"
        sslmode = "require"
        production = false
    """
    file = targets_file_path(path)
    if not file.is_file():
        raise TargetError(f"targets file {file} not found (give --targets-file or set {TARGETS_ENV})")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"targets file {file} is not valid TOML: {exc}") from None
    entries = data.get("targets", {})
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise TargetError(f"target {name!r} is not in {file} (known: {known})")
    entry = dict(entries[name])
    _refuse_secrets(entry, f"target {name!r} in {file}")
    production = entry.pop("production", False)
    if not isinstance(production, bool):
        raise TargetError(f"target {name!r} in {file}: production must be true or false")
    unknown = sorted(set(entry) - set(CONNINFO_KEYS))
    if unknown:
        raise TargetError(f"target {name!r} in {file}: unknown keys {', '.join(unknown)} "
                          f"(allowed: {', '.join(CONNINFO_KEYS)}, production)")
    for required in ("host", "dbname", "user"):
        if required not in entry:
            raise TargetError(f"target {name!r} in {file}: {required} is required")
    return Target(name=name, kind="target", params=entry, production=production,
                  targets_file=str(file.resolve()))


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
