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
    """Project version and the git commit the run used (dirty when files differ from it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        project_version = version("truthsource-runbooks")
    except PackageNotFoundError:
        project_version = "unknown"
    facts = {"version": project_version, "git_commit": None, "git_dirty": None}
    try:
        git = ["git", "-C", str(PROJECT_ROOT)]
        facts["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                             check=True).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
        facts["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass  # not a clone: the version alone identifies the code
    return facts


def operator_facts(operator: str | None = None) -> dict:
    os_user = getpass.getuser()
    return {"operator": operator or os_user, "os_user": os_user, "host": socket.gethostname()}


# -- secrets ---------------------------------------------------------------------------------

def known_secrets() -> list[str]:
    """Passwords this process could hand to libpq: PGPASSWORD and every .pgpass entry."""
    found = []
    if os.environ.get("PGPASSWORD"):
        found.append(os.environ["PGPASSWORD"])
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


def find_secrets(folder: Path, secrets: list[str]) -> list[str]:
    """Files under `folder` that contain any of `secrets` (names only, never the secret)."""
    hits = []
    needles = secret_forms(secrets)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(path.relative_to(folder)))
    return hits


def redact_files(folder: Path, secrets: list[str]) -> list[str]:
    """Replace every secret in every file under `folder`; the names of the files that held one."""
    leaked = find_secrets(folder, secrets)
    for name in leaked:
        path = folder / name
        data = path.read_bytes()
        for form in secret_forms(secrets):
            data = data.replace(form, REDACTED.encode())
        path.write_bytes(data)
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
        (record.path / NOTEBOOKS_DIR).mkdir(parents=True, exist_ok=False)
        return record

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

        write_index(self.path, manifest)
        manifest = dict(manifest, format=FORMAT, files=self.file_hashes())
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
        tmp.replace(self.manifest_path)

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
            rows.append({"run_id": folder.name, "command": m.get("command"),
                         "target": (m.get("target") or {}).get("name"),
                         "started_at": m.get("started_at"), "verdict": m.get("verdict")})
    return rows


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
    lines = [
        f"run {m.get('run_id')}: {m.get('command')} — verdict {str(m.get('verdict')).upper()}",
        f"  who:     {who.get('operator')} (os user {who.get('os_user')} on {who.get('host')})",
        f"  when:    {m.get('started_at')} → {m.get('finished_at')}",
        f"  target:  {target.get('kind')} {target.get('name')}"
        + (" (production)" if target.get("production") else "")
        + (f", database {server.get('database')} on {server.get('server_address')}:{server.get('server_port')}"
           f" as {server.get('current_user')}, PostgreSQL {server.get('server_version')}" if server else ""),
        f"  project: {project.get('version')} at {project.get('git_commit') or 'no git commit'}"
        + (" (with uncommitted changes)" if project.get("git_dirty") else ""),
    ]
    if (record.path / INDEX_FILE).is_file():
        lines.append(f"  page:    {(record.path / 'index.html').resolve()} (open it in a browser, offline)")
    if m.get("rolls_back"):
        lines.append(f"  rolls back: run {m['rolls_back']}")
    lines += _promotion_lines(m.get("promotion"))
    if m.get("error"):
        lines.append(f"  error:   {m['error']}")
    lines.append("  sql files:")
    lines += [f"    {name}  sha256 {digest}" for name, digest in (m.get("sql_files") or {}).items()]
    backup = m.get("backup")
    if backup:
        lines.append(f"  backup:  {backup.get('file')} ({backup.get('bytes')} bytes) sha256 {backup.get('sha256')}")
    if m.get("parameters"):
        lines.append("  parameters: " + ", ".join(f"{k}={v}" for k, v in m["parameters"].items()))
    lines.append("  notebooks:")
    for nb in m.get("notebooks", []):
        extra = f"  cell {nb.get('failed_cell')}: {nb.get('error')}" if nb.get("status") == "failed" else ""
        seconds = f"{nb['seconds']:.1f}s" if nb.get("seconds") is not None else ""
        lines.append(f"    {nb.get('name'):<16} {outcome_text(nb):<26} {seconds:>7}  {nb.get('file') or ''}{extra}")
    return "\n".join(lines)
