"""`runbook sandbox` and `runbook lab`: a practice database for stepping through the notebooks by hand.

`sandbox` starts an embedded PostgreSQL (embedded.py) that stays up until Ctrl-C or SIGTERM,
with a database holding the Supabase shim and the legacy fixture, or (``--from NAME``) a fresh
copy of a target's database: dumped with the sandbox server's own pg_dump, its roles created
(without passwords), restored with pg_restore. It prints the service and the libpq files to
export, and writes them to ``.sandbox.env`` at the project root (``$RUNBOOK_SANDBOX_FILE``), which
`runbook lab` reads: JupyterLab then starts with ``PGSERVICE`` naming the sandbox, so the
notebooks' parameters (``target_kind = None``: libpq's environment) point at it unchanged.
On stop, the server, its data directory and its client files are removed.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2

from . import connection, rehearsal
from .embedded import EmbeddedPostgres, EmbeddedPostgresError
from .paths import NOTEBOOK_DIR, PROJECT_ROOT

DATABASE = "truthsource_sandbox"
SERVICE = "sandbox"
FILE_ENV = "RUNBOOK_SANDBOX_FILE"


class SandboxError(RuntimeError):
    """The sandbox cannot be made as asked (exit 2)."""


def env_file() -> Path:
    return Path(os.environ.get(FILE_ENV) or PROJECT_ROOT / ".sandbox.env")


def source_target(name: str, targets_file: str | None = None) -> connection.Target:
    """--from NAME: `service:NAME`, `target:NAME`, else a service if one is defined, else a targets-file entry."""
    kind, _, rest = name.partition(":")
    if rest and kind in ("service", "target"):
        return connection.resolve(kind, rest, targets_file)
    try:
        return connection.from_service(name)
    except connection.TargetError as as_service:
        try:
            return connection.from_targets_file(name, targets_file)
        except connection.TargetError as as_target:
            raise SandboxError(f"--from {name}: neither a service ({as_service}) nor a target ({as_target})") from None


def serve(source: connection.Target | None = None, say=print) -> int:
    """Start the sandbox, say how to use it, wait for Ctrl-C or SIGTERM, stop it: exit 0."""
    pg = EmbeddedPostgres()
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C, even when started with SIGINT ignored (&)
    # A PGSERVICE exported earlier (an old sandbox's) would be applied by libpq to every connection made
    # here; the sandbox and its source are named explicitly.
    os.environ.pop("PGSERVICE", None)
    try:
        pg.start()   # SIGTERM now raises SystemExit, so the `finally` below stops the server
        if source is None:
            say(f"sandbox: loading the Supabase shim and the legacy fixture into {DATABASE}")
            rehearsal.prepare_database(pg, DATABASE)
        else:
            rehearsal.prepare_database(pg, DATABASE, shim=False)
            say(f"sandbox: copying {source.kind} {source.name!r} into {DATABASE} (pg_dump {pg.version})")
            _copy_from(pg, source, say)
        pg.add_service(SERVICE, DATABASE)
        _announce(pg, source, say)
        while True:
            signal.pause()   # the handlers raise: KeyboardInterrupt (Ctrl-C), SystemExit (SIGTERM)
    except (KeyboardInterrupt, SystemExit):
        say("sandbox: stopping")
    finally:
        _forget(pg)
        try:
            pg.stop()
        except EmbeddedPostgresError as exc:   # Ctrl-C in a terminal reaches the server too
            say(f"sandbox: the server stopped on its own ({str(exc).splitlines()[0]})")
    say("sandbox: stopped; its data directory is removed")
    return 0


# Role attributes a copy keeps (no password: logins to the sandbox go through its .pgpass as postgres).
ROLES_SQL = """
select rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolbypassrls
  from pg_roles
 where rolname !~ '^pg_' and rolname <> current_user
 order by rolname
"""


def _copy_from(pg: EmbeddedPostgres, source: connection.Target, say) -> None:
    """The source's database into the sandbox: its roles (no passwords), then its dump."""
    try:
        src = connection.connect(source, application_name="runbook sandbox copy", readonly=True, autocommit=True)
    except psycopg2.OperationalError as exc:
        raise SandboxError(f"cannot connect to {source.kind} {source.name!r}: {' '.join(str(exc).split())}") from None
    try:
        with src.cursor() as cur:
            cur.execute(ROLES_SQL)
            roles = cur.fetchall()
    finally:
        src.close()
    _create_roles(pg, roles)
    workdir = Path(tempfile.mkdtemp(prefix="truthsource-sandbox-"))   # 0700: the dump holds every row
    dump = workdir / "source.dump"
    try:
        done = subprocess.run([str(pg.binary("pg_dump")), "-Fc", "-f", str(dump), "-d", source.conninfo()],
                              capture_output=True, text=True)   # the user's PGSERVICEFILE/.pgpass reach the source
        if done.returncode != 0:
            raise SandboxError(f"pg_dump of {source.name!r} failed: {done.stderr.strip()}")
        done = subprocess.run([str(pg.binary("pg_restore")), "-d", pg.conninfo(DATABASE), str(dump)],
                              capture_output=True, text=True, env={**os.environ, **pg.client_env()})
    finally:
        dump.unlink(missing_ok=True)
        workdir.rmdir()
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    if errors:   # a practice copy: say what did not restore, and go on
        say(f"sandbox: pg_restore reported {len(errors)} error(s); the first: {errors[0].strip()}")


def _create_roles(pg: EmbeddedPostgres, roles: list[tuple]) -> None:
    conn = psycopg2.connect(pg.conninfo("postgres"), passfile=str(pg.client.pgpass_file))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("select rolname from pg_roles")
            existing = {r[0] for r in cur.fetchall()}
            for name, superuser, inherit, createrole, createdb, login, bypassrls in roles:
                if name in existing:
                    continue
                flags = [("SUPERUSER" if superuser else "NOSUPERUSER"), ("INHERIT" if inherit else "NOINHERIT"),
                         ("CREATEROLE" if createrole else "NOCREATEROLE"), ("CREATEDB" if createdb else "NOCREATEDB"),
                         ("LOGIN" if login else "NOLOGIN"), ("BYPASSRLS" if bypassrls else "NOBYPASSRLS")]
                cur.execute(f'create role "{name.replace(chr(34), chr(34) * 2)}" ' + " ".join(flags))
    finally:
        conn.close()


def exports(pg: EmbeddedPostgres) -> dict[str, str]:
    return {**pg.client_env(), "PGSERVICE": SERVICE}


def _announce(pg: EmbeddedPostgres, source, say) -> None:
    values = exports(pg)
    lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    path = env_file()
    path.write_text(f"# the running sandbox (runbook sandbox); `runbook lab` reads this file\n{lines}")
    what = "the Supabase shim and the legacy fixture" if source is None else f"a copy of {source.name!r}"
    say(f"sandbox: embedded PostgreSQL {pg.version} on {pg.host}:{pg.port}, database {DATABASE} with {what}")
    say(f"data directory: {pg.data_dir}")
    say(f"service: {SERVICE}")
    for key, value in values.items():
        say(f"export {key}={shlex.quote(value)}")
    say(f"(also written to {path}: `make lab` or `runbook lab` starts JupyterLab on the sandbox)")
    say("Ctrl-C stops the sandbox and deletes its data")


def _forget(pg: EmbeddedPostgres) -> None:
    """Remove the env file if it still names this sandbox (another may have started since)."""
    path = env_file()
    try:
        if pg.client is not None and str(pg.client.service_file) in path.read_text():
            path.unlink()
    except OSError:
        pass


# -- lab -------------------------------------------------------------------------------------

def lab_command(port: int | None = None) -> list[str]:
    """JupyterLab on 127.0.0.1, no browser, root allowed when we are root (its own check refuses it)."""
    command = [sys.executable, "-m", "jupyterlab", "--ip", "127.0.0.1", "--no-browser",
               f"--notebook-dir={NOTEBOOK_DIR}"]
    if port:
        command.append(f"--port={port}")
    if os.geteuid() == 0:
        command.append("--allow-root")
    return command


def lab_environment(say=print) -> dict[str, str]:
    """The environment JupyterLab gets: the running sandbox's, unless PGSERVICE is exported already."""
    env = dict(os.environ)
    if env.get("PGSERVICE"):
        say(f"lab: the notebooks use PGSERVICE={env['PGSERVICE']} (exported)")
        return env
    path = env_file()
    if not path.is_file():
        say(f"lab: no sandbox running ({path} missing) and no PGSERVICE: the notebooks use libpq's PG* "
            "environment, or the target their parameters cell names")
        return env
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
    say(f"lab: the notebooks use the sandbox (PGSERVICE={env.get('PGSERVICE')}, from {path})")
    return env


def lab(port: int | None = None, say=print) -> int:
    env = lab_environment(say)
    os.execve(sys.executable, lab_command(port), env)   # JupyterLab replaces us: Ctrl-C stops it
    return 0   # not reached
