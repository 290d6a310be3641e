"""Catalog differences as a reader takes them in: one row per thing that changed.

``snapshot.compare_snapshots`` says which normalised catalog lines were added and which removed.
Read raw, a column whose type or default changed is a "removed" line and an "added" one (a phase
that alters 30 columns reads like 30 columns lost), and every privilege is a line of its own (a
REVOKE ALL on a table is eight rows). ``change_rows`` turns them into:

- ``altered``: one row for an object found on both sides under the same name (a column: its table
  and name; a constraint or policy: its name and table; a function: its signature...), showing
  before → after (a column's whole definition; for other objects the ``key=value`` settings that
  changed, or the whole definition when more than settings changed);
- grants (and default privileges) grouped: one row per object, role, grantor and change, listing
  the privileges;
- every other line as it was, ``added`` or ``removed``.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict

ARROW = " → "
CHANGE_ORDER = ("added", "altered", "removed")

_IDENT = r'(?:"(?:[^"]|"")*"|[^\s"]+)'
# snapshot.CATALOG_QUERIES["columns"]: "<table> #<position> <column> <definition>"
_COLUMN = re.compile(rf"^(?P<table>.+?) #(?P<position>\d+) (?P<column>{_IDENT}) (?P<definition>.*)$")
# "grants" and "default_privileges": "<on>: <grantee> <PRIVILEGE>[ WITH GRANT OPTION] (granted by <grantor>)"
_GRANT = re.compile(r"^(?P<on>.+): (?P<grantee>\S+) (?P<privilege>[A-Z]+(?: WITH GRANT OPTION)?) "
                    r"\(granted by (?P<grantor>.+)\)$")
# What names an object of each kind: the line's text before its settings or definition.
_NAMED = {
    "constraints": re.compile(rf"^(?P<key>{_IDENT} on .+?): (?P<rest>.*)$"),
    "policies": re.compile(rf"^(?P<key>{_IDENT} on .+?): (?P<rest>.*)$"),
    "comments": re.compile(r"^(?P<key>.+?): (?P<rest>.*)$"),
    "functions": re.compile(r"^(?P<key>.+?\)) (?P<rest>returns .*)$"),
    "tables": re.compile(r"^(?P<key>.+?) (?P<rest>kind=.*)$"),
    "views": re.compile(r"^(?P<key>.+?) (?P<rest>kind=.*)$"),
    "types": re.compile(r"^(?P<key>.+?) (?P<rest>kind=.*)$"),
    "rls": re.compile(r"^(?P<key>.+?) (?P<rest>row_level_security=.*)$"),
    "sequences": re.compile(r"^(?P<key>.+?) (?P<rest>type=.*)$"),
    "schemas": re.compile(r"^(?P<key>.+?) (?P<rest>owner=.*)$"),
    "extensions": re.compile(r"^(?P<key>.+?) (?P<rest>version=.*)$"),
}
# Triggers and indexes: named by name and table; the whole definition is what changes.
_DEFINED = {
    "triggers": re.compile(rf"^CREATE (?:CONSTRAINT )?TRIGGER (?P<name>{_IDENT}) .*? ON (?P<table>\S+) "),
    "indexes": re.compile(rf"^CREATE (?:UNIQUE )?INDEX (?P<name>{_IDENT}) ON (?:ONLY )?(?P<table>\S+) "),
}
GROUPED_KINDS = ("grants", "default_privileges")


def _column(line: str) -> tuple[str, str] | None:
    """(table.column, "#position definition") of a column line."""
    match = _COLUMN.match(line)
    if not match:
        return None
    return f"{match['table']}.{match['column']}", f"#{match['position']} {match['definition']}"


def _named(kind: str, line: str) -> tuple[str, str] | None:
    """(what names the object, the rest of its line), or None when the line has no such shape."""
    if kind == "columns":
        return _column(line)
    if kind in _DEFINED:
        match = _DEFINED[kind].match(line)
        return (f"{match['name']} on {match['table']}", line) if match else None
    match = _NAMED[kind].match(line) if kind in _NAMED else None
    return (match["key"], match["rest"]) if match else None


def _column_change(before: str, after: str) -> str:
    """A column's definition before → after; its position only when that moved (a column dropped before it)."""
    (old_position, old), (new_position, new) = before.split(" ", 1), after.split(" ", 1)
    moved = f"position {old_position}{ARROW}{new_position}" if old_position != new_position else ""
    if old == new:
        return f"{old} ({moved})"
    return f"{old}{ARROW}{new}" + (f" ({moved})" if moved else "")


def _settings_change(before: str, after: str) -> str:
    """Only the settings that changed when every changed word is a key=value setting (a function's
    owner or body digest, a table's row-level security), else the whole definition before → after."""
    old, new = before.split(" "), after.split(" ")
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        words = old[i1:i2] + new[j1:j2]
        if not all("=" in word for word in words):
            return f"{before}{ARROW}{after}"
        parts.append(f"{' '.join(old[i1:i2]) or '(none)'}{ARROW}{' '.join(new[j1:j2]) or '(none)'}")
    return "; ".join(parts)


def altered(kind: str, added: list[str], removed: list[str]) -> tuple[list[dict], list[str], list[str]]:
    """Objects of `kind` on both sides under one name: ([altered rows], added left, removed left)."""
    def by_name(lines):
        named = defaultdict(list)
        for line in lines:
            parsed = _named(kind, line)
            if parsed:
                named[parsed[0]].append((line, parsed[1]))
        return {key: found[0] for key, found in named.items() if len(found) == 1}   # a name seen twice: left alone

    new, old = by_name(added), by_name(removed)
    rows, paired = [], set()
    for key in sorted(set(new) & set(old)):
        (old_line, before), (new_line, after) = old[key], new[key]
        change = _column_change(before, after) if kind == "columns" else _settings_change(before, after)
        rows.append({"kind": kind, "change": "altered", "object": f"{key}: {change}"})
        paired.update((old_line, new_line))
    return rows, [line for line in added if line not in paired], [line for line in removed if line not in paired]


def grouped_grants(kind: str, change: str, lines: list[str]) -> list[dict]:
    """One row per object, grantee and grantor, with the privileges listed (in the lines' order)."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    rows = []
    for line in lines:
        match = _GRANT.match(line)
        if not match:
            rows.append({"kind": kind, "change": change, "object": line})
            continue
        groups.setdefault((match["on"], match["grantee"], match["grantor"]), []).append(match["privilege"])
    rows += [{"kind": kind, "change": change, "object": f"{on}: {grantee} {', '.join(privileges)} (granted by {grantor})"}
             for (on, grantee, grantor), privileges in groups.items()]
    return rows


def change_rows(differences: dict[str, dict[str, list[str]]]) -> list[dict]:
    """Rows {kind, change, object} of a Comparison's differences, by kind, then added, altered, removed."""
    rows = []
    for kind, diff in sorted(differences.items()):
        added, removed = diff.get("added", []), diff.get("removed", [])
        if kind in GROUPED_KINDS:
            found = grouped_grants(kind, "added", added) + grouped_grants(kind, "removed", removed)
        else:
            found, added, removed = altered(kind, added, removed)
            found += [{"kind": kind, "change": "added", "object": line} for line in added]
            found += [{"kind": kind, "change": "removed", "object": line} for line in removed]
        rows += sorted(found, key=lambda row: (CHANGE_ORDER.index(row["change"]), row["object"]))
    return rows


def summary(rows: list[dict]) -> str:
    """"3 columns added, 30 columns altered, 2 grants removed", or "no change"."""
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        counts[(row["kind"], row["change"])] = counts.get((row["kind"], row["change"]), 0) + 1
    return ", ".join(f"{n} {kind} {change}" for (kind, change), n in sorted(
        counts.items(), key=lambda item: (item[0][0], CHANGE_ORDER.index(item[0][1])))) or "no change"
