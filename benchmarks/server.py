"""The benchmark's server: production-like by default, optionally on a data directory that outlives the run.

By default the server runs as a production server does (``runbooks.embedded``'s durable profile): fsync,
synchronous_commit and full_page_writes on, ``wal_level = logical``, WAL archived to a directory of the
cluster (``archive_command``), and a hot standby streaming from it (``pg_basebackup`` into a second
embedded cluster of the same binaries, over a replication slot), so every write pays for durability and
every phase's WAL is replayed somewhere. ``throwaway=True`` (``--throwaway``) is the old rehearsal
profile — fsync, synchronous_commit and full_page_writes off, no archive, no replica — which flatters
every write-heavy step; every table the benchmark prints names the profile it was measured on.

A scale benchmark spends most of a first run generating its legacy database; kept as a template
database in a persistent data directory (``--data-dir``), later runs clone it in seconds. The
directory holds one PostgreSQL cluster per major version and profile (``pg15-durable``, ``pg18``
for the throwaway one), and the superuser's password beside it in a file readable by the invoking user
only. When started as root the server runs as an unprivileged account (see runbooks.embedded), so the
directory must not sit under a 0700 home: /var/tmp is a good place. The archived WAL is only there to be
archived: ``prune_archive`` empties it between measurements, so a long run does not fill the disk.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path

from runbooks import embedded
from runbooks.embedded import EmbeddedPostgres, EmbeddedPostgresError

PASSWORD_FILE = "superuser-password"
# a benchmark writes gigabytes: fewer forced checkpoints (as a production server tuned for bulk work has)
BENCH_SETTINGS = {"max_wal_size": "8GB", "checkpoint_timeout": "30min"}


class BenchPostgres(EmbeddedPostgres):
    """The embedded server with the benchmark's checkpoint spacing, in either profile."""

    SETTINGS = {**embedded._THROWAWAY_SETTINGS, **BENCH_SETTINGS}


class PersistentPostgres(BenchPostgres):
    """An embedded server whose cluster lives in `root` and is kept when the server stops."""

    def __init__(self, root: Path | str, bin_dir: Path | str | None = None, *, durable: bool = True):
        super().__init__(bin_dir, durable=durable)
        self.persistent_root = Path(root).resolve() / (f"pg{self.major}-durable" if durable else f"pg{self.major}")

    def start(self) -> "PersistentPostgres":
        if self._root is not None:
            return self
        root = self.persistent_root
        self._check_reachable(root.parent)
        root.parent.mkdir(parents=True, exist_ok=True)
        root.mkdir(exist_ok=True)
        root.chmod(0o755)
        if self.account is not None:
            os.chown(root, self.account.pw_uid, self.account.pw_gid)
        self._root = root
        self._password = self._stored_password(root)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        elif (self.data_dir / "postmaster.pid").exists():  # a run that was killed left it up
            self._run([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"],
                      timeout=120)
        self._launch()
        return self

    def _check_reachable(self, path: Path) -> None:
        """Refuse (before creating anything) a directory the server's account could not reach."""
        existing = next(p for p in [path, *path.parents] if p.exists())
        if self.account is not None and not embedded._reachable_by(existing, self.account):
            raise EmbeddedPostgresError(
                f"--data-dir {path}: the server runs as {self.account.pw_name}, who cannot reach it "
                "(a 0700 home on the way?); use a directory such as /var/tmp/truthsource-bench")

    def _stored_password(self, root: Path) -> str:
        # ours only: the server account never needs it (it checks scram verifiers in the catalog)
        stored = root.parent / f"{root.name}-{PASSWORD_FILE}"
        if not stored.exists():
            fd = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(24))
        return stored.read_text().strip()

    def _launch(self) -> None:
        client_dir = Path(tempfile.mkdtemp(prefix="truthsource-benchclient-"))  # 0700, ours
        self.client = embedded.ClientFiles(client_dir / "pg_service.conf", client_dir / "pgpass")
        atexit.register(self.stop)
        self._install_sigterm_handler()
        self.port = embedded._free_port()
        self._run([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                   "-t", "120", "-o", f"-p {self.port}", "start"], timeout=180)
        self._write_client_files()

    def stop(self) -> None:
        """Stop the server and keep its cluster (the parent's stop would delete it)."""
        self._stop_replicas()
        if self._root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run([str(self.binary("pg_ctl")), "-D", str(self.data_dir), "-m", "fast", "-w",
                           "-t", "120", "stop"], timeout=180)
        finally:
            self._root = None
            if self.client is not None:
                shutil.rmtree(self.client.service_file.parent, ignore_errors=True)
            atexit.unregister(self.stop)


def start_server(bin_dir: str | None, data_dir: str | None, *, throwaway: bool = False) -> EmbeddedPostgres:
    """A started server, durable (the default) or throwaway, kept in `data_dir` or in a temporary one.
    The replica is started apart (``start_replica``), once the templates it would copy exist."""
    if bin_dir is not None:
        missing = [b for b in embedded.REQUIRED_BINARIES if not os.access(Path(bin_dir) / b, os.X_OK)]
        if missing:
            raise EmbeddedPostgresError(f"--pg-bin {bin_dir}: no usable {', '.join(missing)} there")
    durable = not throwaway
    server = PersistentPostgres(data_dir, bin_dir, durable=durable) if data_dir else BenchPostgres(bin_dir, durable=durable)
    server.start()
    prune_archive(server)
    return server


def prune_archive(pg: EmbeddedPostgres) -> int:
    """Empty a durable server's WAL archive (nothing here restores from it): the bytes freed."""
    if not pg.durable or not pg.archive_dir.is_dir():
        return 0
    freed = 0
    for segment in pg.archive_dir.iterdir():
        if segment.is_file():
            freed += segment.stat().st_size
            segment.unlink()
    return freed


def profile(pg: EmbeddedPostgres) -> str:
    """The server's profile in words, for every table the benchmark prints."""
    if not pg.durable:
        return "THROWAWAY (fsync, synchronous_commit, full_page_writes off; no archive, no replica)"
    replicas = len(pg.replicas)
    return ("durable (fsync, synchronous_commit, full_page_writes on; wal_level logical; WAL archived; "
            + (f"{replicas} streaming replica{'s' if replicas != 1 else ''})" if replicas else "no replica)"))
