"""Runs stepped through by hand are runs: the notebooks executed as JupyterLab runs them (no run id),
one run id and one record folder from the preflight on, phases refused without a passed preflight or
whose preflight's run is sealed or of another database, "not proven" without a snapshot, and `runbook
records seal` making a record that `records verify` and `runbook rollback` accept. A practice night on a
sandbox (run, stop, new sandbox, run again, seal, rollback, seal) leaves every record intact."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat
import papermill
import pytest

from runbooks import by_hand, connection, identity, records, runner, verification
from runbooks.paths import NOTEBOOK_DIR

from runhelpers import history, runbook

pytestmark = pytest.mark.slow

STEPS = ("00_preflight", "01_phase1_core_functions", "02_phase2_core_schema",
         "03_phase3_production_enhancements", "04_verification")


def by_hand_run(name: str, db, saved: Path, **parameters) -> nbformat.NotebookNode:
    """A notebook run as JupyterLab runs it: only the target named, no run id; saved where the DBA saves it."""
    saved.mkdir(exist_ok=True)
    out = saved / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), kernel_name="python3",
                               parameters={"target_kind": "service", "target_name": db.name, **parameters},
                               progress_bar=False, cwd=str(NOTEBOOK_DIR),
                               kernel_manager_class=runner.IPCKernelManager)
    return nbformat.read(out, as_version=4)


@pytest.fixture
def by_hand_records(tmp_path):
    root = tmp_path / "records"
    root.mkdir()
    with runner.environment({by_hand.RECORDS_ENV: str(root)}):
        yield root


def practice_run(name: str, saved: Path, **parameters) -> nbformat.NotebookNode:
    """A notebook run by hand on the sandbox: the target left to libpq's environment (PGSERVICE=practice,
    as `runbook sandbox` has the DBA export it), no run id; saved where the DBA saves it."""
    saved.mkdir(exist_ok=True)
    out = saved / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(out), kernel_name="python3",
                               parameters=parameters, progress_bar=False, cwd=str(NOTEBOOK_DIR),
                               kernel_manager_class=runner.IPCKernelManager)
    return nbformat.read(out, as_version=4)


def sandbox_at(services: Path, db) -> None:
    """`runbook sandbox` started: its service, practice, names this database (a new sandbox, a new one);
    the test server's own services stay defined beside it."""
    own = Path(db.server.client_env()["PGSERVICEFILE"]).read_text()
    services.write_text(own + f"\n[practice]\nhost=127.0.0.1\nport={db.server.port}\nuser=postgres\n"
                        f"dbname={db.name}\nsslmode=disable\n")


def record_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_practice_night_run_stop_new_sandbox_run_again_seal_rollback_seal_leaves_every_record_intact(
        make_db, server, by_hand_records, tmp_path, capsys):
    services = tmp_path / "pg_service.conf"
    first, second = make_db("legacy"), make_db("legacy")
    practice = connection.Target(name="practice", kind="service")
    sandbox_at(services, first)
    with runner.environment({"PGSERVICEFILE": str(services), "PGSERVICE": "practice"}):
        # the first sandbox: a preflight and phase 1, by hand; then the sandbox is stopped, a new one started
        practice_run("00_preflight", tmp_path / "night-1")
        run_1 = by_hand.read_state(practice)["run_id"]
        assert by_hand.belongs_to(practice_run("01_phase1_core_functions", tmp_path / "night-1"), run_1)
        kept_1 = record_bytes(by_hand_records / run_1)
        server.drop_database(first)
        sandbox_at(services, second)

        # phase 2 on the new sandbox never joins the first night's run: it names both databases
        with pytest.raises(papermill.PapermillExecutionError) as refused:
            practice_run("02_phase2_core_schema", tmp_path / "refused")
        assert refused.value.ename == "PreflightRequired"
        assert f"run {run_1}'s preflight was of database {first.name}" in refused.value.evalue
        assert f"this target is now database {second.name}" in refused.value.evalue
        assert "another database" in refused.value.evalue and "to start a new run" in refused.value.evalue
        assert record_bytes(by_hand_records / run_1) == kept_1   # nothing written into the first night's run
        assert history(second) == []

        # run again: a new run, every notebook joining it
        saved = tmp_path / "night-2"
        executed = {name: practice_run(name, saved) for name in STEPS}
        run_2 = by_hand.read_state(practice)["run_id"]
        assert run_2 != run_1 and all(by_hand.belongs_to(nb, run_2) for nb in executed.values())
        assert {row["run_id"] for row in history(second)} == {run_2}
        verdict = runner._verdict_of(executed["04_verification"])
        assert {c["name"]: c["status"] for c in verdict["checks"]}["row_counts"] == "ok"   # proven by its snapshot

        # sealing from a terminal without the sandbox's exports is refused, nothing changed, naming what to export
        with runner.environment({"PGSERVICEFILE": str(tmp_path / "not-exported.conf")}):
            assert runbook("records", "seal", run_2, "--records", by_hand_records, "--notebooks", saved) == 2
        assert "export PGSERVICEFILE" in capsys.readouterr().err
        assert not (by_hand_records / run_2 / records.MANIFEST).exists() and run_2 in unfinished(second)

        assert runbook("records", "seal", run_2, "--records", by_hand_records, "--notebooks", saved) == 0
        assert f"the database's witness of run {run_2}" in capsys.readouterr().out
        assert run_2 not in unfinished(second)
        assert not by_hand.state_path(practice, by_hand_records).exists()   # the seal ended the run: no pointer
        assert_the_auditor_sees_the_facts(records.Record.open(by_hand_records, run_2))

        assert runbook("rollback", "--run", run_2, "--yes", "--records", by_hand_records) == 0
        columns = {name for (name,) in second.query("select column_name from information_schema.columns "
                                                    "where table_schema = 'public' and table_name = 'api_keys'")}
        assert "key" in columns and "key_prefix" not in columns   # the legacy shape, plaintext keys and all, back

        # the first night's run is sealed last: its database is gone, its record kept as it was
        assert runbook("records", "seal", run_1, "--records", by_hand_records, "--notebooks", tmp_path / "night-1") == 0
        assert f"holds no witness of run {run_1}" in capsys.readouterr().out
    every = [p.name for p in by_hand_records.iterdir() if p.is_dir()]
    assert len(every) == 3 and {run_1, run_2} < set(every)
    for run_id in every:
        assert runbook("records", "verify", run_id, "--records", by_hand_records) == 0, run_id
    assert not list(by_hand_records.glob("last-preflight-*.json"))


def assert_the_auditor_sees_the_facts(record: records.Record) -> None:
    """A by-hand run's record: every notebook with its real duration, each phase's card its SQL file and
    sha256, approver and change ticket none, and the run's verdict on every card as in the manifest."""
    manifest = record.manifest()
    assert manifest["command"] == "by hand" and manifest["verdict"] == "passed"
    assert [(n["name"], n["status"]) for n in manifest["notebooks"]] == [(name, "passed") for name in STEPS]
    assert manifest["backup"]["file"].startswith("backup/")
    for entry in manifest["notebooks"]:
        assert entry["seconds_from"] == "papermill" and entry["seconds"] > 0
        card = (record.path / entry["html"]).read_text()
        assert f'<span class="runbook-run-verdict">{manifest["verdict_text"]}</span>' in card
        assert ">approver</th><td style=\"text-align:left\">none<" in card
        if entry["name"] in by_hand.PHASES:
            sql_file = entry["facts"]["sql_file"]
            assert f"{sql_file}, sha256 {records.sha256_of(Path(NOTEBOOK_DIR).parent / sql_file)}" in card
    kept = nbformat.read(record.path / manifest["notebooks"][2]["file"], as_version=4)
    assert kept.metadata["truthsource"]["run_id"] == record.run_id


def unfinished(db) -> set[str]:
    conn = db.connect(readonly=True, autocommit=True)
    try:
        return {row["run_id"] for row in identity.unfinished_runs(conn)}
    finally:
        conn.close()


def test_a_phase_by_hand_without_a_preflight_is_refused_naming_what_to_do(legacy_db, by_hand_records, tmp_path):
    with pytest.raises(papermill.PapermillExecutionError) as refused:
        by_hand_run("01_phase1_core_functions", legacy_db, tmp_path / "saved")
    assert refused.value.ename == "PreflightRequired"
    assert "Run 00_preflight" in refused.value.evalue and "require_preflight = False" in refused.value.evalue
    assert history(legacy_db) == []


THEN = identity.Identity("truthsource_sandbox", 16384, "7300000000000000001", "0b9f1c9e-0000-4000-8000-000000000001")


def write_state(target, root: Path, status: str, hours_ago: float, seen: identity.Identity = THEN) -> Path:
    """The pointer a by-hand preflight leaves, and its run's open record folder."""
    finished = datetime.now(timezone.utc) - timedelta(hours=hours_ago)
    folder = root / "20260101T000000Z-abcdef"
    folder.mkdir(exist_ok=True)
    by_hand.state_path(target, root).write_text(json.dumps({
        "run_id": "20260101T000000Z-abcdef", "record_dir": str(folder), "identity": seen.as_dict(),
        "status": status, "finished_at": finished.isoformat()}))
    return folder


@pytest.mark.parametrize("status, hours_ago, said", [
    ("passed", 13, "more than 12 hours ago"),
    ("failed", 1, "did not pass (failed)"),
    ("running", 1, "did not pass (running)"),
])
def test_a_phase_refuses_a_stale_or_unpassed_preflight_unless_told_and_then_runs_on_its_own(
        by_hand_records, status, hours_ago, said):
    target = connection.Target(name="practice", kind="service")
    write_state(target, by_hand_records, status, hours_ago)
    with pytest.raises(by_hand.PreflightRequired, match=re.escape(said)):
        by_hand.joined_run("02_phase2_core_schema", target)
    assert by_hand.joined_run("02_phase2_core_schema", target, require_preflight=False) is None
    assert by_hand.joined_run("04_verification", target) is None   # read-only: its own run, no refusal


def test_a_recent_passed_preflight_is_joined_by_the_phases_and_the_verification(by_hand_records):
    target = connection.Target(name="practice", kind="service")
    write_state(target, by_hand_records, "passed", 11)
    for name in ("01_phase1_core_functions", "04_verification"):
        assert by_hand.joined_run(name, target)["run_id"] == "20260101T000000Z-abcdef"
    assert by_hand.joined_run("06_maintenance", target) is None   # a run of its own
    with pytest.raises(by_hand.PreflightRequired, match="more than 10 hours ago"):
        by_hand.joined_run("01_phase1_core_functions", target, max_age_hours=10)


def test_a_phase_never_joins_a_sealed_run_it_refuses_naming_the_record_and_how_to_start_a_new_run(by_hand_records):
    target = connection.Target(name="practice", kind="service")
    folder = write_state(target, by_hand_records, "passed", 1)
    records.Record(by_hand_records, folder.name).write_manifest({"run_id": folder.name, "notebooks": []})
    with pytest.raises(by_hand.PreflightRequired) as refused:
        by_hand.joined_run("02_phase2_core_schema", target, now=THEN)
    said = str(refused.value)
    assert f"run {folder.name} of that preflight is sealed ({folder}" in said
    assert "Run 00_preflight for this target to start a new run" in said
    assert by_hand.joined_run("04_verification", target, now=THEN) is None   # a run of its own, not the sealed one


def test_a_phase_never_joins_the_run_of_another_database_it_refuses_naming_both(by_hand_records):
    target = connection.Target(name="practice", kind="service")
    write_state(target, by_hand_records, "passed", 1)
    # the sandbox stopped and a new one started: another cluster, another database, under the same service
    now = identity.Identity("truthsource_sandbox", 16390, "7300000000000000999", "0b9f1c9e-0000-4000-8000-000000000002")
    with pytest.raises(by_hand.PreflightRequired) as refused:
        by_hand.joined_run("02_phase2_core_schema", target, now=now)
    said = str(refused.value)
    assert f"run 20260101T000000Z-abcdef's preflight was of {THEN.describe()}; this target is now {now.describe()}" in said
    assert "system identifier 7300000000000000001 vs 7300000000000000999 (another server)" in said
    assert "to start a new run" in said
    assert by_hand.joined_run("02_phase2_core_schema", target, now=THEN)["run_id"] == "20260101T000000Z-abcdef"


def test_a_pointer_is_removed_only_where_it_names_the_run_given(by_hand_records, tmp_path):
    target = connection.Target(name="practice", kind="service")
    write_state(target, by_hand_records, "passed", 1)
    assert by_hand.clear_pointers("service", "practice", [by_hand_records], run_id="20260101T000000Z-ffffff") == []
    assert by_hand.clear_pointers("service", "practice", [by_hand_records, tmp_path / "elsewhere"]) == [
        by_hand.state_path(target, by_hand_records)]
    assert not by_hand.state_path(target, by_hand_records).exists()


def test_without_a_snapshot_no_data_loss_is_not_proven_rather_than_passed(migrated_db, tmp_path):
    conn = migrated_db.connect(readonly=True, autocommit=True)
    try:
        counts = verification.row_counts(conn, tmp_path)
    finally:
        conn.close()
    criteria = verification.success_criteria([counts])
    result = {row["criterion"]: row for row in criteria.rows}["No data loss"]
    assert result["result"] == "not proven" and "no preflight snapshot" in result["notes"]
    assert not (tmp_path / records.SNAPSHOT_FILE).exists()


def test_sealing_refuses_a_folder_that_is_not_a_by_hand_run(by_hand_records):
    assert runbook("records", "seal", "20260101T000000Z-abcdef", "--records", by_hand_records) == 2
    (by_hand_records / "20260101T000000Z-abcdef").mkdir()
    assert runbook("records", "seal", "20260101T000000Z-abcdef", "--records", by_hand_records) == 2
    assert runbook("records", "seal", "not-a-run", "--records", by_hand_records) == 2
