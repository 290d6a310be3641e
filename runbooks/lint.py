"""squawk, the migration linter, over a phase file: errors stop a run, warnings are shown.

squawk runs from the project root, so the project's ``.squawk.toml`` (rules excluded, with
the reason for each) applies; ``--assume-in-transaction`` because the engine wraps each file
in one transaction, and the server's major version so version-specific advice is right.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from . import engine
from .checks import Check
from .paths import PROJECT_ROOT


class LintError(RuntimeError):
    """squawk itself could not run."""


def squawk_binary() -> str:
    beside_python = Path(sys.executable).parent / "squawk"
    found = str(beside_python) if beside_python.exists() else shutil.which("squawk")
    if not found:
        raise LintError("squawk is not installed (pip install squawk-cli)")
    return found


def lint_file(path: Path, pg_major: int | None = None) -> list[dict]:
    """squawk's findings: file, line (1-based), level, rule, message, help."""
    # The engine sets lock_timeout and statement_timeout itself for every phase.
    args = [squawk_binary(), "--reporter", "json", "--assume-in-transaction",
            "--exclude", "require-lock-timeout,require-statement-timeout"]
    if pg_major:
        args += ["--pg-version", f"{pg_major}.0"]
    proc = subprocess.run(args + [str(path)], capture_output=True, text=True, cwd=PROJECT_ROOT)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        raise LintError(f"squawk failed on {path.name}: {proc.stderr.strip() or proc.stdout.strip()}") from None
    return [{"line": f["line"] + 1, "level": f["level"].lower(), "rule": f["rule_name"],
             "message": f["message"], "help": f.get("help") or ""} for f in findings]


def _outside_transaction_lines(path: Path) -> set[int]:
    """Lines of the statements the engine runs outside the body's transaction (`-- runbook: no-transaction`)."""
    lines: set[int] = set()
    for statement in engine.parse_file(path):
        if not statement.transactional:
            lines.update(range(statement.line, statement.line + statement.text.count("\n") + 1))
    return lines


def lint_check(path: Path, pg_major: int | None = None) -> Check:
    # squawk is told the file runs in a transaction; the marked statements do not, so its
    # "concurrently inside a transaction" finding is wrong for exactly those lines.
    outside = _outside_transaction_lines(path)
    findings = [f for f in lint_file(path, pg_major)
                if not (f["rule"] == "ban-concurrent-index-creation-in-transaction" and f["line"] in outside)]
    errors = [f for f in findings if f["level"] == "error"]
    warnings = [f for f in findings if f["level"] != "error"]
    status = "error" if errors else "warning" if warnings else "ok"
    summary = (f"{len(errors)} error(s), {len(warnings)} warning(s) from squawk" if findings
               else "squawk finds nothing to object to")
    return Check(name=f"lint_{Path(path).stem}", title=f"squawk lint of {Path(path).name}", status=status,
                 summary=summary, rows=findings, columns=["line", "level", "rule", "message"])
