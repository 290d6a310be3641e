"""A fleet through Dagster, in process: one run per target of the targets file, each `runbook deploy`.

Three embedded databases as staging targets, one of which refuses on purpose (a duplicate SKU under
phase 2's unique rule, found by the preflight), and one target nobody listens on (refused, exit 2).
The two good ones pass with sealed records; the duplicate fails with its record; neither failure is
retried; the canary sensor holds production back until every staging target passed. Skipped where
the `fleet` extra (dagster) is not installed: `pip install -e .[fleet]`.
"""

import socket
import threading
from datetime import datetime

import pytest

dg = pytest.importorskip("dagster", reason="the fleet extra is not installed (pip install -e .[fleet])")

from runbooks import connection, engine, fleet, promotion, records, runner, snapshot  # noqa: E402  (after the skip)

from runhelpers import assert_identical, history, sign_off_window, snapshot_of, target_entry  # noqa: E402
from sqlhelpers import wait_until  # noqa: E402

pytestmark = pytest.mark.slow

STAGING = ("eu", "us", "duplicates", "gone")


def closed_port() -> int:
    """A port of this host that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fleet_runs(server, tmp_path_factory):
    """The staging partitions of a four-target fleet (and one production target), each run once."""
    dbs = {name: server.create_database("legacy") for name in ("eu", "us", "duplicates", "prod")}
    dbs["duplicates"].execute("insert into public.products (organization_id, sku, name) values "
                              "('0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget again')")
    folder = tmp_path_factory.mktemp("fleet")
    targets = folder / "targets.toml"
    targets.write_text("".join(target_entry(name, server, dbs[name].name) for name in ("eu", "us", "duplicates"))
                       + target_entry("gone", server, "postgres").replace(str(server.pg.port), str(closed_port()))
                       + target_entry("prod", server, dbs["prod"].name, production=True))
    resource = fleet.Fleet(targets_file=str(targets), records=str(folder / "records"),
                           signoff_file=str(folder / "change.toml"))
    instance = dg.DagsterInstance.ephemeral()
    fleet.sync_partitions(instance, resource)
    job = fleet.defs.resolve_job_def("deploy_staging")
    results = {name: job.execute_in_process(instance=instance, partition_key=name, raise_on_error=False,
                                            resources={"fleet": resource})
               for name in STAGING}
    yield {"results": results, "instance": instance, "fleet": resource, "root": folder / "records",
           "folder": folder, "prod": dbs["prod"], "dbs": dbs}
    for db in dbs.values():
        server.drop_database(db)


def materialized(result) -> dict:
    [event] = result.asset_materializations_for_node("staging_deployment")
    return {key: value.value for key, value in event.metadata.items()}


def failure_metadata(result) -> dict:
    [event] = result.get_step_failure_events()
    return {key: value.value for key, value in event.step_failure_data.user_failure_data.metadata.items()}


def output_metadata(result, node: str) -> dict:
    """The metadata of an op's output (verification, rollback): its verdict, record and seal."""
    [event] = [e for e in result.events_for_node(node) if e.event_type_value == "STEP_OUTPUT"]
    return {key: value.value for key, value in event.step_output_data.metadata.items()}


def retries(result) -> int:
    return sum(1 for event in result.all_events if event.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_RESTARTED"))


def test_the_partitions_are_the_targets_file_split_into_staging_and_production(fleet_runs):
    instance = fleet_runs["instance"]
    assert instance.get_dynamic_partitions(fleet.STAGING_PARTITIONS.name) == list(STAGING)
    assert instance.get_dynamic_partitions(fleet.PRODUCTION_PARTITIONS.name) == ["prod"]
    assert instance.get_dynamic_partitions(fleet.TARGET_PARTITIONS.name) == [*STAGING, "prod"]
    context = dg.build_sensor_context(instance=instance, resources={"fleet": fleet_runs["fleet"]})
    assert "match the targets file" in fleet.targets_file_partitions(context).skip_message


def grouped(server, name: str, group, *, production: bool = False) -> str:
    return target_entry(name, server, "postgres", production=production) + f"group = {group}\n"


def test_a_group_of_the_targets_file_makes_only_its_targets_partitions(server, tmp_path):
    targets = tmp_path / "targets.toml"
    targets.write_text(grouped(server, "eu-staging", '"eu"') + grouped(server, "eu-prod", '"eu"', production=True)
                       + grouped(server, "us-staging", '"us"') + target_entry("lab", server, "postgres"))
    assert connection.from_targets_file("eu-prod", targets).describe()["group"] == "eu"
    assert "group" not in connection.from_targets_file("lab", targets).describe()
    instance = dg.DagsterInstance.ephemeral()
    eu = fleet.Fleet(targets_file=str(targets), group="eu")
    fleet.sync_partitions(instance, eu)
    assert instance.get_dynamic_partitions(fleet.TARGET_PARTITIONS.name) == ["eu-staging", "eu-prod"]
    assert instance.get_dynamic_partitions(fleet.STAGING_PARTITIONS.name) == ["eu-staging"]
    assert instance.get_dynamic_partitions(fleet.PRODUCTION_PARTITIONS.name) == ["eu-prod"]
    with pytest.raises(connection.TargetError, match="'us-staging' is not in group 'eu'"):
        eu.target("us-staging")
    everyone = fleet.Fleet(targets_file=str(targets))
    fleet.sync_partitions(instance, everyone)
    assert instance.get_dynamic_partitions(fleet.TARGET_PARTITIONS.name) == ["eu-staging", "eu-prod", "us-staging", "lab"]


def test_a_group_no_target_has_is_refused_naming_the_groups_and_a_group_must_be_a_name(server, tmp_path):
    targets = tmp_path / "targets.toml"
    targets.write_text(grouped(server, "eu-staging", '"eu"') + grouped(server, "us-staging", '"us"'))
    instance = dg.DagsterInstance.ephemeral()
    asia = fleet.Fleet(targets_file=str(targets), group="asia")
    with pytest.raises(fleet.UnknownGroup, match="no target of .* is in group 'asia' \\(its groups: eu, us\\)"):
        fleet.sync_partitions(instance, asia)
    skipped = fleet.targets_file_partitions(dg.build_sensor_context(instance=instance, resources={"fleet": asia}))
    assert "in group 'asia' (its groups: eu, us)" in skipped.skip_message
    assert instance.get_dynamic_partitions(fleet.TARGET_PARTITIONS.name) == []
    targets.write_text(grouped(server, "eu-staging", "3"))
    with pytest.raises(connection.TargetError, match="group must be a name in quotes"):
        connection.from_targets_file("eu-staging", targets)


def test_two_targets_pass_with_sealed_records_and_the_run_shows_verdict_record_and_seal(fleet_runs):
    for name in ("eu", "us"):
        result = fleet_runs["results"][name]
        assert result.success, name
        facts = materialized(result)
        record = records.Record.open(fleet_runs["root"], facts["run_id"])
        assert facts["verdict"] == "passed" and facts["seal"] == record.seal() and record.verify() == []
        assert facts["record"] == str(record.path.resolve()) and facts["phase_files"] == promotion.phase_digests()
        manifest = record.manifest()
        assert manifest["command"] == "deploy" and manifest["target"]["name"] == name
        assert manifest["plan"] == ["preflight", "phase1", "phase2", "phase3", "verification"]
        tags = fleet_runs["instance"].get_run_by_id(result.run_id).tags
        assert tags["truthsource/verdict"] == "passed" and tags["truthsource/seal"] == record.seal()


def test_the_target_with_duplicate_skus_fails_with_its_record_and_is_not_retried(fleet_runs):
    result = fleet_runs["results"]["duplicates"]
    assert not result.success and retries(result) == 0
    facts = failure_metadata(result)
    record = records.Record.open(fleet_runs["root"], facts["run_id"])
    assert facts["verdict"] == "failed" and facts["exit_code"] == 1 and facts["seal"] == record.seal()
    preflight = record.manifest()["notebooks"][0]
    assert preflight["status"] == "failed" and "GAD-100" in preflight["error"]
    assert not (record.path / "backup").exists() and record.verify() == []


def test_an_unreachable_target_is_refused_with_exit_2_and_not_retried(fleet_runs):
    result = fleet_runs["results"]["gone"]
    assert not result.success and retries(result) == 0
    facts = failure_metadata(result)
    assert facts["verdict"] == "refused" and facts["exit_code"] == 2
    assert "cannot connect to target 'gone'" in records.Record.open(fleet_runs["root"], facts["run_id"]).manifest()["error"]


def test_verification_of_a_passed_target_passes_with_a_sealed_record_shown_as_the_runs_metadata(fleet_runs):
    instance = fleet_runs["instance"]
    result = fleet.defs.resolve_job_def("verify_targets").execute_in_process(
        instance=instance, partition_key="eu", resources={"fleet": fleet_runs["fleet"]}, raise_on_error=False)
    assert result.success and retries(result) == 0
    facts = output_metadata(result, "verify_target")
    record = records.Record.open(fleet_runs["root"], facts["run_id"])
    assert result.output_for_node("verify_target") == facts["run_id"]
    assert facts["verdict"] == "passed" and facts["seal"] == record.seal() and record.verify() == []
    manifest = record.manifest()
    assert manifest["command"] == "verify" and manifest["target"]["name"] == "eu"
    assert manifest["plan"] == ["verification"]
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags["truthsource/verdict"] == "passed" and tags["truthsource/record"] == facts["record"]
    assert tags["truthsource/stage"] == "verification"


def test_a_run_waits_for_the_pools_only_slot_and_passes_once_it_is_freed(fleet_runs):
    """The pool's limit set to 1 on an instance with storage (an ephemeral one has no pools): a slot
    held by another run keeps the verification of `us` pending, as Dagster's own pool state shows."""
    resource = fleet_runs["fleet"]
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        fleet.sync_partitions(instance, resource)
        storage.set_concurrency_slots(fleet.POOL, 1)
        assert storage.claim_concurrency_slot(fleet.POOL, "another-run", "staging_deployment").is_claimed
        finished = {}
        job = fleet.defs.resolve_job_def("verify_targets")
        worker = threading.Thread(target=lambda: finished.update(result=job.execute_in_process(
            instance=instance, partition_key="us", resources={"fleet": resource}, raise_on_error=False)))
        worker.start()
        try:
            [pending] = wait_until(lambda: [step for step in storage.get_concurrency_info(fleet.POOL).pending_steps
                                            if step.run_id != "another-run"], "the verification to queue for the pool")
            assert pending.step_key == "verify_target" and pending.assigned_timestamp is None
            wait_until(lambda: any(f"blocked by limit for pool {fleet.POOL}" in (e.dagster_event.message or "")
                                   for e in instance.all_logs(pending.run_id) if e.dagster_event),
                       "the run to say it is blocked")
            info = storage.get_concurrency_info(fleet.POOL)
            assert [slot.run_id for slot in info.claimed_slots] == ["another-run"] and worker.is_alive()
            assert not [e for e in instance.all_logs(pending.run_id) if e.dagster_event
                        and e.dagster_event.event_type_value == "STEP_START"]
        finally:
            storage.free_concurrency_slot_for_step("another-run", "staging_deployment")
            worker.join()
        result = finished["result"]
        assert result.success and result.run_id == pending.run_id
        assert output_metadata(result, "verify_target")["verdict"] == "passed"
        info = storage.get_concurrency_info(fleet.POOL)
        assert info.claimed_slots == [] and info.pending_steps == []


def test_the_runs_did_not_interleave(fleet_runs):
    spans = sorted((datetime.fromisoformat(m["started_at"]), datetime.fromisoformat(m["finished_at"]))
                   for m in (records.Record.open(fleet_runs["root"], row["run_id"]).manifest()
                             for row in records.list_records(fleet_runs["root"]))
                   if m["target"]["name"] in STAGING and m["command"] == "deploy")
    assert len(spans) == 4
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))


def test_production_depends_on_every_staging_partition(fleet_runs):
    mapping = fleet.production_deployment.get_partition_mapping(fleet.staging_deployment.key)
    assert isinstance(mapping, dg.AllPartitionMapping)


def test_the_canary_sensor_holds_production_until_every_staging_target_passed_and_it_is_signed_off(fleet_runs):
    instance, resource = fleet_runs["instance"], fleet_runs["fleet"]

    def evaluate():
        return fleet.production_after_staging(dg.build_sensor_context(instance=instance, resources={"fleet": resource}))

    held = evaluate()
    assert "production waits for staging: duplicates, gone not passed" in held.skip_message
    for name in ("duplicates", "gone"):   # the team takes them out of the fleet
        instance.delete_dynamic_partition(fleet.STAGING_PARTITIONS.name, name)
    assert "waits for the change's sign-off file" in evaluate().skip_message
    window = sign_off_window(-1, 2)
    (fleet_runs["folder"] / "change.toml").write_text(
        f'yes = true\n[parameters]\napprover = "Dana DBA"\nchange_ticket = "CHG-9"\nmaintenance_window = "{window}"\n'
        'stakeholders_notified = true\nrollback_plan_confirmed = true\n')
    [request] = evaluate()
    assert request.partition_key == "prod"
    assert request.run_config == {"ops": {"production_deployment": {"config": {"yes": True, "parameters": {
        "approver": "Dana DBA", "change_ticket": "CHG-9", "maintenance_window": window,
        "stakeholders_notified": "true", "rollback_plan_confirmed": "true"}}}}}


def test_the_production_run_the_canary_requests_passes_and_names_its_staging_evidence(fleet_runs):
    instance, resource = fleet_runs["instance"], fleet_runs["fleet"]
    for name in ("duplicates", "gone"):
        if name in instance.get_dynamic_partitions(fleet.STAGING_PARTITIONS.name):
            instance.delete_dynamic_partition(fleet.STAGING_PARTITIONS.name, name)
    (fleet_runs["folder"] / "change.toml").write_text(
        f'yes = true\n[parameters]\napprover = "Dana DBA"\nchange_ticket = "CHG-9"\n'
        f'maintenance_window = "{sign_off_window(-1, 2)}"\nstakeholders_notified = true\nrollback_plan_confirmed = true\n')
    [request] = fleet.production_after_staging(dg.build_sensor_context(instance=instance, resources={"fleet": resource}))
    result = fleet.defs.resolve_job_def("deploy_production").execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config,
        resources={"fleet": resource}, raise_on_error=False)
    assert result.success
    [event] = result.asset_materializations_for_node("production_deployment")
    record = records.Record.open(fleet_runs["root"], event.metadata["run_id"].value)
    evidence = record.manifest()["promotion"]["evidence"]
    staging_runs = {materialized(fleet_runs["results"][name])["run_id"] for name in ("eu", "us")}
    assert evidence["run_id"] in staging_runs and evidence["seal"] and record.verify() == []


def rollback_of_us(fleet_runs, **config):
    """The rollback job on `us`, of its staging deployment's run, with the config given."""
    config = {"run_id": materialized(fleet_runs["results"]["us"])["run_id"], **config}
    return fleet.defs.resolve_job_def("rollback_target").execute_in_process(
        instance=fleet_runs["instance"], partition_key="us", resources={"fleet": fleet_runs["fleet"]},
        run_config={"ops": {"roll_back": {"config": config}}}, raise_on_error=False)


def test_a_rollback_without_yes_is_refused_before_anything_changes(fleet_runs):
    db = fleet_runs["dbs"]["us"]
    before, rows, kept = snapshot_of(db), history(db), records.list_records(fleet_runs["root"])
    result = rollback_of_us(fleet_runs)
    assert not result.success and retries(result) == 0
    [event] = result.get_step_failure_events()
    assert "pass --yes to confirm" in event.step_failure_data.user_failure_data.description
    assert failure_metadata(result) == {"verdict": "refused", "exit_code": 2}
    assert_identical(before, snapshot_of(db))
    assert history(db) == rows and records.list_records(fleet_runs["root"]) == kept
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_id"):
        fleet.defs.resolve_job_def("rollback_target").execute_in_process(
            instance=fleet_runs["instance"], partition_key="us", resources={"fleet": fleet_runs["fleet"]},
            run_config={"ops": {"roll_back": {"config": {"yes": True}}}})


def test_a_rollback_through_the_job_restores_the_targets_snapshot_and_holds_production_back(fleet_runs):
    deployment = records.Record.open(fleet_runs["root"], materialized(fleet_runs["results"]["us"])["run_id"])
    result = rollback_of_us(fleet_runs, yes=True)
    assert result.success and retries(result) == 0
    facts = output_metadata(result, "roll_back")
    record = records.Record.open(fleet_runs["root"], facts["run_id"])
    assert facts["verdict"] == "passed" and facts["seal"] == record.seal() and record.verify() == []
    assert record.manifest()["rolls_back"] == deployment.run_id
    db = fleet_runs["dbs"]["us"]
    assert_identical(snapshot.load_snapshot(deployment.path / "snapshot.json"), snapshot_of(db))
    rows = history(db)
    assert rows[-1]["action"] == "rollback" and rows[-1]["run_id"] == facts["run_id"]
    assert engine.latest_applied(rows) == {}
    # the deployment asset of `us` now says it was rolled back: the canary no longer counts it
    assert fleet.staging_not_passed(fleet_runs["instance"]) == ["us"]


@pytest.mark.parametrize("verdict, error, retried", [
    ("failed", "ConnectionLost: the server ended the session during phase 2 (connection was lost)", True),
    ("failed", "CheckFailed: phase_preconditions: products_organization_id_sku_key would refuse GAD-100", False),
    ("refused", None, False),
])
def test_only_a_run_the_server_cut_off_mid_phase_is_retried(tmp_path, verdict, error, retried):
    # the outcome as runner.run_plan leaves it: the failing notebook's entry says "<exception>: <message>"
    run_id = records.new_run_id()
    outcome = runner.Outcome(run_id=run_id, record=records.Record(tmp_path, run_id), verdict=verdict,
                             notebooks=[{"name": "phase2", "status": "failed" if error else "not run", "error": error}])
    assert fleet.retry_is_safe(outcome) is retried
