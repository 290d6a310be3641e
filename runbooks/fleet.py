"""A fleet of targets through Dagster: the Dagster code location of the runbooks (`pip install .[fleet]`).

    dagster dev -m runbooks.fleet --host 127.0.0.1

Each entry of the targets file (or of its group `Fleet.group`, `group = "eu"` in an entry) is a partition
(dynamic partitions, kept in step with the file by the `targets_file_partitions` sensor): the
non-production ones of asset `staging_deployment`, the production ones of asset `production_deployment`,
and all of them of the jobs `verify_targets` and `rollback_target`. A partition's run is one `runbook
deploy`, `verify` or `rollback` of that target, by the package's own code (`cli.deploy`, `cli.verify`,
`cli.rollback`: the sign-off, the promotion rule, the run lock, papermill, the sealed record), not a second
implementation of the plan. So every target gets its own run and record, and a failing target never stops
the others. Its verdict, record path and seal are the run's metadata and tags (`run_partition`, one shape
for the three): the Dagster UI shows, per target, what ran, its verdict and where its record is.

Verification and rollback are op jobs, not assets. A verification is an observation of a database at one
moment, asked for at any time (after a deployment, after a rollback, for an audit, on a target deployed
by hand): it produces no data for anything downstream, and an asset `verified_deployment` would call a
target "stale" or "missing" by Dagster's lineage rather than by what the database is. A rollback is an
action a person starts with the run to undo named and `yes = true`; no sensor launches it and it is never
retried. What it changes is told to the deployment assets: a rollback that ran materializes the target's
deployment partition with verdict `rollback passed` or `rollback failed`, so the canary sensor no longer
counts a rolled-back staging target as having passed the files.

Canary order is Dagster's: `production_deployment` depends on every partition of `staging_deployment`
(AllPartitionMapping), and the `production_after_staging` sensor asks for production runs only when every
staging partition's latest materialization passed with the phase files on disk (then once per target and
set of files), with the sign-off a change file gives (`Fleet.signoff_file`). The promotion rule still
refuses a production run launched by hand without staging evidence.

Retries only where safe: a refusal (exit 2: sign-off, promotion, unreachable target, another run holding
the database) and a failed check or cell are final; a run whose connection the server ended mid-phase
(`ConnectionLost`: the phase's transaction was rolled back, a re-run resumes) is retried. Concurrency is
bounded by the pool `truthsource_runbook`, which every run (deploy, verify, rollback) holds a slot of while it
runs: set its limit in the instance's dagster.yaml (`concurrency: pools: default_limit: 2`) or with
`dagster instance concurrency set truthsource_runbook 2`. An instance on SQLite or PostgreSQL storage
enforces it, in process too; an ephemeral (in-memory) instance has no pools and does not.
"""

import argparse
import os
import tomllib
from pathlib import Path

import dagster as dg

from . import by_hand, cli, connection, promotion, records, runner, signoff

POOL = "truthsource_runbook"   # one slot per running deploy, verify or rollback; the instance sets the limit
STAGING_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_staging_targets")
PRODUCTION_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_production_targets")
TARGET_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_targets")   # all: verification, rollback
RECORDS_ENV = by_hand.RECORDS_ENV   # where runs keep their records, as by hand
SIGNOFF_ENV = "RUNBOOK_FLEET_SIGNOFF"
GROUP_ENV = "RUNBOOK_FLEET_GROUP"
# What may be retried: the server ended the session mid-phase; the phase's transaction was rolled back.
RETRYABLE_ERRORS = ("ConnectionLost",)
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)


class Fleet(dg.ConfigurableResource):
    """Where the fleet is described and where its records go (defaults: the environment, as `runbook`)."""

    targets_file: str | None = None   # default $RUNBOOK_TARGETS, ./targets.toml, the project's
    records: str | None = None        # default $RUNBOOK_RECORDS, else ./records
    signoff_file: str | None = None   # default $RUNBOOK_FLEET_SIGNOFF: the change's sign-off for production
    group: str | None = None          # default $RUNBOOK_FLEET_GROUP: only the targets of this group (else all)

    def records_root(self) -> Path:
        return Path(self.records or os.environ.get(RECORDS_ENV) or records.DEFAULT_RECORDS_DIR)

    def chosen_group(self) -> str | None:
        return self.group or os.environ.get(GROUP_ENV) or None

    def targets(self) -> list[connection.Target]:
        """The fleet's targets: the file's entries, or those of its group (UnknownGroup: no target has it)."""
        path = connection.targets_file_path(self.targets_file)
        every = [connection.from_targets_file(name, path) for name in connection.target_names(path)]
        group = self.chosen_group()
        chosen = [t for t in every if group is None or t.group == group]
        if not chosen and group is not None:
            known = sorted({t.group for t in every if t.group is not None})
            raise UnknownGroup(f"no target of {path} is in group {group!r} (its groups: {', '.join(known) or 'none'})")
        return chosen

    def target(self, name: str) -> connection.Target:
        """A partition's target, as `--target NAME` resolves it (a transaction pooler refused); one
        outside the fleet's group is refused."""
        if self.chosen_group() is not None and name not in {t.name for t in self.targets()}:
            raise connection.TargetError(f"target {name!r} is not in group {self.chosen_group()!r}, "
                                         "the group this fleet deploys")
        return cli.resolve_target(argparse.Namespace(service=None, target=name, targets_file=self.targets_file))

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


class UnknownGroup(connection.TargetError):
    """The fleet is given a group that no target of the targets file has."""


class DeployConfig(dg.Config):
    """A partition's `runbook deploy` options: --yes and -p NAME VALUE, checked as the command checks them."""

    yes: bool = False
    parameters: dict[str, str] = {}


class RollbackConfig(dg.Config):
    """`runbook rollback --target <partition> --run RUN_ID --yes -p NAME VALUE`: nothing is assumed."""

    run_id: str                       # the run whose preflight backup to restore (required)
    yes: bool = False                 # must be true: a rollback replaces the database's contents
    parameters: dict[str, str] = {}   # e.g. discard_later_writes = "true"


# -- partitions from the targets file ---------------------------------------------------------

def partition_requests(instance: dg.DagsterInstance, fleet: Fleet) -> list:
    """What makes the partition sets the fleet's non-production, production and all targets."""
    targets = fleet.targets()
    requests = []
    for partitions, production in ((STAGING_PARTITIONS, False), (PRODUCTION_PARTITIONS, True),
                                   (TARGET_PARTITIONS, None)):
        wanted = [t.name for t in targets if production is None or t.production == production]
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
    """Keeps one partition per target of the targets file (or of the fleet's group)."""
    try:
        requests = partition_requests(context.instance, fleet)
    except UnknownGroup as exc:
        return dg.SkipReason(f"the partitions are left as they are: {exc}")
    if not requests:
        return dg.SkipReason("the partitions match the targets file")
    return dg.SensorResult(dynamic_partitions_requests=requests)


# -- one target's plan as a partition's run ---------------------------------------------------

def retry_is_safe(outcome: runner.Outcome) -> bool:
    """Only a run the server cut off mid-phase (nothing half-applied, a re-run resumes); never a
    refusal or a failed check, which would fail the same way again."""
    if outcome.verdict != "failed":
        return False
    return any(str(nb.get("error") or "").startswith(RETRYABLE_ERRORS) for nb in outcome.notebooks)


def never(outcome: runner.Outcome) -> bool:
    """No retry: a failed verification fails again the same way; a rollback is run again only by a person."""
    return False


def run_partition(context: dg.OpExecutionContext | dg.AssetExecutionContext, fleet: Fleet, plan,
                  retry=retry_is_safe, after=None) -> dict:
    """`plan(target)` (a `runbook` command's library function) on the partition's target: the run's
    metadata when it passed, else a Failure naming the verdict, retried only where `retry` says so.
    Either way the run's tags say the verdict, record and seal, and `after(outcome, metadata)` is told."""
    name = context.partition_key
    try:
        outcome = plan(fleet.target(name))
    except cli.REFUSALS as exc:
        _tag(context, {"truthsource/verdict": "refused"})
        raise dg.Failure(description=f"target {name!r} refused before anything changed: {exc}",
                         metadata={"verdict": "refused", "exit_code": 2}, allow_retries=False) from None
    metadata = _metadata(outcome)
    _tag(context, {"truthsource/verdict": outcome.verdict, "truthsource/run_id": outcome.run_id,
                   "truthsource/seal": metadata["seal"], "truthsource/record": str(outcome.record.path.resolve())})
    if after is not None:
        after(outcome, metadata)
    if outcome.verdict != "passed":
        raise dg.Failure(description=f"target {name!r}: {outcome.verdict} (exit {outcome.exit_code}); "
                                     f"record {outcome.record.path.resolve()}: {_first_error(outcome)}",
                         metadata=metadata, allow_retries=retry(outcome))
    return metadata


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


def _tag(context: dg.OpExecutionContext | dg.AssetExecutionContext, tags: dict[str, str]) -> None:
    """The run's tags: what the runs list shows per target."""
    context.instance.add_run_tags(context.run.run_id, {k: v for k, v in tags.items() if v})


def _parameters(given: dict[str, str], steps) -> dict:
    """The config's parameters, checked as `-p NAME VALUE` of the command."""
    return cli.parse_parameters([[name, value] for name, value in given.items()], steps)


# -- one target's deployment --------------------------------------------------------------------

def deploy_partition(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    """`runbook deploy --target <partition>` with the config's options; a Failure names the verdict."""
    def plan(target: connection.Target) -> runner.Outcome:
        return cli.deploy(target, _parameters(config.parameters, runner.DEPLOY_PLAN), confirmed=config.yes,
                          records_root=fleet.records_root(), progress=context.log.info)

    return dg.MaterializeResult(metadata=run_partition(context, fleet, plan))


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


# -- one target's verification and rollback ----------------------------------------------------

@dg.op(pool=POOL, out=dg.Out(str, description="the run id of the verification's record"))
def verify_target(context: dg.OpExecutionContext, fleet: Fleet) -> dg.Output:
    """`runbook verify --target <partition>`: changes nothing, and a failed verification is not retried."""
    metadata = run_partition(context, fleet, lambda target: cli.verify(target, fleet.records_root(),
                                                                       progress=context.log.info), retry=never)
    return dg.Output(metadata["run_id"], metadata=metadata)


@dg.op(pool=POOL, out=dg.Out(str, description="the run id of the rollback's record"))
def roll_back(context: dg.OpExecutionContext, config: RollbackConfig, fleet: Fleet) -> dg.Output:
    """`runbook rollback --target <partition> --run RUN_ID`: refused without `yes`, never retried."""
    def plan(target: connection.Target) -> runner.Outcome:
        return cli.rollback(target, config.run_id, _parameters(config.parameters, ("rollback",)),
                            confirmed=config.yes, records_root=fleet.records_root(), progress=context.log.info,
                            warn=context.log.warning)

    def deployment_undone(outcome: runner.Outcome, metadata: dict) -> None:
        """The target's deployment asset says its deployment is undone (the canary then holds
        production back again), once the rollback ran, whether or not its proof passed."""
        if outcome.verdict == "refused":
            return
        name = context.partition_key
        production = name in context.instance.get_dynamic_partitions(PRODUCTION_PARTITIONS.name)
        context.log_event(dg.AssetMaterialization(
            asset_key=(production_deployment if production else staging_deployment).key, partition=name,
            description=f"rolled back to the backup of run {config.run_id}: {outcome.verdict}",
            metadata={**metadata, "verdict": f"rollback {outcome.verdict}", "rolls_back": config.run_id}))

    metadata = run_partition(context, fleet, plan, retry=never, after=deployment_undone)
    return dg.Output(metadata["run_id"], metadata=metadata)


@dg.job(partitions_def=TARGET_PARTITIONS, tags={"truthsource/stage": "verification"},
        description="`runbook verify` of one target a run: its verdict, record and seal")
def verify_targets():
    verify_target()


@dg.job(partitions_def=TARGET_PARTITIONS, tags={"truthsource/stage": "rollback"},
        description="`runbook rollback` of one target: config run_id and yes = true; never retried or sensed")
def rollback_target():
    roll_back()


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
    jobs=[deploy_staging, deploy_production, verify_targets, rollback_target],
    sensors=[targets_file_partitions, production_after_staging],
    resources={"fleet": Fleet()},
)
