"""Promotion: production gets only the phase files a non-production target has proven.

A production target is refused unless the same phase files (by sha256) passed a full deployment
with verification (preflight, the three phases, verification, all passed) on a target that is not
production, within ``promotion_max_age_days``. The evidence is found in the records folder (a
sealed record whose manifest still matches its files) or, for runs recorded elsewhere, in the
deployment history of the non-production targets of the targets file (their runs table says the
run passed; their history says which files it left applied). The production run's record names
the evidence: run id, target, seal. ``-p promotion_override "<reason>"`` goes on without it, and
the record says so, with the reason.

``decide`` is the one place the rule lives: ``runbook deploy`` asks it before anything runs
(exit 2), the preflight notebook asks it again and writes the answer into the record
(``promotion.json``, which the runner copies into ``manifest.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

from . import connection, engine, identity, records, storage
from .checks import Check
from .paths import PHASES, PROJECT_ROOT

DEFAULT_MAX_AGE_DAYS = 14
PROMOTION_FILE = "promotion.json"   # in the production run's record: the decision and its evidence
# The notebooks of a full deployment, by the names a runner's and a by-hand manifest give them.
FULL_DEPLOYMENT = ("00_preflight", "01_phase1_core_functions", "02_phase2_core_schema",
                   "03_phase3_production_enhancements", "04_verification")
_STEP_STEMS = {"preflight": "00_preflight", "phase1": "01_phase1_core_functions",
               "phase2": "02_phase2_core_schema", "phase3": "03_phase3_production_enhancements",
               "verification": "04_verification"}


def phase_digests() -> dict[str, str]:
    """sha256 of each phase file on disk, by its path in the project (as manifests name them)."""
    return {str(path.relative_to(PROJECT_ROOT)): records.sha256_of(path) for _, path in PHASES}


def _short(digests: dict[str, str]) -> str:
    return ", ".join(f"{Path(name).name} {digest[:12]}" for name, digest in digests.items())


@dataclass
class Evidence:
    """A passed full deployment of the same phase files on a non-production target."""

    run_id: str
    target: dict             # as the record describes it (never a secret)
    finished_at: str
    source: str              # "records" | "deployment history"
    seal: str | None = None  # sha256 of its manifest.json (None: its record is not in this records folder)
    record: str | None = None

    def describe(self) -> str:
        where = f"{self.target.get('kind')} {self.target.get('name')!r}"
        seal = f", seal {self.seal}" if self.seal else f", found in the {self.source} (record not here: no seal)"
        return f"run {self.run_id} on {where}, finished {self.finished_at}{seal}"


@dataclass
class Decision:
    """Whether a deployment of the phase files on disk may go to this target, and why."""

    production: bool
    allowed: bool
    phase_files: dict[str, str]
    max_age_days: float
    evidence: Evidence | None = None
    override: str | None = None
    problem: str | None = None
    near_misses: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """What the production run's record says (promotion.json, manifest.json's `promotion`)."""
        return {"required": self.production, "allowed": self.allowed, "phase_files": self.phase_files,
                "max_age_days": self.max_age_days,
                "evidence": asdict(self.evidence) if self.evidence else None,
                "override": {"reason": self.override} if self.override else None,
                "problem": self.problem}


# -- where evidence is found -------------------------------------------------------------------

def _parse_time(text: str | None) -> datetime | None:
    try:
        moment = datetime.fromisoformat(str(text))
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _full_deployment_passed(manifest: dict) -> bool:
    """Every notebook of a full deployment is in the record, passed (a skipped phase passed too:
    its file was applied with the same sha256 and the verification after it passed)."""
    passed = {_STEP_STEMS.get(nb.get("name"), nb.get("name")) for nb in manifest.get("notebooks", [])
              if nb.get("status") == "passed"}
    return manifest.get("verdict") == "passed" and set(FULL_DEPLOYMENT) <= passed


def _why_not(manifest: dict, record: records.Record, digests: dict[str, str], oldest: datetime) -> str | None:
    """Why a non-production record is not evidence for these files (None: it is)."""
    if not _full_deployment_passed(manifest):
        return "not a passed full deployment with verification"
    recorded = manifest.get("sql_files") or {}
    differing = [Path(name).name for name, digest in digests.items() if recorded.get(name) != digest]
    if differing:
        return "other phase files (" + ", ".join(differing) + " differ)"
    finished = _parse_time(manifest.get("finished_at"))
    if finished is None or finished < oldest:
        return f"too old (finished {manifest.get('finished_at')})"
    problems = record.verify()
    if problems:
        return "its record does not match its manifest (" + "; ".join(problems[:2]) + ")"
    return None


def evidence_in_records(root: Path, digests: dict[str, str], oldest: datetime,
                        misses: list[str] | None = None) -> list[Evidence]:
    """Sealed records of non-production runs that prove these files, newest first. Records that
    come close (a deployment of other files, or too old) are described in `misses`."""
    found = []
    location = storage.location(root)   # a local folder, or an object store other workers publish to
    for row in reversed(location.list_records()):
        record = location.open(row["run_id"])
        try:
            manifest = record.manifest()
        except records.RecordError:
            continue
        target = manifest.get("target") or {}
        if target.get("production") or manifest.get("command") not in ("deploy", "by hand"):
            continue
        problem = _why_not(manifest, record, digests, oldest)
        if problem is None:
            found.append(Evidence(run_id=row["run_id"], target=target, finished_at=manifest["finished_at"],
                                  source="records", seal=record.seal(), record=location.record_url(row["run_id"])))
        elif misses is not None and manifest.get("command") == "deploy":
            misses.append(f"run {row['run_id']} on {target.get('kind')} {target.get('name')!r}: {problem}")
    return found


PASSED_RUNS_SQL = f"""select run_id, finished_at from {identity.RUNS_TABLE}
where verdict = 'passed' and finished_at >= %s order by finished_at desc"""


def evidence_in_history(target: connection.Target, digests: dict[str, str], oldest: datetime) -> list[Evidence]:
    """Runs on a non-production target that passed (its runs table), applied phases themselves, and
    after which its history shows every phase file applied with these digests, newest first. The
    database vouches for the run; the seal is the record's, which lives where that run was made."""
    conn = connection.connect(target, application_name="runbook promotion", readonly=True, autocommit=True)
    try:
        history = engine.read_history(conn)
        with conn.cursor() as cur:
            cur.execute("select to_regclass(%s) is not null", (identity.RUNS_TABLE,))
            if not history or not cur.fetchone()[0]:
                return []
            cur.execute(PASSED_RUNS_SQL, (oldest,))
            runs = cur.fetchall()
    finally:
        conn.close()
    by_file = {Path(name).name: digest for name, digest in digests.items()}
    applying_runs = {row["run_id"] for row in history if row["action"] != "rollback"}
    found = []
    for run_id, finished_at in runs:
        if run_id not in applying_runs:
            continue   # it applied nothing (a re-run that skipped every phase): its record is the evidence
        applied = engine.latest_applied([row for row in history if row["applied_at"] <= finished_at])
        if {row["file_name"]: row["sha256"] for row in applied.values()} == by_file:
            found.append(Evidence(run_id=run_id, target=target.describe(), source="deployment history",
                                  finished_at=finished_at.astimezone(timezone.utc).isoformat(timespec="seconds")))
    return found


def non_production_targets(targets_file: str | Path | None) -> list[connection.Target]:
    """Every entry of the targets file that is not production ([] without a targets file)."""
    path = connection.targets_file_path(targets_file)
    if not path.is_file():
        return []
    found = []
    for name in connection.target_names(path):
        try:
            target = connection.from_targets_file(name, path)
        except connection.TargetError:
            continue   # an entry that cannot be used proves nothing
        if not target.production:
            found.append(target)
    return found


# -- the decision ------------------------------------------------------------------------------

def decide(target: connection.Target, records_root: Path, *, override: str | None = None,
           max_age_days: float | None = None, targets_file: str | Path | None = None,
           now: datetime | None = None) -> Decision:
    """May the phase files on disk be deployed to `target`? Non-production targets always may."""
    max_age_days = DEFAULT_MAX_AGE_DAYS if max_age_days is None else max_age_days
    digests = phase_digests()
    decision = Decision(production=target.production, allowed=True, phase_files=digests, max_age_days=max_age_days)
    if not target.production:
        return decision
    oldest = (now or datetime.now(timezone.utc)) - timedelta(days=max_age_days)
    misses: list[str] = []
    found = evidence_in_records(records_root, digests, oldest, misses)
    if not found:
        found = _evidence_in_histories(targets_file or target.targets_file, digests, oldest, misses)
    if found:
        decision.evidence = found[0]
        return decision
    decision.near_misses = misses
    reason = (override or "").strip()
    if reason:
        decision.override = reason
        return decision
    decision.allowed = False
    decision.problem = (
        f"production target {target.name!r} refused: no non-production target passed a full deployment with "
        f"verification of these phase files ({_short(digests)}) in the last {max_age_days:g} days "
        f"(looked in the records {_where(records_root)} and the deployment history of the "
        "non-production targets of the targets file)"
        + ("; nearest: " + "; ".join(misses[:3]) if misses else "")
        + ". Deploy these files to staging first, or pass -p promotion_override \"<reason>\" (recorded)")
    return decision


def _where(records_root) -> str:
    location = storage.location(records_root)
    return f"at {location}" if location.remote else f"folder {Path(records_root).resolve()}"


def _evidence_in_histories(targets_file, digests: dict[str, str], oldest: datetime, misses: list[str]) -> list[Evidence]:
    found = []
    for candidate in non_production_targets(targets_file):
        try:
            found += evidence_in_history(candidate, digests, oldest)
        except psycopg2.Error as exc:
            misses.append(f"{candidate.kind} {candidate.name!r}: history not readable "
                          f"({' '.join(str(exc).split())[:120]})")
    return sorted(found, key=lambda e: e.finished_at, reverse=True)


# -- in the preflight and the record -------------------------------------------------------------

def check(target: connection.Target, record_dir: Path, *, override: str | None = None,
          max_age_days: float | None = None, now: datetime | None = None) -> Check:
    """The preflight's promotion step: decides (records beside this run's folder, the targets
    file's histories) and writes the decision into the run's record."""
    record_dir = Path(record_dir)
    decision = decide(target, storage.home_of(record_dir), override=override, max_age_days=max_age_days, now=now)
    write(record_dir, decision)
    rows = [{"phase file": name, "sha256": digest} for name, digest in decision.phase_files.items()]
    if not target.production:
        return Check("promotion", "info", "not production: a passed deployment of these files here is the "
                     "evidence a production deployment needs", rows=rows)
    if decision.evidence:
        return Check("promotion", "ok", "proven on a non-production target: " + decision.evidence.describe(), rows=rows)
    if decision.override:
        return Check("promotion", "warning", f"no staging evidence; going on by override: {decision.override!r}"
                     + (" (nearest: " + "; ".join(decision.near_misses[:3]) + ")" if decision.near_misses else ""),
                     rows=rows)
    return Check("promotion", "error", decision.problem, rows=rows)


def write(record_dir: Path, decision: Decision) -> None:
    records.write_text(Path(record_dir) / PROMOTION_FILE, json.dumps(decision.as_dict(), indent=2) + "\n")


def read(record_dir: Path) -> dict | None:
    """The decision a run's preflight wrote (None: no preflight, or an older run)."""
    path = Path(record_dir) / PROMOTION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# -- where each target stands --------------------------------------------------------------------

def applied_digests(target: connection.Target) -> dict[str, str | None]:
    """Per phase file, the sha256 the target's history says is applied (None: not applied)."""
    conn = connection.connect(target, application_name="runbook status", readonly=True, autocommit=True)
    try:
        applied = engine.latest_applied(engine.read_history(conn))
    finally:
        conn.close()
    return {path.name: (applied.get(version) or {}).get("sha256") for version, path in PHASES}
