"""Deployment records: one folder per run, a manifest an auditor can check, no secret inside.

``records/<run id>/`` holds the executed notebooks and their HTML, the backup and snapshot a
preflight took, and ``manifest.json``: who, when, which target (without secrets), which
project version and commit, the sha256 of every SQL file, of the backup and of every file in
the folder, each notebook's status and duration, and the verdict. Sealing also writes
``index.html``, the run's front page for an auditor (see pages.py), which the manifest hashes
like any other file. ``verify`` re-hashes every file against the manifest, so any later change
to the folder is detected.
"""

from __future__ import annotations

import contextlib
import fnmatch
import getpass
import hashlib
import html
import json
import os
import re
import secrets as _secrets
import socket
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .paths import PROJECT_ROOT, SQL_DIR

# The layout of a run's record, named here once (other modules name only the files of their own steps).
MANIFEST = "manifest.json"          # the sealed list of every file and its sha256
SNAPSHOT_FILE = "snapshot.json"     # the preflight's snapshot
BACKUP_DIR = "backup"               # the preflight's verified dump and its backup.json
NOTEBOOKS_DIR = "notebooks"         # the executed notebooks and their HTML
INDEX_FILE = "index.html"           # the run's front page for an auditor
KERNEL_LOG = "kernels.log"          # the kernels' chatter
FORMAT = "truthsource-record/1"
RUN_ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
DEFAULT_RECORDS_DIR = Path("records")


class RecordError(Exception):
    """A record is missing, malformed, or does not match its manifest."""


class SealedRecord(RecordError):
    """A write into a sealed record: once its manifest is written, nothing changes a record."""


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique: 20261124T150102Z-3f9a1c."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{_secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id or ""):
        raise RecordError(f"{run_id!r} is not a run id (like 20261124T150102Z-3f9a1c)")
    return run_id


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sql_checksums() -> dict[str, str]:
    """sha256 of every SQL file the project ships, by path relative to the project."""
    return {str(p.relative_to(PROJECT_ROOT)): sha256_of(p) for p in sorted(SQL_DIR.rglob("*.sql"))}


def project_facts() -> dict:
    """Project version and the git commit the run used: dirty when files differ from it, except the
    runbook notebooks executed in place (by hand, JupyterLab saves their outputs over them), which
    are listed apart while their cells' sources are the commit's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        project_version = version("truthsource-runbooks")
    except PackageNotFoundError:
        project_version = "unknown"
    return {"version": project_version, **git_facts(PROJECT_ROOT)}


def git_facts(root: Path) -> dict:
    """The commit checked out at `root`, whether files differ from it, and which notebooks differ only
    by having been executed in place."""
    facts = {"git_commit": None, "git_dirty": None, "git_executed_notebooks": []}
    try:
        git = ["git", "-C", str(root)]
        facts["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                             check=True).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
        changed = [line[3:].split(" -> ")[-1] for line in status.splitlines() if line.strip()]
        executed = [name for name in changed if _only_executed(git, Path(root), name)]
        facts["git_dirty"] = bool(set(changed) - set(executed))
        facts["git_executed_notebooks"] = executed
    except (OSError, subprocess.CalledProcessError):
        pass  # not a clone: the version alone identifies the code
    return facts


def _only_executed(git: list[str], root: Path, name: str) -> bool:
    """A notebook that differs from the commit only by what running it adds (outputs, execution
    counts, metadata, the values in its parameters cell): its cells' sources are the commit's."""
    import nbformat

    if not name.endswith(".ipynb"):
        return False
    try:
        committed = subprocess.run(git + ["show", f"HEAD:{name}"], capture_output=True, text=True, check=True).stdout
        return _sources(nbformat.reads(committed, as_version=4)) == _sources(nbformat.read(root / name, as_version=4))
    except (OSError, ValueError, subprocess.CalledProcessError):
        return False


def _sources(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells
            if not {"parameters", "injected-parameters"} & set(cell.get("metadata", {}).get("tags", []))]


def commit_text(project: dict) -> str:
    """The commit a run used, as the record says it: clean, executed in place, or with changes."""
    commit = project.get("git_commit")
    text = f"{commit[:12]}" if commit else "no git commit"
    executed = [Path(name).stem for name in project.get("git_executed_notebooks") or []]
    if project.get("git_dirty"):
        text += " (with uncommitted changes)"
    elif commit:
        text += " (clean" + (f"; executed in place: {', '.join(executed)}" if executed else "") + ")"
    return f"{text}; truthsource-runbooks {project.get('version', '?')}"


def operator_facts(operator: str | None = None) -> dict:
    os_user = getpass.getuser()
    return {"operator": operator or os_user, "os_user": os_user, "host": socket.gethostname()}


# -- writing into a record -------------------------------------------------------------------
# Every file a run keeps is written through these few functions (one guard: `check_writable`), so
# a sealed record refuses every writer alike, and a file that holds the database's data is
# readable by its owner alone from its first byte.

# Files that hold the database's rows or what identifies them (dumps, the rows a rollback discarded,
# keys and row hashes): mode 0600. The others (notebooks, pages, the manifest) are the auditor's.
DATA_FILES = ("*.dump", "*.dump.partial", "later_writes.sql", "later_writes.json", "post-deployment-rows.json.gz")


def holds_data(path) -> bool:
    """Whether a record's file holds the database's data (and is written readable by its owner only)."""
    return any(fnmatch.fnmatchcase(Path(path).name, pattern) for pattern in DATA_FILES)


def sealed_folder(path) -> Path | None:
    """The sealed record that `path` is, or lies in (files lie at most one folder deep: backup/,
    notebooks/, maintenance/); None when it is in none."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def check_writable(path) -> Path:
    """The guard every writer passes: a path in a sealed record is refused (SealedRecord)."""
    sealed = sealed_folder(path)
    if sealed is not None:
        raise SealedRecord(f"record {sealed} is sealed (its {MANIFEST}, seal {sha256_of(sealed / MANIFEST)[:12]}…, "
                           f"vouches for every file in it): nothing writes into a sealed record "
                           f"({Path(path).relative_to(sealed) if Path(path) != sealed else 'the folder'} refused)")
    return Path(path)


def _mode(path) -> int:
    return 0o600 if holds_data(path) else 0o666   # less the umask


def write_bytes(path, data: bytes) -> Path:
    """Write a record's file whole (a temporary file renamed over it), with its mode from the start."""
    path = check_writable(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode(path)), "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


@contextlib.contextmanager
def open_for_writing(path, mode: str = "wb"):
    """A record's file opened to write ("w", "wb") or append ("a", "ab") as a stream (a kernel's log,
    a gzipped state), with its mode from the first byte."""
    path = check_writable(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    descriptor = os.open(path, flags, _mode(path))
    if holds_data(path):
        os.fchmod(descriptor, 0o600)   # a file that existed keeps its mode otherwise
    with os.fdopen(descriptor, mode) as stream:
        yield stream


def create_empty(path) -> Path:
    """A new, empty file (never one that exists), with its mode: for a tool that writes into it (pg_dump)."""
    path = check_writable(path)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _mode(path)))
    return path


def make_folder(path) -> Path:
    path = check_writable(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def rename(source, destination) -> Path:
    check_writable(source)
    os.replace(source, check_writable(destination))
    return Path(destination)


def remove(path) -> None:
    """Remove a record's file (nothing when it is gone already)."""
    if Path(path).exists():
        check_writable(path).unlink()


# -- secrets ---------------------------------------------------------------------------------

# What the object store's client reads its keys from (records at s3://): never a record's.
_CLOUD_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_CLOUD_SECRET_KEYS = re.compile(r"^\s*(aws_secret_access_key|aws_session_token)\s*=\s*(\S+)", re.MULTILINE)


def known_secrets() -> list[str]:
    """What this process could hand to libpq (PGPASSWORD, every .pgpass entry) or to the object
    store records are published to (the AWS secret key and session token, from the environment
    or the shared credentials file)."""
    found = [os.environ[name] for name in ("PGPASSWORD", *_CLOUD_SECRET_VARIABLES) if os.environ.get(name)]
    credentials = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    with contextlib.suppress(OSError):
        found += [value for _, value in _CLOUD_SECRET_KEYS.findall(credentials.read_text())]
    passfile = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = passfile.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            fields = re.split(r"(?<!\\):", line, maxsplit=4)
            if len(fields) == 5 and fields[4]:
                found.append(fields[4].replace("\\:", ":").replace("\\\\", "\\"))
    # Very short strings would match everywhere; libpq passwords that short are not secrets anyway.
    return sorted({s for s in found if len(s) >= 6})


REDACTED = "[REDACTED]"


def secret_forms(secrets: list[str]) -> list[bytes]:
    """Each secret as a file may hold it: as typed, escaped in JSON (notebooks, manifest) and in
    HTML (exported notebooks); longest first, so a longer form is replaced before a part of it."""
    forms = set()
    for secret in secrets:
        for text in (secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
                     html.escape(secret), html.escape(secret, quote=False)):
            forms.add(text.encode())
    return sorted(forms, key=len, reverse=True)


def find_secrets(folder: Path, secrets: list[str], names: list[str] | None = None) -> list[str]:
    """Files under `folder` (or those `names` in it) that contain any of `secrets` (names only, never the secret)."""
    hits = []
    needles = secret_forms(secrets)
    for path in sorted(folder.rglob("*")) if names is None else [folder / name for name in names]:
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(path.relative_to(folder)))
    return hits


def redact_files(folder: Path, secrets: list[str], names: list[str] | None = None) -> list[str]:
    """Replace every secret in every file under `folder` (or those `names` in it); the names of the
    files that held one."""
    check_writable(folder)
    leaked = find_secrets(folder, secrets, names)
    for name in leaked:
        path = folder / name
        data = path.read_bytes()
        for form in secret_forms(secrets):
            data = data.replace(form, REDACTED.encode())
        write_bytes(path, data)
    return leaked


def redact_text(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_data(value, secrets: list[str]):
    """A JSON-able value with every secret redacted: inside text, and a number or other scalar
    whose printed form holds one is replaced whole (a password of digits given as a number)."""
    if isinstance(value, dict):
        return {redact_data(k, secrets): redact_data(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v, secrets) for v in value)
    if isinstance(value, str):
        return redact_text(value, secrets)
    if value is not None and any(secret in str(value) for secret in secrets):
        return REDACTED
    return value


# -- one record ------------------------------------------------------------------------------

@dataclass
class Record:
    root: Path       # the records directory
    run_id: str

    @property
    def path(self) -> Path:
        return self.root / self.run_id

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @classmethod
    def create(cls, root: Path, run_id: str) -> "Record":
        record = cls(Path(root), check_run_id(run_id))
        record.path.mkdir(parents=True, exist_ok=False)   # a new run's folder: never one that exists
        make_folder(record.path / NOTEBOOKS_DIR)
        return record

    @property
    def sealed(self) -> bool:
        return self.manifest_path.is_file()

    @classmethod
    def open(cls, root: Path, run_id: str) -> "Record":
        record = cls(Path(root), check_run_id(run_id))
        if not record.manifest_path.is_file():
            raise RecordError(f"no record {run_id} in {Path(root).resolve()} (no {MANIFEST})")
        return record

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise RecordError(f"{self.manifest_path}: not valid JSON ({exc})") from None

    def seal(self) -> str:
        """The sha256 of manifest.json. The manifest vouches for every other file; this digest,
        noted outside the record (the change ticket), vouches for the manifest."""
        return sha256_of(self.manifest_path)

    def write_manifest(self, manifest: dict) -> None:
        """Seal the record: write its index.html (the auditor's front page), then hash every file
        in the folder, the index included, into the manifest."""
        from .pages import write_index   # pages renders records' facts: imported late, no cycle

        check_writable(self.manifest_path)   # sealed once: a record is never sealed again
        write_index(self.path, manifest)
        manifest = dict(manifest, format=FORMAT, files=self.file_hashes())
        write_text(self.manifest_path, json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")

    def file_hashes(self) -> dict[str, str]:
        return {str(p.relative_to(self.path)): sha256_of(p)
                for p in sorted(self.path.rglob("*"))
                if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}

    def verify(self) -> list[str]:
        """Problems found re-hashing the folder against the manifest ([] when intact)."""
        manifest = self.manifest()
        if manifest.get("format") != FORMAT:
            return [f"{MANIFEST}: unknown format {manifest.get('format')!r}"]
        recorded = manifest.get("files", {})
        actual = self.file_hashes()
        problems = []
        for name, digest in sorted(recorded.items()):
            if name not in actual:
                problems.append(f"missing: {name}")
            elif actual[name] != digest:
                problems.append(f"altered: {name} (sha256 {actual[name][:12]}…, manifest says {digest[:12]}…)")
        problems += [f"not in manifest: {name}" for name in sorted(set(actual) - set(recorded))]
        # The manifest's own statements about files must agree with its file list.
        for entry in manifest.get("notebooks", []):
            for key, digest_key in (("file", "sha256"), ("html", "html_sha256")):
                name, digest = entry.get(key), entry.get(digest_key)
                if name and digest and recorded.get(name) != digest:
                    problems.append(f"manifest disagrees with itself about {name}")
        backup = manifest.get("backup") or {}
        if backup.get("file") and recorded.get(backup["file"]) != backup.get("sha256"):
            problems.append(f"manifest disagrees with itself about {backup['file']}")
        return problems


def list_records(root: Path) -> list[dict]:
    """Every record under `root`, oldest first, with its headline facts."""
    rows = []
    root = Path(root)
    if not root.is_dir():
        return rows
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and RUN_ID_PATTERN.match(folder.name) and (folder / MANIFEST).is_file():
            try:
                m = json.loads((folder / MANIFEST).read_text())
            except json.JSONDecodeError:
                m = {"verdict": "unreadable manifest"}
            rows.append(headline(folder.name, m))
    return rows


def headline(run_id: str, manifest: dict) -> dict:
    """A record's headline facts, wherever it is kept: what `records list` prints."""
    return {"run_id": run_id, "command": manifest.get("command"),
            "target": (manifest.get("target") or {}).get("name"),
            "started_at": manifest.get("started_at"), "verdict": manifest.get("verdict"),
            "verdict_text": manifest.get("verdict_text") or str(manifest.get("verdict")).upper()}


def latest_with_snapshot(root: Path, target: dict) -> Path | None:
    """The newest record of a run against `target` whose preflight left a snapshot."""
    for row in reversed(list_records(root)):
        folder = Path(root) / row["run_id"]
        manifest = json.loads((folder / MANIFEST).read_text())
        same = {k: manifest.get("target", {}).get(k) for k in ("kind", "name")} == {k: target.get(k) for k in ("kind", "name")}
        if same and (folder / SNAPSHOT_FILE).is_file():
            return folder
    return None


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def check_counts(entry: dict) -> tuple[int, int]:
    """A notebook's (warnings, errors) among the checks its verdict listed."""
    statuses = [check.get("status") for check in entry.get("checks") or []]
    return statuses.count("warning"), statuses.count("error")


def outcome_text(entry: dict) -> str:
    """A notebook's result in words: passed, passed with 2 warnings, skipped (already applied),
    failed, not run. The manifest's `status` stays passed/failed/not run for programs."""
    status = entry.get("status") or "not run"
    if status != "passed":
        return status
    warnings, _ = check_counts(entry)
    text = "skipped (already applied)" if entry.get("skipped") else "passed"
    return text + (f" with {plural(warnings, 'warning')}" if warnings else "")


def outcome_kind(entry: dict) -> str:
    """passed | warnings | skipped | failed | not run: what colour a result is shown in."""
    status = entry.get("status") or "not run"
    if status != "passed":
        return status
    if check_counts(entry)[0]:
        return "warnings"
    return "skipped" if entry.get("skipped") else "passed"


def promotion_summary(decided: dict | None) -> tuple[str, str] | None:
    """What a production run's record says about its staging evidence (promotion.py), or its override:
    a label and a sentence (`runbook records show` and the run's index.html), None where none was asked."""
    if not decided or not decided.get("required"):
        return None
    evidence, override = decided.get("evidence"), decided.get("override")
    if evidence:
        target = evidence.get("target") or {}
        return ("promoted from", f"run {evidence['run_id']} on {target.get('kind')} {target.get('name')} "
                f"(finished {evidence.get('finished_at')}, seal {evidence.get('seal') or 'not here: ' + evidence['source']})")
    if override:
        return "promotion", f"OVERRIDDEN without staging evidence: {override.get('reason')}"
    return "promotion", f"refused: {decided.get('problem')}"


def _promotion_lines(decided: dict | None) -> list[str]:
    summary = promotion_summary(decided)
    return [f"  {summary[0]}: {summary[1]}"] if summary else []


def describe(record: Record) -> str:
    """A record's manifest, readably (what `runbook records show` prints)."""
    m = record.manifest()
    target = m.get("target") or {}
    server = m.get("server") or {}
    who = m.get("operator") or {}
    project = m.get("project") or {}
    from .verdicts import lines as verdict_lines, text_of   # verdicts reads records: imported late, no cycle

    lines = [
        f"run {m.get('run_id')}: {m.get('command')} — verdict {m.get('verdict_text') or text_of(str(m.get('verdict')), 0)}",
        f"  who:     {who.get('operator')} (os user {who.get('os_user')} on {who.get('host')})",
        f"  when:    {m.get('started_at')} → {m.get('finished_at')}",
        f"  target:  {target.get('kind')} {target.get('name')}"
        + (" (production)" if target.get("production") else "")
        + (f", database {server.get('database')} on {server.get('server_address')}:{server.get('server_port')}"
           f" as {server.get('current_user')}, PostgreSQL {server.get('server_version')}" if server else ""),
        f"  project: {commit_text(project)}",
    ]
    if (record.path / INDEX_FILE).is_file():
        lines.append(f"  page:    {(record.path / 'index.html').resolve()} (open it in a browser, offline)")
    signoff = m.get("signoff") or {}
    lines.append(f"  approver: {signoff.get('approver') or 'none'}; change ticket: {signoff.get('change_ticket') or 'none'}")
    if m.get("rolls_back"):
        lines.append(f"  rolls back: run {m['rolls_back']}")
    restored = m.get("restored_backup")
    if restored:
        lines.append(f"  backup restored: run {restored.get('run_id')}: {restored.get('file')} sha256 {restored.get('sha256')}")
    lines += _promotion_lines(m.get("promotion"))
    if m.get("error"):
        lines.append(f"  error:   {m['error']}")
    lines.append("  sql files:")
    lines += [f"    {name}  sha256 {digest}" for name, digest in (m.get("sql_files") or {}).items()]
    backup = m.get("backup")
    if backup:
        label = "safety dump" if m.get("rolls_back") or restored else "backup"
        lines.append(f"  {label}:  {backup.get('file')} ({backup.get('bytes')} bytes) sha256 {backup.get('sha256')}")
    if m.get("parameters"):
        lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in m["parameters"].items()))
    lines.append("  notebooks:")
    for nb in m.get("notebooks", []):
        extra = f"  cell {nb.get('failed_cell')}: {nb.get('error')}" if nb.get("status") == "failed" else ""
        seconds = f"{nb['seconds']:.1f}s" if nb.get("seconds") is not None else ""
        lines.append(f"    {nb.get('name'):<16} {outcome_text(nb):<26} {seconds:>7}  {nb.get('file') or ''}{extra}")
    lines += verdict_lines(m, record.path)
    return "\n".join(lines)
