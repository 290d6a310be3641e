"""The benchmark's server: the embedded one, optionally on a data directory that outlives the run.

A scale benchmark spends most of a first run generating its legacy database; kept as a template
database in a persistent data directory (``--data-dir``), later runs clone it in seconds. The
directory holds one PostgreSQL cluster per major version (``pg15``, ``pg18``), and the superuser's
password beside it in a file readable by the invoking user only. When started as root the server
runs as an unprivileged account (see runbooks.embedded), so the directory must not sit under a
0700 home: /var/tmp is a good place.
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
# a benchmark writes gigabytes: fewer forced checkpoints (the throwaway settings stay: fsync off)
BENCH_SETTINGS = {"max_wal_size": "8GB", "checkpoint_timeout": "30min"}


class PersistentPostgres(EmbeddedPostgres):
    """An embedded server whose cluster lives in `root` and is kept when the server stops."""

    SETTINGS = {**embedded._THROWAWAY_SETTINGS, **BENCH_SETTINGS}

    def __init__(self, root: Path | str, bin_dir: Path | str | None = None):
        super().__init__(bin_dir)
        self.persistent_root = Path(root).resolve() / f"pg{self.major}"

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


def start_server(bin_dir: str | None, data_dir: str | None) -> EmbeddedPostgres:
    """A started server: throwaway (the default) or kept in `data_dir`."""
    if bin_dir is not None:
        missing = [b for b in embedded.REQUIRED_BINARIES if not os.access(Path(bin_dir) / b, os.X_OK)]
        if missing:
            raise EmbeddedPostgresError(f"--pg-bin {bin_dir}: no usable {', '.join(missing)} there")
    server = PersistentPostgres(data_dir, bin_dir) if data_dir else EmbeddedPostgres(bin_dir)
    return server.start()
