"""The auditor's pages: each executed notebook's HTML opens with a card saying who, what, when,
where and the verdict; each run's ``index.html`` lists its notebooks. Nothing is fetched from the
network (no require.js, MathJax or widget scripts from a CDN): a record reads the same offline.

Tables are rendered here too (``html_table``): text left-aligned, no index column, no cell cut
short, and a long table collapsed behind a ``<details>`` line that says how many rows it holds.
The cells of a maintenance cadence this run skipped are one line naming the skipped tasks
(``collapse_skipped_cadences``), not a page of "skipped" cells; the executed notebook keeps them.
"""

from __future__ import annotations

import html
import math
from datetime import datetime, timedelta
from pathlib import Path

from jinja2 import DictLoader

from . import footprint, records

INDEX = records.INDEX_FILE
COLLAPSE_AFTER = 25   # rows: a longer table is collapsed (complete, one click away)

# Colours, not emoji: a record must read the same in any browser, with any fonts.
_COLOUR = {"passed": "#1a7f37", "warnings": "#9a6700", "failed": "#cf222e", "refused": "#cf222e",
           "skipped": "#57606a", "not run": "#57606a"}

CSS = """
.runbook-card { font-family: system-ui, sans-serif; border: 1px solid #d0d7de; border-left: 6px solid var(--verdict);
  border-radius: 6px; padding: 12px 16px; margin: 12px 0 20px; background: #f6f8fa; color: #1f2328; max-width: 70em; }
.runbook-card h1 { font-size: 1.3em; margin: 0 0 8px; }
.runbook-verdict { display: inline-block; color: #fff; background: var(--verdict); padding: 3px 10px;
  border-radius: 4px; font-weight: bold; font-size: 1.1em; margin: 0 8px 8px 0; }
.runbook-counts { font-weight: bold; }
.runbook-card table.runbook-facts { margin: 0; border-collapse: collapse; }
.runbook-card table.runbook-facts th { text-align: left; padding: 2px 16px 2px 0; vertical-align: top;
  white-space: nowrap; color: #57606a; font-weight: normal; }
.runbook-card table.runbook-facts td { text-align: left; padding: 2px 0; vertical-align: top; }
.runbook-card a { color: #0969da; text-decoration: underline; }
.runbook-production { color: #fff; background: #cf222e; padding: 0 6px; border-radius: 3px; font-weight: bold; }
.runbook-detail { margin: 8px 0 0; padding-left: 20px; }
.runbook-cell-label { font-family: system-ui, sans-serif; font-weight: bold; color: #57606a; margin: 16px 0 2px; }
main > .runbook-card, main > .runbook-cell-label { margin-left: calc(var(--jp-cell-prompt-width, 64px) + 20px); }
table.runbook-table { margin-left: 0; margin-right: 0; border-collapse: collapse; }
table.runbook-table th, table.runbook-table td { text-align: left; vertical-align: top; padding: 4px 8px; }
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td, :not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon th,
:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon tr { text-align: left; }
"""

# The lab template without anything it would load from the network, with the card on top and
# the two parameters cells labelled (the notebook's defaults, then what runbook gave this run).
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_css -%}<style type="text/css">{{ resources.runbook_css }}</style>{%- endblock html_head_css -%}
{%- block body_header -%}{{ super() }}{{ resources.runbook_card }}{%- endblock body_header -%}
{%- block any_cell scoped -%}
{%- set tags = cell.metadata.get('tags', []) -%}
{%- if 'injected-parameters' in tags -%}
<p class="runbook-cell-label">Parameters given by runbook for this run (they override the defaults above)</p>
{%- elif 'parameters' in tags -%}
<p class="runbook-cell-label">Parameters: the notebook's defaults</p>
{%- endif -%}
{{ super() }}
{%- endblock any_cell -%}
"""


# -- tables ------------------------------------------------------------------------------------

def cell_text(value) -> str:
    """A table cell as text: nothing for None and pandas' missing values (NaN, NA, NaT)."""
    if value is None or (isinstance(value, float) and math.isnan(value)) \
            or type(value).__name__ in ("NAType", "NaTType"):
        return ""
    return str(value)


def html_table(columns: list[str], rows: list[dict], *, collapse_after: int = COLLAPSE_AFTER) -> str:
    """Rows as an HTML table, every cell left-aligned inline (JupyterLab's own CSS right-aligns
    output tables), complete; longer than `collapse_after` rows it is collapsed behind a line."""
    left = ' style="text-align:left;vertical-align:top"'
    head = "".join(f"<th{left}>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td{left}>{html.escape(cell_text(row.get(c)))}</td>" for c in columns)
                   + "</tr>" for row in rows)
    table = (f'<table class="runbook-table" style="margin-left:0"><thead><tr>{head}</tr></thead>'
             f"<tbody>{body}</tbody></table>")
    if len(rows) <= collapse_after:
        return table
    return f"<details><summary>{len(rows)} rows (click to show them all)</summary>{table}</details>"


# -- facts of a run --------------------------------------------------------------------------

def _when(stamp: str | None) -> str:
    """An ISO timestamp as an auditor reads it: 2026-11-30 04:35:12 UTC."""
    if not stamp:
        return "—"
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if moment.utcoffset() == timedelta(0):
        return f"{moment:%Y-%m-%d %H:%M:%S} UTC"
    return moment.isoformat(sep=" ", timespec="seconds")


def _seconds_between(start: str | None, end: str | None) -> float | None:
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


def _duration(seconds: float | None) -> str:
    from .checks import human_duration

    return "—" if seconds is None else human_duration(seconds)


def _target(manifest: dict) -> str:
    """Where, without secrets: the manifest's target holds no password (connection.Target.describe)."""
    target = manifest.get("target") or {}
    server = manifest.get("server") or {}
    text = f"{target.get('kind', '?')} {target.get('name', '?')}"
    host = server.get("server_address") or target.get("host")
    port = server.get("server_port") or target.get("port")
    database = server.get("database") or target.get("dbname")
    role = server.get("current_user") or target.get("user")
    where = ", ".join(part for part in (
        f"database {database}" if database else "",
        f"on {host}:{port}" if host else "",
        f"as {role}" + (" (superuser)" if server.get("superuser") else "") if role else "",
        f"PostgreSQL {server['server_version']}" if server.get("server_version") else "") if part)
    return html.escape(text + (f" — {where}" if where else ""))


def _production(manifest: dict) -> str:
    production = (manifest.get("target") or {}).get("production")
    return '<span class="runbook-production">PRODUCTION</span>' if production else "not production"


def _commit(manifest: dict) -> str:
    return html.escape(records.commit_text(manifest.get("project") or {}))


def _who(manifest: dict) -> str:
    who = manifest.get("operator") or {}
    return html.escape(f"{who.get('operator', '?')} (os user {who.get('os_user', '?')} on {who.get('host', '?')})")


# -- the facts of a run's header card: each a small function of the manifest giving rows (label, HTML) --
# The index's card and every notebook's card list them in this order; a new fact is one more function.

def _approval_rows(manifest: dict) -> list[tuple[str, str]]:
    """Who approved, under which change ticket: always shown, "none" where none was given."""
    signoff = manifest.get("signoff") or {}
    return [("approver", html.escape(str(signoff.get("approver") or "none"))),
            ("change ticket", html.escape(str(signoff.get("change_ticket") or "none")))]


def _rollback_rows(manifest: dict) -> list[tuple[str, str]]:
    """A rollback: the run it rolls back, the backup it restored, and its own safety dump."""
    rows = []
    if manifest.get("rolls_back"):
        rows.append(("rolls back", f"run {html.escape(manifest['rolls_back'])}"))
    restored = manifest.get("restored_backup")
    if restored:
        rows.append(("backup restored", html.escape(
            f"run {restored.get('run_id')}: {restored.get('file')} ({restored.get('bytes')} bytes, taken "
            f"{restored.get('taken_at')}), sha256 {restored.get('sha256')}")))
    return rows


def _backup_rows(manifest: dict) -> list[tuple[str, str]]:
    """The backup this run took: a rollback's safety dump, any other run's backup."""
    backup = manifest.get("backup")
    if not backup:
        return []
    label = "safety dump" if manifest.get("rolls_back") or manifest.get("restored_backup") else "backup"
    return [(label, html.escape(f"{backup.get('file')} ({backup.get('bytes')} bytes), sha256 {backup.get('sha256')}"))]


def _promotion_rows(manifest: dict) -> list[tuple[str, str]]:
    """A production run's staging evidence, or the override an auditor must see."""
    promotion = records.promotion_summary(manifest.get("promotion"))
    if not promotion:
        return []
    label, text = promotion
    return [(label, f'<span id="runbook-promotion">{html.escape(text)}</span>')]


def _discarded_rows(manifest: dict) -> list[tuple[str, str]]:
    """A rollback that discarded rows written since the deployment: how many, of which tables, where kept."""
    from .verdicts import discarded_text

    discarded = manifest.get("discarded")
    return [("discarded", html.escape(discarded_text(discarded, None)))] if discarded else []


def run_facts(manifest: dict) -> list[tuple[str, str]]:
    """The facts of a run both cards show, in order (label, HTML)."""
    rows = [("who", _who(manifest)), ("target", _target(manifest)), ("production", _production(manifest)),
            ("commit", _commit(manifest))]
    for facts in RUN_FACTS:
        rows += facts(manifest)
    return rows


def _footprint_rows(manifest: dict) -> list[tuple[str, str]]:
    """What the app felt and the WAL and disk the run's phases used (footprint.py), where they were measured."""
    return [(label, f'<span id="{element}">{html.escape(text)}</span>')
            for label, element, text in footprint.card_rows(manifest)]


RUN_FACTS = (_approval_rows, _rollback_rows, _backup_rows, _promotion_rows, _discarded_rows, _footprint_rows)


def _facts_table(rows: list[tuple[str, str]]) -> str:
    """Label/value rows; values are HTML already (escaped where they come from data)."""
    return ('<table class="runbook-facts">'
            + "".join(f'<tr><th style="text-align:left">{label}</th><td style="text-align:left">{value}</td></tr>'
                      for label, value in rows) + "</table>")


def _colour(kind: str) -> str:
    return _COLOUR.get(kind, _COLOUR["failed"])


def _count_words(warnings: int, errors: int) -> str:
    return f"{records.plural(warnings, 'warning')} · {records.plural(errors, 'error')}"


def _counts_of(entry: dict) -> str:
    """Warning and error counts, or why there are none: a notebook that stopped before its verdict."""
    if not entry.get("checks") and entry.get("status") != "passed":
        return "stopped before its verdict" if entry.get("status") == "failed" else "—"
    return _count_words(*records.check_counts(entry))


# -- the card on each notebook's page --------------------------------------------------------

# Where a notebook's duration comes from (runner.seconds_of), as its card says it.
SECONDS_FROM = {"papermill": "papermill's timing", "cell timing": "its cells' timing", "kernel": "the kernel's timing",
                "journal": "from its setup cell to its verdict"}


def _verdict_text(manifest: dict) -> str:
    from .verdicts import text_of

    return manifest.get("verdict_text") or text_of(str(manifest.get("verdict") or "unknown"), 0)


def _sql_file_rows(entry: dict) -> list[tuple[str, str]]:
    """A phase notebook's SQL file and the sha256 it applied (its file check's facts)."""
    facts = entry.get("facts") or {}
    if not facts.get("sql_file"):
        return []
    return [("SQL file", html.escape(f"{facts['sql_file']}, sha256 {facts.get('sql_sha256')}"))]


def notebook_card(manifest: dict, entry: dict, step: str) -> str:
    """The header card of one executed notebook: its verdict first, then the run's (the one verdict,
    worded as everywhere), who, when and where."""
    outcome = records.outcome_text(entry)
    failure = (f"cell {entry.get('failed_cell')}: {entry.get('error')}" if entry.get("failed_cell")
               else entry.get("error"))
    source = SECONDS_FROM.get(entry.get("seconds_from"), "")
    rows = [("run", f'{html.escape(manifest["run_id"])} — runbook {html.escape(manifest["command"])} '
                    f'(<a href="../{INDEX}">all notebooks of this run</a>)'),
            ("run verdict", f'<span class="runbook-run-verdict">{html.escape(_verdict_text(manifest))}</span>'),
            ("when", f"{_when(entry.get('started_at'))} → {_when(entry.get('finished_at'))} "
                     f"({_duration(entry.get('seconds'))}" + (f", {html.escape(source)}" if source else "") + ")"),
            *run_facts(manifest), *_sql_file_rows(entry)]
    # where it stopped, the facts, then what the counts count (so many warnings never push the facts down)
    flagged = [(html.escape(c["status"]), html.escape(f"{c.get('name')}: {c.get('summary')}"))
               for c in entry.get("checks") or [] if c.get("status") in ("warning", "error")]
    stopped = [("stopped at", html.escape(str(failure)))] if entry.get("status") == "failed" and failure else []
    rows = stopped + rows + flagged
    title = f"{html.escape(Path(entry.get('source') or step).stem)} — {html.escape(outcome)}"
    return (f'<section class="runbook-card" id="runbook-card" style="--verdict:{_colour(records.outcome_kind(entry))}">'
            f"<h1>{title}</h1>"
            f'<span class="runbook-verdict" id="runbook-verdict">{html.escape(outcome.upper())}</span>'
            f'<span class="runbook-counts">{_counts_of(entry)}</span>'
            f"{_facts_table(rows)}</section>")


# -- a skipped cadence: one line ----------------------------------------------------------------

SKIPPED_LINE = "runbook_skipped_line"   # cell metadata of the line that stands for skipped cells

def _skipped_cadence(cell) -> dict | None:
    """{"cadence", "current"} of a code cell whose every output says a skipped cadence ran nothing."""
    from .maintenance import SKIPPED_METADATA

    marks = [output.get("metadata", {}).get(SKIPPED_METADATA) for output in cell.get("outputs", [])] \
        if cell.get("cell_type") == "code" else []
    return marks[0] if marks and all(mark == marks[0] for mark in marks) else None


def _heading(cell) -> tuple[int, str]:
    """A markdown cell's heading text and level ("## W1. Retention" -> (2, "W1. Retention"))."""
    first = cell.get("source", "").lstrip().split("\n", 1)[0]
    hashes = len(first) - len(first.lstrip("#"))
    return (hashes, first[hashes:].strip()) if cell.get("cell_type") == "markdown" and hashes else (0, "")


def _skipped_line(cells: list, mark: dict):
    """The markdown cell that stands for a run of skipped cells: the cadence and its tasks."""
    from nbformat.v4 import new_markdown_cell

    tasks = [_heading(cell)[1] for cell, following in zip(cells, cells[1:])
             if cell.get("cell_type") == "markdown" and _skipped_cadence(following)]
    code = sum(cell.get("cell_type") == "code" for cell in cells)
    named = f": {'; '.join(tasks)}" if tasks else ""
    return new_markdown_cell(f"**{mark['cadence'].capitalize()} tasks skipped** (this run's cadence is "
                             f"{mark['current']}; {records.plural(code, 'cell')} ran nothing){named}.")


def collapse_skipped_cadences(cells: list) -> list:
    """Cells with each run of a skipped cadence's cells (and the task headings among them) replaced
    by one line naming the skipped tasks. A top-level heading ("# Weekly tasks") and the markdown
    after the run's last skipped cell stay: they belong to what follows."""
    out, index = [], 0
    while index < len(cells):
        mark = _skipped_cadence(cells[index])
        if mark is None:
            out.append(cells[index])
            index += 1
            continue
        run = []
        while out and out[-1].get("cell_type") == "markdown" and _heading(out[-1])[0] >= 2 \
                and not out[-1].get("metadata", {}).get(SKIPPED_LINE):
            run.insert(0, out.pop())     # the task's heading above its first skipped cell
        end = index
        while end < len(cells) and (_skipped_cadence(cells[end]) == mark or cells[end].get("cell_type") == "markdown"):
            end += 1
        while cells[end - 1].get("cell_type") == "markdown":
            end -= 1                      # trailing markdown introduces what follows
        run += cells[index:end]
        line = _skipped_line(run, mark)
        line.metadata[SKIPPED_LINE] = True
        out.append(line)
        index = end
    return out


def _collapse_preprocessor():
    from nbconvert.preprocessors import Preprocessor

    class CollapseSkippedCadences(Preprocessor):
        def preprocess(self, nb, resources):
            nb.cells = collapse_skipped_cadences(nb.cells)
            return nb, resources

    return CollapseSkippedCadences()


def export_notebook(nb_path: Path, card: str) -> Path:
    """The executed notebook as HTML beside it, opening with `card`, fetching nothing, each skipped
    maintenance cadence one line."""
    from nbconvert import HTMLExporter

    html_path = records.check_writable(nb_path.with_suffix(".html"))   # a sealed record: refused before any work
    exporter = HTMLExporter(extra_loaders=[DictLoader({"runbook_record.html.j2": TEMPLATE})],
                            template_file="runbook_record.html.j2")
    exporter.register_preprocessor(_collapse_preprocessor(), enabled=True)
    body, _ = exporter.from_filename(str(nb_path), resources={"runbook_card": card, "runbook_css": CSS})
    records.write_text(html_path, body)
    return html_path


# -- a run's index.html ----------------------------------------------------------------------

def _verdict_detail(manifest: dict) -> str:
    """Each warning and error the verdict counts, named (as the terminal and `records show` print them)."""
    from .verdicts import item_text

    items = manifest.get("verdict_detail") or []
    if not items:
        return ""
    return ('<ul class="runbook-detail" id="runbook-verdict-detail">'
            + "".join(f"<li>{html.escape(item_text(item))}</li>" for item in items) + "</ul>")


def index_page(manifest: dict) -> str:
    """A run's front page: the verdict and its facts in the first screen, then its notebooks."""
    notebooks = manifest.get("notebooks") or []
    warnings = sum(records.check_counts(entry)[0] for entry in notebooks)
    errors = sum(records.check_counts(entry)[1] for entry in notebooks)
    verdict = str(manifest.get("verdict") or "unknown")
    kind = verdict if verdict != "passed" else ("warnings" if warnings else "passed")
    verdict_text = _verdict_text(manifest)
    rows = [("when", f"{_when(manifest.get('started_at'))} → {_when(manifest.get('finished_at'))} "
                     f"({_duration(_seconds_between(manifest.get('started_at'), manifest.get('finished_at')))})"),
            *run_facts(manifest)]
    if manifest.get("error"):
        rows.insert(0, ("error", html.escape(manifest["error"])))
    card = (f'<section class="runbook-card" id="runbook-card" style="--verdict:{_colour(kind)}">'
            f"<h1>Run {html.escape(manifest.get('run_id', '?'))} — runbook {html.escape(manifest.get('command', '?'))}</h1>"
            f'<span class="runbook-verdict" id="runbook-verdict">{html.escape(verdict_text)}</span>'
            f'<span class="runbook-counts">{_count_words(warnings, errors)}</span>'
            f"{_facts_table(rows)}{_verdict_detail(manifest)}</section>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1.0">'
            f"<title>Run {html.escape(manifest.get('run_id', '?'))}: {html.escape(verdict_text)}</title>"
            f'<style type="text/css">{CSS}{_INDEX_CSS}</style></head>\n<body>\n{card}\n'
            f"<h2>Notebooks</h2>\n{_notebooks_table(notebooks)}\n{_sql_files(manifest)}\n{_parameters(manifest)}\n"
            f"<p class=\"runbook-note\">This page is part of the sealed record: <code>manifest.json</code> lists the "
            f"sha256 of every file here, this page included; <code>runbook records verify "
            f"{html.escape(manifest.get('run_id', '?'))}</code> re-hashes them.</p>\n</body></html>\n")


_INDEX_CSS = """
body { font-family: system-ui, sans-serif; margin: 16px 24px; color: #1f2328; }
h2 { font-size: 1.1em; margin: 20px 0 8px; }
table.runbook-table { border: 1px solid #d0d7de; }
table.runbook-table th { background: #f6f8fa; }
table.runbook-table tr + tr td { border-top: 1px solid #d0d7de; }
.runbook-status { font-weight: bold; }
.runbook-note { color: #57606a; font-size: 0.9em; margin-top: 24px; }
code { font-family: ui-monospace, monospace; }
"""


def _notebooks_table(notebooks: list[dict]) -> str:
    left = ' style="text-align:left;vertical-align:top"'
    head = "".join(f"<th{left}>{c}</th>" for c in ("#", "notebook", "result", "duration", "checks", "where it stopped"))
    body = []
    for number, entry in enumerate(notebooks, start=1):
        name = html.escape(Path(entry.get("file") or entry.get("source") or entry.get("name", "?")).stem)
        link = f'<a href="{html.escape(entry["html"])}">{name}</a>' if entry.get("html") else name
        checks = f"{len(entry['checks'])}: {_counts_of(entry)}" if entry.get("checks") else _counts_of(entry)
        stopped = (f"cell {entry.get('failed_cell')}: " if entry.get("failed_cell") else "") + (entry.get("error") or "")
        status = (f'<span class="runbook-status" style="color:{_colour(records.outcome_kind(entry))}">'
                  f"{html.escape(records.outcome_text(entry))}</span>")
        seconds = entry.get("seconds")
        cells = (str(number), link, status, _duration(seconds) if seconds is not None else "—", html.escape(checks),
                 html.escape(stopped if entry.get("status") == "failed" else ""))
        body.append("<tr>" + "".join(f"<td{left}>{cell}</td>" for cell in cells) + "</tr>")
    return f'<table class="runbook-table"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _sql_files(manifest: dict) -> str:
    files = manifest.get("sql_files") or {}
    rows = [{"file": name, "sha256": digest} for name, digest in files.items()]
    return (f"<h2>SQL files ({len(rows)})</h2>\n" + html_table(["file", "sha256"], rows)) if rows else ""


def _parameters(manifest: dict) -> str:
    parameters = manifest.get("parameters") or {}
    rows = [{"parameter": k, "value": v} for k, v in parameters.items()]
    return ("<h2>Parameters</h2>\n" + html_table(["parameter", "value"], rows)) if rows else ""


def write_index(folder: Path, manifest: dict) -> Path:
    path = Path(folder) / INDEX
    records.write_text(path, index_page(manifest))
    return path
