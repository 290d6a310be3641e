"""Rollback: a run's preflight backup is found, checked again, restored, and the result proven equal to
the run's snapshot; end to end through the runner after a deployment and after a failed phase 2."""

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from runbooks import engine, identity, preflight, records, restore, runner, snapshot
from runbooks.paths import PHASES
from runbooks.rollback import Rollback, RollbackError

from runhelpers import (assert_identical, deploy_in_a_process, preflight_record, hold_phase_two, wait_for_phase_two, executed_notebook, history, make_run, readonly, run_check, runbook,
                        snapshot_of)
from sqlhelpers import wait_until

pytestmark = pytest.mark.both_versions   # rollback restores with pg_restore and SQL that depend on the version


@pytest.fixture
def preflighted(legacy_db, tmp_path):
    """(db, the run's record folder, its run id): a preflight's snapshot and backup, then phase 1 applied."""
    run_id = records.new_run_id()
    folder = tmp_path / run_id
    preflight_record(legacy_db, folder, run_id)
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
    identity_before = identity_of(db)
    rb, checks = rollback_steps(db, folder, run_id, tmp_path / "rollback-run")
    assert {c.name: c.status for c in checks} == {   # the record was never sealed (no runner): said so
        "locate_backup": "warning", "verify_backup": "ok", "safety_backup": "ok", "restore_plan": "ok",
        "restore": "ok", "rollback_proof": "ok", "history": "ok"}
    assert "UNSEALED RECORD" in checks[0].summary
    assert_identical(before, snapshot_of(db))
    rows = history(db)
    assert [(r["version"], r["action"]) for r in rows] == [("000", "apply"), ("rollback", "rollback")]
    assert rows[1]["run_id"] == rb.run.run_id and engine.latest_applied(rows) == {}
    assert (tmp_path / "rollback-run" / "snapshot-after-rollback.json").is_file()
    # the identity and the runs' witnesses survive the rollback, as the history does
    assert identity_of(db) == identity_before
    assert [r[0] for r in db.query(f"select run_id from {identity.RUNS_TABLE} order by recorded_at")] == [
        run_id, rb.run.run_id]


def identity_of(db) -> identity.Identity:
    conn = readonly(db)
    try:
        return identity.read_identity(conn)
    finally:
        conn.close()


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
    assert rb.locate().status == "warning"    # unsealed; its backup.json and witness agree with each other
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
    # the verification kept the post-deployment state; nothing was written since
    assert (record / "post-deployment-rows.json.gz").is_file()
    assert {c["name"]: c["status"] for c in rollback.record.manifest()["notebooks"][0]["checks"]}[
        "later_writes"] == "ok"


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


# -- which database, which backup: refused before anything changes ------------------------------------

@pytest.fixture
def clone_of(server):
    """Factory: clone_of(db) -> a copy made with CREATE DATABASE ... TEMPLATE (its identity row copied
    along), reachable as a service; dropped after the test."""
    made = []

    def clone(db):
        name = f"{db.name}_copy"
        server.admin_execute(f"create database {name} template {db.name}")
        server.pg.add_service(name, name)
        made.append(name)
        return type(db)(name, db.server)

    yield clone
    for name in made:
        server.admin_execute(f"drop database if exists {name} with (force)")


def test_a_backup_restored_into_another_database_is_refused_naming_both_before_anything_changes(
        preflighted, clone_of, tmp_path, capsys):
    db, folder, run_id = preflighted
    copy = clone_of(db)            # same name pattern, same server, even the same identity row: another database
    before, rows = snapshot_of(copy), history(copy)
    code = runbook("rollback", "--service", copy.name, "--run", run_id, "--yes", "--records", tmp_path)
    err = capsys.readouterr().err
    assert code == 2
    assert f"target {copy.name!r} is not the database the backup of run {run_id} was taken from" in err
    assert f"database {db.name} (system identifier" in err and f"database {copy.name} (system identifier" in err
    assert "database oid" in err and "Nothing was changed" in err
    assert_identical(before, snapshot_of(copy))
    assert history(copy) == rows and sorted(p.name for p in tmp_path.iterdir()) == [run_id]


def test_the_restore_itself_refuses_a_backup_of_another_database(preflighted, clone_of):
    db, folder, run_id = preflighted
    copy = clone_of(db)
    info = json.loads((folder / "backup" / "backup.json").read_text())
    with pytest.raises(restore.RestoreRefused, match="is a backup of database .* differ|database oid"):
        restore.restore_backup(copy.target, folder / "backup" / info["file_name"], info["sha256"], run_id=run_id,
                               operator="tester")


def test_a_backup_that_does_not_match_the_databases_witness_is_refused(preflighted, tmp_path, capsys):
    db, folder, run_id = preflighted
    db.execute(f"update {identity.RUNS_TABLE} set backup_sha256 = repeat('0', 64) where run_id = %s", (run_id,))
    before = snapshot_of(db)
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "does not match the database's witness of it" in err and "0" * 64 in err
    assert_identical(before, snapshot_of(db))


def test_an_unsealed_record_without_the_databases_witness_is_refused(preflighted, tmp_path, capsys):
    db, folder, run_id = preflighted
    db.execute(f"delete from {identity.RUNS_TABLE} where run_id = %s", (run_id,))
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path)
    assert code == 2 and "nothing vouches for backup.json" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unsealed_record_rolls_back_on_the_databases_witness_and_says_so_loudly(preflighted, tmp_path, capsys):
    db, folder, run_id = preflighted
    assert not (folder / records.MANIFEST).exists()
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path)
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert f"WARNING: UNSEALED RECORD: run {run_id} never wrote its manifest.json" in captured.err
    assert_identical(snapshot.load_snapshot(folder / "snapshot.json"), snapshot_of(db))
    [rollback_run] = [p.name for p in tmp_path.iterdir() if p.name != run_id]
    manifest = records.Record.open(tmp_path, rollback_run).manifest()
    assert manifest["rolls_back"] == run_id and manifest["rolls_back_unsealed"] is True
    assert any("UNSEALED RECORD" in w for w in manifest["warnings"])
    assert {c["name"]: c["status"] for c in manifest["notebooks"][0]["checks"]}["locate_backup"] == "warning"


# -- what the rollback does not restore -----------------------------------------------------------------

def test_a_user_signing_up_after_the_deployment_is_reported_not_a_failure_of_the_proof(preflighted, tmp_path):
    db, folder, run_id = preflighted
    users = db.query("select count(*) from auth.users")[0][0]
    db.execute("insert into auth.users (id, aud, role, email) values "
               "(gen_random_uuid(), 'authenticated', 'authenticated', 'late.signup@example.com')")
    rb, checks = rollback_steps(db, folder, run_id, tmp_path / "rollback-run")
    proof = next(c for c in checks if c.name == "rollback_proof")
    assert proof.status == "ok", proof.summary
    assert f"auth.users: {users} -> {users + 1} rows (+1)" in proof.summary and "not a failure" in proof.summary
    shown = {r["what"]: r for r in proof.rows}
    assert shown["rows auth.users (not restored)"]["same"] == "changed: a fact, not a failure"
    assert rb.outside_changes == [("auth.users", users, users + 1)]
    assert db.query("select count(*) from auth.users where email = 'late.signup@example.com'") == [(1,)]


# -- a runner killed inside a phase -------------------------------------------------------------------

def kernels_of(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_a_deploy_killed_inside_a_phase_takes_its_kernel_along_and_its_run_rolls_back(make_db, tmp_path, capsys):
    db = make_db("legacy")
    root = tmp_path / "records"
    blocker = hold_phase_two(db)
    try:
        deploy = deploy_in_a_process(db, root, "-p", "lock_timeout", "10min", "-p", "lock_retries", "0", capture=False)
        wait_for_phase_two(db, blocker, deploy)
        [kernel] = kernels_of(deploy.pid)
        # stopped, the kernel cannot run ipykernel's own watchdog thread: only the operating system can end it
        kernel.suspend()
        os.kill(deploy.pid, signal.SIGKILL)
        deploy.wait()
        wait_until(lambda: gone(kernel), "the kernel die with its runner")
    finally:
        blocker.rollback()
        blocker.close()
    [run_id] = [p.name for p in root.iterdir()]
    # every session of the dead run ends (the phase's transaction is rolled back, never committed)
    wait_until(lambda: not db.query("select 1 from pg_stat_activity where application_name like %s",
                                    (f"%{run_id}%",)), "the run's sessions end")
    folder = root / run_id
    assert not (folder / records.MANIFEST).exists() and (folder / "snapshot.json").is_file()
    assert [r["version"] for r in history(db)] == ["000"]          # phase 2 left nothing behind
    unfinished = run_check(db, preflight.unfinished_runs)           # what the next deploy reports
    assert unfinished.status == "warning" and f"runbook rollback --run {run_id} --yes" in unfinished.rows[0]["what to do"]

    capsys.readouterr()
    assert runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", root) == 0
    assert "UNSEALED RECORD" in capsys.readouterr().err
    assert_identical(snapshot.load_snapshot(folder / "snapshot.json"), snapshot_of(db))
    assert [r["action"] for r in history(db)] == ["apply", "rollback"]
    assert run_check(db, preflight.unfinished_runs).status == "ok"   # rolled back: nothing left to resume


# -- writes after the deployment ------------------------------------------------------------------------

# the app, after the deployment: a product inserted with its stock (a child table sorting before its
# parent), one renamed, one without stock deleted
APP_WRITES = """
insert into public.products (id, organization_id, sku, name, price)
  select '00000000-0000-0000-0000-00000000abcd', organization_id, 'LATE-1', 'Written after the deployment', 9.99
  from public.products order by id limit 1;
insert into public.inventory (product_id, organization_id, location, quantity)
  select id, organization_id, 'late', 5 from public.products where sku = 'LATE-1';
update public.products set name = 'Renamed after the deployment', price = price + 1
  where id = (select id from public.products where sku <> 'LATE-1' order by id limit 1);
delete from public.products p where id = (select id from public.products q where sku <> 'LATE-1'
  and not exists (select 1 from public.inventory i where i.product_id = q.id) order by id desc limit 1)
"""


def products(db) -> list[tuple]:
    return db.query("select id, organization_id, sku, name, description, price, created_at from public.products "
                    "order by id") + db.query("select id, product_id, location, quantity from public.inventory order by id")


@pytest.fixture
def written_after(preflighted):
    """(db, folder, run_id, the products as the app left them): the verification recorded the
    post-deployment state, then the app inserted, updated and deleted a product."""
    db, folder, run_id = preflighted
    from runbooks import verification
    check = run_check(db, verification.row_counts, folder)
    assert check.status == "ok" and "post-deployment state kept" in check.summary
    assert (folder / "post-deployment-rows.json.gz").is_file()
    db.execute(APP_WRITES)
    return db, folder, run_id, products(db)


def test_writes_since_the_deployment_are_refused_naming_the_counts_before_anything_changes(written_after, tmp_path,
                                                                                            capsys):
    db, folder, run_id, _ = written_after
    before = snapshot_of(db)
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "4 row(s) written since the deployment" in err, err
    assert "public.inventory: 1 inserted, 0 updated, 0 deleted; public.products: 1 inserted, 1 updated, 1 deleted" in err
    assert "-p discard_later_writes true" in err
    assert_identical(before, snapshot_of(db))
    # the notebook's step refuses the same way, and keeps the rows in its record already
    run = make_run(db, tmp_path / "rollback-run")
    rb = Rollback(run, run_id, folder)
    rb.locate()
    check = rb.later_writes(False)
    run.close()
    assert check.status == "error" and "nothing was changed" in check.summary
    assert {r["table"]: (r["inserted"], r["updated"], r["deleted"]) for r in check.rows} == {
        "public.inventory": (1, 0, 0), "public.products": (1, 1, 1)}
    assert_identical(before, snapshot_of(db))


def test_a_mistyped_discard_parameter_is_refused_before_anything_changes(written_after, tmp_path, capsys):
    db, _, run_id, _ = written_after
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path,
                   "-p", "discard_later_writes", "perhaps")
    assert code == 2 and "discard_later_writes" in capsys.readouterr().err


def test_with_discard_the_rollback_restores_and_its_record_holds_the_rows_which_re_apply(written_after, tmp_path):
    db, folder, run_id, written = written_after
    run = make_run(db, tmp_path / "rollback-run")
    rb = Rollback(run, run_id, folder)
    checks = [rb.locate(), rb.verify_backup(), rb.later_writes(True), rb.safety_backup(True), rb.make_plan(),
              rb.execute(), rb.prove(), rb.history()]
    run.close()
    statuses = {c.name: c.status for c in checks}
    assert statuses["later_writes"] == "warning" and statuses["rollback_proof"] == "ok", checks
    assert "discarding 4 row(s)" in checks[2].summary
    script = tmp_path / "rollback-run" / "later_writes.sql"
    summary = json.loads((tmp_path / "rollback-run" / "later_writes.json").read_text())
    assert summary["rows"] == 4 and [t["table"] for t in summary["tables"]] == ["public.inventory", "public.products"]
    text = script.read_text()
    assert text.count("ON CONFLICT (") == 3 and text.count("\nDELETE FROM") == 1
    assert text.index('INSERT INTO "public"."products"') < text.index('INSERT INTO "public"."inventory"')   # parents first
    assert products(db) != written                                     # the writes are gone
    db.psql_file(script)
    assert products(db) == written                                     # and back


@pytest.mark.slow
def test_runbook_rollback_with_discard_later_writes_restores_and_keeps_the_rows_in_its_record(written_after, tmp_path,
                                                                                            capsys):
    db, folder, run_id, written = written_after
    code = runbook("rollback", "--service", db.name, "--run", run_id, "--yes", "--records", tmp_path,
                   "-p", "discard_later_writes", "true")
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert_identical(snapshot.load_snapshot(folder / "snapshot.json"), snapshot_of(db))
    [rollback_run] = [p.name for p in tmp_path.iterdir() if p.name not in (run_id, "rollback-run")]
    record = records.Record.open(tmp_path, rollback_run)
    manifest = record.manifest()
    checks = {c["name"]: c["status"] for c in manifest["notebooks"][0]["checks"]}
    assert checks["later_writes"] == "warning" and checks["rollback_proof"] == "ok"
    assert record.verify() == []                               # the script is part of the sealed record
    # one verdict, worded alike in the terminal, records show, the manifest, the index and the card; the
    # rows discarded said with their tables and where they are kept
    kept = (record.path / "later_writes.sql").resolve()
    discarded = ("discarded 4 row(s) written since the deployment (public.inventory: 1 inserted, 0 updated, 0 "
                 "deleted; public.products: 1 inserted, 1 updated, 1 deleted); kept in " + str(kept))
    text = manifest["verdict_text"]
    assert text.startswith("PASSED WITH ") and f"verdict: {text}\n" in captured.out
    assert "warning: 01-05_rollback later_writes: discarding 4 row(s)" in captured.out and discarded in captured.out
    assert runbook("records", "show", rollback_run, "--records", tmp_path) == 0
    shown = capsys.readouterr().out
    assert f"verdict {text}\n" in shown and f"verdict: {text}\n" in shown and discarded in shown
    assert f'id="runbook-verdict">{text}<' in (record.path / "index.html").read_text()
    card = (record.path / manifest["notebooks"][0]["html"]).read_text()
    assert f'<span class="runbook-run-verdict">{text}</span>' in card
    # the card names the backup restored and the safety dump, each with its sha256
    restored = manifest["restored_backup"]
    assert restored["run_id"] == run_id and restored["sha256"] in card and manifest["backup"]["sha256"] in card
    assert ">backup restored<" in card and ">safety dump<" in card
    # every file that holds data is readable by its owner only: the dumps, the rows discarded, the row hashes
    assert modes(record.path) | modes(folder) >= {"later_writes.sql": 0o600, "later_writes.json": 0o600,
                                                  "post-deployment-rows.json.gz": 0o600}.items()
    for path in [*record.path.rglob("*"), *folder.rglob("*")]:
        if path.is_file():
            assert path.stat().st_mode & 0o777 == (0o600 if records.holds_data(path) else 0o666 & ~umask()), path
    assert {p.name for p in [*record.path.rglob("*.dump"), *folder.rglob("*.dump")]} and all(
        p.stat().st_mode & 0o777 == 0o600 for p in [*record.path.rglob("*.dump"), *folder.rglob("*.dump")])
    db.psql_file(record.path / "later_writes.sql")
    assert products(db) == written


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def modes(folder: Path) -> set[tuple[str, int]]:
    return {(p.name, p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}
