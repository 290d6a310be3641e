"""Promotion: a production target takes only phase files a non-production target has proven.

One staging deployment per module (a real `runbook deploy` of the legacy fixture, sealed record and
deployment history); each production database is a fresh clone. Refusals exit 2 before anything
changes; accepted runs name their evidence in the record; overrides are recorded with the reason.
"""

import html
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from runbooks import by_hand, connection, promotion, records, runner

from runhelpers import runbook, sign_off_window, target_entry

pytestmark = pytest.mark.slow

SIGNOFF = ["--yes", "-p", "approver", "Dana DBA", "-p", "change_ticket", "CHG-7", "-p", "stakeholders_notified",
           "true", "-p", "rollback_plan_confirmed", "true"]


@pytest.fixture(scope="module")
def staging(server, tmp_path_factory):
    """The legacy fixture deployed to a non-production target, with its sealed record."""
    db = server.create_database("legacy")
    folder = tmp_path_factory.mktemp("promotion")
    targets = folder / "targets.toml"
    targets.write_text(target_entry("staging", server, db.name))
    root = folder / "records"
    code = runbook("deploy", "--target", "staging", "--targets-file", targets, "--records", root)
    [run_id] = [p.name for p in root.iterdir()]
    yield {"db": db, "root": root, "run_id": run_id, "code": code, "record": records.Record.open(root, run_id)}
    server.drop_database(db)


@pytest.fixture
def fleet(server, staging, make_db, tmp_path):
    """A targets file with the staging target and a fresh production database."""
    prod = make_db("legacy")
    targets = tmp_path / "targets.toml"
    targets.write_text(target_entry("staging", server, staging["db"].name)
                       + target_entry("prod", server, prod.name, production=True))
    return {"server": server, "prod": prod, "targets": targets, "target": connection.from_targets_file("prod", targets)}


def prod_alone(fleet, tmp_path):
    """A targets file with the production target only: no staging history to ask."""
    path = tmp_path / "prod-alone.toml"
    path.write_text(target_entry("prod", fleet["server"], fleet["prod"].name, production=True))
    return path


def deploy_prod(fleet, root, *extra) -> int:
    return runbook("deploy", "--target", "prod", "--targets-file", fleet["targets"], "--records", root,
                   *SIGNOFF, "-p", "maintenance_window", sign_off_window(-1, 2), *extra)


def only_record(root) -> records.Record:
    [run_id] = [row["run_id"] for row in records.list_records(root) if row["target"] == "prod"]
    return records.Record.open(root, run_id)


def test_the_staging_deployment_passed_with_a_sealed_record(staging):
    assert staging["code"] == 0 and staging["record"].verify() == []


def test_production_without_staging_evidence_is_refused_with_exit_2_before_anything_changes(fleet, tmp_path, capsys):
    lonely = prod_alone(fleet, tmp_path)
    before = fleet["prod"].query("select count(*) from pg_class")
    root = tmp_path / "records"
    code = runbook("deploy", "--target", "prod", "--targets-file", lonely, "--records", root, *SIGNOFF,
                   "-p", "maintenance_window", sign_off_window(-1, 2))
    err = capsys.readouterr().err
    assert code == 2
    assert "production target 'prod' refused: no non-production target passed a full deployment" in err
    assert "000_core_functions.sql" in err and "promotion_override" in err
    assert fleet["prod"].query("select count(*) from pg_class") == before
    assert not root.exists() or not any(root.iterdir())


def promotion_on_page(record: records.Record) -> str:
    """The promotion line of the run's index.html, the auditor's page."""
    page = (record.path / records.INDEX_FILE).read_text()
    return html.unescape(re.search(r'<span id="runbook-promotion">(.*?)</span>', page).group(1))


def test_production_with_staging_evidence_in_the_records_passes_and_its_record_names_the_evidence(
        fleet, staging, tmp_path):
    root = tmp_path / "records"
    shutil.copytree(staging["root"], root)   # the records folder the staging run wrote
    assert deploy_prod(fleet, root) == 0
    record = only_record(root)
    decided = record.manifest()["promotion"]
    assert decided["required"] and decided["allowed"] and decided["override"] is None
    assert decided["evidence"]["run_id"] == staging["run_id"]
    assert decided["evidence"]["target"]["name"] == "staging"
    assert decided["evidence"]["seal"] == staging["record"].seal()
    assert decided["phase_files"] == promotion.phase_digests()
    assert record.verify() == []
    assert f"promoted from: run {staging['run_id']} on target staging" in records.describe(record)
    assert f"run {staging['run_id']} on target staging" in promotion_on_page(record)


def test_the_override_goes_on_without_evidence_and_is_recorded_with_its_reason(fleet, tmp_path):
    lonely = prod_alone(fleet, tmp_path)
    root = tmp_path / "records"
    code = runbook("deploy", "--target", "prod", "--targets-file", lonely, "--records", root, *SIGNOFF,
                   "-p", "maintenance_window", sign_off_window(-1, 2),
                   "-p", "promotion_override", "CHG-7: staging is down, fix is urgent")
    assert code == 0
    manifest = only_record(root).manifest()
    assert manifest["promotion"]["override"] == {"reason": "CHG-7: staging is down, fix is urgent"}
    assert manifest["promotion"]["evidence"] is None
    assert manifest["parameters"]["promotion_override"] == "CHG-7: staging is down, fix is urgent"
    assert ("promotion: OVERRIDDEN without staging evidence: CHG-7: staging is down, fix is urgent"
            in records.describe(only_record(root)))
    assert promotion_on_page(only_record(root)) == "OVERRIDDEN without staging evidence: CHG-7: staging is down, fix is urgent"


def test_evidence_for_other_phase_files_is_not_accepted(staging):
    other = {name: "0" * 64 if "001_" in name else digest for name, digest in promotion.phase_digests().items()}
    misses = []
    oldest = datetime.now(timezone.utc) - timedelta(days=14)
    assert promotion.evidence_in_records(staging["root"], other, oldest, misses) == []
    assert misses == [f"run {staging['run_id']} on target 'staging': other phase files (001_core_schema.sql differ)"]


def test_evidence_older_than_the_maximum_age_is_not_accepted(fleet, staging):
    later = datetime.now(timezone.utc) + timedelta(days=15)
    decision = promotion.decide(fleet["target"], staging["root"], now=later)
    assert not decision.allowed and "in the last 14 days" in decision.problem
    assert f"run {staging['run_id']} on target 'staging': too old" in decision.problem
    assert promotion.decide(fleet["target"], staging["root"], now=later, max_age_days=30).allowed


def test_a_tampered_staging_record_is_not_evidence(fleet, staging, tmp_path):
    root = tmp_path / "records"
    shutil.copytree(staging["root"], root)
    (root / staging["run_id"] / records.NOTEBOOKS_DIR / "05-04_verification.ipynb").write_text("{}")
    lonely = prod_alone(fleet, tmp_path)
    decision = promotion.decide(connection.from_targets_file("prod", lonely), root)
    assert not decision.allowed and "does not match its manifest" in decision.problem


def test_staging_evidence_is_found_in_its_deployment_history_when_its_record_is_elsewhere(fleet, staging, tmp_path):
    decision = promotion.decide(fleet["target"], tmp_path / "no-records-here")
    assert decision.allowed and decision.evidence.source == "deployment history"
    assert decision.evidence.run_id == staging["run_id"] and decision.evidence.target["name"] == "staging"
    assert decision.evidence.seal is None


def test_the_preflight_notebook_refuses_production_without_evidence_the_same_way(fleet, tmp_path):
    lonely = prod_alone(fleet, tmp_path)
    outcome = runner.run_plan("deploy", ("preflight",), connection.from_targets_file("prod", lonely),
                              records_root=tmp_path / "records", progress=lambda *_: None,
                              parameters={"approver": "Dana DBA", "change_ticket": "CHG-7",
                                          "maintenance_window": sign_off_window(-1, 2),
                                          "stakeholders_notified": True, "rollback_plan_confirmed": True})
    assert outcome.verdict == "failed"
    [entry] = outcome.notebooks
    assert "production target 'prod' refused: no non-production target passed" in entry["error"]
    assert not (outcome.record.path / "backup").exists()
    assert outcome.record.manifest()["promotion"]["allowed"] is False


def test_status_all_shows_which_digests_each_target_has_applied(fleet, staging, capsys):
    assert runbook("status", "--all", "--targets-file", fleet["targets"], "--records", staging["root"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["target", "prod", *(Path(name).name for name in promotion.phase_digests())]   # no name cut
    staging_line = next(line for line in out.splitlines() if line.startswith("staging "))
    prod_line = next(line for line in out.splitlines() if line.startswith("prod "))
    for digest in promotion.phase_digests().values():
        assert "=" + digest[:12] in staging_line
    assert prod_line.split()[1:] == ["yes", "pending", "pending", "pending"]
    assert f"proven by run {staging['run_id']} on target 'staging'" in out


def test_a_phase_stepped_through_by_hand_on_production_needs_the_preflights_run_even_when_told_not_to(
        fleet, tmp_path, monkeypatch):
    monkeypatch.setenv(by_hand.RECORDS_ENV, str(tmp_path / "records"))
    with pytest.raises(by_hand.PreflightRequired, match="production target takes a phase only in the run of a passed"):
        by_hand.joined_run("01_phase1_core_functions", fleet["target"], require_preflight=False)
