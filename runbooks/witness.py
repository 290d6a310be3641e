"""A run's record and the database's witness of its backup agree: both say when the run ended.

The preflight writes the run's backup into ``truthsource.deployment_runs`` (see identity.py); the
row is *finished* when the run ends, so that a later deployment does not name the run as
unfinished. The runner finishes it itself; a run stepped through by hand is finished when it is
sealed, and `runbook records seal` therefore refuses, changing nothing, when it cannot reach the
target (`reach` names what to export). A witness that was left open all the same (a record
sealed by an older version, or the target out of reach since) is finished by `runbook records
finish RUN_ID` (`finish`), or by the next command that runs on that database (`reconcile`).
"""

from __future__ import annotations

from pathlib import Path

import psycopg2

from . import connection, identity, records

# What a terminal needs to reach a target of each kind: named when it cannot.
HOW_TO_REACH = {
    "service": "export PGSERVICEFILE (the pg_service.conf that defines service {name!r}) and PGPASSFILE, as `runbook "
               "sandbox` prints them for its service (or `source .sandbox.env`)",
    "target": "give the targets file that names {name!r} ($RUNBOOK_TARGETS, ./targets.toml or the project's) and its "
              "password through ~/.pgpass, PGPASSFILE or PGPASSWORD",
    "environment": "export the PGHOST, PGPORT, PGDATABASE and PGUSER the run used, and its password through ~/.pgpass, "
                   "PGPASSFILE or PGPASSWORD",
}


class Unreachable(records.RecordError):
    """The record's target cannot be reached from here: nothing was changed (exit 2)."""


def reach(target: dict, why: str, application_name: str):
    """A connection to a record's target (its manifest's or journal's `target`), or Unreachable naming
    the target, what libpq said, and what to export."""
    kind, name = target.get("kind") or "environment", target.get("name")
    how = HOW_TO_REACH.get(kind, HOW_TO_REACH["environment"]).format(name=name)
    try:
        resolved = connection.resolve(kind if kind != "environment" else None, name, target.get("targets_file"))
        return connection.connect(resolved, application_name=application_name[:63], autocommit=True)
    except (connection.TargetError, psycopg2.OperationalError) as exc:
        said = records.redact_text(" ".join(str(exc).split())[:300], records.known_secrets())
        raise Unreachable(f"cannot reach {kind} {name!r} ({said}): {why}, nothing was changed. To reach it: {how}; "
                          "then run the command again") from None


def mark_finished(conn, run_id: str, verdict: str) -> str:
    """Finish the run's witness in the database `conn` reaches; a sentence saying what was done."""
    where = identity.read_identity(conn).describe()
    if identity.finish_run(conn, run_id, "passed" if verdict == "passed" else "failed"):
        return f"the database's witness of run {run_id} ({identity.RUNS_TABLE} in {where}): finished ({verdict})"
    row = identity.run_witness(conn, run_id)
    if row is None:
        return (f"{where} holds no witness of run {run_id} (another database, or no backup was taken): nothing "
                "to finish there")
    return f"the database's witness of run {run_id}: finished already, at {row['finished_at']} ({row['verdict']})"


def finish(root: Path, run_id: str, progress=print) -> int:
    """`runbook records finish RUN_ID`: the witness of a sealed run, left open, finished with its verdict."""
    record = records.Record.open(root, run_id)   # a sealed record (its manifest), or RecordError
    manifest = record.manifest()
    conn = reach(manifest.get("target") or {}, f"the witness of run {run_id} was not finished",
                 f"runbook records finish {run_id}")
    try:
        progress(mark_finished(conn, run_id, str(manifest.get("verdict"))))
    finally:
        conn.close()
    return 0


def reconcile(conn, roots: list[Path], current_run_id: str) -> list[str]:
    """Witnesses left open in this database whose record is sealed in one of `roots` (the same
    backup, by sha256): finished with the record's verdict, each said in a sentence."""
    said = []
    for row in identity.open_witnesses(conn, current_run_id):
        if not records.RUN_ID_PATTERN.match(row["run_id"]):
            continue
        for root in dict.fromkeys(Path(r).resolve() for r in roots):
            record = records.Record(root, row["run_id"])
            if not record.sealed:
                continue
            manifest = record.manifest()
            if (manifest.get("backup") or {}).get("sha256") != row["backup_sha256"]:
                continue   # not the backup the database witnessed: left as it is
            identity.finish_run(conn, row["run_id"], "passed" if manifest.get("verdict") == "passed" else "failed")
            said.append(f"the database's witness of run {row['run_id']} was left open; its record {record.path} is "
                        f"sealed ({manifest.get('verdict_text') or manifest.get('verdict')}): finished now")
            break
    return said
