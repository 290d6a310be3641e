"""A phase notebook's steps: the file, its checksum and lint, its statements, the apply,
and what changed in the catalog."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import catalog_changes, engine, estimate, footprint, impact, lint, records, resources, snapshot, watch
from .checks import Check
from .notebook import Run, details, table
from .paths import PHASES


@dataclass
class Phase:
    run: Run
    version: str
    before: dict | None = None
    after: dict | None = None
    result: engine.ApplyResult | None = None
    statements: list = field(default_factory=list)
    measured: dict | None = None     # what the app felt and the WAL and disk used (footprint.py)

    def __post_init__(self):
        paths = dict(PHASES)
        if self.version not in paths:
            raise ValueError(f"unknown phase {self.version!r} (known: {', '.join(paths)})")
        self.path = paths[self.version]
        self.sha256 = records.sha256_of(self.path)
        self.statements = engine.parse_file(self.path)

    def file_check(self) -> Check:
        """The file, its sha256, and what the history says about this phase (the file and its sha256 go
        to the run's record: the phase's card names them)."""
        check = self._file_check()
        check.facts = {"sql_file": f"sql/{self.path.name}", "sql_sha256": self.sha256}
        return check

    def _file_check(self) -> Check:
        history = engine.read_history(self.run.conn)
        previous = engine.latest_applied(history).get(self.version)
        rows = [{"file": f"sql/{self.path.name}", "sha256": self.sha256, "statements": len(self.statements),
                 "outside the transaction": sum(not s.transactional for s in self.statements)}]
        if previous is None:
            return Check("phase_file", "ok", "not applied yet: it will be applied", title=f"phase {self.version} file",
                         rows=rows)
        when = f"{previous['applied_at']:%Y-%m-%d %H:%M %Z} by {previous['applied_by']} (run {previous['run_id']})"
        if previous["sha256"] == self.sha256:
            return Check("phase_file", "info", f"already applied {when}, same sha256: skipped unless reapply=True",
                         title=f"phase {self.version} file", rows=rows)
        return Check("phase_file", "warning",
                     f"applied {when} with sha256 {previous['sha256'][:12]}…, the file changed since: refused unless force=True",
                     title=f"phase {self.version} file", rows=rows)

    def lint_check(self) -> Check:
        return lint.lint_check(self.path, self.run.facts.get("server_version_num", 0) // 10000 or None)

    def show_statements(self) -> None:
        rows = [{"#": s.index, "line": s.line, "in transaction": "yes" if s.transactional else "no (before it)" if s.before_body else "no (after commit)",
                 "statement": s.summary} for s in self.statements]
        from IPython.display import display

        display(table(rows))
        details(f"Full text of sql/{self.path.name} (sha256 {self.sha256})", self.path.read_text())

    def apply(self, *, force: bool = False, reapply: bool = False, lock_timeout: str = "500ms",
              statement_timeout: str = "auto", lock_retries: int = 5, lock_wait: float = 60,
              max_replica_lag: float | None = None) -> engine.ApplyResult:
        """Apply through the engine; raises (stopping the notebook) on any failure. A statement_timeout
        of "auto" grows with the target's data (estimate.statement_timeout). What the app felt and the WAL
        and disk used are measured meanwhile and kept in the record (footprint.py)."""
        if statement_timeout == "auto":
            statement_timeout = estimate.statement_timeout(self.run.conn, self.version)
            print(f"statement_timeout {statement_timeout} (auto: {estimate.TIMEOUT_FACTOR}x this phase's estimate, "
                  f"at least {estimate.TIMEOUT_FLOOR // 60} min)", flush=True)
        def progress(t: engine.Timing) -> None:
            print(f"  [{t.index:>3}/{len(self.statements)}] line {t.line:>4}  {t.seconds:8.3f}s  {t.summary}",
                  flush=True)

        def on_retry(attempt: int, delay: float, reason: str) -> None:
            app_impact.note_retry(attempt, delay, reason)
            print(f"  attempt {attempt}/{lock_retries + 1} rolled back, {reason}; retrying in {delay:.1f}s",
                  flush=True)

        self.before = snapshot.take_snapshot(self.run.conn, checksum_row_limit=0)
        apply_engine = engine.ApplyEngine(self.run.target, run_id=self.run.run_id, operator=self.run.operator,
                                          lock_timeout=lock_timeout, statement_timeout=statement_timeout,
                                          lock_retries=lock_retries, lock_wait=lock_wait, progress=progress,
                                          on_retry=on_retry, max_replica_lag=max_replica_lag)
        run_backends = (apply_engine.application_name,)
        # a line at least every 10 s while the phase runs: long statements and lock waits are not silence
        with watch.Heartbeat(self.run.target, what=f"phase {self.version}", applications=run_backends), \
                impact.ImpactSampler(self.run.target, run_backends) as app_impact, \
                resources.ResourceMeter(self.run.target) as used:
            self.result = apply_engine.apply(self.version, self.path, force=force, reapply=reapply)
        if self.result.status != "skipped":
            self.measured = {"impact": app_impact.summary(), "resources": used.summary(),
                             "seconds": round(self.result.seconds, 3)}
            footprint.write(self.run.record_dir, self.version, self.measured)
        self.after = snapshot.take_snapshot(self.run.conn, checksum_row_limit=0)
        r = self.result
        print(f"phase {self.version}: {r.status}"
              + (f" in {r.seconds:.2f}s, {len(r.timings)} statements, {r.attempts} attempt(s)" if r.status != "skipped" else
                 " (already applied with the same sha256)"))
        return r

    def timings(self):
        """Per-statement timings, slowest first, with what the statements reported."""
        rows = [{"#": t.index, "line": t.line, "seconds": round(t.seconds, 3), "rows": t.rowcount,
                 "statement": t.summary, "notices": " | ".join(n.removeprefix("NOTICE:").strip() for n in t.notices)}
                for t in sorted(self.result.timings, key=lambda t: -t.seconds)] if self.result else []
        return table(rows, columns=["#", "line", "seconds", "rows", "statement", "notices"])

    def footprint(self) -> Check:
        """What the app felt while the phase ran (who waited on the phase's locks, how long, what failed)
        and the WAL, replica lag and disk it used, as the record keeps them."""
        if self.measured is None:
            return Check("footprint", "info", "not measured: the phase did not run (already applied)",
                         title=f"phase {self.version}: what the app felt, and the WAL and disk it used")
        return footprint.check(self.version, self.measured)

    def app_waits(self):
        """Each wait of an app session on the phase's locks, longest first (at most ten)."""
        rows = impact.rows(self.measured["impact"]) if self.measured else []
        return table(rows, columns=["session", "waited", "lock", "held by (run's pid)", "ended", "statement"])

    def changes(self) -> Check:
        """What the phase changed, read back from the catalog: objects added, altered (one row with
        before → after) and removed; grants one row per object and role (catalog_changes)."""
        comparison = snapshot.compare_snapshots(self.before, self.after)
        rows = catalog_changes.change_rows(comparison.differences)
        summary = catalog_changes.summary(rows)
        status = "ok" if comparison.ok_for_deploy else "error"
        if not comparison.ok_for_deploy:
            summary += "; " + "; ".join(p for p in comparison.problems() if "LOST" in p or "gone" in p)
        summary += "".join(f"; {p}" for p in comparison.problems() if "drained" in p)  # work queues: facts
        return Check("phase_changes", status, summary, title=f"phase {self.version}: catalog changes", rows=rows,
                     columns=["kind", "change", "object"])
