"""A fleet through Dagster, in process: one run per target of the targets file, each `runbook deploy`.

Three embedded databases as staging targets, one of which refuses on purpose (a duplicate SKU under
phase 2's unique rule, found by the preflight), and one target nobody listens on (refused, exit 2).
The two good ones pass with sealed records; the duplicate fails with its record; neither failure is
retried; the canary sensor holds production back until every staging target passed. Skipped where
the `fleet` extra (dagster) is not installed: `pip install -e .[fleet]`.
"""

import socket
from datetime import datetime

import pytest

dg = pytest.importorskip("dagster", reason="the fleet extra is not installed (pip install -e .[fleet])")

from runbooks import fleet, promotion, records, runner  # noqa: E402  (after the skip: fleet imports dagster)

from runhelpers import sign_off_window, target_entry  # noqa: E402

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
           "folder": folder, "prod": dbs["prod"]}
    for db in dbs.values():
        server.drop_database(db)


def materialized(result) -> dict:
    [event] = result.asset_materializations_for_node("staging_deployment")
    return {key: value.value for key, value in event.metadata.items()}


def failure_metadata(result) -> dict:
    [event] = result.get_step_failure_events()
    return {key: value.value for key, value in event.step_failure_data.user_failure_data.metadata.items()}


def retries(result) -> int:
    return sum(1 for event in result.all_events if event.event_type_value in ("STEP_UP_FOR_RETRY", "STEP_RESTARTED"))


def test_the_partitions_are_the_targets_file_split_into_staging_and_production(fleet_runs):
    instance = fleet_runs["instance"]
    assert instance.get_dynamic_partitions(fleet.STAGING_PARTITIONS.name) == list(STAGING)
    assert instance.get_dynamic_partitions(fleet.PRODUCTION_PARTITIONS.name) == ["prod"]
    context = dg.build_sensor_context(instance=instance, resources={"fleet": fleet_runs["fleet"]})
    assert "match the targets file" in fleet.targets_file_partitions(context).skip_message


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


def test_the_runs_did_not_interleave(fleet_runs):
    spans = sorted((datetime.fromisoformat(m["started_at"]), datetime.fromisoformat(m["finished_at"]))
                   for m in (records.Record.open(fleet_runs["root"], row["run_id"]).manifest()
                             for row in records.list_records(fleet_runs["root"]))
                   if m["target"]["name"] in STAGING)
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
