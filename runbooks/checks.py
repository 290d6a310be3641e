"""Checks: a named question about the database, the SQL that asks it, and the answer.

A check function takes a connection and returns a ``Check``; ``@sql_check(SQL)`` gives it a
``.sql`` (so a notebook can show the SQL before running it) and a ``.title``. Status is
``ok``, ``info``, ``warning`` or ``error``; an ``error`` stops a runbook.
"""

from __future__ import annotations

import functools
import html
import re
from dataclasses import dataclass, field

STATUSES = ("ok", "info", "warning", "error")
# Colours, not emoji: a record's HTML must read the same in any browser, with any fonts.
_BADGE_COLOUR = {"ok": "#1a7f37", "info": "#0969da", "warning": "#9a6700", "error": "#cf222e"}


class CheckFailed(AssertionError):
    """A check, verification or criterion failed: the run stops here (exit 1)."""


@dataclass
class Check:
    name: str
    status: str
    summary: str
    title: str = ""
    rows: list[dict] = field(default_factory=list)
    columns: list[str] | None = None
    sql: str | None = None
    displayed: bool = field(default=False, repr=False, compare=False)  # Run.check showed it already
    # facts for the run's record (the sign-off, a phase's SQL file and sha256, the backup a rollback
    # restores): not shown with the check; the notebook's verdict carries them to the manifest
    facts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: unknown status {self.status!r}")
        self.title = self.title or self.name.replace("_", " ")

    @property
    def passed(self) -> bool:
        return self.status != "error"

    def _columns(self) -> list[str]:
        if self.columns:
            return self.columns
        return list(self.rows[0].keys()) if self.rows else []

    def __repr__(self) -> str:
        lines = [f"[{self.status}] {self.title}: {self.summary}"]
        columns = self._columns()
        if self.rows:
            widths = {c: max(len(c), *(len(_text(r.get(c))) for r in self.rows)) for c in columns}
            lines.append("  " + "  ".join(c.ljust(widths[c]) for c in columns).rstrip())
            for row in self.rows:
                lines.append("  " + "  ".join(_text(row.get(c)).ljust(widths[c]) for c in columns).rstrip())
        return "\n".join(lines)

    def _ipython_display_(self) -> None:
        # `run.check(...)` as a cell's last line shows the check, then returns it: show it once
        if self.displayed:
            return
        from IPython.display import display

        display({"text/html": self._repr_html_(), "text/plain": repr(self)}, raw=True)

    def _repr_html_(self) -> str:
        badge = (f'<span style="color:#fff;background:{_BADGE_COLOUR[self.status]};padding:1px 6px;'
                 f'border-radius:3px;font-weight:bold">{self.status.upper()}</span>')
        parts = [f"<p>{badge} <b>{html.escape(self.title)}</b>: "
                 f"{html.escape(self.summary)}</p>"]
        if self.rows:  # left-aligned, complete, collapsed when long (the auditor's page)
            from .pages import html_table

            parts.append(html_table(self._columns(), self.rows))
        return "\n".join(parts)


def _text(value) -> str:
    return "" if value is None else str(value)


def sql_check(sql: str, title: str | None = None):
    """Decorate a check function with the SQL it runs and a title, for notebooks to show."""
    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            check = function(*args, **kwargs)
            check.sql = check.sql or sql
            return check
        wrapper.sql = sql
        wrapper.title = title or function.__name__.replace("_", " ")
        return wrapper
    return decorate


def fetch(conn, sql: str, params=None) -> list[dict]:
    """Rows as dicts (the connection is left as it was found: autocommit or rolled back)."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        names = [d[0] for d in cur.description] if cur.description else []
        rows = [dict(zip(names, row)) for row in cur.fetchall()] if names else []
    if not conn.autocommit:
        conn.rollback()
    return rows


def human_bytes(n: int | None) -> str:
    """512 bytes, 3.2 MB: sizes as an operator reads them."""
    if n is None:
        return ""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_BYTE_UNITS = {"": 1, "b": 1, "bytes": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024 ** 2, "mb": 1024 ** 2,
               "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4, "tb": 1024 ** 4,
               "tib": 1024 ** 4}


def parse_bytes(text: str | int) -> int:
    """'20GB', '512 MB', '1.5TiB' or a number of bytes, as PostgreSQL reads sizes (a GB is 1024 MB);
    a ValueError names what is accepted."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _BYTE_UNITS:
        raise ValueError(f"{text!r} is no size: give a number with a unit, e.g. 20GB, 512MB or 1.5TB")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def human_duration(seconds: float | None) -> str:
    """12s, 3m05s, 1h20m: durations as an operator reads them."""
    seconds = max(0, round(seconds or 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
