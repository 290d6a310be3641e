"""A phase's footprint in the run's record: what the app felt, and the WAL and disk the phase used.

The phase notebook measures both while its phase runs (``phases.Phase.apply``: ``impact.ImpactSampler``
and ``resources.ResourceMeter``), shows them, and writes ``footprint/phase-<version>.json`` into the
record; the runner gathers the files into ``manifest.json`` (``footprint``), and the record's
``index.html`` says them on its header card ("app impact: longest wait 0.4 s, 3 sessions waited, none
cancelled").
"""

from __future__ import annotations

import json
from pathlib import Path

from . import impact, records, resources
from .checks import Check, human_bytes

FOLDER = "footprint"
LONGEST_WAIT_GOAL = 1.0   # seconds: no app statement waits longer on a lock a phase holds (the contract)


def write(record_dir: Path, version: str, measured: dict) -> Path:
    """Keep one phase's figures in the record (before it is sealed)."""
    folder = records.make_folder(Path(record_dir) / FOLDER)
    return records.write_text(folder / f"phase-{version}.json",
                              json.dumps({"phase": version, **measured}, indent=1, default=str) + "\n")


def gather(record_dir: Path) -> dict | None:
    """Every phase's figures in the record, by version (None when no phase was measured)."""
    folder = Path(record_dir) / FOLDER
    found = {}
    for path in sorted(folder.glob("phase-*.json")) if folder.is_dir() else []:
        data = json.loads(path.read_text())
        found[data["phase"]] = data
    return found or None


def check(version: str, measured: dict) -> Check:
    """The phase notebook's view: one row per figure, a warning when an app session waited longer
    than the contract allows or failed."""
    app, used = measured.get("impact") or {}, measured.get("resources") or {}
    failed = (app.get("aborted_after_wait") or 0) + (app.get("deadlocks") or 0)
    status = "warning" if app.get("longest_wait_s", 0) > LONGEST_WAIT_GOAL or failed else "info"
    rows = [{"figure": "app sessions that waited on the phase's locks", "value": str(app.get("sessions_waited", "-"))},
            {"figure": "longest such wait", "value": f"{app.get('longest_wait_s', 0):.3f} s"
             + (f" (pid {app['longest']['pid']}: {app['longest']['query'][:80]})" if app.get("longest") else "")},
            {"figure": "lock waits the phase gave up (lock_timeout, retried)", "value": str(len(app.get("gave_up") or []))},
            {"figure": "deadlocks in the database meanwhile", "value": _shown(app.get("deadlocks"))},
            {"figure": "app transactions aborted after waiting", "value": str(app.get("aborted_after_wait", "-"))},
            {"figure": "sessions the deployment cancelled", "value": "none (its lock_timeout gives up its own statement)"},
            {"figure": "WAL written meanwhile", "value": human_bytes(used.get("wal_bytes")) or "-"},
            {"figure": "replicas", "value": resources.replica_text(used)},
            {"figure": "WAL archiving, segments behind at most", "value": _shown(used.get("archive_segments_behind"),
                                                                              "archiving off")},
            {"figure": "server disk used beyond the start, at most", "value": human_bytes(used.get("server_extra_bytes"))},
            {"figure": "temporary files written", "value": human_bytes(used.get("temp_bytes")) or "-"},
            {"figure": "resolution", "value": f"waits sampled every {app.get('resolution_s', impact.FAST) * 1000:.0f} ms "
             f"while the run holds locks (a shorter wait may go unseen); disk and lag every "
             f"{used.get('interval_s', resources.INTERVAL):g} s"}]
    # the summary (in the verdict) says what the app felt; the WAL and disk, which vary run by run, are rows
    return Check("footprint", status, f"app impact: {impact.describe(app)}",
                 title=f"phase {version}: what the app felt, and the WAL and disk it used", rows=rows,
                 columns=["figure", "value"])


def _shown(value, none: str = "not readable") -> str:
    return none if value is None else str(value)


def run_totals(phases: dict | None) -> tuple[dict, dict]:
    """The run's impact and resources over its phases: the longest wait and largest lag and disk, the
    sums of sessions, failures and WAL."""
    phases = list((phases or {}).values())
    apps = [p.get("impact") or {} for p in phases]
    used = [p.get("resources") or {} for p in phases]
    app = {"sessions_waited": sum(a.get("sessions_waited") or 0 for a in apps),
           "longest_wait_s": max([a.get("longest_wait_s") or 0 for a in apps], default=0),
           "aborted_after_wait": sum(a.get("aborted_after_wait") or 0 for a in apps),
           "deadlocks": sum(a.get("deadlocks") or 0 for a in apps),
           "gave_up": [g for a in apps for g in a.get("gave_up") or []]}
    wal = [u.get("wal_bytes") for u in used if u.get("wal_bytes") is not None]
    totals = {"wal_bytes": sum(wal) if wal else None,
              "replicas": max([u["replicas"] for u in used if u.get("replicas") is not None], default=None),
              "replicas_readable": all(u.get("replicas_readable", True) for u in used),
              "replica_lag_bytes": max([u["replica_lag_bytes"] for u in used if u.get("replica_lag_bytes") is not None],
                                       default=None),
              "replica_lag_s": max([u["replica_lag_s"] for u in used if u.get("replica_lag_s") is not None], default=None),
              "archive_segments_behind": max([u["archive_segments_behind"] for u in used
                                              if u.get("archive_segments_behind") is not None], default=None),
              "server_extra_bytes": max([u.get("server_extra_bytes") or 0 for u in used], default=0),
              "temp_bytes": sum(u.get("temp_bytes") or 0 for u in used)}
    return app, totals


def card_rows(manifest: dict) -> list[tuple[str, str, str]]:
    """The header card's lines (label, element id, plain text): what the app felt, and the WAL and disk
    the run used."""
    phases = manifest.get("footprint")
    if not phases:
        return []
    app, used = run_totals(phases)
    backup = (manifest.get("backup") or {}).get("bytes")
    if backup is not None:
        used["runner_bytes"] = backup
    measured = ("phase " if len(phases) == 1 else "phases ") + ", ".join(sorted(phases))
    return [("app impact", "runbook-impact", f"{impact.describe(app)} ({measured})"),
            ("WAL and disk", "runbook-resources", resources.describe(used))]
