"""Runs stepped through by hand in JupyterLab are runs: one run id, one record, a seal.

A notebook run by hand gets no run id from `runbook`. The preflight then starts a run: a new
run id, its record folder, a journal in it (``by-hand.json``: the target without secrets, who,
each notebook's start, end and status) and a small state file beside the records,
``last-preflight-<kind>-<name>.json``, naming the run. The phases and the verification of the
same target read that file and join the run (same run id, same folder). A phase refuses unless
that preflight passed in the last hours (``preflight_max_age_hours``), unless
``require_preflight = False``.

``runbook records seal RUN_ID`` then makes the folder a record like any other: the notebooks
JupyterLab saved are found by the run id their outputs show (in ``notebooks/`` or already in the
record's ``notebooks/``), copied into the record with the run's facts in their metadata, exported
to HTML, and the manifest is written (runner._seal: secrets scanned, every file hashed).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat
import psycopg2

from . import connection, identity, records
from .paths import NOTEBOOK_DIR, PROJECT_ROOT

RECORDS_ENV = "RUNBOOK_RECORDS"     # where by-hand runs keep their records (default records/ in the project)
JOURNAL = "by-hand.json"
PREFLIGHT = "00_preflight"
PHASES = ("01_phase1_core_functions", "02_phase2_core_schema", "03_phase3_production_enhancements")
JOINS_THE_PREFLIGHT = (*PHASES, "04_verification")   # later notebooks of a deployment: the preflight's run


class PreflightRequired(RuntimeError):
    """A phase run by hand without a passed, recent preflight of its target."""


def records_root() -> Path:
    return Path(os.environ.get(RECORDS_ENV) or PROJECT_ROOT / "records")


def state_path(target, root: Path | None = None) -> Path:
    """records/last-preflight-<kind>-<name>.json: the last by-hand preflight of this target."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{target.kind}-{target.name}")
    return (root or records_root()) / f"last-preflight-{slug}.json"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def read_state(target) -> dict | None:
    path = state_path(target)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def joined_run(notebook: str, target, *, require_preflight: bool = True, max_age_hours: float = 12) -> dict | None:
    """The by-hand run a later notebook joins (the state file's), or None for a run of its own;
    a phase without a passed preflight of this target in the last hours is refused."""
    if notebook not in JOINS_THE_PREFLIGHT:
        return None
    state = read_state(target)
    problem = _preflight_problem(state, target, max_age_hours)
    if problem and notebook in PHASES and target.production:
        # production: the preflight is where the sign-off and the staging evidence (promotion) are asked
        raise PreflightRequired(f"{notebook}: {problem}. A production target takes a phase only in the run of a "
                                "passed preflight (sign-off, staging evidence): run 00_preflight first")
    if problem and notebook in PHASES and require_preflight:
        raise PreflightRequired(f"{notebook}: {problem}. Run 00_preflight for this target first (by hand it "
                                "starts the run this notebook joins), or set require_preflight = False")
    return None if problem else state   # a stale or failed preflight's run is not joined


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


def start(run) -> None:
    """Note this notebook in its run's journal; a preflight also names its run in the state file."""
    journal = _journal(run.record_dir)
    if not journal:
        journal = {"run_id": run.run_id, "target": run.target.describe(), "server": run.facts,
                   "operator": records.operator_facts(run.operator), "started_at": records.utc_now(),
                   "notebooks": []}
    journal["notebooks"].append({"name": run.notebook, "started_at": records.utc_now(), "status": "running"})
    _write_json(run.record_dir / JOURNAL, journal)
    if run.notebook == PREFLIGHT:
        state_path(run.target).parent.mkdir(parents=True, exist_ok=True)
        _write_json(state_path(run.target), {"run_id": run.run_id, "record_dir": str(run.record_dir.resolve()),
                                             "target": run.target.describe(), "status": "running",
                                             "started_at": records.utc_now(), "finished_at": None})


def finish(run, status: str) -> None:
    """The notebook's verdict into the journal (and, for a preflight, the state file)."""
    journal = _journal(run.record_dir)
    for entry in reversed(journal.get("notebooks", [])):
        if entry["name"] == run.notebook:
            entry.update(status=status, finished_at=records.utc_now())
            break
    _write_json(run.record_dir / JOURNAL, journal)
    state = read_state(run.target)
    if run.notebook == PREFLIGHT and state and state.get("run_id") == run.run_id:
        _write_json(state_path(run.target), dict(state, status=status, finished_at=records.utc_now()))


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


def seal(root: Path, run_id: str, notebooks_dir: Path = NOTEBOOK_DIR, progress=print):
    """Make a by-hand run's folder a sealed record; returns the runner's Outcome."""
    from . import runner   # runner runs notebooks that import this module: imported late

    record = records.Record(Path(root), records.check_run_id(run_id))
    if not record.path.is_dir():
        raise records.RecordError(f"no run folder {run_id} in {Path(root).resolve()}")
    if record.manifest_path.exists():
        raise records.RecordError(f"run {run_id} is sealed already ({record.manifest_path}): "
                                  "`runbook records verify` checks it")
    journal = _journal(record.path)
    if not journal:
        raise records.RecordError(f"{record.path} holds no {JOURNAL}: not a run stepped through by hand "
                                  "(its notebooks' setup writes it)")
    manifest = _manifest(journal, run_id)
    saved = saved_notebooks(run_id, notebooks_dir, record.path)
    (record.path / records.NOTEBOOKS_DIR).mkdir(exist_ok=True)
    for number, entry in enumerate(manifest["notebooks"], start=1):
        source = saved.get(entry["name"])
        if source is None:
            progress(f"  {entry['name']}: no saved notebook shows run {run_id} (save it in JupyterLab, then seal);"
                     " the record lists it without its cells")
            continue
        _keep_notebook(record, manifest, entry, source, number, runner)
    outcome = runner.Outcome(run_id=run_id, record=record,
                             verdict="passed" if all(e["status"] == "passed" for e in manifest["notebooks"])
                             and manifest["notebooks"] else "failed")
    runner._seal(record, manifest, outcome)
    if journal.get("target", {}).get("kind") in ("service", "target"):
        _mark_finished(journal, run_id, outcome.verdict, progress)
    progress(f"record: {record.path}\nseal: sha256 of manifest.json {record.seal()} (note it in the change ticket)"
             f"\nverdict: {outcome.verdict.upper()}")
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
                          "seconds": _seconds(entry.get("started_at"), entry.get("finished_at"))})
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


def _mark_finished(journal: dict, run_id: str, verdict: str, say) -> None:
    """The database's witness of the run's backup learns it ended (a later deploy then no longer
    names it as unfinished); best effort: the target may be out of reach from where the DBA seals."""
    target = journal.get("target") or {}
    try:
        conn = connection.connect(connection.resolve(target.get("kind"), target.get("name")),
                                  application_name=f"runbook seal {run_id}"[:63], autocommit=True)
        try:
            identity.finish_run(conn, run_id, verdict)
        finally:
            conn.close()
    except (connection.TargetError, psycopg2.Error) as exc:
        say(f"  note: could not mark run {run_id} finished on {target.get('kind')} {target.get('name')!r} "
            f"({' '.join(str(exc).split())[:200]}); a later deploy will name it as unfinished")


def _keep_notebook(record, manifest: dict, entry: dict, source: Path, number: int, runner) -> None:
    """A saved notebook copied into the record with the run's facts in its metadata, and its HTML."""
    output = record.path / records.NOTEBOOKS_DIR / f"{number:02d}-{entry['name']}.ipynb"
    nb = nbformat.read(source, as_version=4)
    verdict = runner._verdict_of(nb)
    if verdict is not None:
        entry["checks"] = verdict.get("checks", [])
        if verdict.get("status") == "failed":
            entry["status"] = "failed"
    if runner._skipped_phase(nb):
        entry["skipped"] = True
    nb.metadata["truthsource"] = {
        "run_id": manifest["run_id"], "command": manifest["command"], "step": entry["name"],
        "operator": manifest["operator"], "target": manifest["target"], "status": entry["status"],
        "sql_files": manifest["sql_files"], "project": manifest["project"]}
    nbformat.write(nb, output)
    if source.resolve() != output.resolve() and source.parent.resolve() == (record.path / records.NOTEBOOKS_DIR).resolve():
        source.unlink()   # a copy the DBA saved into the record: the numbered one replaces it
    entry["file"] = str(output.relative_to(record.path))
    entry["html"] = str(runner._export_html(output, manifest, entry, entry["name"]).relative_to(record.path))

