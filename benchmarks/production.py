"""What production conditions add to the scale benchmark (benchmarks/scale.py); prints, asserts nothing.

- **WAL, replica and disk per phase**: each phase's WAL (``pg_current_wal_lsn()`` before and after), the
  largest replica lag and archiving backlog seen, the largest extra disk on the server and its temporary
  files (``runbooks.resources.ResourceMeter``, as every record measures them), beside the size of the
  tables the phase rewrites or updates in every row (a WAL more than 3x their size is explained below the
  table);
- **predicted against measured**: the preflight's predictions (``runbooks.estimate`` for the duration,
  ``runbooks.budgets`` for the WAL and the disk, from the clone's sizes before the phases) beside what the
  engine's run then measured, per phase, and the runner's disk against the record ``runbook deploy`` wrote;
- **``runbook deploy`` as a process**: the whole command a DBA runs (notebooks, snapshots, verification),
  timed from outside with the app's traffic running, beside its floor — raw ``pg_dump -Fc``, raw ``psql -1
  -f`` of the three phases (the psql pass), one sequential read of every table — and where the rest goes:
  each notebook, the kernel's start and papermill around its cells, and the slowest steps (cells by their
  heading), with what its record says the app felt.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import nbformat

from runbooks import budgets, connection, estimate, footprint, impact, resources
from runbooks.checks import fetch, human_bytes

SLOWEST_STEPS = 8   # the deploy's slowest cells shown
WAL_RATIO_EXPLAINED = 3.0


# -- predictions ---------------------------------------------------------------------------------------

def predictions(dbname: str) -> dict:
    """What the preflight predicts for a database (its sizes now): per phase duration, WAL and disk, the
    tables each rewrites and their size, and the runner's disk for the record."""
    conn = connection.connect(connection.from_service(dbname), application_name="bench predictions",
                              readonly=True, autocommit=True)
    try:
        sizes = fetch(conn, budgets.TABLES_SQL)
        legacy = fetch(conn, estimate.SIZES_SQL)
        conversions = estimate.conversions(conn)
    finally:
        conn.close()
    public = {r["table_name"]: r["total_bytes"] for r in sizes if r["schema_name"] == "public"}
    needs = budgets.phase_needs(sizes, legacy, conversions, set())
    return {"seconds": {p.version: round(p.seconds, 2) for p in estimate.estimate_phases(legacy, set(), conversions)},
            "disk": {n.version: n.disk_bytes for n in needs}, "wal": {n.version: n.wal_bytes for n in needs},
            "tables": {n.version: n.tables for n in needs},
            "tables_bytes": {n.version: sum(public.get(t, 0) for t in n.tables) for n in needs},
            "runner_bytes": budgets.runner_need(sizes)[0], "conversions": conversions}


# -- runbook deploy as a process -----------------------------------------------------------------------

def sequential_read(pg, dbname: str) -> None:
    """One sequential read of every table of the database's app schemas (the floor's verification)."""
    conn = connection.connect(connection.from_service(dbname), application_name="bench seq read", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("""select format('%I.%I', n.nspname, c.relname) from pg_class c
                           join pg_namespace n on n.oid = c.relnamespace
                           where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema')
                             and n.nspname !~ '^pg_'""")
            for (table,) in cur.fetchall():
                cur.execute(f"select count(*) from {table}")
    finally:
        conn.close()


def deploy_command(dbname: str, records: Path, max_replica_lag: float) -> list[str]:
    return [sys.executable, "-m", "runbooks.cli", "deploy", "--service", dbname, "--records", str(records),
            "-p", "max_replica_lag", f"{max_replica_lag:g}"]


def run_deploy(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The command, bounded (a run that outlives `timeout` is killed and reported as an error)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"runbook deploy did not finish in {timeout:g} s") from None


def deploy_breakdown(records: Path) -> dict:
    """From the deploy's record: its verdict, each notebook's time (cells, and around them), the slowest
    steps, what the app felt, the WAL and disk per phase, and the record's own size."""
    folders = [p for p in records.iterdir() if (p / "manifest.json").is_file()] if records.is_dir() else []
    if not folders:
        return {"verdict": "no record"}
    folder = folders[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    notebooks, steps = [], []
    for entry in manifest.get("notebooks", []):
        cells = _cell_times(folder / entry["file"]) if entry.get("file") else []
        in_cells = sum(s for _, s in cells)
        notebooks.append({"name": entry["name"], "seconds": entry.get("seconds"), "cells_s": round(in_cells, 2),
                          "status": entry.get("status")})
        steps += [(f"{entry['name']}: {label}", s) for label, s in cells]
    steps.sort(key=lambda x: -x[1])
    app, used = footprint.run_totals(manifest.get("footprint"))
    return {"verdict": manifest.get("verdict"), "error": manifest.get("error"), "notebooks": notebooks,
            "slowest_steps": [[label, round(s, 2)] for label, s in steps[:SLOWEST_STEPS]],
            "footprint": manifest.get("footprint"), "impact_text": impact.describe(app),
            "resources_text": resources.describe(used),
            "record_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
            "backup_bytes": (manifest.get("backup") or {}).get("bytes")}


def _cell_times(path: Path) -> list[tuple[str, float]]:
    """(the step a cell belongs to, its seconds) for each executed cell: steps are the markdown headings."""
    if not path.is_file():
        return []
    nb = nbformat.read(path, as_version=4)
    heading, found = "setup", {}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            heading = cell.source.lstrip().splitlines()[0].lstrip("# ").strip()[:60]
        duration = (cell.metadata.get("papermill") or {}).get("duration")
        if cell.cell_type == "code" and duration:
            found[heading] = found.get(heading, 0.0) + duration
    return list(found.items())


def floor_seconds(result: dict) -> float | None:
    """The floor of `runbook deploy`: raw pg_dump -Fc, raw psql of the three phases, one read of every table."""
    d = result.get("deploy") or {}
    parts = [d.get("floor", {}).get("pg_dump"), d.get("floor", {}).get("seq_read")]
    parts += [p["step"] for p in result["psql"]["phases"]]
    seconds = [p["seconds"] if p and p["status"] == "ok" else None for p in parts]
    return None if None in seconds else round(sum(seconds), 2)


def step_dict(step) -> dict:
    return asdict(step)


# -- the tables ----------------------------------------------------------------------------------------

def _b(value) -> str:
    return human_bytes(value) if value is not None else "-"


def _x(ours, base) -> str:
    return f"{ours / base:.2f}x" if ours is not None and base else "-"


def resource_rows(result: dict) -> list[list]:
    """Per pass and phase: WAL, beside the tables it rewrites; replica lag, archiving, server disk."""
    rows, notes = [], []
    predicted = result.get("predicted") or {}
    for how in ("engine", "psql"):
        for p in result[how]["phases"]:
            used = p.get("resources") or {}
            version = f"{p['phase'] - 1:03d}"
            rewritten = (predicted.get("tables_bytes") or {}).get(version)
            ratio = _x(used.get("wal_bytes"), rewritten)
            names = ", ".join((predicted.get("tables") or {}).get(version) or [])
            rows.append([how, p["phase"], _b(used.get("wal_bytes")), f"{names} ({_b(rewritten)})" if names else "none",
                         ratio, resources.replica_text(used) if used else "-",
                         used.get("archive_segments_behind", "-") if used.get("archive_segments_behind") is not None else "-",
                         _b(used.get("server_extra_bytes")), _b(used.get("temp_bytes"))])
    return rows


def wal_notes(result: dict) -> list[str]:
    """Why a phase's WAL is more than 3x the tables it rewrites, where it is."""
    notes = []
    predicted = result.get("predicted") or {}
    for p in result["engine"]["phases"]:
        version = f"{p['phase'] - 1:03d}"
        wal, base = (p.get("resources") or {}).get("wal_bytes"), (predicted.get("tables_bytes") or {}).get(version)
        if wal and base and wal > WAL_RATIO_EXPLAINED * base:
            notes.append(f"phase {p['phase']}: WAL {_x(wal, base)} the tables it rewrites: every row of "
                         f"{', '.join(predicted['tables'][version])} is written more than once (a batch's update "
                         "with a full page image at each page's first change after a checkpoint, then the rewrite "
                         "that drops the old versions, then its indexes), and the app's own writes meanwhile")
        elif wal and not base:
            notes.append(f"phase {p['phase']}: rewrites no table; its WAL is catalog changes, index builds, "
                         "validations' hint bits and the app's own writes meanwhile")
    return notes


def prediction_rows(result: dict) -> list[list]:
    """Per phase: duration, WAL and disk (the database's growth and the temporary files), predicted and measured
    (the engine with the app's traffic)."""
    predicted = result.get("predicted") or {}
    rows = []
    for p in result["engine"]["phases"]:
        version = f"{p['phase'] - 1:03d}"
        used = p.get("resources") or {}
        seconds = p["step"]["seconds"] if p["step"]["status"] == "ok" else None
        rows.append([p["phase"], f"{predicted.get('seconds', {}).get(version, '-')}", _fmt_s(seconds),
                     _x(seconds, predicted.get("seconds", {}).get(version)),
                     _b(predicted.get("wal", {}).get(version)), _b(used.get("wal_bytes")),
                     _x(used.get("wal_bytes"), predicted.get("wal", {}).get(version)),
                     _b(predicted.get("disk", {}).get(version)), _b(disk_used(used)),
                     _x(disk_used(used), predicted.get("disk", {}).get(version))])
    deploy = (result.get("deploy") or {}).get("record") or {}
    rows.append(["runner (the record)", "", "", "", "", "", "", _b(predicted.get("runner_bytes")),
                 _b(deploy.get("record_bytes")), _x(deploy.get("record_bytes"), predicted.get("runner_bytes"))])
    return rows


def disk_used(used: dict) -> int | None:
    """The server disk a phase used at most: the database's growth, and its temporary files (sorts)."""
    if used.get("server_extra_bytes") is None:
        return None
    return max(used["server_extra_bytes"], 0) + (used.get("temp_bytes") or 0)


def _fmt_s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def _psql_seconds(result: dict) -> float | None:
    steps = [p["step"] for p in result["psql"]["phases"]]
    return None if any(s["status"] != "ok" for s in steps) else sum(s["seconds"] for s in steps)


def deploy_rows(result: dict) -> list[list]:
    """runbook deploy as a process against its floor, then each notebook and the slowest steps."""
    d = result.get("deploy")
    if not d:
        return []
    step, floor = d["step"], floor_seconds(result)
    took = step["seconds"] if step["status"] == "ok" else None
    rows = [["runbook deploy (the process)", _fmt_s(took) if took is not None else step["detail"],
             f"floor {_fmt_s(floor)} s: {_x(took, floor)}"],
            ["  floor: raw pg_dump -Fc", _fmt_s(d["floor"]["pg_dump"]["seconds"]), ""],
            ["  floor: raw psql -1 -f, phases 1-3", _fmt_s(_psql_seconds(result)), ""],
            ["  floor: one sequential read of every table", _fmt_s(d["floor"]["seq_read"]["seconds"]), ""]]
    record = d.get("record") or {}
    for n in record.get("notebooks", []):
        around = (n["seconds"] or 0) - n["cells_s"]
        rows.append([f"  {n['name']} ({n['status']})", _fmt_s(n["seconds"]),
                     f"cells {n['cells_s']:.2f} s, kernel and papermill {around:.2f} s"])
    for label, seconds in record.get("slowest_steps", []):
        rows.append([f"    slowest: {label}", _fmt_s(seconds), ""])
    return rows
