"""The rollback notebook's steps, over `restore` (which holds the strategy, see its docstring).

Given the run whose preflight backup to restore: find its backup through its record, check it
again (sha256, table of contents, a full read), dump the current state first (so this rollback
can itself be undone), show the restore plan before anything changes, restore in one
transaction, then prove the result: a fresh snapshot compared with that run's preflight
``snapshot.json`` must be identical (schema fingerprint, row counts, content checksums).

The runner holds the database's run lock for the whole plan; this module does not take it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import backup as backup_module
from . import engine, preflight, records, restore, snapshot
from .checks import Check
from .notebook import Run, details, sql_block
from .paths import PROJECT_ROOT


class RollbackError(RuntimeError):
    """A step could not run because an earlier one did not succeed."""


@dataclass
class Rollback:
    run: Run
    rollback_run_id: str
    rollback_record_dir: str | Path | None = None
    folder: Path | None = None
    info: backup_module.BackupInfo | None = None
    manifest: dict | None = None
    pre_snapshot: dict | None = None
    plan: restore.RestorePlan | None = None
    result: restore.RestoreResult | None = None
    history_before: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.rollback_run_id:
            raise RollbackError("rollback_run_id is required: the run whose preflight backup to restore")
        self.folder = Path(self.rollback_record_dir) if self.rollback_record_dir else (
            PROJECT_ROOT / "records" / self.rollback_run_id)

    # -- 1. find the backup ----------------------------------------------------------------------
    def locate(self) -> Check:
        """The run's record: its backup.json, its snapshot.json and (when sealed) its manifest agree."""
        title = f"the backup of run {self.rollback_run_id}"
        rows = [{"fact": "record folder", "value": str(self.folder)}]
        if not self.folder.is_dir():
            return Check("locate_backup", "error", f"no record folder {self.folder}", title=title, rows=rows)
        info_path = self.folder / preflight.BACKUP_DIR / backup_module.INFO_FILE
        if not info_path.is_file():
            return Check("locate_backup", "error", f"run {self.rollback_run_id} has no backup in its record "
                         f"({info_path.relative_to(self.folder)} missing): its preflight did not finish one",
                         title=title, rows=rows)
        self.info = backup_module.BackupInfo.load(info_path)
        dump = info_path.parent / self.info.file_name
        problems = []
        if self.info.run_id != self.rollback_run_id:
            problems.append(f"backup.json names run {self.info.run_id}, not {self.rollback_run_id}")
        manifest_path = self.folder / records.MANIFEST
        if manifest_path.is_file():
            self.manifest = json.loads(manifest_path.read_text())
            recorded = (self.manifest.get("backup") or {})
            if self.manifest.get("run_id") != self.rollback_run_id:
                problems.append(f"the manifest is of run {self.manifest.get('run_id')}")
            if recorded.get("sha256") and recorded["sha256"] != self.info.sha256:
                problems.append(f"the manifest records sha256 {recorded['sha256'][:16]}…, backup.json "
                                f"{self.info.sha256[:16]}…")
            altered = [p for p in records.Record(self.folder.parent, self.folder.name).verify()
                       if preflight.BACKUP_DIR + "/" in p or preflight.SNAPSHOT_FILE in p or records.MANIFEST in p]
            problems += [f"record: {p}" for p in altered]
        snap_path = self.folder / preflight.SNAPSHOT_FILE
        if snap_path.is_file():
            self.pre_snapshot = snapshot.load_snapshot(snap_path)
        else:
            problems.append(f"no {preflight.SNAPSHOT_FILE}: the result could not be proven")
        if self.info.database != self.run.facts["database"]:
            problems.append(f"the backup is of database {self.info.database!r}, this is {self.run.facts['database']!r}")
        rows += [
            {"fact": "backup", "value": f"{preflight.BACKUP_DIR}/{self.info.file_name}"},
            {"fact": "sha256 (recorded)", "value": self.info.sha256},
            {"fact": "size", "value": f"{self.info.size_bytes} bytes ({preflight._human_bytes(self.info.size_bytes)})"},
            {"fact": "taken at (server clock)", "value": self.info.taken_at},
            {"fact": "of database", "value": f"{self.info.database} (PostgreSQL {self.info.server_version})"},
            {"fact": "pg_dump", "value": self.info.pg_dump.get("version")},
            {"fact": "manifest", "value": f"verdict {self.manifest.get('verdict')}, command {self.manifest.get('command')}"
             if self.manifest else "none (the run's record was not sealed): backup.json alone"},
            {"fact": "snapshot", "value": f"taken {self.pre_snapshot.get('taken_at')}, fingerprint "
             f"{self.pre_snapshot['fingerprint'][:16]}…, {len(self.pre_snapshot['row_counts'])} tables"
             if self.pre_snapshot else "missing"},
        ]
        if not dump.is_file():
            problems.append(f"the dump {dump.name} is missing")
        if problems:
            return Check("locate_backup", "error", "; ".join(problems), title=title, rows=rows,
                         columns=["fact", "value"])
        return Check("locate_backup", "ok", f"{self.info.file_name}, taken {self.info.taken_at}, with its snapshot",
                     title=title, rows=rows, columns=["fact", "value"])

    @property
    def backup_path(self) -> Path:
        if self.info is None:
            raise RollbackError("locate the backup first")
        return self.folder / preflight.BACKUP_DIR / self.info.file_name

    # -- 2. check it again -----------------------------------------------------------------------
    def verify_backup(self) -> Check:
        """sha256 against the record, pg_restore --list, and a full read of every data block."""
        title = "the backup, checked again"
        try:
            v = backup_module.verify_backup(self.backup_path, self.info.sha256, full=True,
                                            server_major=self.run.facts["server_version_num"] // 10000)
        except (backup_module.BackupError, RollbackError) as exc:
            return Check("verify_backup", "error", f"refused: {exc}", title=title)
        rows = [{"check": "sha256 matches the record", "result": v.sha256},
                {"check": "size", "result": f"{v.size_bytes} bytes"},
                {"check": "pg_restore --list", "result": f"{v.toc_entries} entries: "
                 + ", ".join(f"{n} {t}" for t, n in v.toc_summary.items())},
                {"check": "full read (every data block decompresses)", "result": "ok" if v.full_read else "skipped"},
                {"check": "pg_restore", "result": f"{v.pg_restore['version']} ({v.pg_restore['origin']})"}]
        return Check("verify_backup", "ok", f"sha256 matches, {v.toc_entries} archive entries readable, every data "
                     "block reads", title=title, rows=rows, columns=["check", "result"])

    def show_verify_command(self) -> None:
        path = self.backup_path if self.info else "<backup>"
        preflight.show_command(f"sha256sum {path}    # must equal {self.info.sha256 if self.info else 'the recorded sha256'}\n"
                               f"pg_restore --list {path}\npg_restore --file /dev/null {path}",
                               "what this step runs")

    # -- 3. a safety backup of what is there now ---------------------------------------------------
    def safety_backup(self, take: bool = True) -> Check:
        """Dump the current state (and snapshot it) into THIS run's record: the rollback can be undone."""
        if not take:
            return Check("safety_backup", "warning", "skipped (safety_backup=False): what the rollback replaces is "
                         "not kept anywhere", title="a backup of the current state")
        with preflight.one_moment(self.run) as moment:
            check = preflight.backup(self.run.conn, self.run.target, self.run.record_dir, self.run.run_id,
                                     snapshot=moment)
            check.name, check.title = "safety_backup", "a backup of the current state, before it is replaced"
            if check.status == "error":
                return check
            snap = preflight.snapshot(self.run.conn, self.run.record_dir, moment=moment)
        check.summary += (f"; snapshot kept ({snap.summary.split(';')[0]}). To undo this rollback: runbook rollback "
                          f"--run {self.run.run_id}")
        return check

    # -- 4. the plan ---------------------------------------------------------------------------------
    def make_plan(self, lock_timeout: str = "30s") -> Check:
        """What the restore will drop, re-create and keep; checked and refused before anything changes."""
        title = "the restore plan"
        try:
            engine_history = self._history()
            self.history_before = engine_history
            self.plan = restore.plan_restore(self.run.target, self.backup_path, self.info.sha256,
                                             run_id=self.run.run_id, operator=self.run.operator,
                                             restored_to=self.info.taken_at, lock_timeout=lock_timeout)
        except (restore.RestoreError, RollbackError) as exc:
            return Check("restore_plan", "error", f"refused, nothing was changed: {exc}", title=title)
        d = self.plan.describe()
        created_public = "public" in d["restored_schemas"] and "public" not in d["kept_schemas"]
        rows = [
            {"step": "empty, keeping the schema (its owner, privileges, other roles' default privileges)",
             "what": ", ".join(d["kept_schemas"]) or "none"},
            {"step": "drop (with everything in them, whoever created it)", "what": ", ".join(d["dropped_schemas"]) or "none"},
            {"step": "of those, created again from the backup (their own owner, comment or privileges changed)",
             "what": ", ".join(d["replaced_schemas"]) or "none"},
            {"step": "create public as initdb leaves it", "what": "yes" if created_public else "no"},
            {"step": "default privileges reset, then restored from the archive (the roles that create objects here)",
             "what": ", ".join(d["default_privileges_reset"])},
            {"step": "compared with the backup, unchanged, left as they are", "what": "; ".join(d["kept_as_they_are"]) or "none"},
            {"step": "restore from the archive", "what": f"{d['archive_entries_restored']} entries into "
             + ", ".join(d["restored_schemas"]) + ": " + ", ".join(f"{n} {t}" for t, n in d["archive_entries_by_type"].items())},
            {"step": "extensions re-created", "what": ", ".join(d["extensions_recreated"]) or "none"},
            {"step": "objects outside them, restored from the backup", "what": "; ".join(d["outside_objects_restored"]) or "none"},
            {"step": "objects outside them, created after the backup: dropped", "what": "; ".join(d["outside_objects_dropped"]) or "none"},
            {"step": "routines outside them, dropped since the backup: re-created",
             "what": "; ".join(d["outside_objects_recreated"]) or "none"},
            {"step": f"kept: {engine.HISTORY_TABLE}", "what": f"{d['history_rows_kept']} rows, plus one rollback row"},
            {"step": "never touched", "what": "roles, database settings, and the Supabase platform schemas (auth, "
             "storage, ...) beyond the objects outside listed above"},
            {"step": "restored to", "what": f"{d['restored_to']} (when the backup was taken)"},
            {"step": "how", "what": f"one transaction: psql {d['psql']['version']} --single-transaction "
             f"-v ON_ERROR_STOP=1 fed by pg_restore {d['pg_restore']['version']} -L <list>; lock_timeout {lock_timeout}"},
        ]
        rows += [{"step": "warning", "what": w} for w in d["warnings"]]
        return Check("restore_plan", "warning" if d["warnings"] else "ok",
                     f"empty {', '.join(d['kept_schemas']) or 'nothing'}; drop {', '.join(d['dropped_schemas']) or 'nothing'}; "
                     f"restore {d['archive_entries_restored']} "
                     f"archive entries; keep {d['history_rows_kept']} history rows", title=title, rows=rows,
                     columns=["step", "what"])

    def show_plan_sql(self) -> None:
        """The SQL the restore wraps around pg_restore's output, and the archive entries it restores."""
        if self.plan is None:
            raise RollbackError("no plan: the planning step did not succeed")
        sql_block(self.plan.prelude_sql, "before the archive (same transaction)")
        sql_block(self.plan.postlude_sql, "after the archive (same transaction)")
        details(f"the {len(self.plan.entries)} archive entries restored (pg_restore -L)",
                "\n".join(e.line for e in self.plan.entries))

    # -- 5. restore ----------------------------------------------------------------------------------
    def execute(self) -> Check:
        title = "the restore"
        if self.plan is None:
            return Check("restore", "error", "no plan: the planning step did not succeed", title=title)
        try:
            self.result = restore.execute_plan(self.plan, self.run.target)
        except restore.RestoreFailed as exc:
            return Check("restore", "error", f"{exc}", title=title)
        except restore.RestoreError as exc:
            return Check("restore", "error", f"{exc}", title=title)
        r = self.result
        rows = [{"fact": "archive entries restored", "value": r.archive_entries_restored},
                {"fact": "schemas emptied (kept)", "value": ", ".join(r.kept_schemas)},
                {"fact": "schemas dropped", "value": ", ".join(r.dropped_schemas)},
                {"fact": "schemas restored", "value": ", ".join(r.restored_schemas)},
                {"fact": "history rows kept", "value": r.history_rows_kept},
                {"fact": "rollback recorded", "value": f"{r.rollback_row['version']} by {r.rollback_row['applied_by']}, "
                 f"run {r.rollback_row['run_id']}, restored_to {r.rollback_row['restored_to']}"},
                {"fact": "seconds", "value": r.seconds}]
        return Check("restore", "ok", f"restored {r.archive_entries_restored} archive entries in one transaction "
                     f"({r.seconds:.1f}s); {r.history_rows_kept} history rows kept, the rollback recorded",
                     title=title, rows=rows, columns=["fact", "value"])

    # -- 6. prove it ---------------------------------------------------------------------------------
    def prove(self) -> Check:
        """A fresh snapshot against the run's preflight snapshot: everything must be identical."""
        title = "the database equals the pre-deployment snapshot"
        if self.pre_snapshot is None:
            return Check("rollback_proof", "error", "no preflight snapshot to prove against", title=title)
        if self.result is None:
            return Check("rollback_proof", "error", "the restore did not run", title=title)
        after = snapshot.take_snapshot(self.run.conn, checksum_row_limit=self.pre_snapshot.get("checksum_row_limit",
                                                                                               1_000_000))
        snapshot.save_snapshot(after, Path(self.run.record_dir) / "snapshot-after-rollback.json")
        comparison = snapshot.compare_snapshots(self.pre_snapshot, after)
        before_parts, after_parts = self.pre_snapshot["fingerprint_parts"], after["fingerprint_parts"]
        rows = [{"what": "schema fingerprint", "snapshot": self.pre_snapshot["fingerprint"][:16],
                 "now": after["fingerprint"][:16], "same": _yes(comparison.fingerprint_equal)}]
        rows += [{"what": f"  {kind}", "snapshot": (before_parts.get(kind) or "")[:16],
                  "now": (after_parts.get(kind) or "")[:16], "same": _yes(before_parts.get(kind) == after_parts.get(kind))}
                 for kind in sorted(set(before_parts) | set(after_parts))]
        rows += [{"what": f"rows {r.table}", "snapshot": r.before, "now": r.after, "same": _yes(r.status == "same")}
                 for r in comparison.counts]
        for t in sorted(set(self.pre_snapshot["content"]) | set(after["content"])):
            b, a = self.pre_snapshot["content"].get(t), after["content"].get(t)
            rows.append({"what": f"content {t}", "snapshot": (b or "")[:16], "now": (a or "")[:16], "same": _yes(a == b)})
        self.comparison = comparison
        if comparison.identical:
            unverified = f" ({len(comparison.content_unverified)} tables too large to checksum)" \
                if comparison.content_unverified else ""
            return Check("rollback_proof", "ok", f"identical: fingerprint, {len(comparison.counts)} row counts and "
                         f"{len(self.pre_snapshot['content'])} content checksums match the snapshot of run "
                         f"{self.rollback_run_id}{unverified}", title=title, rows=rows,
                         columns=["what", "snapshot", "now", "same"])
        self.show_differences()
        return Check("rollback_proof", "error", "NOT identical to the snapshot: " + "; ".join(comparison.problems()),
                     title=title, rows=rows, columns=["what", "snapshot", "now", "same"])

    def show_differences(self) -> None:
        """Every differing catalog line, when the proof failed (nothing to show when identical)."""
        comparison = getattr(self, "comparison", None)
        if comparison is None or comparison.identical:
            print("no differences")
            return
        text = "\n".join(f"{kind} {change}: {line}" for kind, diff in sorted(comparison.differences.items())
                         for change in ("added", "removed") for line in diff[change])
        details("catalog differences", text or "none in the catalog")

    # -- 7. the history ------------------------------------------------------------------------------
    def _history(self) -> list[dict]:
        return engine.read_history(self.run.conn)

    def history(self) -> Check:
        """The deployment history after the rollback: every row kept, one rollback row added, phases undone."""
        rows = self._history()
        shown = [{"version": r["version"], "action": r["action"], "file": r["file_name"], "sha256": r["sha256"][:16],
                  "applied_at": r["applied_at"], "by": r["applied_by"], "run": r["run_id"],
                  "restored_to": r["restored_to"] or ""} for r in rows]
        kept = {r["id"] for r in self.history_before}
        now = {r["id"] for r in rows}
        mine = [r for r in rows if r["action"] == "rollback" and r["run_id"] == self.run.run_id]
        problems = []
        if not kept <= now:
            problems.append(f"{len(kept - now)} history row(s) missing")
        if len(mine) != 1:
            problems.append(f"{len(mine)} rollback rows of this run (expected 1)")
        effective = engine.latest_applied(rows)
        undone = [r for r in self.history_before if r["action"] != "rollback" and r["run_id"] == self.rollback_run_id
                  and effective.get(r["version"], {}).get("id") == r["id"]]
        if undone:
            problems.append("the history still counts phases of run " + self.rollback_run_id + " as applied: "
                            + ", ".join(r["version"] for r in undone))
        title = "the deployment history, after the rollback"
        columns = ["version", "action", "file", "sha256", "applied_at", "by", "run", "restored_to"]
        if problems:
            return Check("history", "error", "; ".join(problems), title=title, rows=shown, columns=columns)
        applied = ", ".join(sorted(effective)) or "none"
        return Check("history", "ok", f"{len(kept)} rows kept, the rollback recorded; phases in effect now: {applied}",
                     title=title, rows=shown, columns=columns)


def _yes(value: bool) -> str:
    return "yes" if value else "NO"

