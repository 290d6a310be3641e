"""What a runbook notebook calls: one ``setup`` cell, then checks and steps that display
themselves (what runs, the SQL, the result) and stop the run loudly on anything unexpected.

``setup`` also makes ipython-sql safe for runbooks:
- ``%sql`` gets a connection made here, read-only (``default_transaction_read_only``): cells
  inspect, only the package's transactional code changes anything;
- every SQL error raises (ipython-sql's default prints it and lets papermill carry on);
- a failing connection raises too (ipython-sql prints that and returns None);
- results are pandas DataFrames, and prettytable >= 3.12 no longer breaks the display.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import connection, records
from .checks import Check, CheckFailed
from .pages import html_table
from .paths import PROJECT_ROOT

VERDICT_MIME = "application/vnd.truthsource.verdict+json"
# The verdict output's metadata: what the record reads besides the verdict (its checks' facts, the kernel's
# own timing), kept out of the compared outputs (they differ from run to run).
VERDICT_METADATA = "truthsource_verdict"


def _display(obj=None, **kwargs):
    from IPython.display import display

    display(obj, **kwargs)


def _markdown(text: str) -> None:
    from IPython.display import Markdown

    _display(Markdown(text))


def sql_block(sql: str, title: str | None = None) -> None:
    """Show SQL as a highlighted block (plain text in consoles and diffs)."""
    body = sql.strip("\n")
    heading = f"**{title}**\n\n" if title else ""
    _display({"text/markdown": f"{heading}```sql\n{body}\n```", "text/plain": (title + "\n" if title else "") + body},
             raw=True)


def table(rows: list[dict], columns: list[str] | None = None):
    """A DataFrame for display (deterministic text form for nbval) whose HTML has no index column,
    text left-aligned and every cell whole, a long table collapsed (pages.html_table)."""
    import pandas as pd

    class Table(pd.DataFrame):
        runbook_table = True

        @property
        def _constructor(self):
            return Table

        def _repr_html_(self) -> str:
            return html_table(list(self.columns), self.to_dict("records"))

    return Table(rows, columns=columns)


def configure_ipython_sql(conn_factory) -> None:
    """Load %sql with a read-only connection that raises on every error."""
    import prettytable
    from IPython import get_ipython
    from sql.connection import Connection

    # ipython-sql 0.5 looks styles up in prettytable's module dict, which 3.12 emptied.
    for style in prettytable.TableStyle:
        prettytable.__dict__.setdefault(style.name, style)
    shell = get_ipython()
    if shell is None:
        return  # plain Python (tests of the package): nothing to configure
    shell.run_line_magic("load_ext", "sql")
    for setting in ("SqlMagic.short_errors = False", "SqlMagic.autopandas = True",
                    "SqlMagic.displaycon = False", "SqlMagic.feedback = False",
                    "SqlMagic.style = 'DEFAULT'"):
        shell.run_line_magic("config", setting)
    # Made here, so a connection failure raises instead of being printed and ignored.
    Connection("postgresql+psycopg2://", creator=conn_factory)
    show_frames_as_tables(shell)


FRAME_ROWS_SHOWN = 500   # a DBA's query may return millions of rows: the page shows this many


def show_frames_as_tables(shell) -> None:
    """Every DataFrame in the notebook (%sql results too) shown as the runbook's own tables are:
    no index column, text left-aligned, cells whole, long ones collapsed, at most FRAME_ROWS_SHOWN rows."""
    import pandas as pd

    def as_html(frame) -> str:
        if getattr(frame, "runbook_table", False):   # the runbook's own (table()): always complete
            return frame._repr_html_()
        shown = html_table(list(frame.columns), frame.head(FRAME_ROWS_SHOWN).to_dict("records"))
        hidden = len(frame) - FRAME_ROWS_SHOWN
        return shown + (f"<p>… and {hidden} more row(s), not shown</p>" if hidden > 0 else "")

    shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, as_html)


class KernelTimer:
    """How long this kernel has spent executing cells since the setup cell began: the kernel's own
    timing (its cells' run times; the setup cell from when the frontend sent it, so the imports before
    setup() count), never the idle time between cells a DBA takes. A notebook's real duration by hand."""

    running: "KernelTimer | None" = None   # the kernel's timer: setup run again starts a new one

    def __init__(self, shell):
        self.total = 0.0
        self.current: float | None = time.monotonic() - _seconds_since_request(shell)
        self.shell = shell
        if shell is not None:
            if KernelTimer.running is not None:
                KernelTimer.running.stop()
            shell.events.register("pre_run_cell", self._started)
            shell.events.register("post_run_cell", self._ended)
            KernelTimer.running = self

    def stop(self) -> None:
        self.shell.events.unregister("pre_run_cell", self._started)
        self.shell.events.unregister("post_run_cell", self._ended)

    def _started(self, *args) -> None:
        self.current = time.monotonic()

    def _ended(self, *args) -> None:
        if self.current is not None:
            self.total += time.monotonic() - self.current
            self.current = None

    def seconds(self) -> float:
        """Time spent executing so far, the running cell included."""
        running = time.monotonic() - self.current if self.current is not None else 0.0
        return round(self.total + running, 2)


def _seconds_since_request(shell) -> float:
    """How long ago the frontend asked for the cell now running (0 where the kernel cannot say)."""
    from datetime import datetime, timezone

    try:
        sent = shell.kernel.get_parent("shell")["header"]["date"]
        return max(0.0, (datetime.now(timezone.utc) - sent).total_seconds())
    except (AttributeError, KeyError, TypeError):
        return 0.0


class Verdict(dict):
    """Run.verdict()'s result: a dict that a notebook does not display a second time."""

    def _ipython_display_(self) -> None:
        pass


@dataclass
class Run:
    """One notebook's run: target, run id, operator, record folder and the checks so far."""

    notebook: str
    target: connection.Target
    run_id: str
    operator: str
    record_dir: Path
    conn: object = None               # read-only psycopg2 connection for checks
    facts: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # False: a failed check is shown and counted, and the notebook carries on to its verdict, which
    # then fails (verification: nothing it does stays, so the whole picture is worth more than a stop).
    stop_on_error: bool = True
    by_hand: bool = False             # no runbook command gave a run id: by_hand.py keeps the run's journal
    joined: dict | None = None        # the by-hand preflight whose run this notebook joined
    timer: KernelTimer | None = None  # the kernel's own execution time (a by-hand notebook's duration)

    # -- display -------------------------------------------------------------------------
    def header(self) -> None:
        run = self.run_id + (f" (the by-hand run of the preflight passed at {self.joined['finished_at']})"
                             if self.joined else " (by hand: a new run)" if self.by_hand else "")
        rows = [("notebook", self.notebook), ("run id", run), ("operator", self.operator),
                ("target", f"{self.target.kind} {self.target.name}"
                 + (" (PRODUCTION)" if self.target.production else "")),
                ("database", f"{self.facts['database']} on {self.facts['server_address']}:{self.facts['server_port']}"),
                ("connected as", self.facts["current_user"] + (" (superuser)" if self.facts["superuser"] else "")),
                ("server", self.facts["server_version"]),
                ("record", str(self.record_dir))]
        _display(table([{"fact": k, "value": v} for k, v in rows]))

    def show_sql(self, source, title: str | None = None) -> None:
        """Show the SQL a step will run, before it runs (a string, or a check with .sql)."""
        if isinstance(source, str):   # a plain string: str.title is a method, not a title
            sql_block(source, title)
            return
        sql_block(source.sql, title or getattr(source, "title", None))

    # -- checks --------------------------------------------------------------------------
    def check(self, check_or_function, *args, **kwargs) -> Check:
        """Run (or take) a check, display it, and stop the run if it failed."""
        check = check_or_function
        if callable(check_or_function) and not isinstance(check_or_function, Check):
            check = check_or_function(self.conn, *args, **kwargs)
        self.checks.append(check)
        _display(check)
        check.displayed = True
        if check.status == "error" and self.stop_on_error:
            raise CheckFailed(f"{check.title}: {check.summary}")
        return check

    def verdict(self) -> dict:
        """The notebook's verdict: a table of its checks; raises if any failed."""
        failed = [c for c in self.checks if c.status == "error"]
        verdict = {"notebook": self.notebook, "run_id": self.run_id,
                   "status": "failed" if failed else "passed",
                   "checks": [{"name": c.name, "status": c.status, "summary": c.summary} for c in self.checks]}
        kept = {"facts": {k: v for c in self.checks for k, v in c.facts.items()},
                "kernel_seconds": self.timer.seconds() if self.timer else None}
        _display(table(verdict["checks"], columns=["name", "status", "summary"]))
        _display({VERDICT_MIME: verdict, "text/plain": f"verdict: {verdict['status']}"}, raw=True,
                 metadata={VERDICT_METADATA: kept})
        if self.by_hand:
            from . import by_hand as by_hand_runs

            by_hand_runs.finish(self, verdict["status"])
        if failed:
            raise CheckFailed(f"{len(failed)} check(s) failed: " + ", ".join(c.name for c in failed))
        return Verdict(verdict)

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()


def setup(*, notebook: str, target_kind: str | None = None, target_name: str | None = None,
          targets_file: str | None = None, run_id: str | None = None, record_dir: str | None = None,
          operator: str | None = None, show_header: bool = True, stop_on_error: bool = True,
          require_preflight: bool = True, preflight_max_age_hours: float = 12) -> Run:
    """Resolve the target, connect read-only, make %sql safe, and show who/what/where.
    Without a run id (stepped through by hand) a phase or the verification joins the run of the
    target's last by-hand preflight, and a phase refuses without a passed, recent one (by_hand.py)."""
    target = connection.resolve(target_kind, target_name, targets_file)
    by_hand = run_id is None
    joined = None
    if by_hand:  # no runbook command checked the target for a pooler, nor gave a run
        # imported here: by_hand imports nbformat, whose jsonschema parses a grammar at import for
        # seconds (rfc3987_syntax), which every notebook of `runbook deploy` paid before it did anything
        from . import by_hand as by_hand_runs

        connection.refuse_transaction_pooler(target)
        joined = by_hand_runs.joined_run(notebook, target, now=_identity_if_joining(notebook, target),
                                         require_preflight=require_preflight, max_age_hours=preflight_max_age_hours)
        if joined:
            run_id, record_dir = joined["run_id"], record_dir or joined["record_dir"]
    run_id = run_id or records.new_run_id()
    folder = Path(record_dir) if record_dir else (by_hand_runs.records_root() if by_hand
                                                 else PROJECT_ROOT / "records") / run_id
    records.make_folder(folder)   # a sealed record refuses: nothing writes into it
    app = f"runbook {run_id} {notebook}"[:63]  # PostgreSQL keeps 63 bytes of application_name

    def factory():
        return connection.connect(target, application_name=app, readonly=True)

    timer = KernelTimer(_shell())
    conn = factory()
    conn.autocommit = True
    run = Run(notebook=notebook, target=target, run_id=run_id,
              operator=operator or records.operator_facts()["operator"], record_dir=folder, conn=conn,
              facts=connection.server_facts(conn), stop_on_error=stop_on_error, by_hand=by_hand,
              joined=joined, timer=timer)
    if by_hand:
        by_hand_runs.start(run)
    configure_ipython_sql(factory)
    if show_header:
        run.header()
    return run


def _identity_if_joining(notebook: str, target: connection.Target):
    """The target's identity, for a notebook that may join a by-hand preflight's run (only the very
    database that preflight saw is joined); None for the others."""
    from . import by_hand as by_hand_runs, identity

    if notebook not in by_hand_runs.JOINS_THE_PREFLIGHT:
        return None
    conn = connection.connect(target, application_name=f"runbook {notebook} identity"[:63], readonly=True,
                              autocommit=True)
    try:
        return identity.read_identity(conn)
    finally:
        conn.close()


def _shell():
    from IPython import get_ipython

    return get_ipython()


def details(summary: str, text: str) -> None:
    """A collapsed block in HTML (full text in plain-text form)."""
    _display({"text/html": f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>",
              "text/plain": f"{summary}\n{text}"}, raw=True)


def json_block(data: dict) -> None:
    _display({"application/json": data, "text/plain": json.dumps(data, indent=2, default=str)}, raw=True)
