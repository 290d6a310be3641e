"""Rollback: a run's preflight backup is found, checked again, restored, and the result proven equal to
the run's snapshot; end to end through the runner after a deployment and after a failed phase 2."""

import json

import pytest

from runbooks import engine, preflight, records, runner, snapshot
from runbooks.paths import PHASES
from runbooks.rollback import Rollback, RollbackError

from runhelpers import assert_identical, executed_notebook, history, make_run, readonly, snapshot_of


@pytest.fixture
def preflighted(legacy_db, tmp_path):
    """(db, the run's record folder, its run id): a preflight's snapshot and backup, then phase 1 applied."""
    run_id = records.new_run_id()
    folder = tmp_path / run_id
    conn = readonly(legacy_db)
    try:
        assert preflight.snapshot(conn, folder).status == "ok"
        assert preflight.backup(conn, legacy_db.target, folder, run_id).status == "ok"
    finally:
        conn.close()
    engine.ApplyEngine(legacy_db.target, run_id=run_id, operator="deployer").apply(*PHASES[0])
    return legacy_db, folder, run_id


def rollback_steps(db, folder, run_id, record_dir, safety=True) -> tuple[Rollback, list]:
    run = make_run(db, record_dir)
    rb = Rollback(run, run_id, folder)
    checks = [rb.locate(), rb.verify_backup(), rb.safety_backup(safety), rb.make_plan(), rb.execute(), rb.prove(),
              rb.history()]
    run.close()
    return rb, checks


def test_the_steps_restore_the_backup_and_prove_the_database_equals_the_snapshot(preflighted, tmp_path):
    db, folder, run_id = preflighted
    before = snapshot.load_snapshot(folder / "snapshot.json")
    assert not snapshot.compare_snapshots(before, snapshot_of(db)).identical      # phase 1 changed it
    rb, checks = rollback_steps(db, folder, run_id, tmp_path / "rollback-run")
    assert {c.name: c.status for c in checks} == {
        "locate_backup": "ok", "verify_backup": "ok", "safety_backup": "ok", "restore_plan": "ok", "restore": "ok",
        "rollback_proof": "ok", "history": "ok"}
    assert_identical(before, snapshot_of(db))
    rows = history(db)
    assert [(r["version"], r["action"]) for r in rows] == [("000", "apply"), ("rollback", "rollback")]
    assert rows[1]["run_id"] == rb.run.run_id and engine.latest_applied(rows) == {}
    assert (tmp_path / "rollback-run" / "snapshot-after-rollback.json").is_file()


def test_a_run_without_a_backup_in_its_record_is_refused(legacy_db, tmp_path):
    run = make_run(legacy_db, tmp_path / "rollback-run")
    (tmp_path / "20260101T000000Z-000000").mkdir()
    check = Rollback(run, "20260101T000000Z-000000", tmp_path / "20260101T000000Z-000000").locate()
    run.close()
    assert check.status == "error" and "has no backup in its record" in check.summary
    with pytest.raises(RollbackError, match="rollback_run_id is required"):
        Rollback(run, None)


def test_a_backup_altered_since_it_was_recorded_is_refused_and_nothing_changes(preflighted, tmp_path):
    db, folder, run_id = preflighted
    dump = next((folder / "backup").glob("*.dump"))
    dump.write_bytes(dump.read_bytes() + b"\0")
    before = snapshot_of(db)
    run = make_run(db, tmp_path / "rollback-run")
    rb = Rollback(run, run_id, folder)
    assert rb.locate().status == "ok"
    check = rb.verify_backup()
    run.close()
    assert check.status == "error" and "does not match its recorded sha256" in check.summary
    assert_identical(before, snapshot_of(db))
    assert [r["action"] for r in history(db)] == ["apply"]


def test_the_proof_fails_when_the_restored_database_differs_from_the_snapshot(legacy_db, tmp_path):
    run_id = records.new_run_id()
    folder = tmp_path / run_id
    conn = readonly(legacy_db)
    try:
        preflight.snapshot(conn, folder)
        legacy_db.execute("insert into public.organizations (name, slug) values ('Written after the snapshot', 'late')")
        preflight.backup(conn, legacy_db.target, folder, run_id)
    finally:
        conn.close()
    rb, checks = rollback_steps(legacy_db, folder, run_id, tmp_path / "rollback-run", safety=False)
    proof = next(c for c in checks if c.name == "rollback_proof")
    assert proof.status == "error" and "public.organizations: 3 -> 4 rows" in proof.summary
    assert {r["what"]: r["same"] for r in proof.rows}["rows public.organizations"] == "NO"
    assert next(c for c in checks if c.name == "safety_backup").status == "warning"


def test_the_safety_backup_lets_a_rollback_itself_be_rolled_back(preflighted, tmp_path):
    db, folder, run_id = preflighted
    deployed = snapshot_of(db)
    first, _ = rollback_steps(db, folder, run_id, tmp_path / "first-rollback")
    second, checks = rollback_steps(db, first.run.record_dir, first.run.run_id, tmp_path / "second-rollback",
                                    safety=False)
    assert {c.name: c.status for c in checks}["rollback_proof"] == "ok"
    assert_identical(deployed, snapshot_of(db))


# -- end to end through the runner ------------------------------------------------------------------

def quiet(*_):
    pass


@pytest.mark.slow
def test_deploy_then_rollback_through_the_runner_returns_the_legacy_database_to_its_snapshot(legacy_db, tmp_path):
    deploy = runner.run_plan("deploy", runner.DEPLOY_PLAN, legacy_db.target, records_root=tmp_path, progress=quiet)
    assert deploy.verdict == "passed", deploy.notebooks
    record = deploy.record.path
    manifest = deploy.record.manifest()
    assert [n["status"] for n in manifest["notebooks"]] == ["passed"] * 5
    assert all((record / n["file"]).is_file() and (record / n["html"]).is_file() for n in manifest["notebooks"])
    assert manifest["backup"]["sha256"] == records.sha256_of(record / manifest["backup"]["file"])
    assert (record / "snapshot.json").is_file() and deploy.record.verify() == []
    verification = next(n for n in manifest["notebooks"] if n["name"] == "verification")
    assert {c["name"]: c["status"] for c in verification["checks"]}["success_criteria"] == "ok"
    preflight_checks = {c["name"] for c in manifest["notebooks"][0]["checks"]}
    assert {"signoff", "privileges", "long_transactions", "blocking_locks", "legacy_rule_breakers", "snapshot",
            "backup"} <= preflight_checks

    rollback = runner.run_plan("rollback", ("rollback",), legacy_db.target, records_root=tmp_path, progress=quiet,
                               parameters={"rollback_run_id": deploy.run_id, "rollback_record_dir": str(record)})
    assert rollback.verdict == "passed", rollback.notebooks
    assert_identical(snapshot.load_snapshot(record / "snapshot.json"), snapshot_of(legacy_db))
    rows = history(legacy_db)
    assert [r["action"] for r in rows] == ["apply", "apply", "apply", "rollback"]
    assert rows[-1]["run_id"] == rollback.run_id and engine.latest_applied(rows) == {}
    assert rollback.record.manifest()["backup"]["file"].startswith("backup/")   # the safety backup
    assert "NOT identical" not in json.dumps(executed_notebook(rollback))


@pytest.mark.slow
def test_a_rollback_after_a_failed_phase_2_returns_the_database_to_its_snapshot(legacy_db, tmp_path):
    held = {}

    def hold_a_lock_once_phase_1_passed(message):
        if "01_phase1_core_functions: passed" in message:
            held["conn"] = legacy_db.connect(application_name="a long report")
            with held["conn"].cursor() as cur:
                cur.execute("lock table public.api_keys in access share mode")

    try:
        deploy = runner.run_plan("deploy", runner.DEPLOY_PLAN, legacy_db.target, records_root=tmp_path,
                                 progress=hold_a_lock_once_phase_1_passed,
                                 parameters={"lock_retries": 0, "lock_timeout": "100ms"})
    finally:
        if "conn" in held:
            held["conn"].rollback()
            held["conn"].close()
    statuses = {n["name"]: n["status"] for n in deploy.notebooks}
    assert statuses == {"preflight": "passed", "phase1": "passed", "phase2": "failed", "phase3": "not run",
                        "verification": "not run"}
    assert [r["version"] for r in history(legacy_db)] == ["000"]

    rollback = runner.run_plan("rollback", ("rollback",), legacy_db.target, records_root=tmp_path, progress=quiet,
                               parameters={"rollback_run_id": deploy.run_id,
                                           "rollback_record_dir": str(deploy.record.path)})
    assert rollback.verdict == "passed", rollback.notebooks
    assert_identical(snapshot.load_snapshot(deploy.record.path / "snapshot.json"), snapshot_of(legacy_db))
    assert legacy_db.query("select to_regnamespace('private')") == [(None,)]
