"""Shared by the tests of the operations runbooks (maintenance, troubleshooting)."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

from runbooks import connection, engine, records
from runbooks.notebook import Run
from runbooks.paths import PHASES


def migrate(db) -> None:
    """Apply the three phases through the engine, as a deployment would (skip while one is missing)."""
    missing = [path.name for _, path in PHASES if not path.exists()]
    if missing:
        pytest.skip(f"phase file(s) {', '.join(missing)} not written yet: maintenance needs a migrated database")
    apply_engine = engine.ApplyEngine(db.target, run_id="test-migrate", operator="test")
    for version, path in PHASES:
        apply_engine.apply(version, path)


def make_run(db, record_dir: Path, run_id: str | None = None) -> Run:
    """What notebook.setup() returns, without a kernel: checks can be called directly."""
    run_id = run_id or records.new_run_id()
    folder = Path(record_dir) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    conn = connection.connect(db.target, readonly=True, autocommit=True)
    return Run(notebook="test", target=db.target, run_id=run_id, operator="tester", record_dir=folder, conn=conn,
               facts=connection.server_facts(conn))


def executed_notebook(outcome) -> nbformat.NotebookNode:
    return nbformat.read(outcome.record.path / outcome.notebooks[0]["file"], as_version=4)


def notebook_text(nb) -> str:
    """Every text output of an executed notebook, joined (what a reader sees)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                parts.append(output["text"])
            for mime in ("text/plain", "text/markdown"):
                if mime in output.get("data", {}):
                    parts.append(output["data"][mime])
    return "\n".join(parts)


def checks_of(outcome) -> dict[str, dict]:
    """The verdict's checks by name (the last one of a name wins)."""
    return {c["name"]: c for c in outcome.notebooks[0].get("checks", [])}


def wait_for_stats(db, table: str, seq_scans: int, timeout: float = 10) -> None:
    """Statistics reach pg_stat_user_tables when the backends flush them: wait until they show."""
    deadline = time.monotonic() + timeout
    while True:
        [(seen,)] = db.query("select coalesce(seq_scan, 0) from pg_stat_user_tables where relid = %s::regclass",
                             (table,))
        if seen >= seq_scans or time.monotonic() > deadline:
            assert seen >= seq_scans, f"{table}: {seen} sequential scans recorded, expected {seq_scans}"
            return
        time.sleep(0.1)
