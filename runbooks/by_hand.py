"""Runs stepped through by hand in JupyterLab are runs: one run id, one record, a seal.

A notebook run by hand gets no run id from `runbook`. The preflight then starts a run: a new
run id, its record folder, a journal in it (``by-hand.json``: the target without secrets, who,
each notebook's start, end and status, the database's identity) and a pointer beside the
records, ``last-preflight-<kind>-<name>.json``, naming the run. The phases and the verification
of the same target read the pointer and join the run (same run id, same folder) only when it is
open (not sealed) and the target is the very database its preflight saw (system identifier,
database oid, identity row: identity.py); otherwise a phase refuses, naming both runs' databases
or the sealed record, and says how to start a new run. A phase also refuses unless that preflight
passed in the last hours (``preflight_max_age_hours``), unless ``require_preflight = False``.

The pointer is replaced by the next by-hand preflight of the target and removed by whatever ends
or supersedes the run: its seal, a `runbook deploy` or `runbook rollback` of the target, a
rollback notebook run by hand on it.

``runbook records seal RUN_ID`` then makes the folder a record like any other, once it has
reached the target (else it refuses, nothing changed, naming what to export: witness.py): the
notebooks JupyterLab saved are found by the run id their outputs show (in ``notebooks/`` or
already in the record's ``notebooks/``), copied into the record with the run's facts in their
metadata, and sealed as the runner seals (runner._seal: secrets scanned, the verdict decided,
pages written, every file hashed); the database's witness of the run is then finished.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat

from . import identity, records, witness
from .paths import NOTEBOOK_DIR, PROJECT_ROOT

RECORDS_ENV = "RUNBOOK_RECORDS"     # where by-hand runs keep their records (default records/ in the project)
JOURNAL = "by-hand.json"
PREFLIGHT = "00_preflight"
ROLLBACK = "05_rollback"
PHASES = ("01_phase1_core_functions", "02_phase2_core_schema", "03_phase3_production_enhancements")
JOINS_THE_PREFLIGHT = (*PHASES, "04_verification")   # later notebooks of a deployment: the preflight's run
NEW_RUN = "Run 00_preflight for this target to start a new run (by hand it starts one, which the phases then join)"


class PreflightRequired(RuntimeError):
    """A phase run by hand without a passed, recent preflight of its target, or whose preflight's run
    is sealed or was of another database."""


def records_root() -> Path:
    return Path(os.environ.get(RECORDS_ENV) or PROJECT_ROOT / "records")


def state_path(target, root: Path | None = None) -> Path:
    """records/last-preflight-<kind>-<name>.json: the last by-hand preflight of this target."""
    return pointer_path(target.kind, target.name, root)


def pointer_path(kind: str, name: str, root: Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{kind}-{name}")
    return Path(root or records_root()) / f"last-preflight-{slug}.json"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write_json(path: Path, data: dict) -> None:
    records.write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_state(target) -> dict | None:
    path = state_path(target)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def clear_pointers(kind: str, name: str, roots, *, run_id: str | None = None) -> list[Path]:
    """Remove the target's pointer in each of `roots` (only where it names `run_id`, when given): its
    run was sealed, or a deployment or rollback of the target superseded it. The pointers removed."""
    removed = []
    for root in dict.fromkeys(Path(r).resolve() for r in roots):
        path = pointer_path(kind, name, root)
        try:
            named = json.loads(path.read_text()).get("run_id")
        except (OSError, json.JSONDecodeError):
            continue
        if run_id is None or named == run_id:
            records.remove(path)
            removed.append(path)
    return removed


# -- joining the preflight's run ----------------------------------------------------------------

def joined_run(notebook: str, target, *, now: identity.Identity | None = None, require_preflight: bool = True,
               max_age_hours: float = 12) -> dict | None:
    """The by-hand run a later notebook joins (the pointer's), or None for a run of its own; a phase
    without a passed, recent preflight of this target, open and of this very database (`now`, the
    target's identity), is refused."""
    if notebook not in JOINS_THE_PREFLIGHT:
        return None
    state = read_state(target)
    problem = _preflight_problem(state, target, max_age_hours) or _join_problem(state, now)
    if problem and notebook in PHASES and target.production:
        # production: the preflight is where the sign-off and the staging evidence (promotion) are asked
        raise PreflightRequired(f"{notebook}: {problem}. A production target takes a phase only in the run of a "
                                "passed preflight (sign-off, staging evidence): run 00_preflight first")
    if problem and notebook in PHASES and require_preflight:
        raise PreflightRequired(f"{notebook}: {problem}. {NEW_RUN}; or set require_preflight = False (a run of "
                                "its own)")
    return None if problem else state   # a stale, failed, sealed or foreign preflight's run is not joined


def _preflight_problem(state: dict | None, target, max_age_hours: float) -> str | None:
    where = f"{target.kind} {target.name!r}"
    if state is None:
        return f"no preflight of {where} was run by hand ({state_path(target)} is missing)"
    if state.get("status") != "passed":
        return (f"the preflight of {where} in run {state.get('run_id')} did not pass "
                f"({state.get('status') or 'unknown'})")
    finished = datetime.fromisoformat(state["finished_at"])
    if _now() - finished > timedelta(hours=max_age_hours):
        return (f"the preflight of {where} (run {state['run_id']}) passed at {finished:%Y-%m-%d %H:%M} UTC, "
                f"more than {max_age_hours:g} hours ago")
    return None


def _join_problem(state: dict, now: identity.Identity | None) -> str | None:
    """Why a passed, recent preflight's run cannot be joined: its record is sealed or gone, or the target
    is not the database the preflight saw (None: it can)."""
    run_id, folder = state["run_id"], Path(state.get("record_dir") or "")
    if (folder / records.MANIFEST).is_file():
        return (f"run {run_id} of that preflight is sealed ({folder}, seal "
                f"{records.sha256_of(folder / records.MANIFEST)[:12]}…): a sealed record never changes")
    if not folder.is_dir():
        return f"the record folder of run {run_id} ({folder}) is gone"
    if now is None:
        return None
    if not state.get("identity"):
        return f"the preflight of run {run_id} recorded no identity of its database: nothing proves this is it"
    then = identity.Identity.from_dict(state["identity"])
    differences = then.differences(now)
    if differences:
        return (f"run {run_id}'s preflight was of {then.describe()}; this target is now {now.describe()}: another "
                f"database ({'; '.join(differences)})")
    return None


# -- the journal --------------------------------------------------------------------------------

def start(run) -> None:
    """Note this notebook in its run's journal (refused by a sealed record); a preflight also names its
    run in the pointer, and a rollback removes the pointer (it supersedes that run)."""
    journal = _journal(run.record_dir)
    if not journal:
        journal = {"run_id": run.run_id, "target": run.target.describe(), "server": run.facts,
                   "operator": records.operator_facts(run.operator), "started_at": records.utc_now(),
                   "notebooks": []}
    journal["notebooks"].append({"name": run.notebook, "started_at": records.utc_now(), "status": "running"})
    _write_json(run.record_dir / JOURNAL, journal)
    if run.notebook == PREFLIGHT:
        records.make_folder(state_path(run.target).parent)
        _write_json(state_path(run.target), {"run_id": run.run_id, "record_dir": str(run.record_dir.resolve()),
                                             "target": run.target.describe(), "status": "running",
                                             "started_at": records.utc_now(), "finished_at": None})
    if run.notebook == ROLLBACK:
        clear_pointers(run.target.kind, run.target.name, [records_root()])


def finish(run, status: str) -> None:
    """The notebook's verdict into the journal (and, for a preflight, the pointer, with the identity of
    the database it saw: the phases join only that database)."""
    journal = _journal(run.record_dir)
    for entry in reversed(journal.get("notebooks", [])):
        if entry["name"] == run.notebook:
            entry.update(status=status, finished_at=records.utc_now())
            break
    seen = identity.read_identity(run.conn).as_dict() if run.notebook == PREFLIGHT else None
    if seen:
        journal["identity"] = seen
    _write_json(run.record_dir / JOURNAL, journal)
    state = read_state(run.target)
    if run.notebook == PREFLIGHT and state and state.get("run_id") == run.run_id:
        _write_json(state_path(run.target), dict(state, status=status, finished_at=records.utc_now(), identity=seen))


def _journal(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / JOURNAL).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# -- seal ------------------------------------------------------------------------------------

def belongs_to(nb, run_id: str) -> bool:
    """A notebook whose outputs show this run id (the setup header, the verdict) ran in this run."""
    return any(run_id in json.dumps(output) for cell in nb.cells for output in cell.get("outputs", []))


def saved_notebooks(run_id: str, notebooks_dir: Path, record_dir: Path) -> dict[str, Path]:
    """The executed notebooks of a run, by name: saved by JupyterLab over the notebooks in
    `notebooks_dir`, or as copies in the record's own notebooks/ folder (which win)."""
    found = {}
    for folder in (Path(notebooks_dir), record_dir / records.NOTEBOOKS_DIR):
        for path in sorted(folder.glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            if nb.metadata.get("truthsource") is None and belongs_to(nb, run_id):
                found[re.sub(r"^\d+-", "", path.stem)] = path
    return found


def _sealable(root: Path, run_id: str) -> tuple[records.Record, dict]:
    """The run's folder and journal, or RecordError: not a folder, sealed already, not a by-hand run."""
    record = records.Record(Path(root), records.check_run_id(run_id))
    if not record.path.is_dir():
        raise records.RecordError(f"no run folder {run_id} in {Path(root).resolve()}")
    if record.sealed:
        raise records.RecordError(f"run {run_id} is sealed already ({record.manifest_path}): "
                                  "`runbook records verify` checks it")
    journal = _journal(record.path)
    if not journal:
        raise records.RecordError(f"{record.path} holds no {JOURNAL}: not a run stepped through by hand "
                                  "(its notebooks' setup writes it)")
    return record, journal


def seal(root: Path, run_id: str, notebooks_dir: Path = NOTEBOOK_DIR, progress=print):
    """Make a by-hand run's folder a sealed record, and finish the database's witness of the run;
    refused (witness.Unreachable, nothing changed) when the target cannot be reached. Returns the
    runner's Outcome."""
    from . import runner   # runner runs notebooks that import this module: imported late

    record, journal = _sealable(root, run_id)
    conn = witness.reach(journal.get("target") or {}, f"run {run_id} was not sealed (sealing finishes the "
                         "database's witness of the run)", f"runbook records seal {run_id}")
    try:
        manifest = _manifest(journal, run_id)
        saved = saved_notebooks(run_id, notebooks_dir, record.path)
        records.make_folder(record.path / records.NOTEBOOKS_DIR)
        for number, entry in enumerate(manifest["notebooks"], start=1):
            source = saved.get(entry["name"])
            if source is None:
                progress(f"  {entry['name']}: no saved notebook shows run {run_id} (save it in JupyterLab, then "
                         "seal); the record lists it without its cells")
                continue
            _keep_notebook(record, manifest, entry, source, number, runner)
        outcome = runner.Outcome(run_id=run_id, record=record,
                                 verdict="passed" if all(e["status"] == "passed" for e in manifest["notebooks"])
                                 and manifest["notebooks"] else "failed")
        runner._seal(record, manifest, outcome)
        progress("  " + witness.mark_finished(conn, run_id, outcome.verdict))
    finally:
        conn.close()
    target = journal.get("target") or {}
    clear_pointers(target.get("kind"), target.get("name"), [root, records_root()], run_id=run_id)
    runner.say_sealed(record, progress)
    return outcome


def _manifest(journal: dict, run_id: str) -> dict:
    """The manifest of a by-hand run, from its journal (a notebook run twice: its last run counts)."""
    last = {}
    for entry in journal.get("notebooks", []):
        last[entry["name"]] = entry
    notebooks = []
    for name, entry in sorted(last.items()):
        status = entry.get("status")
        notebooks.append({"name": name, "source": f"notebooks/{name}.ipynb",
                          "status": status if status in ("passed", "failed") else "failed",
                          **({} if status in ("passed", "failed") else
                             {"error": "stopped before its verdict (a cell raised, or the kernel was stopped)"}),
                          "started_at": entry.get("started_at"), "finished_at": entry.get("finished_at"),
                          "seconds": _seconds(entry.get("started_at"), entry.get("finished_at")),
                          "seconds_from": "journal"})
    return {"run_id": run_id, "command": "by hand", "plan": [n["name"] for n in notebooks],
            "operator": journal.get("operator"), "started_at": journal.get("started_at"),
            "finished_at": None, "target": journal.get("target"), "server": journal.get("server"),
            "project": records.project_facts(), "sql_files": records.sql_checksums(), "parameters": {},
            "backup": None, "notebooks": notebooks, "verdict": "failed", "error": None,
            "sealed_by": records.operator_facts(), "sealed_at": records.utc_now()}


def _seconds(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 2)


def _keep_notebook(record, manifest: dict, entry: dict, source: Path, number: int, runner) -> None:
    """A saved notebook copied into the record with the run's facts in its metadata (its page is
    written when the record is sealed), its real duration from its own timing."""
    output = record.path / records.NOTEBOOKS_DIR / f"{number:02d}-{entry['name']}.ipynb"
    nb = nbformat.read(source, as_version=4)
    runner.note_results(nb, entry)
    entry["seconds"], entry["seconds_from"] = runner.seconds_of(nb, entry["seconds"])
    nb.metadata["truthsource"] = {
        "run_id": manifest["run_id"], "command": manifest["command"], "step": entry["name"],
        "operator": manifest["operator"], "target": manifest["target"], "status": entry["status"],
        "seconds": entry["seconds"], "sql_files": manifest["sql_files"], "project": manifest["project"]}
    records.write_text(output, nbformat.writes(nb))
    if source.resolve() != output.resolve() and source.parent.resolve() == (record.path / records.NOTEBOOKS_DIR).resolve():
        records.remove(source)   # a copy the DBA saved into the record: the numbered one replaces it
    entry["file"] = str(output.relative_to(record.path))
