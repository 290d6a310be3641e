"""A fleet of targets through Dagster: the Dagster code location of the runbooks (`pip install .[fleet]`).

    dagster dev -m runbooks.fleet --host 127.0.0.1

Each entry of the targets file is a partition (dynamic partitions, kept in step with the file by the
`targets_file_partitions` sensor): the non-production ones of asset `staging_deployment`, the production
ones of asset `production_deployment`. A partition's run is one `runbook deploy` of that target, by the
package's own code (`cli.deploy`: the sign-off, the promotion rule, the run lock, papermill, the sealed
record), not a second implementation of the plan. So every target gets its own run and record, and a
failing target never stops the others. Its verdict, record path and seal are the materialization's
metadata and the run's tags: the Dagster UI shows, per target, what ran, its verdict and where its record is.

Canary order is Dagster's: `production_deployment` depends on every partition of `staging_deployment`
(AllPartitionMapping), and the `production_after_staging` sensor asks for production runs only when every
staging partition's latest materialization passed with the phase files on disk (then once per target and
set of files), with the sign-off a change file gives (`Fleet.signoff_file`). The promotion rule still
refuses a production run launched by hand without staging evidence.

Retries only where safe: a refusal (exit 2: sign-off, promotion, unreachable target, another run holding
the database) and a failed check or cell are final; a run whose connection the server ended mid-phase
(`ConnectionLost`: the phase's transaction was rolled back, a re-run resumes) is retried. Concurrency is
bounded by the pool `truthsource_runbook` (set its limit in the instance's dagster.yaml).
"""

import argparse
import os
import tomllib
from pathlib import Path

import dagster as dg

from . import by_hand, cli, connection, promotion, records, runner, signoff

POOL = "truthsource_runbook"   # one slot per running deployment; the instance sets the limit
STAGING_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_staging_targets")
PRODUCTION_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_production_targets")
RECORDS_ENV = by_hand.RECORDS_ENV   # where runs keep their records, as by hand
SIGNOFF_ENV = "RUNBOOK_FLEET_SIGNOFF"
# What may be retried: the server ended the session mid-phase; the phase's transaction was rolled back.
RETRYABLE_ERRORS = ("ConnectionLost",)
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)


class Fleet(dg.ConfigurableResource):
    """Where the fleet is described and where its records go (defaults: the environment, as `runbook`)."""

    targets_file: str | None = None   # default $RUNBOOK_TARGETS, ./targets.toml, the project's
    records: str | None = None        # default $RUNBOOK_RECORDS, else ./records
    signoff_file: str | None = None   # default $RUNBOOK_FLEET_SIGNOFF: the change's sign-off for production

    def records_root(self) -> Path:
        return Path(self.records or os.environ.get(RECORDS_ENV) or records.DEFAULT_RECORDS_DIR)

    def targets(self) -> list[connection.Target]:
        path = connection.targets_file_path(self.targets_file)
        return [connection.from_targets_file(name, path) for name in connection.target_names(path)]

    def signoff(self) -> dict | None:
        """The production deployment's config from the change's sign-off file, None without one::

            yes = true
            [parameters]
            approver = "Dana DBA"
            change_ticket = "CHG-1234"
            maintenance_window = "2026-11-24T22:00Z/2026-11-25T02:00Z"
            stakeholders_notified = "true"
            rollback_plan_confirmed = "true"
        """
        named = self.signoff_file or os.environ.get(SIGNOFF_ENV)
        if not named or not Path(named).is_file():
            return None
        data = tomllib.loads(Path(named).read_text())
        return {"yes": bool(data.get("yes", False)),
                "parameters": {str(k): str(v).lower() if isinstance(v, bool) else str(v)
                               for k, v in (data.get("parameters") or {}).items()}}


class DeployConfig(dg.Config):
    """A partition's `runbook deploy` options: --yes and -p NAME VALUE, checked as the command checks them."""

    yes: bool = False
    parameters: dict[str, str] = {}


# -- partitions from the targets file ---------------------------------------------------------

def partition_requests(instance: dg.DagsterInstance, fleet: Fleet) -> list:
    """What makes the two partition sets the targets file's non-production and production entries."""
    targets = fleet.targets()
    requests = []
    for partitions, production in ((STAGING_PARTITIONS, False), (PRODUCTION_PARTITIONS, True)):
        wanted = [t.name for t in targets if t.production == production]
        known = set(instance.get_dynamic_partitions(partitions.name))
        added = [name for name in wanted if name not in known]
        gone = sorted(known - set(wanted))
        if added:
            requests.append(partitions.build_add_request(added))
        if gone:
            requests.append(partitions.build_delete_request(gone))
    return requests


def sync_partitions(instance: dg.DagsterInstance, fleet: Fleet) -> None:
    """Apply partition_requests at once (tests, scripts); the sensor does it in a deployment."""
    for request in partition_requests(instance, fleet):
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def targets_file_partitions(context: dg.SensorEvaluationContext, fleet: Fleet):
    """Keeps one partition per target of the targets file."""
    requests = partition_requests(context.instance, fleet)
    if not requests:
        return dg.SkipReason("the partitions match the targets file")
    return dg.SensorResult(dynamic_partitions_requests=requests)


# -- one target's deployment --------------------------------------------------------------------

def deploy_partition(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    """`runbook deploy --target <partition>` with the config's options; a Failure names the verdict."""
    name = context.partition_key
    try:
        target = cli.resolve_target(argparse.Namespace(service=None, target=name, targets_file=fleet.targets_file))
        params = cli.parse_parameters([[k, v] for k, v in config.parameters.items()], runner.DEPLOY_PLAN)
        outcome = cli.deploy(target, params, confirmed=config.yes, records_root=fleet.records_root(),
                             progress=context.log.info)
    except (cli.UsageError, connection.TargetError, signoff.SignoffError) as exc:
        _tag(context, {"truthsource/verdict": "refused"})
        raise dg.Failure(description=f"target {name!r} refused before anything changed: {exc}",
                         metadata={"verdict": "refused", "exit_code": 2}, allow_retries=False) from None
    metadata = _metadata(outcome)
    _tag(context, {"truthsource/verdict": outcome.verdict, "truthsource/run_id": outcome.run_id,
                   "truthsource/seal": metadata["seal"], "truthsource/record": str(outcome.record.path.resolve())})
    if outcome.verdict == "passed":
        return dg.MaterializeResult(metadata=metadata)
    raise dg.Failure(description=f"target {name!r}: {outcome.verdict} (exit {outcome.exit_code}); "
                                 f"record {outcome.record.path.resolve()}: {_first_error(outcome)}",
                     metadata=metadata, allow_retries=retry_is_safe(outcome))


def _metadata(outcome: runner.Outcome) -> dict:
    return {"verdict": outcome.verdict, "exit_code": outcome.exit_code, "run_id": outcome.run_id,
            "record": dg.MetadataValue.path(str(outcome.record.path.resolve())),
            "seal": outcome.record.seal() if outcome.record.manifest_path.is_file() else "",
            "phase_files": dg.MetadataValue.json(promotion.phase_digests()),
            "notebooks": dg.MetadataValue.md("\n".join(
                f"- {nb['name']}: {records.outcome_text(nb)}" for nb in outcome.notebooks))}


def _first_error(outcome: runner.Outcome) -> str:
    return outcome.error or next((f"{nb['name']}: {nb.get('error')}" for nb in outcome.notebooks
                                  if nb.get("status") == "failed"), "failed")


def retry_is_safe(outcome: runner.Outcome) -> bool:
    """Only a run the server cut off mid-phase (nothing half-applied, a re-run resumes); never a
    refusal or a failed check, which would fail the same way again."""
    if outcome.verdict != "failed":
        return False
    return any(str(nb.get("error") or "").startswith(RETRYABLE_ERRORS) for nb in outcome.notebooks)


def _tag(context: dg.AssetExecutionContext, tags: dict[str, str]) -> None:
    """The run's tags: what the runs list shows per target."""
    context.instance.add_run_tags(context.run.run_id, {k: v for k, v in tags.items() if v})


@dg.asset(partitions_def=STAGING_PARTITIONS, pool=POOL, retry_policy=RETRY_POLICY, group_name="truthsource",
          description="`runbook deploy` of each non-production target: its verdict, record and seal")
def staging_deployment(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    return deploy_partition(context, config, fleet)


@dg.asset(partitions_def=PRODUCTION_PARTITIONS, pool=POOL, retry_policy=RETRY_POLICY, group_name="truthsource",
          deps=[dg.AssetDep(staging_deployment, partition_mapping=dg.AllPartitionMapping())],
          description="`runbook deploy` of each production target, after every staging target passed")
def production_deployment(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    return deploy_partition(context, config, fleet)


deploy_staging = dg.define_asset_job("deploy_staging", selection=[staging_deployment],
                                     tags={"truthsource/stage": "staging"})
deploy_production = dg.define_asset_job("deploy_production", selection=[production_deployment],
                                        tags={"truthsource/stage": "production"})


# -- canary order -----------------------------------------------------------------------------

def staging_not_passed(instance: dg.DagsterInstance) -> list[str]:
    """Staging targets whose latest materialization is not a passed deployment of the files on disk."""
    digests = promotion.phase_digests()
    pending = []
    for name in instance.get_dynamic_partitions(STAGING_PARTITIONS.name):
        found = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=staging_deployment.key, asset_partitions=[name]), limit=1).records
        metadata = found[0].asset_materialization.metadata if found else {}
        files = metadata.get("phase_files")
        if not (files is not None and files.value == digests
                and getattr(metadata.get("verdict"), "value", None) == "passed"):
            pending.append(name)
    return pending


@dg.sensor(job=deploy_production, minimum_interval_seconds=60)
def production_after_staging(context: dg.SensorEvaluationContext, fleet: Fleet):
    """Production runs, once per target and set of phase files, when every staging target passed them."""
    staging = context.instance.get_dynamic_partitions(STAGING_PARTITIONS.name)
    pending = staging_not_passed(context.instance)
    if not staging or pending:
        return dg.SkipReason("production waits for staging: " + (", ".join(pending) + " not passed with the phase "
                                                                 "files on disk" if pending else "no staging target"))
    config = fleet.signoff()
    if config is None:
        return dg.SkipReason(f"staging passed; production waits for the change's sign-off file (${SIGNOFF_ENV})")
    files = "-".join(digest[:12] for digest in promotion.phase_digests().values())
    return [dg.RunRequest(run_key=f"{name}:{files}", partition_key=name,
                          run_config={"ops": {"production_deployment": {"config": config}}})
            for name in context.instance.get_dynamic_partitions(PRODUCTION_PARTITIONS.name)]


defs = dg.Definitions(
    assets=[staging_deployment, production_deployment],
    jobs=[deploy_staging, deploy_production],
    sensors=[targets_file_partitions, production_after_staging],
    resources={"fleet": Fleet()},
)
