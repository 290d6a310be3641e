"""A run's one verdict: computed once, when its record is sealed, and worded the same everywhere.

`decide` reads the notebooks' results and gives what the manifest keeps: ``verdict`` (passed,
failed or refused: what programs read), ``verdict_text`` (what every place prints: ``PASSED``,
``PASSED WITH 2 WARNINGS``, ``FAILED``, ``REFUSED``), ``verdict_detail`` (each warning and error,
by notebook and check, so that a count is never printed without what it counts) and, for a
rollback that discarded rows written since the deployment, ``discarded`` (how many, of which
tables, and the file that keeps them). `lines` prints them as the terminal and `runbook records
show` do; pages.py renders the same in ``index.html`` and on each notebook's card.
"""

from __future__ import annotations

from pathlib import Path

from .records import plural


def _detail(manifest: dict) -> list[dict]:
    """Every warning and error of the run: the checks that said so, a notebook that stopped at a
    cell, and the run's own error (a refusal, a secret redacted)."""
    found = []
    for entry in manifest.get("notebooks") or []:
        name = Path(entry.get("file") or entry.get("source") or entry.get("name") or "?").stem
        checks = entry.get("checks") or []
        found += [{"level": "error" if c.get("status") == "error" else "warning", "notebook": name,
                   "check": c.get("name"), "summary": c.get("summary")}
                  for c in checks if c.get("status") in ("warning", "error")]
        if entry.get("status") == "failed" and not any(c.get("status") == "error" for c in checks):
            where = f"cell {entry['failed_cell']}" if entry.get("failed_cell") else "stopped"
            found.append({"level": "error", "notebook": name, "check": where,
                          "summary": entry.get("error") or "stopped before its verdict"})
    if manifest.get("error"):
        found.insert(0, {"level": "error", "notebook": None, "check": None, "summary": manifest["error"]})
    return found


def _discarded(manifest: dict) -> dict | None:
    """What a rollback that ran discarded (its later_writes check's facts); None for any other run."""
    for entry in manifest.get("notebooks") or []:
        discarded = (entry.get("facts") or {}).get("discarded")
        if discarded and entry.get("status") == "passed":
            return dict(discarded)
    return None


def text_of(status: str, warnings: int) -> str:
    """PASSED, PASSED WITH 1 WARNING, FAILED, REFUSED."""
    if status != "passed":
        return status.upper()
    return "PASSED" + (f" WITH {plural(warnings, 'warning').upper()}" if warnings else "")


def decide(manifest: dict, status: str) -> dict:
    """The verdict's fields for the manifest: `status` (passed, failed, refused) worded with what it counts."""
    detail = _detail(manifest)
    warnings = sum(1 for item in detail if item["level"] == "warning")
    return {"verdict": status, "verdict_text": text_of(status, warnings), "verdict_detail": detail,
            "discarded": _discarded(manifest)}


def item_text(item: dict) -> str:
    """One warning or error: where (notebook, check) and what it said."""
    where = " ".join(part for part in (item.get("notebook"), item.get("check")) if part)
    return f"{item['level']}: " + (f"{where}: " if where else "") + str(item.get("summary"))


def discarded_text(discarded: dict, record_path: Path | None) -> str:
    """What a rollback discarded, and where its rows are kept to re-apply."""
    kept = (Path(record_path) / discarded["file"]).resolve() if record_path else discarded["file"]
    return (f"discarded {discarded['rows']} row(s) written since the deployment ({discarded['tables']}); kept in "
            f"{kept}: re-apply with psql -X -v ON_ERROR_STOP=1 -f {kept}")


def lines(manifest: dict, record_path: Path | None = None) -> list[str]:
    """The verdict as the terminal and `runbook records show` print it: the one text, then what it counts."""
    text = manifest.get("verdict_text") or text_of(str(manifest.get("verdict")), 0)
    out = [f"verdict: {text}"]
    out += [f"  {item_text(item)}" for item in manifest.get("verdict_detail") or []]
    if manifest.get("discarded"):
        out.append(f"  {discarded_text(manifest['discarded'], record_path)}")
    return out
