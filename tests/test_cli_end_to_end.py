"""`runbook` end to end on real servers: rehearse, deploy, status, verify, records, concurrency."""

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from runbooks import engine, records, runner
from runbooks.paths import PHASES

from runhelpers import ended, runbook
from sqlhelpers import wait_until

pytestmark = pytest.mark.slow

PASSWORD = "Deployer-Pa55word-never-in-a-record"


def all_record_bytes(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def deployed(server, tmp_path_factory):
    """A legacy database deployed once by a password-protected role, through .pgpass only."""
    db = server.create_database("legacy")
    db.execute(f"create role deployer login superuser password '{PASSWORD}'")
    server.pg.add_pgpass("deployer", PASSWORD)
    service = f"{db.name}_deployer"
    server.pg.add_service(service, db.name, user="deployer")
    root = tmp_path_factory.mktemp("records")
    code = runbook("deploy", "--service", service, "--records", root)
    [run_id] = [p.name for p in root.iterdir()]
    yield {"db": db, "service": service, "root": root, "run_id": run_id, "code": code}
    server.drop_database(db)
    server.admin_execute("drop role if exists deployer")


def test_deploy_as_a_password_protected_role_passes_and_writes_a_complete_record(deployed):
    assert deployed["code"] == 0
    record = records.Record.open(deployed["root"], deployed["run_id"])
    manifest = record.manifest()
    assert manifest["verdict"] == "passed"
    assert [n["status"] for n in manifest["notebooks"]] == ["passed"] * 5
    assert all((record.path / n["html"]).is_file() for n in manifest["notebooks"])
    assert manifest["server"]["current_user"] == "deployer"
    assert manifest["backup"]["sha256"] == records.sha256_of(record.path / manifest["backup"]["file"])
    assert set(manifest["sql_files"]) >= {f"sql/{path.name}" for _, path in PHASES}
    assert manifest["project"]["git_commit"]
    assert record.verify() == []


def test_no_file_of_the_record_holds_the_password_not_even_papermills_metadata(deployed):
    folder = deployed["root"] / deployed["run_id"]
    assert PASSWORD.encode() not in all_record_bytes(folder)
    for secret in records.known_secrets():
        assert secret.encode() not in all_record_bytes(folder)
    nb = nbformat.read(next((folder / "notebooks").glob("*preflight.ipynb")), as_version=4)
    parameters = nb.metadata.papermill.parameters
    assert set(parameters) <= {"target_kind", "target_name", "targets_file", "run_id", "record_dir", "operator"}
    assert nb.metadata.truthsource["target"]["name"] == deployed["service"]


def test_a_password_given_as_a_parameter_value_is_redacted_from_the_manifest_and_fails_the_run(empty_db, tmp_path):
    secret = records.known_secrets()[0]   # refused by the CLI (test_cli); a caller of the runner is caught here
    notebook = Path(__file__).parent / "notebooks" / "sql_inspection.ipynb"
    outcome = runner.run_plan("test", [str(notebook)], empty_db.target, records_root=tmp_path,
                              parameters={"approver": secret}, progress=lambda *_: None)
    assert outcome.exit_code == 1
    manifest = outcome.record.manifest()
    assert manifest["parameters"] == {"approver": "[REDACTED]"}
    assert manifest["error"] == "a secret appeared in manifest.json; redacted there"
    assert secret.encode() not in all_record_bytes(outcome.record.path)
    assert outcome.record.verify() == []


def test_the_history_records_each_phase_with_its_checksum_and_run(deployed):
    conn = deployed["db"].connect()
    history = engine.read_history(conn)
    conn.close()
    assert [(r["version"], r["action"], r["run_id"]) for r in history] == [
        (version, "apply", deployed["run_id"]) for version, _ in PHASES]
    assert [r["sha256"] for r in history] == [records.sha256_of(path) for _, path in PHASES]


def test_status_shows_every_phase_applied_and_the_files_matching(deployed, capsys):
    assert runbook("status", "--service", deployed["service"]) == 0
    out = capsys.readouterr().out
    assert out.count("applied") >= 3 and "files on disk match what was applied" in out


def test_records_list_and_show_tell_who_did_what_when_and_where(deployed, capsys):
    assert runbook("records", "list", "--records", deployed["root"]) == 0
    assert deployed["run_id"] in capsys.readouterr().out
    assert runbook("records", "show", deployed["run_id"], "--records", deployed["root"]) == 0
    out = capsys.readouterr().out
    assert "verdict PASSED" in out and f"service {deployed['service']}" in out and "as deployer" in out
    assert "backup:" in out and "sha256" in out


def test_records_verify_detects_a_tampered_notebook(deployed, capsys, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(deployed["root"], copy)
    assert runbook("records", "verify", deployed["run_id"], "--records", copy) == 0
    seal = records.Record.open(copy, deployed["run_id"]).seal()
    assert f"seal: sha256 of manifest.json {seal}" in capsys.readouterr().out
    notebook = next((copy / deployed["run_id"] / "notebooks").glob("*phase2*.ipynb"))
    notebook.write_text(notebook.read_text().replace("passed", "passed!"))
    assert runbook("records", "verify", deployed["run_id"], "--records", copy) == 1
    assert f"altered: notebooks/{notebook.name}" in capsys.readouterr().out


def test_a_second_deploy_skips_applied_phases_and_passes_and_no_means_no(deployed, capsys):
    assert runbook("deploy", "--service", deployed["service"], "--records", deployed["root"],
                   "-p", "reapply", "no", "-p", "force", "off") == 0
    out = capsys.readouterr().out   # the terminal says skipped, not passed, for each phase
    for stem in ("01_phase1_core_functions", "02_phase2_core_schema", "03_phase3_production_enhancements"):
        assert re.search(rf"^\[\d/5\] {stem}: skipped \(already applied\)", out, re.MULTILINE), out
    assert re.search(r"^\[1/5\] 00_preflight: passed( with \d+ warnings?)? \(", out, re.MULTILINE), out
    conn = deployed["db"].connect()
    assert len(engine.read_history(conn)) == 3  # unchanged phases are skipped, not re-run
    conn.close()


def test_verify_alone_compares_with_the_last_preflight_snapshot_and_passes(deployed, capsys):
    assert runbook("verify", "--service", deployed["service"], "--records", deployed["root"]) == 0
    assert "verdict: PASSED" in capsys.readouterr().out


def test_rehearse_needs_no_database_and_prints_the_record_and_a_passing_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # as `make rehearse` runs it: records in ./records
    assert runbook("rehearse") == 0
    out = capsys.readouterr().out
    [run_id] = [p.name for p in (tmp_path / "records").iterdir()]
    record = records.Record.open(tmp_path / "records", run_id)
    assert f"record: records/{run_id}" in out and "verdict: PASSED" in out
    assert f"seal: sha256 of manifest.json {record.seal()}" in out
    assert record.manifest()["rehearsal"]["fixture"] == "sql/support/legacy_fixture.sql"
    assert record.verify() == []


def test_a_failing_phase_stops_the_run_with_exit_1_and_the_record_shows_where(make_db, tmp_path):
    db = make_db("legacy")
    engine.ApplyEngine(db.target, run_id="earlier-run").apply(*PHASES[0])
    blocker = db.connect(application_name="a long report")
    with blocker.cursor() as cur:
        cur.execute("lock table public.api_keys in access share mode")
    try:
        code = runbook("deploy", "--service", db.name, "--records", tmp_path,
                       "-p", "lock_timeout", "100ms", "-p", "lock_retries", "0")
    finally:
        blocker.rollback()
        blocker.close()
    assert code == 1
    [run_id] = [p.name for p in tmp_path.iterdir()]
    manifest = records.Record.open(tmp_path, run_id).manifest()
    statuses = {n["name"]: n["status"] for n in manifest["notebooks"]}
    assert statuses == {"preflight": "passed", "phase1": "passed", "phase2": "failed",
                        "phase3": "not run", "verification": "not run"}
    failed = next(n for n in manifest["notebooks"] if n["name"] == "phase2")
    assert "LockRetriesExhausted" in failed["error"] and "a long report" in failed["error"]
    nb = nbformat.read(tmp_path / run_id / failed["file"], as_version=4)
    assert any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    conn = db.connect()
    assert [r["version"] for r in engine.read_history(conn)] == ["000"]  # phase 2 left nothing behind
    conn.close()


def test_two_deploys_at_once_never_interleave_the_second_gives_up_naming_the_first_with_exit_2(make_db, tmp_path, capsys):
    db = make_db("legacy")
    first = subprocess.Popen([sys.executable, "-m", "runbooks.cli", "deploy", "--service", db.name,
                              "--records", str(tmp_path / "first")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=os.environ.copy())
    wait_until(lambda: db.query("select 1 from pg_locks where locktype = 'advisory' and classid = %s and objid = %s",
                                (engine.LOCK_CLASS, engine.RUN_LOCK)),
               "the first deploy holding the run lock", stopped=lambda: ended(first))
    os.environ["RUNBOOK_LOCK_WAIT"] = "1"
    try:
        code = runbook("deploy", "--service", db.name, "--records", tmp_path / "second")
    finally:
        del os.environ["RUNBOOK_LOCK_WAIT"]
    printed = capsys.readouterr()
    assert code == 2 and "locked by another runner" in printed.err and "runbook run" in printed.out
    assert first.wait(timeout=300) == 0
    [first_run] = [p.name for p in (tmp_path / "first").iterdir()]
    conn = db.connect()
    assert {r["run_id"] for r in engine.read_history(conn)} == {first_run}
    conn.close()
    [second_run] = [p.name for p in (tmp_path / "second").iterdir()]
    second = records.Record.open(tmp_path / "second", second_run).manifest()
    assert second["verdict"] == "refused" and {n["status"] for n in second["notebooks"]} == {"not run"}
    assert "locked by another runner" in second["error"]
