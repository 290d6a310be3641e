"""Plans: run runbook notebooks with papermill, in this process, and keep the record.

Every notebook of a plan runs with the same run id, target and record folder; a failing cell
stops the plan. Each executed notebook is kept with its HTML and the run's facts in its
metadata (as papermill keeps its own), and the record is sealed with a manifest. A whole plan
holds the database's run lock, so two runs against one database never interleave.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import papermill
import psycopg2
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir

from . import (by_hand, connection, engine, footprint, identity, kernel_guard, pages, promotion, records, storage,
               verdicts, watch, witness)
from .notebook import VERDICT_METADATA, VERDICT_MIME
from .paths import NOTEBOOK_DIR, PROJECT_ROOT

# The runbook notebooks, in the order a deployment runs them.
NOTEBOOKS = {
    "preflight": "00_preflight.ipynb",
    "phase1": "01_phase1_core_functions.ipynb",
    "phase2": "02_phase2_core_schema.ipynb",
    "phase3": "03_phase3_production_enhancements.ipynb",
    "verification": "04_verification.ipynb",
    "rollback": "05_rollback.ipynb",
    "maintenance": "06_maintenance.ipynb",
    "troubleshooting": "07_troubleshooting.ipynb",
}
DEPLOY_PLAN = ("preflight", "phase1", "phase2", "phase3", "verification")
# Commands that change the database: a by-hand run of the target is superseded (its pointer removed).
SUPERSEDES_BY_HAND = ("deploy", "rollback")
LOCK_WAIT_ENV = "RUNBOOK_LOCK_WAIT"  # seconds a run waits for another run on the same database


class IPCKernelManager(AsyncKernelManager):
    """Kernels talk over Unix sockets in the runtime directory, not unencrypted TCP ports."""

    kernel_log: Path | None = None   # where the kernel's own stdout/stderr go (set per run)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transport = "ipc"
        # Sockets in the private runtime directory, one name per kernel: the default is a path
        # relative to the working directory, where concurrent runs' kernels would collide.
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(parents=True, exist_ok=True)
        self.ip = str(runtime / f"kernel-{uuid.uuid4().hex[:12]}-ipc")

    async def _async_launch_kernel(self, kernel_cmd, **kw):
        kernel_cmd = kernel_guard.command(kernel_cmd)   # the kernel dies with this process, never outlives it
        if self.kernel_log is None:
            return await super()._async_launch_kernel(kernel_cmd, **kw)
        # The kernel's chatter (shutdown noise, warnings) belongs in the record, not on the terminal.
        with records.open_for_writing(self.kernel_log, "ab") as log:
            return await super()._async_launch_kernel(kernel_cmd, **{**kw, "stdout": log, "stderr": log})


@dataclass
class Outcome:
    run_id: str
    record: records.Record
    verdict: str                       # passed | failed | refused (nothing of the plan ran)
    notebooks: list[dict] = field(default_factory=list)
    error: str | None = None

    @property
    def exit_code(self) -> int:
        return {"passed": 0, "refused": 2}.get(self.verdict, 1)


def notebook_path(step: str) -> Path:
    """A runbook by its step name, or any notebook by path (tests run fixture notebooks)."""
    return NOTEBOOK_DIR / NOTEBOOKS[step] if step in NOTEBOOKS else Path(step)


def notebook_parameters(step: str) -> dict:
    """The parameters a notebook declares (name -> default as written)."""
    return {name: spec.default_text for name, spec in declared_parameters(step).items()}


@dataclass(frozen=True)
class Parameter:
    """A notebook parameter as its parameters cell declares it: the type a value must have."""

    name: str
    kind: str            # bool | int | float | text
    nullable: bool       # None is a meaningful value (the default, or the comment says "None: ...")
    default_text: str    # the default as written
    help: str

    @property
    def accepts(self) -> str:
        """What a value may be, in words (for refusals)."""
        words = {"bool": "true/false (also yes/no, on/off, 1/0)", "int": "an integer",
                 "float": "a number", "text": "text"}[self.kind]
        return words + (" or none" if self.nullable and self.kind != "text" else "")


def declared_parameters(step: str) -> dict[str, Parameter]:
    """Each parameter of a notebook with its type: the cell's annotation or `# type:` comment when it
    has one, else the type of its default (a default of None takes text)."""
    found = {}
    for name, spec in papermill.inspect_notebook(str(notebook_path(step))).items():
        default_text, help_text = spec["default"], spec["help"] or ""
        annotation = spec["inferred_type_name"]
        kind, nullable = _kind_of_annotation(annotation) if annotation != "None" else _kind_of_default(default_text)
        # a number whose comment gives None a meaning ("None: no limit") takes none too
        nullable = nullable or bool(re.search(r"\bNone\b", help_text))
        found[name] = Parameter(name, kind, nullable, default_text, help_text)
    return found


_KINDS = {"bool": "bool", "int": "int", "float": "float", "str": "text"}


def _kind_of_annotation(annotation: str) -> tuple[str, bool]:
    inner = re.fullmatch(r"Optional\[(\w+)\]", annotation.strip())
    parts = [inner.group(1)] if inner else [p.strip() for p in annotation.split("|")]
    nullable = bool(inner) or "None" in parts
    named = [p for p in parts if p != "None"]
    return (_KINDS.get(named[0], "text") if len(named) == 1 else "text"), nullable


def _kind_of_default(default_text: str) -> tuple[str, bool]:
    try:
        default = ast.literal_eval(default_text)
    except (ValueError, SyntaxError):
        return "text", False   # an expression: whatever it is, a value arrives as text
    if default is None:
        return "text", True
    for python_type, kind in ((bool, "bool"), (int, "int"), (float, "float")):
        if isinstance(default, python_type):
            return kind, False
    return "text", False


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for this process and the kernels it starts, then restore."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _verdict_of(nb) -> dict | None:
    """The notebook's verdict as its last cell displayed it, with what its output's metadata keeps
    (the checks' facts, the kernel's own timing) merged in."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if VERDICT_MIME in data:
                return {**data[VERDICT_MIME], **output.get("metadata", {}).get(VERDICT_METADATA, {})}
    return None


# What a phase notebook prints when its phase was already applied with the same sha256 (phases.Phase.apply).
SKIPPED_PHASE = re.compile(r"^phase \d+: skipped\b", re.MULTILINE)


def _skipped_phase(nb) -> bool:
    return any(output.get("output_type") == "stream" and SKIPPED_PHASE.search("".join(output.get("text", "")))
               for cell in nb.cells for output in cell.get("outputs", []))


def _export_html(nb_path: Path, manifest: dict, entry: dict, step: str) -> Path:
    """The HTML beside the notebook, opening with its header card, fetching nothing (pages.py).
    The card is added at export, not as a cell: the executed notebook stays what ran."""
    return pages.export_notebook(nb_path, pages.notebook_card(manifest, entry, step))


def seconds_of(nb, fallback: float | None) -> tuple[float | None, str]:
    """A notebook's real duration and where it comes from: papermill's metadata (it executed it), else
    the cells' own timing as JupyterLab records it, else the kernel's own timing kept in its verdict,
    else `fallback` (the journal's times, from the setup cell to the verdict)."""
    papermill_seconds = (nb.metadata.get("papermill") or {}).get("duration")
    if papermill_seconds is not None:
        return round(float(papermill_seconds), 2), "papermill"
    cells = [_cell_seconds(cell) for cell in nb.cells if cell.get("cell_type") == "code"]
    if any(seconds is not None for seconds in cells):
        return round(sum(seconds or 0.0 for seconds in cells), 2), "cell timing"
    verdict = _verdict_of(nb) or {}
    if verdict.get("kernel_seconds") is not None:
        return round(float(verdict["kernel_seconds"]), 2), "kernel"
    return fallback, "journal"


def _cell_seconds(cell) -> float | None:
    """A cell's run time as JupyterLab records it (Settings › Notebook › Record cell timing)."""
    from datetime import datetime

    timing = cell.get("metadata", {}).get("execution") or {}
    try:
        return (datetime.fromisoformat(timing["shell.execute_reply"].replace("Z", "+00:00"))
                - datetime.fromisoformat(timing["iopub.execute_input"].replace("Z", "+00:00"))).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def note_results(nb, entry: dict) -> None:
    """What an executed notebook says about itself, into its manifest entry: its verdict's checks and
    facts (a failed verdict fails it), whether its phase was skipped."""
    verdict = _verdict_of(nb)
    if verdict is not None:
        entry["checks"] = verdict.get("checks", [])
        if verdict.get("facts"):
            entry["facts"] = verdict["facts"]
        if verdict.get("status") == "failed":
            entry["status"] = "failed"
    if _skipped_phase(nb):
        entry["skipped"] = True


def run_plan(command: str, steps: tuple[str, ...] | list[str], target: connection.Target, *,
             records_root: Path, parameters: dict | None = None, operator: str | None = None,
             progress=print, run_id: str | None = None, manifest_extra: dict | None = None) -> Outcome:
    """Run the notebooks of a plan against a target and seal the record; never raises for a
    failed notebook (the outcome says so), only for refusals made before anything ran (and PublishError
    when the sealed record could not be published to an object store: it is kept locally)."""
    logging.getLogger("papermill").setLevel(logging.WARNING)
    run_id = run_id or records.new_run_id()
    location = storage.location(records_root)   # an object store: written here first, published once sealed
    location.check()
    records_root = location.workdir()
    new_folder = not Path(records_root).exists()
    record = records.Record.create(Path(records_root), run_id)
    who = records.operator_facts(operator or (parameters or {}).get("operator"))
    manifest = {
        "run_id": run_id, "command": command, "plan": list(steps), **(manifest_extra or {}),
        "operator": who, "started_at": records.utc_now(), "finished_at": None,
        "target": target.describe(), "server": None, "project": records.project_facts(),
        "sql_files": records.sql_checksums(), "parameters": dict(parameters or {}),
        "backup": None, "notebooks": [], "verdict": "failed", "error": None,
    }
    progress(f"runbook {command}: run {run_id} on {target.kind} {target.name!r}; record {record.path}"
             + (f" (records folder {records_root} created)" if new_folder else ""))
    common = {"run_id": run_id, "record_dir": str(record.path.resolve()), "operator": who["operator"],
              **target.as_parameters()}
    outcome = Outcome(run_id=run_id, record=record, verdict="failed")
    manifest["notebooks"] = [{"name": step if step in NOTEBOOKS else notebook_path(step).stem,
                              "source": _relative(notebook_path(step)), "status": "not run"} for step in steps]
    connected = False
    try:
        with engine.run_lock(target, run_id, float(os.environ.get(LOCK_WAIT_ENV, "30"))) as lock_conn:
            connected = True
            manifest["server"] = connection.server_facts(lock_conn)
            _settle_earlier_runs(command, target, lock_conn, [records_root, by_hand.records_root()], run_id, progress)
            if "preflight" in steps:
                _report_unfinished(lock_conn, run_id, progress)
            failed = False
            for number, (step, entry) in enumerate(zip(steps, manifest["notebooks"]), start=1):
                if not failed:
                    # a line at least every 10 s while a notebook runs: what the server is doing for it
                    with watch.Heartbeat(target, what=notebook_path(step).stem, say=progress):
                        failed = not _run_notebook(step, number, len(steps), record, common, parameters or {},
                                                   manifest, entry, progress)
            outcome.verdict = "failed" if failed else "passed"
            _mark_finished(lock_conn, run_id, outcome.verdict, progress)
    except Exception as exc:  # connection refused, login failed, run lock busy: nothing of the plan ran
        refusal = _refusal(exc, target, connected)
        if refusal and all(entry["status"] == "not run" for entry in manifest["notebooks"]):
            outcome.verdict = "refused"
        outcome.error = manifest["error"] = refusal or f"{type(exc).__name__}: {exc}"
        progress(f"  {'refused' if outcome.verdict == 'refused' else 'failed'}: {manifest['error']}")
    _seal(record, manifest, outcome)
    say_sealed(record, progress)
    outcome.record = location.publish(record, progress)   # PublishError: the sealed record stays where it is
    return outcome


def say_sealed(record: records.Record, progress=print) -> None:
    """What every run ends by printing: the record, its seal, and its verdict with what it counts."""
    progress(f"record: {record.path}\nseal: sha256 of manifest.json {record.seal()} (note it in the change ticket)")
    for line in verdicts.lines(record.manifest(), record.path):
        progress(line)


def _refusal(exc: Exception, target: connection.Target, connected: bool) -> str | None:
    """Why nothing could start, when it is a refusal (exit 2) rather than a failure; None otherwise."""
    if isinstance(exc, engine.LockBusy):
        return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg2.OperationalError) and not connected:
        return connect_refusal(target, exc)
    return None


def connect_refusal(target: connection.Target, exc: psycopg2.OperationalError) -> str:
    """A server that cannot be reached or a login that failed, naming the target (libpq's message
    never holds the password; known secrets are redacted all the same)."""
    where = ", ".join(f"{key} {value}" for key, value in target.describe().items()
                      if key in connection.CONNINFO_KEYS)
    said = " ".join(str(exc).split())
    return records.redact_text(f"cannot connect to {target.kind} {target.name!r}"
                               + (f" ({where})" if where else "") + f": {said}", records.known_secrets())


def _run_notebook(step, number, total, record, common, parameters, manifest, entry, progress) -> bool:
    source = notebook_path(step)
    declared = notebook_parameters(step)
    values = {k: v for k, v in {**common, **parameters}.items() if k in declared}
    output = records.check_writable(record.path / records.NOTEBOOKS_DIR / f"{number:02d}-{source.stem}.ipynb")
    entry.update(file=str(output.relative_to(record.path)), parameters=sorted(values))
    started = time.monotonic()
    entry["started_at"] = records.utc_now()
    progress(f"[{number}/{total}] {source.stem} ...")
    try:
        papermill.execute_notebook(str(source), str(output), parameters=values, kernel_name="python3",
                                   progress_bar=False, log_output=False, cwd=str(NOTEBOOK_DIR),
                                   kernel_manager_class=_kernel_manager_for(record))
        entry["status"] = "passed"
    except papermill.PapermillExecutionError as exc:
        entry.update(status="failed", failed_cell=exc.exec_count, error=f"{exc.ename}: {exc.evalue}".strip())
    except Exception as exc:  # the kernel died, the notebook could not be read...
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    entry["seconds"] = entry["wall_seconds"] = round(time.monotonic() - started, 2)
    entry["finished_at"] = records.utc_now()
    if output.exists():
        nb = nbformat.read(output, as_version=4)
        note_results(nb, entry)
        entry["seconds"], entry["seconds_from"] = seconds_of(nb, entry["wall_seconds"])
        nb.metadata["truthsource"] = {
            "run_id": manifest["run_id"], "command": manifest["command"], "step": step,
            "operator": manifest["operator"], "target": manifest["target"],
            "status": entry["status"], "seconds": entry["seconds"], "sql_files": manifest["sql_files"],
            "project": manifest["project"],
        }
        records.write_text(output, nbformat.writes(nb))   # its HTML is written when the record is sealed
    progress(f"[{number}/{total}] {source.stem}: {records.outcome_text(entry)} ({entry['seconds']:.1f}s)"
             + (f"\n      cell {entry.get('failed_cell')}: {entry.get('error')}" if entry["status"] == "failed" else ""))
    return entry["status"] == "passed"


def _settle_earlier_runs(command: str, target: connection.Target, conn, roots: list[Path], run_id: str,
                         progress) -> None:
    """Before this run: witnesses left open of runs whose records are sealed are finished, and a by-hand
    run of this target is superseded by a command that changes the database (its pointer removed)."""
    for line in witness.reconcile(conn, roots, run_id):
        progress(f"  {line}")
    if command in SUPERSEDES_BY_HAND:
        for path in by_hand.clear_pointers(target.kind, target.name, roots):
            progress(f"  {path.name} removed: runbook {command} supersedes the by-hand run it named")


def _report_unfinished(conn, run_id: str, progress) -> None:
    """Earlier runs on this database that never finished (their runner died): say so, and how to
    roll back or resume. The deployment goes on (see identity.how_to_continue)."""
    for row in identity.unfinished_runs(conn, run_id):
        progress(f"  WARNING: {identity.how_to_continue(row)}")


def _mark_finished(conn, run_id: str, verdict: str, progress) -> None:
    """The database's witness of this run's backup learns that the run ended (no row: no backup)."""
    try:
        identity.finish_run(conn, run_id, verdict)
    except psycopg2.Error as exc:
        progress(f"  warning: could not mark run {run_id} finished in {identity.RUNS_TABLE}: "
                 f"{(exc.diag.message_primary or str(exc)).strip()}")


def _kernel_manager_for(record: records.Record) -> type:
    # absolute: papermill changes directory while it runs a notebook, a relative --records would miss
    return type("RecordKernelManager", (IPCKernelManager,), {"kernel_log": (record.path / records.KERNEL_LOG).resolve()})


def _seal(record: records.Record, manifest: dict, outcome: Outcome) -> None:
    """Seal the record: secrets redacted, the verdict decided once, each notebook's page written with
    it, every file hashed into the manifest. Nothing writes into the folder afterwards."""
    # A secret that reached any file, or the manifest itself (a password typed as a parameter), is
    # redacted and fails the run: a record never keeps one. Files first, so their hashes are of what stays.
    secrets = records.known_secrets()
    leaked = records.redact_files(record.path, secrets)
    backup_json = record.path / "backup" / "backup.json"
    if backup_json.is_file():
        info = json.loads(backup_json.read_text())
        manifest["backup"] = {"file": f"backup/{info['file_name']}", "sha256": info["sha256"],
                              "bytes": info["size_bytes"], "taken_at": info["taken_at"],
                              "format": info["format"], "toc_entries": info["toc_entries"],
                              "pg_dump": (info.get("pg_dump") or {}).get("version"),
                              "server_version": info["server_version"]}
    manifest["finished_at"] = records.utc_now()
    decided = promotion.read(record.path)   # the preflight's promotion decision and its evidence
    if decided is not None:
        manifest["promotion"] = decided
    measured = footprint.gather(record.path)   # per phase: what the app felt, the WAL and disk used
    if measured is not None:
        manifest["footprint"] = measured
    _facts_into_manifest(manifest)
    redacted = records.redact_data(manifest, secrets)
    if redacted != manifest:
        manifest = redacted
        leaked.append(records.MANIFEST)
    if leaked:
        outcome.verdict = "failed"
        manifest["error"] = f"a secret appeared in {', '.join(leaked)}; redacted there"
    manifest.update(verdicts.decide(manifest, outcome.verdict))
    _export_pages(record, manifest, secrets)
    outcome.notebooks = manifest["notebooks"]
    record.write_manifest(manifest)


def _facts_into_manifest(manifest: dict) -> None:
    """The facts the notebooks' checks gave their verdicts, where the record's header card reads them:
    the preflight's sign-off (else the parameters given), the backup a rollback restored."""
    facts = {k: v for entry in manifest["notebooks"] for k, v in (entry.get("facts") or {}).items()}
    parameters = manifest.get("parameters") or {}
    manifest["signoff"] = facts.get("signoff") or {k: parameters.get(k) for k in ("approver", "change_ticket")}
    if facts.get("restored_backup"):
        manifest["restored_backup"] = facts["restored_backup"]


def _export_pages(record: records.Record, manifest: dict, secrets: list[str]) -> None:
    """Each kept notebook's HTML, its card showing the run's verdict, then the sha256 of both; a
    secret on a page is redacted there too (the pages are written after the files were scanned)."""
    for entry in manifest["notebooks"]:
        if entry.get("file") and (record.path / entry["file"]).is_file():
            step = entry.get("step") or entry["name"]
            entry["html"] = str(_export_html(record.path / entry["file"], manifest, entry, step).relative_to(record.path))
    pages_written = [entry["html"] for entry in manifest["notebooks"] if entry.get("html")]
    records.redact_files(record.path, secrets, names=pages_written)
    for entry in manifest["notebooks"]:
        for key, digest in (("file", "sha256"), ("html", "html_sha256")):
            if entry.get(key):
                entry[digest] = records.sha256_of(record.path / entry[key])


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
