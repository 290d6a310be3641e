"""The preflight backup: ``pg_dump -Fc`` of the target, verified before anyone relies on it.

- The server's own pg_dump (see `pgtools`), reached with the target's libpq connection string:
  no password ever passes through here; libpq reads ``.pgpass``/``PGPASSFILE``/service files.
- Written to ``<dbname>-<run_id>.dump.partial`` and renamed only when pg_dump succeeded, so a
  file with the final name is always a complete dump. An existing backup is never overwritten.
- Verified: ``pg_restore --list`` must read the archive's table of contents (entries counted
  and summarised by type), and by default a full read (``pg_restore -f /dev/null``)
  decompresses every data block; sha256 and size are recorded, and ``verify_backup`` checks
  them again before a rollback uses the file.
- ``taken_at`` is the *server's* clock just before pg_dump starts: it is compared with
  ``applied_at`` in the deployment history, which the server stamps too.
- ``identity`` is the database's (system identifier, oid, the uuid in ``truthsource``; see
  `identity`): a rollback refuses a target that is not this very database.
- ``backup.json`` beside the dump keeps all of it for the record.
- Compressed with gzip level 1 (``COMPRESSION``), not pg_dump's default 6: a little larger, much
  less time, the same proofs.
- ``start_backup`` starts pg_dump and returns at once, ``finish_backup`` waits and verifies
  (``take_backup`` does both): the preflight reads its snapshot while pg_dump runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg2

from . import connection, identity, pgtools, records
from .records import sha256_of

INFO_FILE = "backup.json"
_PASSWORD = re.compile(r"(password\s*=\s*).*", re.IGNORECASE)
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# gzip level of the archive. pg_dump's default (6) spends most of a dump's time compressing; level 1
# writes an archive about a tenth larger in about two thirds of the time, and the backup sits on the
# deployment's critical path. What the backup proves does not depend on it (pg_restore --list, every
# data block decompressed, sha256).
COMPRESSION = 1

# `pg_restore --list` entry types, longest first so 'TABLE DATA' wins over 'TABLE'.
TOC_TYPES = sorted("""
ACCESS METHOD|ACL|AGGREGATE|BLOB|BLOB METADATA|BLOBS|CAST|CHECK CONSTRAINT|COLLATION|COMMENT|
CONSTRAINT|CONVERSION|DATABASE|DATABASE PROPERTIES|DEFAULT|DEFAULT ACL|DOMAIN|ENCODING|
EVENT TRIGGER|EXTENSION|FK CONSTRAINT|FOREIGN DATA WRAPPER|FOREIGN SERVER|FOREIGN TABLE|
FUNCTION|INDEX|INDEX ATTACH|LANGUAGE|LARGE OBJECT|LARGE OBJECT METADATA|LARGE OBJECTS|
MATERIALIZED VIEW|MATERIALIZED VIEW DATA|OPERATOR|OPERATOR CLASS|OPERATOR FAMILY|POLICY|
PROCEDURAL LANGUAGE|PROCEDURE|PUBLICATION|PUBLICATION TABLE|PUBLICATION TABLES IN SCHEMA|
ROW SECURITY|RULE|SCHEMA|SEARCH_PATH|SECURITY LABEL|SEQUENCE|SEQUENCE OWNED BY|SEQUENCE SET|
SERVER|SHELL TYPE|STATISTICS|STATISTICS DATA|STDSTRINGS|SUBSCRIPTION|SUBSCRIPTION TABLE|TABLE|
TABLE ATTACH|TABLE DATA|TEXT SEARCH CONFIGURATION|TEXT SEARCH DICTIONARY|TEXT SEARCH PARSER|
TEXT SEARCH TEMPLATE|TRANSFORM|TRIGGER|TYPE|USER MAPPING|VIEW""".replace("\n", "").split("|"),
                   key=len, reverse=True)
_TOC_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")


class BackupError(RuntimeError):
    """The backup could not be taken or does not verify; the message names the problem."""


def redact(text: str) -> str:
    """Tool output is safe to show, but never let anything after 'password=' through."""
    return _PASSWORD.sub(r"\1[redacted]", text or "")


@dataclass(frozen=True)
class TocEntry:
    """One line of `pg_restore --list`: ``215; 1259 16390 TABLE public orgs postgres``."""

    dump_id: int
    catalog_oid: int
    object_oid: int
    type: str
    namespace: str | None     # None for '-' (schemas, extensions, database-level objects)
    tag: str
    owner: str
    line: str
    known: bool = True        # False: a type TOC_TYPES does not list; namespace and tag are guesses

    @classmethod
    def parse(cls, line: str) -> "TocEntry | None":
        match = _TOC_LINE.match(line)
        if not match:
            return None
        rest = match.group(4)
        # a type this list does not know yet (a newer pg_dump): its first word stands for it
        known = next((t for t in TOC_TYPES if rest == t or rest.startswith(t + " ")), None)
        kind = known or rest.split(" ")[0]
        rest = rest[len(kind) + 1:]
        namespace, _, rest = rest.partition(" ")
        # the owner is the last word (empty for extensions and some comments: the line ends in ' ')
        tag, _, owner = rest.rpartition(" ")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), kind,
                   None if namespace == "-" else namespace, tag, owner, line, known is not None)


@dataclass
class ArchiveListing:
    header: dict
    entries: list[TocEntry]

    @property
    def summary(self) -> dict[str, int]:
        return dict(sorted(Counter(e.type for e in self.entries).items()))


def read_listing(pg_restore: pgtools.Tool, path: Path) -> ArchiveListing:
    """`pg_restore --list`, parsed; BackupError when the archive's TOC cannot be read."""
    proc = subprocess.run([str(pg_restore.path), "--list", str(path)], capture_output=True,
                          text=True, env=pgtools.tool_env())
    if proc.returncode != 0:
        raise BackupError(f"pg_restore --list cannot read {path.name} (exit {describe_exit(proc.returncode)}): "
                          f"{redact(proc.stderr.strip()) or 'no message'}")
    header: dict = {}
    entries: list[TocEntry] = []
    for line in proc.stdout.splitlines():
        if line.startswith(";"):
            text = line[1:].strip()
            if text.startswith("Archive created at "):
                header["Archive created at"] = text[len("Archive created at "):]
                continue
            key, sep, value = text.partition(":")
            if sep and value.strip():
                header[key.strip()] = value.strip()
            continue
        if line.strip():
            entry = TocEntry.parse(line)
            if entry is not None:
                entries.append(entry)
    if not entries:
        raise BackupError(f"{path.name}: the archive lists no entries")
    return ArchiveListing(header, entries)


def describe_exit(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else str(code)


def full_read(pg_restore: pgtools.Tool, path: Path) -> None:
    """Read and decompress every data block (the TOC alone says nothing of the data)."""
    proc = subprocess.run([str(pg_restore.path), "--file", os.devnull, str(path)],
                          capture_output=True, text=True, env=pgtools.tool_env())
    if proc.returncode != 0:
        raise BackupError(f"{path.name} is damaged: pg_restore could not read it through "
                          f"(exit {describe_exit(proc.returncode)}): {redact(proc.stderr.strip()) or 'no message'}")


@dataclass
class BackupVerification:
    path: str
    sha256: str
    size_bytes: int
    toc_entries: int
    toc_summary: dict
    full_read: bool
    pg_restore: dict
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def verify_backup(path: str | os.PathLike, expected_sha256: str | None, *, full: bool = True,
                  server_major: int | None = None) -> BackupVerification:
    """Check a backup before relying on it: sha256 (when given), TOC, and optionally a full read."""
    path = Path(path)
    started = time.perf_counter()
    if not path.is_file():
        raise BackupError(f"backup {path} does not exist")
    size = path.stat().st_size
    actual = sha256_of(path)
    if expected_sha256 is not None and actual != expected_sha256.lower():
        raise BackupError(f"backup {path.name} does not match its recorded sha256: expected "
                          f"{expected_sha256}, the file is {actual} ({size} bytes). It was altered, "
                          "truncated or replaced; do not restore it.")
    pg_restore = pgtools.find_tool("pg_restore", server_major)
    listing = read_listing(pg_restore, path)
    if full:
        full_read(pg_restore, path)
    return BackupVerification(str(path), actual, size, len(listing.entries), listing.summary, full,
                              pg_restore.as_dict(), round(time.perf_counter() - started, 3))


@dataclass
class BackupInfo:
    """What the record says about a backup (all JSON-serialisable)."""

    path: str
    file_name: str
    run_id: str
    database: str
    target: dict
    server_version: str
    server_version_num: int
    taken_at: str                 # server clock, ISO 8601, just before pg_dump started
    finished_at: str
    size_bytes: int
    sha256: str
    format: str
    toc_entries: int
    toc_summary: dict
    archive_header: dict
    full_read: bool
    pg_dump: dict
    pg_restore: dict
    dump_seconds: float
    verify_seconds: float
    warnings: list[str] = field(default_factory=list)
    # public's initial privileges when the dump was taken: pg_dump writes public's ACL relative
    # to them, so a restore must start from the same ones (None: not recorded, or no public)
    public_init_privs: list[str] | None = None
    snapshot_id: str | None = None   # the exported snapshot pg_dump ran on, if any
    # the database it was taken from (identity.Identity.as_dict): a rollback refuses any other
    identity: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BackupInfo":
        """From a backup.json (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / INFO_FILE
        return cls(**json.loads(path.read_text()))


def _server_clock(target: connection.Target, run_id: str, with_facts: bool = False) -> tuple[dict | None, str]:
    """(server facts with the database's identity, the server's clock in UTC ISO 8601): history
    rows are stamped by it too."""
    try:
        conn = connection.connect(target, application_name=f"runbook backup {run_id}", readonly=True)
    except psycopg2.Error as exc:
        raise BackupError(f"cannot connect to {target.name!r} to back it up: {redact(str(exc).strip())}") from None
    try:
        facts = connection.server_facts(conn) if with_facts else None
        if facts is not None:
            facts = dict(facts, identity=identity.read_identity(conn).as_dict())
        with conn.cursor() as cur:
            cur.execute("""select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""")
            now = cur.fetchone()[0]
        conn.rollback()
        return facts, now
    finally:
        conn.close()


PUBLIC_INIT_PRIVS_SQL = """
select n.nspname is not null,
       (select initprivs::text[] from pg_init_privs
        where classoid = 'pg_namespace'::regclass and objoid = n.oid)
from (select 1) one left join pg_namespace n on n.nspname = 'public'
"""


@dataclass(frozen=True)
class ExportedSnapshot:
    """A moment of the database that a snapshot and a pg_dump can both be taken at."""

    snapshot_id: str
    taken_at: str                        # the server's clock when the snapshot was exported
    public_init_privs: list[str] | None


@contextmanager
def exported_snapshot(target: connection.Target, run_id: str):
    """Hold a repeatable-read transaction open and export its snapshot (pg_export_snapshot):
    everything that imports it sees the database exactly as of this moment."""
    try:
        conn = connection.connect(target, application_name=f"runbook snapshot {run_id}", readonly=True)
    except psycopg2.Error as exc:
        raise BackupError(f"cannot connect to {target.name!r}: {redact(str(exc).strip())}") from None
    try:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            cur.execute("""select pg_export_snapshot(),
                                  to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"')""")
            snapshot_id, taken_at = cur.fetchone()
            cur.execute(PUBLIC_INIT_PRIVS_SQL)
            exists, init_privs = cur.fetchone()
        yield ExportedSnapshot(snapshot_id, taken_at, (init_privs or []) if exists else None)
    finally:
        conn.close()


def _public_init_privs(target: connection.Target, run_id: str) -> list[str] | None:
    conn = connection.connect(target, application_name=f"runbook backup {run_id}", readonly=True)
    try:
        with conn.cursor() as cur:
            cur.execute(PUBLIC_INIT_PRIVS_SQL)
            exists, init_privs = cur.fetchone()
        return (init_privs or []) if exists else None
    finally:
        conn.close()


@dataclass
class DumpInProgress:
    """A pg_dump started by `start_backup` and not yet verified: `finish_backup` waits for it, `cancel`
    stops it (removing the partial file). Whatever the caller does meanwhile (the preflight's snapshot
    reads the same exported snapshot) runs beside it: pg_dump's compression and the server's reads
    then share the cores instead of taking turns."""

    target: connection.Target
    dest: Path
    run_id: str
    facts: dict
    taken_at: str
    public_init_privs: list[str] | None
    pg_dump: pgtools.Tool
    pg_restore: pgtools.Tool
    warnings: list[str]
    final: Path
    partial: Path
    process: subprocess.Popen
    started: float
    snapshot_id: str | None

    def cancel(self) -> None:
        """Stop pg_dump if it still runs, and remove what it wrote (no-op once finished)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        records.remove(self.partial)


def start_backup(target: connection.Target, dest_dir: str | os.PathLike, run_id: str, *,
                 lock_wait_timeout: str = "60s", snapshot: ExportedSnapshot | None = None,
                 compression: int = COMPRESSION) -> DumpInProgress:
    """Start pg_dump -Fc of the target into dest_dir/<dbname>-<run_id>.dump.partial (see `take_backup`)."""
    if not _SAFE_RUN_ID.match(run_id):
        raise BackupError(f"run id {run_id!r} cannot name a file (letters, digits, '.', '_', '-')")
    dest = records.make_folder(Path(dest_dir))

    facts, taken_at = _server_clock(target, run_id, with_facts=True)
    public_init_privs = snapshot.public_init_privs if snapshot else _public_init_privs(target, run_id)
    taken_at = snapshot.taken_at if snapshot else taken_at
    major = facts["server_version_num"] // 10000
    pg_dump = pgtools.find_tool("pg_dump", major)
    pg_restore = pgtools.find_companion(pg_dump, "pg_restore", major)
    warnings = [w for w in (pg_dump.warning,) if w]

    final = dest / f"{facts['database']}-{run_id}.dump"
    if final.exists():
        raise BackupError(f"{final} already exists: a backup is never overwritten (new run id?)")
    partial = final.with_name(final.name + ".partial")
    records.remove(partial)
    # the dump holds every row (password hashes, the legacy plaintext keys): readable by its owner
    # alone, from the first byte (pg_dump truncates the file it is given and keeps its mode)
    records.create_empty(partial)
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(pg_dump.path), "--format=custom", f"--compress={compression}", "--no-password",
         f"--lock-wait-timeout={lock_wait_timeout}", *([f"--snapshot={snapshot.snapshot_id}"] if snapshot else []),
         "--file", str(partial), "--dbname", target.conninfo(application_name=f"runbook backup {run_id}")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=pgtools.tool_env())
    return DumpInProgress(target, dest, run_id, facts, taken_at, public_init_privs, pg_dump, pg_restore, warnings,
                          final, partial, process, started, snapshot.snapshot_id if snapshot else None)


def finish_backup(dump: DumpInProgress, *, full: bool = True) -> BackupInfo:
    """Wait for the pg_dump `start_backup` started, then verify the file and write backup.json."""
    facts, pg_dump, pg_restore, final, partial = dump.facts, dump.pg_dump, dump.pg_restore, dump.final, dump.partial
    _, stderr = dump.process.communicate()
    dump_seconds = time.perf_counter() - dump.started
    warnings = list(dump.warnings)
    if dump.process.returncode != 0:
        records.remove(partial)
        raise BackupError(f"pg_dump {pg_dump.version} of database {facts['database']!r} failed (exit "
                          f"{describe_exit(dump.process.returncode)}): {redact(stderr.strip()) or 'no message'}")
    if stderr.strip():
        warnings.append("pg_dump: " + redact(stderr.strip()))
    records.rename(partial, final)

    _, finished_at = _server_clock(dump.target, dump.run_id)

    started = time.perf_counter()
    try:
        listing = read_listing(pg_restore, final)
        if full:
            full_read(pg_restore, final)
    except BackupError as exc:
        raise BackupError(f"the backup just taken does not verify: {exc}") from None
    digest = sha256_of(final)
    info = BackupInfo(
        path=str(final.resolve()), file_name=final.name, run_id=dump.run_id, database=facts["database"],
        target=dump.target.describe(), server_version=facts["server_version"],
        server_version_num=facts["server_version_num"], taken_at=dump.taken_at, finished_at=finished_at,
        size_bytes=final.stat().st_size, sha256=digest, format=listing.header.get("Format", "CUSTOM"),
        toc_entries=len(listing.entries), toc_summary=listing.summary, archive_header=listing.header,
        full_read=full, pg_dump=pg_dump.as_dict(), pg_restore=pg_restore.as_dict(),
        dump_seconds=round(dump_seconds, 3), verify_seconds=round(time.perf_counter() - started, 3),
        warnings=warnings, public_init_privs=dump.public_init_privs,
        snapshot_id=dump.snapshot_id, identity=facts["identity"])
    records.write_text(dump.dest / INFO_FILE, json.dumps(info.as_dict(), indent=2, sort_keys=True) + "\n")
    return info


def take_backup(target: connection.Target, dest_dir: str | os.PathLike, run_id: str, *,
                lock_wait_timeout: str = "60s", full: bool = True,
                snapshot: ExportedSnapshot | None = None) -> BackupInfo:
    """pg_dump -Fc the target into dest_dir/<dbname>-<run_id>.dump, verify it, write backup.json.

    With `snapshot` (see `exported_snapshot`) pg_dump runs on that exported snapshot, so the
    backup shows the database at exactly the moment a snapshot.json taken on it shows."""
    dump = start_backup(target, dest_dir, run_id, lock_wait_timeout=lock_wait_timeout, snapshot=snapshot)
    try:
        return finish_backup(dump, full=full)
    finally:
        dump.cancel()
