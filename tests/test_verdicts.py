"""A run's one verdict: decided once from its notebooks' results, worded the same wherever it is printed,
and never a count without what it counts."""

from __future__ import annotations

from runbooks import pages, records, verdicts


def manifest_of(*notebooks: dict, error: str | None = None) -> dict:
    return {"run_id": "20260101T000000Z-abcdef", "command": "deploy", "notebooks": list(notebooks), "error": error}


PREFLIGHT = {"name": "preflight", "file": "notebooks/01-00_preflight.ipynb", "status": "passed",
             "checks": [{"name": "signoff", "status": "info", "summary": "not production"},
                        {"name": "advisor_baseline", "status": "warning", "summary": "2 findings on objects elsewhere"}]}
VERIFICATION = {"name": "verification", "file": "notebooks/05-04_verification.ipynb", "status": "passed",
                "checks": [{"name": "security_lints", "status": "warning", "summary": "no error; 1 warning(s)"}]}


def test_a_passed_run_with_warnings_says_how_many_and_names_each():
    decided = verdicts.decide(manifest_of(PREFLIGHT, VERIFICATION), "passed")
    assert decided["verdict"] == "passed" and decided["verdict_text"] == "PASSED WITH 2 WARNINGS"
    lines = verdicts.lines({**manifest_of(PREFLIGHT, VERIFICATION), **decided})
    assert lines == ["verdict: PASSED WITH 2 WARNINGS",
                     "  warning: 01-00_preflight advisor_baseline: 2 findings on objects elsewhere",
                     "  warning: 05-04_verification security_lints: no error; 1 warning(s)"]


def test_a_failed_run_names_the_cell_where_it_stopped_and_a_refusal_its_reason():
    stopped = {"name": "phase2", "file": "notebooks/03-02_phase2_core_schema.ipynb", "status": "failed",
               "failed_cell": 12, "error": "ChecksumMismatch: changed since applied", "checks": []}
    decided = verdicts.decide(manifest_of(PREFLIGHT, stopped), "failed")
    assert decided["verdict_text"] == "FAILED"
    assert {"level": "error", "notebook": "03-02_phase2_core_schema", "check": "cell 12",
            "summary": "ChecksumMismatch: changed since applied"} in decided["verdict_detail"]
    refused = verdicts.decide(manifest_of(error="LockBusy: another run holds the database"), "refused")
    assert refused["verdict_text"] == "REFUSED"
    assert refused["verdict_detail"][0]["summary"] == "LockBusy: another run holds the database"


def test_a_rollback_that_discarded_rows_says_how_many_of_which_tables_and_where_they_are_kept(tmp_path):
    rollback = {"name": "rollback", "file": "notebooks/01-05_rollback.ipynb", "status": "passed",
                "checks": [{"name": "later_writes", "status": "warning", "summary": "discarding 2 row(s)"}],
                "facts": {"discarded": {"rows": 2, "tables": "public.products: 1 inserted, 1 updated, 0 deleted",
                                        "file": "later_writes.sql"}}}
    manifest = manifest_of(rollback)
    manifest.update(verdicts.decide(manifest, "passed"))
    said = "\n".join(verdicts.lines(manifest, tmp_path))
    assert "verdict: PASSED WITH 1 WARNING\n" in said
    assert (f"discarded 2 row(s) written since the deployment (public.products: 1 inserted, 1 updated, 0 deleted); "
            f"kept in {tmp_path.resolve() / 'later_writes.sql'}") in said
    # not restored (the rollback failed): nothing was discarded
    assert verdicts.decide(manifest_of(dict(rollback, status="failed")), "failed")["discarded"] is None


def test_the_index_and_every_notebooks_card_show_the_one_verdict_and_name_the_warnings():
    manifest = manifest_of(PREFLIGHT, VERIFICATION)
    manifest.update(verdicts.decide(manifest, "passed"))
    index = pages.index_page(manifest)
    assert 'id="runbook-verdict">PASSED WITH 2 WARNINGS<' in index
    assert "warning: 05-04_verification security_lints: no error; 1 warning(s)" in index
    for entry in manifest["notebooks"]:
        card = pages.notebook_card(manifest, entry, entry["name"])
        assert '<span class="runbook-run-verdict">PASSED WITH 2 WARNINGS</span>' in card


def test_the_header_card_says_none_where_no_approver_or_change_ticket_was_given_and_names_a_phases_sql_file():
    phase = {"name": "phase2", "status": "passed", "seconds": 12.3, "seconds_from": "papermill", "checks": [],
             "facts": {"sql_file": "sql/001_core_schema.sql", "sql_sha256": "ab" * 32}}
    manifest = manifest_of(phase)
    card = pages.notebook_card(manifest, phase, "phase2")
    assert "<th" in card and ">approver</th>" in card.replace(' style="text-align:left"', "")
    assert "none" in pages._approval_rows(manifest)[0][1] and "none" in pages._approval_rows(manifest)[1][1]
    assert f"sql/001_core_schema.sql, sha256 {'ab' * 32}" in card
    assert "(12s, papermill&#x27;s timing)" in card
    signed = dict(manifest, signoff={"approver": "Dana DBA", "change_ticket": "CHG-1"})
    assert [v for _, v in pages._approval_rows(signed)] == ["Dana DBA", "CHG-1"]


def test_a_rollbacks_card_shows_the_backup_it_restored_and_its_own_safety_dump():
    manifest = dict(manifest_of(), rolls_back="20260101T000000Z-aaaaaa",
                    restored_backup={"run_id": "20260101T000000Z-aaaaaa", "file": "backup/db-a.dump", "bytes": 10,
                                     "taken_at": "2026-01-01", "sha256": "cd" * 32},
                    backup={"file": "backup/db-b.dump", "bytes": 20, "sha256": "ef" * 32})
    facts = dict(pages.run_facts(manifest))
    assert "backup/db-a.dump" in facts["backup restored"] and "cd" * 32 in facts["backup restored"]
    assert "backup/db-b.dump" in facts["safety dump"] and "backup" not in facts
    assert records.plural(1, "warning") == "1 warning"
