"""The rollback notebook's steps, over `restore` (which holds the strategy, see its docstring).

Given the run whose preflight backup to restore: find its backup through its record, check it
again (sha256, table of contents, a full read), dump the current state first (so this rollback
can itself be undone), show the restore plan before anything changes, restore in one
transaction, then prove the result: a fresh snapshot compared with that run's preflight
``snapshot.json`` must be identical (schema fingerprint, row counts, content checksums) in what
the rollback restores -- the app schemas; rows that changed elsewhere (a user signing up in
``auth``) are reported apart, as facts, never failures.

Before anything changes, the writes made since the deployment are counted (`later_writes`:
per table, rows inserted, updated and deleted since the state the deployment's verification
recorded); when there are any, the rollback keeps them in its record as ``later_writes.sql`` (to
re-apply) and refuses unless ``discard_later_writes`` is set (`runbook rollback -p
discard_later_writes true`; without it, exit 2 from the command line, before the notebook runs).

Before anything changes, the target must be the database the backup was taken from (its
identity, see `identity`), and the backup must match the database's own witness of it
(``truthsource.deployment_runs``). A record that was never sealed (its runner was killed before
it wrote ``manifest.json``) is accepted when that witness vouches for its backup, loudly.
`examine_source` does these checks for the command line (a refusal is exit 2) and `locate` for
the notebook.

The runner holds the database's run lock for the whole plan; this module does not take it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2

from . import backup as backup_module
from . import catalog_changes, connection, engine, identity, later_writes, preflight, records, restore, snapshot
from .checks import Check, human_bytes
from .notebook import Run, details, sql_block
from .paths import PROJECT_ROOT


class RollbackError(RuntimeError):
    """A step could not run because an earlier one did not succeed."""


class RollbackRefused(RollbackError):
    """The run's backup cannot be restored into this target; nothing was changed."""


UNSEALED = ("UNSEALED RECORD: run {run} never wrote its manifest.json (its runner died, or it was stepped through by "
            "hand): its backup is vouched for by backup.json and the database's own witness of it")

LATER_WRITES_REFUSED = ("refused, nothing was changed: {what} since the deployment of run {run} (against the state "
                        "its verification recorded at {since}) would be lost by this rollback: {tables}. To roll back "
                        "anyway, set discard_later_writes (runbook rollback ... -p discard_later_writes true); the "
                        "rollback keeps those rows in its record as " + later_writes.SQL_FILE + ", to re-apply")

NO_WITNESS = ("the database holds no witness of run {run}'s backup (taken before the runbooks wrote one): its sealed "
              "manifest alone vouches for it")


def identity_problem(info: backup_module.BackupInfo, now: identity.Identity, target_name: str) -> str | None:
    """Why the target is not the database the backup was taken from (None: it is), naming both."""
    if not info.identity:
        return (f"the backup of run {info.run_id} records no identity of its database (taken by an older version of "
                f"the runbooks): nothing proves that target {target_name!r} is the database it was taken from")
    then = identity.Identity.from_dict(info.identity)
    differences = then.differences(now)
    if not differences:
        return None
    where = info.target or {}
    source = f"{where.get('kind', '?')} {where.get('name', '?')}" + (
        f" ({where['host']}:{where.get('port', '')})" if where.get("host") else "")
    return (f"refused: target {target_name!r} is not the database the backup of run {info.run_id} was taken from. "
            f"The backup is of {then.describe()}, taken through {source}; the target is {now.describe()}. They "
            f"differ in: {'; '.join(differences)}. Nothing was changed")


def witness_problem(witness: dict | None, sha256: str, run_id: str, sealed: bool) -> str | None:
    """The backup's sha256 against the database's witness of it; an unsealed record needs one."""
    if witness is None:
        if sealed:
            return None
        return (f"run {run_id} has no manifest.json (unsealed) and the database holds no witness of its backup "
                f"({identity.RUNS_TABLE}): nothing vouches for backup.json. Nothing was changed")
    if witness["backup_sha256"] != sha256:
        return (f"the backup of run {run_id} does not match the database's witness of it: {identity.RUNS_TABLE} "
                f"says {witness['backup_file']} had sha256 {witness['backup_sha256']}, the record has "
                f"{sha256}. It was altered or replaced: do not restore it. Nothing was changed")
    return None


@dataclass
class Source:
    """A run's record as a rollback finds it, checked before anything changes."""

    folder: Path
    info: backup_module.BackupInfo
    sealed: bool
    warnings: list[str]

    @property
    def manifest_extra(self) -> dict:
        return {"rolls_back": self.info.run_id, "rolls_back_unsealed": not self.sealed,
                **({"warnings": self.warnings} if self.warnings else {})}


def _what_would_be_lost(writes: later_writes.LaterWrites) -> str:
    return f"{writes.total} row(s) written" if writes.total else "tables created or dropped"


def examine_source(target: connection.Target, records_root, run_id: str, discard_later_writes: bool = False) -> Source:
    """What `runbook rollback` checks before it runs anything: the record has a backup and a
    snapshot, the backup file's sha256 matches backup.json and the database's witness, the
    target is the database it was taken from, and no write since the deployment would be lost
    unless `discard_later_writes`. RollbackRefused (exit 2) otherwise."""
    folder = Path(records_root) / records.check_run_id(run_id)
    if not folder.is_dir():
        raise RollbackRefused(f"no record {run_id} in {Path(records_root).resolve()}")
    info_path = folder / records.BACKUP_DIR / backup_module.INFO_FILE
    if not info_path.is_file() or not (folder / records.SNAPSHOT_FILE).is_file():
        raise RollbackRefused(f"run {run_id} has no preflight backup and snapshot in its record: only a run whose "
                              "preflight took them can be rolled back to")
    info = backup_module.BackupInfo.load(info_path)
    sealed = (folder / records.MANIFEST).is_file()
    dump = info_path.parent / info.file_name
    if not dump.is_file():
        raise RollbackRefused(f"the backup {dump} of run {run_id} is missing")
    actual = records.sha256_of(dump)
    if actual != info.sha256:
        raise RollbackRefused(f"the backup {dump.name} does not match its recorded sha256 (backup.json says "
                              f"{info.sha256}, the file is {actual}): do not restore it. Nothing was changed")
    try:
        conn = connection.connect(target, application_name=f"runbook rollback check {run_id}"[:63], readonly=True,
                                  autocommit=True)
    except psycopg2.Error as exc:
        raise RollbackRefused(f"cannot connect to {target.name!r}: {backup_module.redact(str(exc).strip())}") from None
    try:
        now, witness = identity.read_identity(conn), identity.run_witness(conn, run_id)
        problem = identity_problem(info, now, target.name) or witness_problem(witness, actual, run_id, sealed)
        state = folder / later_writes.ROW_STATE_FILE
        if not problem and not discard_later_writes and state.is_file():
            writes = later_writes.compare(conn, later_writes.load_row_state(state))
            if writes.any:
                problem = LATER_WRITES_REFUSED.format(what=_what_would_be_lost(writes), run=run_id,
                                                      since=writes.since, tables=writes.describe())
    finally:
        conn.close()
    if problem:
        raise RollbackRefused(problem)
    warnings = [] if sealed else [UNSEALED.format(run=run_id)]
    if witness is None:
        warnings.append(NO_WITNESS.format(run=run_id))
    return Source(folder, info, sealed, warnings)


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
    warnings: list[str] = field(default_factory=list)          # the source record's, shown loudly
    outside_changes: list[tuple] = field(default_factory=list)  # (table, rows then, rows now) not restored

    def __post_init__(self):
        if not self.rollback_run_id:
            raise RollbackError("rollback_run_id is required: the run whose preflight backup to restore")
        self.folder = Path(self.rollback_record_dir) if self.rollback_record_dir else (
            PROJECT_ROOT / "records" / self.rollback_run_id)

    # -- 1. find the backup ----------------------------------------------------------------------
    def locate(self) -> Check:
        """The run's record: its backup.json, its snapshot.json and (when sealed) its manifest agree. The
        backup it restores goes to this rollback's record (its header card names it beside the safety dump)."""
        check = self._locate()
        if self.info is not None:
            check.facts = {"restored_backup": {
                "run_id": self.rollback_run_id, "file": f"{records.BACKUP_DIR}/{self.info.file_name}",
                "sha256": self.info.sha256, "bytes": self.info.size_bytes, "taken_at": self.info.taken_at,
                "record": str(self.folder.resolve())}}
        return check

    def _locate(self) -> Check:
        title = f"the backup of run {self.rollback_run_id}"
        rows = [{"fact": "record folder", "value": str(self.folder)}]
        if not self.folder.is_dir():
            return Check("locate_backup", "error", f"no record folder {self.folder}", title=title, rows=rows)
        info_path = self.folder / records.BACKUP_DIR / backup_module.INFO_FILE
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
                       if records.BACKUP_DIR + "/" in p or records.SNAPSHOT_FILE in p or records.MANIFEST in p]
            problems += [f"record: {p}" for p in altered]
        snap_path = self.folder / records.SNAPSHOT_FILE
        if snap_path.is_file():
            self.pre_snapshot = snapshot.load_snapshot(snap_path)
        else:
            problems.append(f"no {records.SNAPSHOT_FILE}: the result could not be proven")
        # the target must be the very database the backup was taken from, and agree with its witness
        now = identity.read_identity(self.run.conn)
        witness = identity.run_witness(self.run.conn, self.rollback_run_id)
        sealed = self.manifest is not None
        problems += [p for p in (identity_problem(self.info, now, self.run.target.name),
                                 witness_problem(witness, self.info.sha256, self.rollback_run_id, sealed)) if p]
        self.warnings = [] if sealed else [UNSEALED.format(run=self.rollback_run_id)]
        if witness is None and sealed:
            self.warnings.append(NO_WITNESS.format(run=self.rollback_run_id))
        rows += [
            {"fact": "backup", "value": f"{records.BACKUP_DIR}/{self.info.file_name}"},
            {"fact": "sha256 (recorded)", "value": self.info.sha256},
            {"fact": "size", "value": f"{self.info.size_bytes} bytes ({human_bytes(self.info.size_bytes)})"},
            {"fact": "taken at (server clock)", "value": self.info.taken_at},
            {"fact": "of database", "value": f"{self.info.database} (PostgreSQL {self.info.server_version})"},
            {"fact": "pg_dump", "value": self.info.pg_dump.get("version")},
            {"fact": "manifest", "value": f"verdict {self.manifest.get('verdict')}, command {self.manifest.get('command')}"
             if self.manifest else "NONE: the record was never sealed (its runner died, or it was stepped through by "
             "hand)"},
            {"fact": "the database's witness", "value": f"{identity.RUNS_TABLE}: {witness['backup_file']}, sha256 "
             f"{witness['backup_sha256'][:16]}…, recorded {witness['recorded_at']}" if witness else "none"},
            {"fact": "target identity", "value": now.describe()},
            {"fact": "backup's identity", "value": identity.Identity.from_dict(self.info.identity).describe()
             if self.info.identity else "not recorded"},
            {"fact": "snapshot", "value": f"taken {self.pre_snapshot.get('taken_at')}, fingerprint "
             f"{self.pre_snapshot['fingerprint'][:16]}…, {len(self.pre_snapshot['row_counts'])} tables"
             if self.pre_snapshot else "missing"},
        ]
        if not dump.is_file():
            problems.append(f"the dump {dump.name} is missing")
        if problems:
            return Check("locate_backup", "error", "; ".join(problems), title=title, rows=rows,
                         columns=["fact", "value"])
        rows += [{"fact": "WARNING", "value": w} for w in self.warnings]
        found = f"{self.info.file_name}, taken {self.info.taken_at} of this very database, with its snapshot"
        if self.warnings:
            return Check("locate_backup", "warning", "; ".join(self.warnings) + f". Found {found}", title=title,
                         rows=rows, columns=["fact", "value"])
        return Check("locate_backup", "ok", found, title=title, rows=rows, columns=["fact", "value"])

    @property
    def backup_path(self) -> Path:
        if self.info is None:
            raise RollbackError("locate the backup first")
        return self.folder / records.BACKUP_DIR / self.info.file_name

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

    # -- 2b. what the rollback would discard ------------------------------------------------------------
    def later_writes(self, discard: bool = False) -> Check:
        """Rows written since the deployment (against the state its verification recorded), per table;
        kept in this run's record as a script to re-apply; refused unless `discard`."""
        title = "writes since the deployment, which the rollback discards"
        path = self.folder / later_writes.ROW_STATE_FILE
        if not path.is_file():
            return Check("later_writes", "warning", f"run {self.rollback_run_id}'s record holds no post-deployment "
                         f"state ({path.name}: its verification did not run): writes made since its deployment "
                         "cannot be told apart from the deployment's own changes. The safety backup keeps the current "
                         "state whole", title=title)
        writes = later_writes.compare(self.run.conn, later_writes.load_row_state(path))
        rows = [{"table": t.table, "inserted": len(t.inserted), "updated": len(t.updated), "deleted": len(t.deleted),
                 "note": t.note} for t in writes.tables if t.total or t.note]
        columns = ["table", "inserted", "updated", "deleted", "note"]
        if not writes.any:
            return Check("later_writes", "ok", f"none: every app table is as the verification recorded it at "
                         f"{writes.since}", title=title)
        record = Path(self.run.record_dir)
        # app rows as upserts: a data file (records.DATA_FILES), readable by its owner only
        records.write_text(record / later_writes.SQL_FILE,
                           later_writes.later_writes_sql(self.run.conn, writes, self.rollback_run_id))
        records.write_text(record / later_writes.SUMMARY_FILE, json.dumps(writes.as_dict(), indent=1) + "\n")
        if not discard:
            return Check("later_writes", "error", LATER_WRITES_REFUSED.format(
                what=_what_would_be_lost(writes), run=self.rollback_run_id, since=writes.since,
                tables=writes.describe()), title=title, rows=rows, columns=columns)
        kept = (record / later_writes.SQL_FILE).resolve()
        check = Check("later_writes", "warning", f"discarding {_what_would_be_lost(writes)} since the deployment "
                      f"(discard_later_writes): {writes.describe()}. Kept in this run's record as {kept}: re-apply "
                      f"with psql -X -v ON_ERROR_STOP=1 -f {kept}", title=title, rows=rows, columns=columns)
        check.facts = {"discarded": {"rows": writes.total, "tables": writes.describe(), "file": later_writes.SQL_FILE}}
        return check

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
        # the database's witness of this backup too: `runbook rollback --run <this run>` checks it
        witnessed = preflight.witness_backup(self.run.conn, self.run.target, self.run.record_dir, self.run.run_id,
                                             self.run.operator, step="05_rollback")
        check.rows = check.rows + [{"fact": "witness", "value": witnessed.summary}]
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
            {"step": "how", "what": f"one transaction (BEGIN ... COMMIT in the script: input cut short is rolled "
             f"back): psql {d['psql']['version']} -v ON_ERROR_STOP=1 fed by pg_restore {d['pg_restore']['version']} "
             f"-L <list>; lock_timeout {lock_timeout}"},
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
        """A fresh snapshot against the run's preflight snapshot: what the rollback restores (the app
        schemas: catalog, row counts, contents) must be identical; row counts elsewhere (the platform
        schemas it leaves alone, where users keep signing up) are reported as facts."""
        title = "the database equals the pre-deployment snapshot"
        if self.pre_snapshot is None:
            return Check("rollback_proof", "error", "no preflight snapshot to prove against", title=title)
        if self.result is None:
            return Check("rollback_proof", "error", "the restore did not run", title=title)
        after = snapshot.take_snapshot(self.run.conn, checksum_row_limit=self.pre_snapshot.get("checksum_row_limit",
                                                                                               1_000_000))
        snapshot.save_snapshot(after, Path(self.run.record_dir) / "snapshot-after-rollback.json")
        (before, before_outside), (now, now_outside) = _split_restored(self.pre_snapshot), _split_restored(after)
        comparison = snapshot.compare_snapshots(before, now)
        outside = [(t, before_outside.get(t), now_outside.get(t)) for t in sorted(set(before_outside) | set(now_outside))]
        self.outside_changes = [(t, b, a) for t, b, a in outside if b != a]
        before_parts, after_parts = before["fingerprint_parts"], now["fingerprint_parts"]
        rows = [{"what": "schema fingerprint", "snapshot": before["fingerprint"][:16],
                 "now": now["fingerprint"][:16], "same": _yes(comparison.fingerprint_equal)}]
        rows += [{"what": f"  {kind}", "snapshot": (before_parts.get(kind) or "")[:16],
                  "now": (after_parts.get(kind) or "")[:16], "same": _yes(before_parts.get(kind) == after_parts.get(kind))}
                 for kind in sorted(set(before_parts) | set(after_parts))]
        rows += [{"what": f"rows {r.table}", "snapshot": r.before, "now": r.after, "same": _yes(r.status == "same")}
                 for r in comparison.counts]
        for t in sorted(set(before["content"]) | set(now["content"])):
            b, a = before["content"].get(t), now["content"].get(t)
            rows.append({"what": f"content {t}", "snapshot": (b or "")[:16], "now": (a or "")[:16], "same": _yes(a == b)})
        rows += [{"what": f"rows {t} (not restored)", "snapshot": b, "now": a,
                  "same": "yes" if b == a else "changed: a fact, not a failure"} for t, b, a in outside]
        self.comparison = comparison
        facts = ""
        if self.outside_changes:
            facts = ("; outside what the rollback restores, changed since the snapshot (reported, not restored, not a "
                     "failure): " + ", ".join(_count_change(t, b, a) for t, b, a in self.outside_changes))
        columns = ["what", "snapshot", "now", "same"]
        if comparison.identical:
            unverified = f" ({len(comparison.content_unverified)} tables too large to checksum)" \
                if comparison.content_unverified else ""
            return Check("rollback_proof", "ok", f"identical in what the rollback restores ({', '.join(before['app_schemas'])}): "
                         f"fingerprint, {len(comparison.counts)} row counts and {len(before['content'])} content "
                         f"checksums match the snapshot of run {self.rollback_run_id}{unverified}{facts}",
                         title=title, rows=rows, columns=columns)
        self.show_differences()
        return Check("rollback_proof", "error", "NOT identical to the snapshot: " + "; ".join(comparison.problems())
                     + facts, title=title, rows=rows, columns=columns)

    def show_differences(self) -> None:
        """Every differing catalog line, when the proof failed (nothing to show when identical)."""
        comparison = getattr(self, "comparison", None)
        if comparison is None or comparison.identical:
            print("no differences")
            return
        text = "\n".join(f"{row['kind']} {row['change']}: {row['object']}"
                         for row in catalog_changes.change_rows(comparison.differences))
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


def _schema_of_table(key: str) -> str:
    """The schema of a snapshot's table key (``quote_ident(schema) || '.' || quote_ident(table)``)."""
    if not key.startswith('"'):
        return key.split(".", 1)[0]
    end = 1
    while True:
        end = key.index('"', end)
        if key[end + 1:end + 2] != '"':
            return key[1:end].replace('""', '"')
        end += 2


def _split_restored(snap: dict) -> tuple[dict, dict[str, int]]:
    """(the snapshot limited to what a rollback restores, the row counts of the tables outside it).
    The fingerprint and contents cover the app schemas only already; row counts cover every schema."""
    inside = {t: n for t, n in snap["row_counts"].items() if snapshot.is_app_schema(_schema_of_table(t))}
    outside = {t: n for t, n in snap["row_counts"].items() if t not in inside}
    return dict(snap, row_counts=inside), outside


def _count_change(table: str, before: int | None, after: int | None) -> str:
    if before is None:
        return f"{table}: new table ({after} rows)"
    if after is None:
        return f"{table}: table gone (had {before} rows)"
    return f"{table}: {before} -> {after} rows ({after - before:+d})"

