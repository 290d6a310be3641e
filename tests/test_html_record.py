"""The auditor's pages: a rehearsal's HTML opened in a real browser (Debian's headless Chromium).

Every page of the record fetches nothing from the network (an auditor offline or behind a strict
proxy reads it whole) and shows its verdict in the first screen; the run's index.html lists each
notebook with its result and duration, linking its HTML, and is sealed with the record.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from runbooks import pages, records

from runhelpers import runbook

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
VIEWPORT = (1280, 800)
# Chromium as root in a container, and nothing of its own on the network (updates, sync, QUIC);
# every host name fails to resolve, so a page that tried the network could not even reach it.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}")


# -- what the pages are made of (no browser) ----------------------------------------------------

def test_a_table_keeps_every_cell_whole_left_aligned_and_escaped():
    rows = [{"name": "a<b", "summary": "x" * 300}]
    shown = pages.html_table(["name", "summary"], rows)
    assert "a&lt;b" in shown and "x" * 300 in shown and "<details>" not in shown
    assert shown.count('text-align:left') == 4   # two headings, two cells


def test_a_long_table_is_collapsed_behind_a_line_that_says_how_many_rows_it_holds():
    shown = pages.html_table(["n"], [{"n": i} for i in range(pages.COLLAPSE_AFTER + 1)])
    assert shown.startswith(f"<details><summary>{pages.COLLAPSE_AFTER + 1} rows")
    assert f"<td style=\"text-align:left;vertical-align:top\">{pages.COLLAPSE_AFTER}</td>" in shown


def test_a_notebook_table_has_no_index_column_in_html_and_missing_values_are_blank():
    from runbooks.notebook import table

    frame = table([{"check": "a", "rows": 1}, {"check": "b", "rows": None}], columns=["check", "rows"])
    shown = frame._repr_html_()
    assert shown.count("<th ") == 2 and ">nan<" not in shown
    assert "check" in repr(frame)   # the text form (nbval compares it) stays pandas'


def test_a_dataframe_in_a_notebook_such_as_a_sql_result_shows_no_index_and_at_most_so_many_rows():
    from types import SimpleNamespace

    import pandas as pd
    from IPython.core.formatters import DisplayFormatter

    from runbooks.notebook import FRAME_ROWS_SHOWN, show_frames_as_tables, table

    shell = SimpleNamespace(display_formatter=DisplayFormatter())
    show_frames_as_tables(shell)
    as_html = shell.display_formatter.formatters["text/html"]
    shown = as_html(pd.DataFrame({"pid": range(FRAME_ROWS_SHOWN + 2)}))
    assert shown.count("<th ") == 1 and shown.endswith("… and 2 more row(s), not shown</p>")
    own = as_html(table([{"n": i} for i in range(FRAME_ROWS_SHOWN + 2)]))
    assert "not shown" not in own and f">{FRAME_ROWS_SHOWN + 1}</td>" in own   # the runbook's own: complete


@pytest.mark.parametrize("entry, said", [
    ({"status": "passed", "checks": [{"status": "ok"}]}, "passed"),
    ({"status": "passed", "checks": [{"status": "warning"}, {"status": "warning"}]}, "passed with 2 warnings"),
    ({"status": "passed", "skipped": True, "checks": [{"status": "info"}]}, "skipped (already applied)"),
    ({"status": "failed", "checks": [{"status": "error"}]}, "failed"),
    ({"status": "not run"}, "not run"),
])
def test_a_notebooks_result_is_said_in_words(entry, said):
    assert records.outcome_text(entry) == said


def skipped(cadence: str, current: str = "daily"):
    """A code cell as a skipped cadence leaves it (maintenance.Section)."""
    from nbformat.v4 import new_code_cell, new_output

    from runbooks.maintenance import skipped_metadata

    return new_code_cell(f"{cadence}.check(...)", outputs=[new_output(
        "display_data", data={"text/plain": f"skipped: a {cadence} task (this run's cadence is {current})"},
        metadata=skipped_metadata(cadence, current))])


def ran(text: str = "a table"):
    from nbformat.v4 import new_code_cell, new_output

    return new_code_cell("daily.check(...)", outputs=[new_output("display_data", data={"text/plain": text})])


def markdown(text: str):
    from nbformat.v4 import new_markdown_cell

    return new_markdown_cell(text)


def test_a_skipped_cadence_is_one_line_naming_its_tasks_and_what_ran_stays():
    cells = [markdown("# Daily tasks"), ran("daily: running"), markdown("## D1. Errors"), ran(),
             markdown("# Weekly tasks"), skipped("weekly"),
             markdown("## W1. Retention\nwhat the policies would delete"), skipped("weekly"), skipped("weekly"),
             markdown("## Audit"), markdown("## W2. Audit log review"), skipped("weekly"),
             markdown("# Monthly tasks"), skipped("monthly"), markdown("## M1. Full integrity check"), skipped("monthly"),
             markdown("## Verdict"), ran("the verdict")]
    shown = pages.collapse_skipped_cadences(cells)
    assert shown[:5] == cells[:5] and shown[6] == cells[12] and shown[-2:] == cells[-2:]
    assert len(shown) == 10
    assert shown[5].source == ("**Weekly tasks skipped** (this run's cadence is daily; 4 cells ran nothing): "
                               "W1. Retention; W2. Audit log review.")
    assert shown[7].source == ("**Monthly tasks skipped** (this run's cadence is daily; 2 cells ran nothing): "
                               "M1. Full integrity check.")


def test_a_skipped_tasks_heading_after_cells_that_ran_goes_into_the_line_and_a_notebook_without_skips_is_kept():
    cells = [skipped("daily", "weekly"), markdown("## Look around"), ran("sessions"),
             markdown("## D1. Errors"), skipped("daily", "weekly"), markdown("# Weekly tasks"), ran("weekly: running")]
    shown = pages.collapse_skipped_cadences(cells)
    assert [c.source for c in shown] == [
        "**Daily tasks skipped** (this run's cadence is weekly; 1 cell ran nothing).", "## Look around",
        "daily.check(...)",
        "**Daily tasks skipped** (this run's cadence is weekly; 1 cell ran nothing): D1. Errors.",
        "# Weekly tasks", "daily.check(...)"]
    unskipped = [markdown("# Daily tasks"), ran(), markdown("## Verdict"), ran()]
    assert pages.collapse_skipped_cadences(unskipped) == unskipped


# -- a rehearsal's record in Chromium -------------------------------------------------------------

@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    assert runbook("rehearse", "--records", root) == 0
    [run_id] = [p.name for p in root.iterdir()]
    return records.Record.open(root, run_id)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"headless Chromium is not installed: {INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})   # every request the page makes
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(browser, path: Path) -> list[str]:
    """Load a page of the record; the URL of every request it made."""
    browser.get("about:blank")
    browser.get_log("performance")   # forget the browser's own start-up requests
    browser.get(path.resolve().as_uri())
    messages = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"]


def pages_of(record: records.Record) -> list[Path]:
    return [record.path / pages.INDEX] + sorted((record.path / "notebooks").glob("*.html"))


def verdict_in_first_screen(browser) -> dict:
    return browser.execute_script(
        "const e = document.getElementById('runbook-verdict'); const r = e.getBoundingClientRect();"
        "return {text: e.innerText, top: r.top, bottom: r.bottom, height: window.innerHeight,"
        "        visible: r.width > 0 && r.height > 0};")


@pytest.mark.slow
def test_no_page_of_a_rehearsals_record_fetches_anything_from_the_network(rehearsal, browser):
    for page in pages_of(rehearsal):
        requested = open_page(browser, page)
        assert page.resolve().as_uri() in requested
        assert [url for url in requested if not url.startswith(("file://", "data:"))] == [], page.name


@pytest.mark.slow
def test_every_page_shows_its_verdict_in_the_first_screen(rehearsal, browser):
    results = {entry["html"]: records.outcome_text(entry) for entry in rehearsal.manifest()["notebooks"]}
    for page in pages_of(rehearsal):
        open_page(browser, page)
        verdict = verdict_in_first_screen(browser)
        assert verdict["visible"] and 0 <= verdict["top"] and verdict["bottom"] <= verdict["height"], page.name
        name = str(page.relative_to(rehearsal.path))
        expected = results.get(name, "passed")   # the index: the run's verdict
        assert verdict["text"].lower().startswith(expected), (name, verdict["text"])


@pytest.mark.slow
def test_each_notebooks_card_says_who_when_where_which_commit_and_not_production(rehearsal, browser):
    manifest = rehearsal.manifest()
    for page in pages_of(rehearsal)[1:]:
        open_page(browser, page)
        card = browser.find_element("id", "runbook-card").text
        for fact in (manifest["run_id"], f"os user {manifest['operator']['os_user']}", "service rehearsal",
                     "not production", manifest["project"]["git_commit"][:12], " UTC → "):
            assert fact in card, (page.name, fact)


@pytest.mark.slow
def test_the_index_lists_each_notebook_with_its_result_and_duration_and_links_its_page(rehearsal, browser):
    manifest = rehearsal.manifest()
    open_page(browser, rehearsal.path / pages.INDEX)
    rows = browser.find_elements("css selector", "table.runbook-table tbody tr")[:len(manifest["notebooks"])]
    for row, entry in zip(rows, manifest["notebooks"]):
        cells = [cell.text for cell in row.find_elements("tag name", "td")]
        assert cells[2] == records.outcome_text(entry) and cells[3].endswith("s")
        link = row.find_element("tag name", "a").get_attribute("href")
        assert link == (rehearsal.path / entry["html"]).resolve().as_uri()


@pytest.mark.slow
def test_tables_are_left_aligned_with_no_index_column_and_no_verdict_cut_short(rehearsal, browser):
    manifest = rehearsal.manifest()
    for entry in manifest["notebooks"]:
        open_page(browser, rehearsal.path / entry["html"])
        aligned = browser.execute_script(
            "return [...document.querySelectorAll('.jp-OutputArea-output td, .jp-OutputArea-output th')]"
            ".map(c => getComputedStyle(c).textAlign);")
        assert aligned and set(aligned) <= {"left", "start"}, entry["html"]
        assert not browser.find_elements("css selector", "table.dataframe"), entry["html"]  # pandas' own, with index
        text = browser.find_element("tag name", "body").get_attribute("textContent")
        for check in entry["checks"]:
            assert check["summary"] in text, (entry["html"], check["name"])


def table_rows(browser, columns: list[str]) -> list[list[str]]:
    """The cells of every runbook table with these headings (collapsed ones too: textContent)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('table.runbook-table')]"
        ".filter(t => JSON.stringify([...t.querySelectorAll('thead th')].map(h => h.textContent)) === arguments[0])"
        ".flatMap(t => [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.textContent)));",
        json.dumps(columns, separators=(",", ":")))


@pytest.mark.slow
def test_phase_twos_changes_show_a_changed_column_as_one_altered_row_and_grants_one_row_per_object_and_role(
        rehearsal, browser):
    [entry] = [e for e in rehearsal.manifest()["notebooks"] if "02_phase2" in e["html"]]
    open_page(browser, rehearsal.path / entry["html"])
    rows = table_rows(browser, ["kind", "change", "object"])
    assert ["columns", "altered", "public.products.price: numeric(10,2) not null default 0 → "
                                  "numeric(12,2) not null default 0"] in rows
    def column(line):   # "public.api_keys #4 key text" -> ("public.api_keys", "key")
        table, rest = line.split(" #", 1)
        return table, rest.split(" ")[1]

    added, removed = ({column(o) for kind, c, o in rows if kind == "columns" and c == change}
                      for change in ("added", "removed"))
    assert added and removed and not added & removed   # a column on both sides is one altered row

    def grant(change, line):   # one row per object, role and grantor: the privileges listed in it
        on, rest = line.rsplit(": ", 1)
        return change, on, rest.split(" ")[0], rest.rsplit("(granted by ", 1)[1]

    grants = [grant(change, obj) for kind, change, obj in rows if kind == "grants"]
    assert grants and len(grants) == len(set(grants))
    assert ["grants", "removed", "TABLE public.api_keys: anon DELETE, INSERT, MAINTAIN, REFERENCES, SELECT, TRIGGER, "
                                 "TRUNCATE, UPDATE (granted by postgres)"] in rows or \
        ["grants", "removed", "TABLE public.api_keys: anon DELETE, INSERT, REFERENCES, SELECT, TRIGGER, TRUNCATE, "
                              "UPDATE (granted by postgres)"] in rows   # MAINTAIN exists from PostgreSQL 17


@pytest.mark.slow
def test_a_daily_maintenance_page_shows_each_skipped_cadence_as_one_line_naming_its_tasks(migrated_db, tmp_path,
                                                                                       browser):
    from runbooks import runner

    outcome = runner.run_plan("maintain daily", ("maintenance",), migrated_db.target, records_root=tmp_path,
                              parameters={"cadence": "daily"}, progress=lambda *_: None)
    [entry] = outcome.notebooks
    assert open_page(browser, outcome.record.path / entry["html"])
    text = browser.find_element("tag name", "body").text
    assert "skipped: a weekly task" not in text and "skipped: a monthly task" not in text
    for cadence, first, last in (("Weekly", "W1. Retention", "W9. Index usage"), ("Monthly", "M1. Full data", "M17.")):
        [line] = [p.text for p in browser.find_elements("tag name", "p") if p.text.startswith(f"{cadence} tasks skipped")]
        assert "this run's cadence is daily" in line and first in line and last in line, line
    assert "D1. Error and performance signals" in text   # what ran is all there


def test_the_index_is_part_of_the_sealed_record(tmp_path):
    record = records.Record.create(tmp_path, records.new_run_id())
    record.write_manifest({"run_id": record.run_id, "command": "deploy", "verdict": "passed", "notebooks": []})
    assert pages.INDEX in record.manifest()["files"] and record.verify() == []
    (record.path / pages.INDEX).write_text("<p>all fine</p>")
    assert f"altered: {pages.INDEX}" in "\n".join(record.verify())
