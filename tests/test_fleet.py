"""A fleet through Dagster's own execution: one run per target of the targets file, each `runbook deploy`.

Three embedded databases as staging targets, one of which refuses on purpose (a duplicate SKU under
phase 2's unique rule, found by the preflight), and one target nobody listens on (refused, exit 2).
The two good ones pass with sealed records; the duplicate fails with its record; neither failure is
retried; the canary sensor holds production back until every canary passed. Then groups with their own
canaries (a failed eu canary while every us target deploys, a quarantined target released by hand),
records in an S3-compatible server written by one process and proven from another, a refusal through
`dagster asset materialize`, and `dagster dev` stopping on SIGTERM. Run configs are the README's YAML.
Skipped where the `fleet` extra (dagster) is not installed: `pip install -e .[fleet]`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import pytest

dg = pytest.importorskip("dagster", reason="the fleet extra is not installed (pip install -e .[fleet])")
import yaml  # noqa: E402  (dagster's dependency)

from runbooks import connection, engine, fleet, promotion, records, runner, snapshot, storage  # noqa: E402

from runhelpers import assert_identical, history, sign_off_window, snapshot_of, target_entry  # noqa: E402
from sqlhelpers import wait_until  # noqa: E402
import object_store  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"

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


def readme_yaml(containing: str) -> dict:
    """The README's Fleets YAML block that holds `containing`, read as YAML 1.1 reads it (as Dagster does)."""
    section = README.read_text().split("## Fleets", 1)[1].split("\n## ", 1)[0]
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)]
    [block] = [b for b in blocks if containing in b]
    return yaml.safe_load(block)


def signed_off(folder: Path, key: str = "confirm") -> None:
    """The change's sign-off file the canary sensor reads."""
    (folder / "change.toml").write_text(
        f'{key} = true\n[parameters]\napprover = "Dana DBA"\nchange_ticket = "CHG-9"\n'
        f'maintenance_window = "{sign_off_window(-1, 2)}"\nstakeholders_notified = true\nrollback_plan_confirmed = true\n')


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


def test_a_group_without_canaries_of_its_own_inherits_the_fleets_and_deploys_them_too(server, tmp_path):
    targets = tmp_path / "targets.toml"
    entries = (target_entry("shared-staging", server, "postgres") + grouped(server, "eu-prod", '"eu"', production=True)
               + grouped(server, "us-staging", '"us"') + grouped(server, "us-prod", '"us"', production=True))
    targets.write_text(entries)
    instance = dg.DagsterInstance.ephemeral()
    eu = fleet.Fleet(targets_file=str(targets), group="eu")
    fleet.sync_partitions(instance, eu)
    assert instance.get_dynamic_partitions(fleet.STAGING_PARTITIONS.name) == ["shared-staging"]
    assert instance.get_dynamic_partitions(fleet.PRODUCTION_PARTITIONS.name) == ["eu-prod"]
    assert eu.target("shared-staging").name == "shared-staging"   # outside the group, but its canary
    plan = eu.plan()
    assert plan.canaries_of("eu") == ("shared-staging",) and plan.canaries_of("us") == ("us-staging",)
    targets.write_text(entries + '\n[groups.us]\ncanaries = ["shared-staging"]\n')
    assert eu.plan().canaries_of("us") == ("shared-staging",)
    for canary, problem in (("eu-prod", "a production target"), ("nobody", "not a target of the file")):
        targets.write_text(entries + f'\n[groups.us]\ncanaries = ["{canary}"]\n')
        with pytest.raises(connection.TargetError, match=rf"\[groups.us\] names canary '{canary}', .*{problem}"):
            eu.plan()


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
        assert facts["index"] == (record.path / "index.html").resolve().as_uri()
        tags = fleet_runs["instance"].get_run_by_id(result.run_id).tags
        assert tags["truthsource/verdict"] == "passed" and tags["truthsource/seal"] == record.seal()
        assert tags["truthsource/stage"] == "staging" and tags["truthsource/target"] == name
        assert tags["truthsource/run_id"] == record.run_id and "truthsource/group" not in tags   # in no group
        assert tags["truthsource/phase_files"] == fleet.files_tag()
        assert {k: v for k, v in tags.items() if k.startswith("truthsource/sha256.")} == {
            f"truthsource/sha256.{Path(path).name}": digest for path, digest in promotion.phase_digests().items()}


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


def canaries(fleet_runs, *names) -> None:
    """The team names the fleet's canaries in the targets file (the failing targets are left out)."""
    path = Path(fleet_runs["fleet"].targets_file)
    text = path.read_text().split("[fleet]")[0]
    path.write_text(text + "[fleet]\ncanaries = [" + ", ".join(f'"{n}"' for n in names) + "]\n")


def test_the_canary_sensor_holds_production_until_every_canary_passed_and_it_is_signed_off(fleet_runs):
    instance, resource = fleet_runs["instance"], fleet_runs["fleet"]

    def evaluate():
        return fleet.production_after_staging(dg.build_sensor_context(instance=instance, resources={"fleet": resource}))

    held = evaluate().skip_message   # by default the fleet's canaries are its non-production targets in no group
    assert held.startswith("the targets in no group waits for its canaries: ")
    assert "duplicates (its latest run failed: failed, Dagster run " in held
    assert "gone (its latest run failed: refused, Dagster run " in held
    assert "eu (" not in held and "us (" not in held
    canaries(fleet_runs, "eu", "us")
    assert "prod; production waits for the change's sign-off file" in evaluate().skip_message
    signed_off(fleet_runs["folder"])
    [request] = evaluate()
    assert request.partition_key == "prod" and request.run_key == f"prod:{fleet.files_tag()}"
    assert request.tags["truthsource/stage"] == "production" and request.tags["truthsource/target"] == "prod"
    assert request.run_config == {"loggers": {"console": {}}, "ops": {"production_deployment": {"config": {
        "confirm": True, "parameters": {
            "approver": "Dana DBA", "change_ticket": "CHG-9", "maintenance_window": request.run_config["ops"][
                "production_deployment"]["config"]["parameters"]["maintenance_window"],
            "stakeholders_notified": "true", "rollback_plan_confirmed": "true"}}}}}


def test_the_production_run_the_canary_requests_passes_and_names_its_staging_evidence(fleet_runs):
    instance, resource = fleet_runs["instance"], fleet_runs["fleet"]
    canaries(fleet_runs, "eu", "us")
    signed_off(fleet_runs["folder"])
    [request] = fleet.production_after_staging(dg.build_sensor_context(instance=instance, resources={"fleet": resource}))
    result = fleet.defs.resolve_job_def("deploy_production").execute_in_process(
        instance=instance, partition_key=request.partition_key, run_config=request.run_config, tags=request.tags,
        resources={"fleet": resource}, raise_on_error=False)
    assert result.success
    [event] = result.asset_materializations_for_node("production_deployment")
    record = records.Record.open(fleet_runs["root"], event.metadata["run_id"].value)
    evidence = record.manifest()["promotion"]["evidence"]
    staging_runs = {materialized(fleet_runs["results"][name])["run_id"] for name in ("eu", "us")}
    assert evidence["run_id"] in staging_runs and evidence["seal"] and record.verify() == []
    again = fleet.production_after_staging(dg.build_sensor_context(instance=instance, resources={"fleet": resource}))
    assert again.skip_message == "no production target waits for the phase files on disk"   # it has them already


def rollback_of_us(fleet_runs, **changes):
    """The rollback job on `us`, of its staging deployment's run, with the README's YAML as its config."""
    config = readme_yaml("roll_back")
    config["ops"]["roll_back"]["config"].update(run_id=materialized(fleet_runs["results"]["us"])["run_id"], **changes)
    return fleet.defs.resolve_job_def("rollback_target").execute_in_process(
        instance=fleet_runs["instance"], partition_key="us", resources={"fleet": fleet_runs["fleet"]},
        run_config=config, raise_on_error=False)


def test_the_readmes_run_configs_are_yaml_whose_keys_are_words():
    """YAML 1.1 reads a bare `yes:` as the boolean true, which Dagster refuses as a key before a run starts."""
    def keys(value):
        if isinstance(value, dict):
            return [*value, *(k for v in value.values() for k in keys(v))]
        return []

    for containing in ("production_deployment", "roll_back"):
        config = readme_yaml(containing)
        assert all(isinstance(key, str) for key in keys(config)), config
        assert config["loggers"] == fleet.CONSOLE
    assert readme_yaml("roll_back")["ops"]["roll_back"]["config"]["confirm"] is True
    assert readme_yaml("production_deployment")["ops"]["production_deployment"]["config"]["confirm"] is True


def test_a_rollback_without_confirm_is_refused_in_the_configs_words_before_anything_changes(fleet_runs):
    db = fleet_runs["dbs"]["us"]
    before, rows, kept = snapshot_of(db), history(db), records.list_records(fleet_runs["root"])
    result = rollback_of_us(fleet_runs, confirm=False)
    assert not result.success and retries(result) == 0
    [event] = result.get_step_failure_events()
    description = event.step_failure_data.user_failure_data.description
    assert "set confirm: true in the run's config to confirm" in description and "--yes" not in description
    assert failure_metadata(result) == {"verdict": "refused", "exit_code": 2}
    assert_identical(before, snapshot_of(db))
    assert history(db) == rows and records.list_records(fleet_runs["root"]) == kept
    with pytest.raises(dg.DagsterInvalidConfigError, match="run_id"):
        fleet.defs.resolve_job_def("rollback_target").execute_in_process(
            instance=fleet_runs["instance"], partition_key="us", resources={"fleet": fleet_runs["fleet"]},
            run_config={"ops": {"roll_back": {"config": {"confirm": True}}}})


def test_a_rollback_through_the_job_restores_the_targets_snapshot_and_holds_production_back(fleet_runs):
    deployment = records.Record.open(fleet_runs["root"], materialized(fleet_runs["results"]["us"])["run_id"])
    result = rollback_of_us(fleet_runs)
    assert result.success and retries(result) == 0
    facts = output_metadata(result, "roll_back")
    record = records.Record.open(fleet_runs["root"], facts["run_id"])
    assert facts["verdict"] == "passed" and facts["seal"] == record.seal() and record.verify() == []
    assert record.manifest()["rolls_back"] == deployment.run_id
    assert fleet_runs["instance"].get_run_by_id(result.run_id).tags["truthsource/stage"] == "rollback"
    db = fleet_runs["dbs"]["us"]
    assert_identical(snapshot.load_snapshot(deployment.path / "snapshot.json"), snapshot_of(db))
    rows = history(db)
    assert rows[-1]["action"] == "rollback" and rows[-1]["run_id"] == facts["run_id"]
    assert engine.latest_applied(rows) == {}
    # the deployment asset of `us` now says it was rolled back: the canary no longer counts it
    plan = fleet_runs["fleet"].plan()
    assert fleet.canaries_not_passed(fleet_runs["instance"], plan, None) == ["us (its deployment says 'rollback passed')"]


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


# -- groups with canaries of their own ----------------------------------------------------------

DUPLICATE_SKU = ("insert into public.products (organization_id, sku, name) values "
                 "('0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget again')")


def entry_in_group(name: str, server, dbname: str, group: str, *, production: bool = False) -> str:
    return target_entry(name, server, dbname, production=production) + f'group = "{group}"\n'


def sensor_of(deployment) -> object:
    return fleet.production_after_staging(dg.build_sensor_context(
        instance=deployment["instance"], resources={"fleet": deployment["fleet"]}))


def deploy_production(deployment, name: str, run_config: dict, tags: dict | None = None):
    return fleet.defs.resolve_job_def("deploy_production").execute_in_process(
        instance=deployment["instance"], partition_key=name, run_config=run_config, tags=tags or {},
        resources={"fleet": deployment["fleet"]}, raise_on_error=False)


@pytest.fixture(scope="module")
def grouped_fleet(server, tmp_path_factory):
    """Group eu, whose only canary nobody listens on, and group us: a canary that passes and two production
    targets, one of which fails its preflight (a duplicate SKU); the staging job run on both canaries."""
    dbs = {name: server.create_database("legacy") for name in ("stg-us", "prod-us", "prod-us-dup", "prod-eu")}
    dbs["prod-us-dup"].execute(DUPLICATE_SKU)
    folder = tmp_path_factory.mktemp("groups")
    targets = folder / "targets.toml"
    targets.write_text(entry_in_group("stg-eu", server, "postgres", "eu").replace(str(server.pg.port), str(closed_port()))
                       + entry_in_group("prod-eu", server, dbs["prod-eu"].name, "eu", production=True)
                       + entry_in_group("stg-us", server, dbs["stg-us"].name, "us")
                       + entry_in_group("prod-us", server, dbs["prod-us"].name, "us", production=True)
                       + entry_in_group("prod-us-dup", server, dbs["prod-us-dup"].name, "us", production=True))
    resource = fleet.Fleet(targets_file=str(targets), records=str(folder / "records"),
                           signoff_file=str(folder / "change.toml"))
    instance = dg.DagsterInstance.ephemeral()
    fleet.sync_partitions(instance, resource)
    job = fleet.defs.resolve_job_def("deploy_staging")
    staging = {name: job.execute_in_process(instance=instance, partition_key=name, raise_on_error=False,
                                            resources={"fleet": resource}) for name in ("stg-eu", "stg-us")}
    signed_off(folder)
    yield {"instance": instance, "fleet": resource, "folder": folder, "dbs": dbs, "staging": staging, "runs": {}}
    for db in dbs.values():
        server.drop_database(db)


def sensors_runs(grouped_fleet) -> dict:
    """The production runs the canary sensor asks for once the canaries ran, each executed (once)."""
    if not grouped_fleet["runs"]:
        requests = sensor_of(grouped_fleet)
        grouped_fleet["requests"] = requests
        for request in requests:
            grouped_fleet["runs"][request.partition_key] = deploy_production(
                grouped_fleet, request.partition_key, request.run_config, request.tags)
    return grouped_fleet["runs"]


def test_a_failed_eu_canary_holds_back_eu_only_and_every_us_target_deploys(grouped_fleet):
    assert not grouped_fleet["staging"]["stg-eu"].success and grouped_fleet["staging"]["stg-us"].success
    ready, waiting = fleet.production_state(grouped_fleet["instance"], grouped_fleet["fleet"].plan())
    assert sorted(ready) == ["prod-us", "prod-us-dup"]
    [eu] = waiting
    assert eu.startswith("group eu waits for its canaries: stg-eu (its latest run failed: refused, Dagster run ")
    runs = sensors_runs(grouped_fleet)
    requests = grouped_fleet["requests"]
    assert sorted(r.partition_key for r in requests) == ["prod-us", "prod-us-dup"]
    assert all(r.tags["truthsource/group"] == "us" for r in requests)
    assert runs["prod-us"].success   # the other us target fails on its own data, not on eu's canary
    [failure] = runs["prod-us-dup"].get_step_failure_events()
    assert "GAD-100" in failure.step_failure_data.user_failure_data.description
    assert not grouped_fleet["instance"].get_runs(dg.RunsFilter(tags={"truthsource/target": "prod-eu"}))


def test_a_target_that_failed_is_quarantined_until_its_partition_is_materialized_by_hand(grouped_fleet):
    assert not sensors_runs(grouped_fleet)["prod-us-dup"].success
    skipped = sensor_of(grouped_fleet).skip_message
    assert "group eu waits for its canaries: stg-eu (its latest run failed: refused" in skipped
    assert ("prod-us-dup is quarantined: its last run failed (failed, Dagster run " in skipped
            and "materialize its partition by hand to release it" in skipped)
    assert "prod-us " not in skipped and "prod-us," not in skipped   # it has the files: nothing to say
    grouped_fleet["dbs"]["prod-us-dup"].execute("delete from public.products where name = 'Gadget again'")
    config = readme_yaml("production_deployment")   # by hand: the README's YAML, the change's own values
    config["ops"]["production_deployment"]["config"]["parameters"]["maintenance_window"] = sign_off_window(-1, 2)
    by_hand = deploy_production(grouped_fleet, "prod-us-dup", config)
    assert by_hand.success
    tags = grouped_fleet["instance"].get_run_by_id(by_hand.run_id).tags
    assert tags["truthsource/stage"] == "production" and tags["truthsource/group"] == "us"
    assert tags["truthsource/verdict"] == "passed"
    skipped = sensor_of(grouped_fleet).skip_message
    assert "quarantined" not in skipped and skipped.startswith("group eu waits for its canaries: stg-eu")


# -- records in an object store, runs on two workers ----------------------------------------------

def dagster_home(folder: Path) -> Path:
    """An instance on SQLite storage in a folder of its own, as `DAGSTER_HOME` of a Dagster process."""
    home = folder / "dagster-home"
    home.mkdir()
    # Dagster's local compute log manager mirrors a step's output to the terminal through `tail -F`, which it
    # stops as the step ends: on a busy machine the step's last lines (its failure) never reach the terminal
    # (dagster-io/dagster#23336). Without capture, the step writes to the terminal itself (README, Fleets).
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\ncompute_logs:\n"
                                       "  module: dagster._core.storage.noop_compute_log_manager\n"
                                       "  class: NoOpComputeLogManager\n")
    return home


def materialize(home: Path, asset: str, partition: str, config: dict, env: dict) -> subprocess.CompletedProcess:
    """`dagster asset materialize` of one partition, in a process of its own (another worker)."""
    dagster = Path(sys.executable).with_name("dagster")
    return subprocess.run([str(dagster), "asset", "materialize", "-m", "runbooks.fleet", "--select", asset,
                           "--partition", partition, "--config-json", json.dumps(config)],
                          cwd=home.parent, env={**os.environ, **env, "DAGSTER_HOME": str(home)},
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def s3_fleet(server, tmp_path_factory):
    """A staging target and a production target whose records go to an S3-compatible server (moto's, on
    127.0.0.1); the staging job run in this process, on this "worker"."""
    pytest.importorskip("moto", reason="the fleet extra is not installed (moto's S3 server)")
    dbs = {name: server.create_database("legacy") for name in ("stg", "prod")}
    folder = tmp_path_factory.mktemp("s3fleet")
    targets = folder / "targets.toml"
    targets.write_text(target_entry("stg", server, dbs["stg"].name)
                       + target_entry("prod", server, dbs["prod"].name, production=True))
    with object_store.s3_server() as endpoint:
        url = f"s3://{object_store.BUCKET}/fleet"
        resource = fleet.Fleet(targets_file=str(targets), records=url)
        instance = dg.DagsterInstance.ephemeral()
        fleet.sync_partitions(instance, resource)
        staging = fleet.defs.resolve_job_def("deploy_staging").execute_in_process(
            instance=instance, partition_key="stg", resources={"fleet": resource}, raise_on_error=False)
        home = dagster_home(folder)
        with dg.DagsterInstance.from_config(str(home)) as other:
            fleet.sync_partitions(other, resource)
        yield {"staging": staging, "url": url, "endpoint": endpoint, "folder": folder, "home": home,
               "env": {"RUNBOOK_TARGETS": str(targets), "RUNBOOK_RECORDS": url}, "store": object_store}
    for db in dbs.values():
        server.drop_database(db)


def test_a_run_publishes_its_sealed_record_to_the_object_store_and_links_its_page(s3_fleet):
    assert s3_fleet["staging"].success
    facts = materialized(s3_fleet["staging"])
    run_id, store = facts["run_id"], storage.location(s3_fleet["url"])
    assert facts["record"] == f"{s3_fleet['url']}/{run_id}/"
    assert facts["index"] == f"{s3_fleet['endpoint']}/{s3_fleet['store'].BUCKET}/fleet/{run_id}/index.html"
    head = s3_fleet["store"].client().head_object(Bucket=s3_fleet["store"].BUCKET, Key=f"fleet/{run_id}/index.html")
    assert head["ContentType"] == "text/html"
    record = store.open(run_id)
    assert record.seal() == facts["seal"] and record.verify() == []
    assert {row["run_id"] for row in store.list_records()} == {run_id}
    assert not list(Path(tempfile.gettempdir()).glob(f"runbook-records-*/{run_id}"))   # the local copy is gone


def test_a_record_written_on_one_worker_verifies_from_another(s3_fleet):
    run_id, seal = materialized(s3_fleet["staging"])["run_id"], materialized(s3_fleet["staging"])["seal"]
    checked = subprocess.run([sys.executable, "-m", "runbooks.cli", "records", "verify", run_id,
                              "--records", s3_fleet["url"]], cwd=s3_fleet["folder"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "intact: every file matches the manifest" in checked.stdout and seal in checked.stdout


def test_a_refusal_through_dagster_asset_materialize_is_one_failure_in_config_words_with_the_runs_tags(s3_fleet):
    refused = materialize(s3_fleet["home"], "production_deployment", "prod", {"loggers": fleet.CONSOLE}, s3_fleet["env"])
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert output.count("refused before anything changed") == 1, output
    assert "set confirm: true in the run's config to confirm" in output and "parameters.approver" in output
    assert "--yes" not in output and "Stack Trace" not in output and "Traceback" not in output
    with dg.DagsterInstance.from_config(str(s3_fleet["home"])) as instance:
        [run] = instance.get_runs()
    assert run.job_name == "__ASSET_JOB" and run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags["truthsource/stage"] == "production" and run.tags["truthsource/target"] == "prod"
    assert run.tags["truthsource/phase_files"] == fleet.files_tag() and run.tags["truthsource/verdict"] == "refused"


def test_a_production_run_on_another_worker_counts_that_record_as_promotion_evidence(s3_fleet):
    staging = materialized(s3_fleet["staging"])
    config = readme_yaml("production_deployment")
    config["ops"]["production_deployment"]["config"]["parameters"]["maintenance_window"] = sign_off_window(-1, 2)
    deployed = materialize(s3_fleet["home"], "production_deployment", "prod", config, s3_fleet["env"])
    assert deployed.returncode == 0, (deployed.stdout + deployed.stderr)[-4000:]
    store = storage.location(s3_fleet["url"])
    [row] = [row for row in store.list_records() if row["target"] == "prod"]
    record = store.open(row["run_id"])
    evidence = record.manifest()["promotion"]["evidence"]
    assert evidence["run_id"] == staging["run_id"] and evidence["seal"] == staging["seal"]
    assert evidence["record"] == f"{s3_fleet['url']}/{staging['run_id']}/" and record.verify() == []


# -- dagster dev stops on SIGTERM ----------------------------------------------------------------

IGNORING_INTERRUPTS = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                       "signal.signal(signal.SIGTERM, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])")


def ignored_signals(pid: int) -> int:
    """The process's ignored signals (SigIgn of /proc/PID/status), as a bit mask."""
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("SigIgn:"))
    return int(line.split()[1], 16)


def test_dagster_dev_started_with_interrupts_ignored_stops_on_sigterm_with_its_services(tmp_path):
    """Started as a script's background job would start it (SIGINT and SIGTERM ignored), the launcher
    gives both back, so `dagster dev` and its webserver, daemon and code server end on one SIGTERM."""
    psutil = pytest.importorskip("psutil")
    port = closed_port()
    home = dagster_home(tmp_path)
    (tmp_path / "targets.toml").write_text("")
    dev = subprocess.Popen([sys.executable, "-c", IGNORING_INTERRUPTS, sys.executable, "-m", "runbooks.fleet_dev",
                            "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env={**os.environ, "DAGSTER_HOME": str(home),
                                                        "RUNBOOK_TARGETS": str(tmp_path / "targets.toml")})
    try:
        import urllib.request

        def serving():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status == 200
            except OSError:
                return False

        wait_until(serving, "dagster dev to serve", stopped=lambda: dev.poll() is not None and dev.stderr.read()[-3000:])
        assert not ignored_signals(dev.pid) & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGINT - 1))
        services = psutil.Process(dev.pid).children(recursive=True)
        assert len(services) >= 3   # webserver, daemon, code server
        dev.send_signal(signal.SIGTERM)
        wait_until(lambda: dev.poll() is not None, "dagster dev to end on SIGTERM")
        wait_until(lambda: not [p for p in services if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                   "its services to end")
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
