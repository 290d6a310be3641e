"""A fleet of targets through Dagster: the Dagster code location of the runbooks (`pip install .[fleet]`).

    dagster dev -m runbooks.fleet --host 127.0.0.1

Each entry of the targets file (or of its group `Fleet.group`, `group = "eu"` in an entry) is a partition
(dynamic partitions, kept in step with the file by the `targets_file_partitions` sensor): the
non-production ones of asset `staging_deployment`, the production ones of asset `production_deployment`,
and all of them of the jobs `verify_targets` and `rollback_target`. A partition's run is one `runbook
deploy`, `verify` or `rollback` of that target, by the package's own code (`cli.deploy`, `cli.verify`,
`cli.rollback`: the sign-off, the promotion rule, the run lock, papermill, the sealed record), not a second
implementation of the plan. So every target gets its own run and record, and a failing target never stops
the others. Its verdict, record and seal are the run's metadata (with a link to the record's index.html)
and tags, beside the tags every run gets when it starts, whoever launched it (`dagster asset materialize`
too): stage, target, group and the phase files' digests (`run_partition`, one shape for the three).

Records go where `Fleet.records` (or `$RUNBOOK_RECORDS`) says: a folder, or an object store every run
worker reaches (`s3://bucket/prefix`, runbooks/storage.py), so a record written by a run on one worker
verifies, and counts as promotion evidence, on another.

Verification and rollback are op jobs, not assets. A verification is an observation of a database at one
moment, asked for at any time (after a deployment, after a rollback, for an audit, on a target deployed
by hand): it produces no data for anything downstream, and an asset `verified_deployment` would call a
target "stale" or "missing" by Dagster's lineage rather than by what the database is. A rollback is an
action a person starts with the run to undo named and `confirm: true`; no sensor launches it and it is
never retried. What it changes is told to the deployment assets: a rollback that ran materializes the
target's deployment partition with verdict `rollback passed` or `rollback failed`, so the canary sensor
no longer counts a rolled-back staging target as having passed the files.

Canaries per group (runbooks/fleet_plan.py): each group names its canary targets in the targets file, or
inherits the fleet's. The `production_after_staging` sensor asks for a production target's run only when
every canary of its group passed the phase files on disk (latest run not failed, latest materialization
passed with these digests), once per target and set of files, with the sign-off a change file gives
(`Fleet.signoff_file`); a failed canary holds back its own group only, and the sensor says which groups
wait and why. A production target whose latest run failed is quarantined: the sensor does not launch it
again, whatever the files, until its partition is materialized by hand. `production_deployment` still
depends on `staging_deployment` for Dagster's lineage (AllPartitionMapping), and the promotion rule
still refuses a production run launched by hand without staging evidence.

Retries only where safe: a refusal (exit 2: sign-off, promotion, unreachable target, another run holding
the database) and a failed check or cell are final; a run whose connection the server ended mid-phase
(`ConnectionLost`: the phase's transaction was rolled back, a re-run resumes) is retried. A refusal is one
clear failure in the run config's words (`confirm: true`, `parameters.approver`), and the console shows it
without a stack (runbooks/fleet_console.py). Concurrency is bounded by the pool `truthsource_runbook`,
which every run (deploy, verify, rollback) holds a slot of while it runs: set its limit in the instance's
dagster.yaml (`concurrency: pools: default_limit: 2`) or with `dagster instance concurrency set
truthsource_runbook 2`. An instance on SQLite or PostgreSQL storage enforces it, in process too; an
ephemeral (in-memory) instance has no pools and does not.
"""

import argparse
import os
import tomllib
from pathlib import Path

import dagster as dg

from . import by_hand, cli, connection, fleet_console, fleet_plan, promotion, records, runner, storage

POOL = "truthsource_runbook"   # one slot per running deploy, verify or rollback; the instance sets the limit
STAGING_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_staging_targets")
PRODUCTION_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_production_targets")
TARGET_PARTITIONS = dg.DynamicPartitionsDefinition(name="truthsource_targets")   # all: verification, rollback
RECORDS_ENV = by_hand.RECORDS_ENV   # where runs keep their records, as by hand
SIGNOFF_ENV = "RUNBOOK_FLEET_SIGNOFF"
GROUP_ENV = "RUNBOOK_FLEET_GROUP"
TAG = "truthsource/"               # the prefix of every tag the fleet puts on a run
# What may be retried: the server ended the session mid-phase; the phase's transaction was rolled back.
RETRYABLE_ERRORS = ("ConnectionLost",)
RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)
# A run's config names the loggers Dagster starts for it (else its default console logger); this one
# prints a refusal as one line, without Dagster's stack (fleet_console). The sensor's runs name it.
CONSOLE = {"console": {}}
UnknownGroup = fleet_plan.UnknownGroup


class Fleet(dg.ConfigurableResource):
    """Where the fleet is described and where its records go (defaults: the environment, as `runbook`)."""

    targets_file: str | None = None   # default $RUNBOOK_TARGETS, ./targets.toml, the project's
    records: str | None = None        # default $RUNBOOK_RECORDS, else ./records; a folder or s3://bucket/prefix
    signoff_file: str | None = None   # default $RUNBOOK_FLEET_SIGNOFF: the change's sign-off for production
    group: str | None = None          # default $RUNBOOK_FLEET_GROUP: only the targets of this group (else all)

    def records_root(self) -> "Path | str":
        return storage.argument(self.records or os.environ.get(RECORDS_ENV) or str(records.DEFAULT_RECORDS_DIR))

    def records_location(self):
        return storage.location(self.records_root())

    def chosen_group(self) -> str | None:
        return self.group or os.environ.get(GROUP_ENV) or None

    def plan(self) -> fleet_plan.FleetPlan:
        return fleet_plan.read_plan(self.targets_file)

    def targets(self) -> list[connection.Target]:
        """The fleet's targets: the file's entries, or those of its group and the group's canaries
        (UnknownGroup: no target has the group)."""
        return self.plan().chosen(self.chosen_group())

    def target(self, name: str) -> connection.Target:
        """A partition's target, as `--target NAME` resolves it (a transaction pooler refused); one
        outside the fleet's group (and not one of its canaries) is refused."""
        if self.chosen_group() is not None and name not in {t.name for t in self.targets()}:
            raise connection.TargetError(f"target {name!r} is not in group {self.chosen_group()!r}, "
                                         "the group this fleet deploys, nor one of its canaries")
        return cli.resolve_target(argparse.Namespace(service=None, target=name, targets_file=self.targets_file))

    def signoff(self) -> dict | None:
        """The production deployment's config from the change's sign-off file, None without one::

            confirm = true                  # (yes = true, as before, is read the same)
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
        return {"confirm": bool(data.get("confirm", data.get("yes", False))),
                "parameters": {str(k): str(v).lower() if isinstance(v, bool) else str(v)
                               for k, v in (data.get("parameters") or {}).items()}}


class DeployConfig(dg.Config):
    """A partition's `runbook deploy` options: `confirm` is --yes, `parameters` are -p NAME VALUE,
    checked as the command checks them. `yes` is the old name of `confirm`, still read (quoted in YAML:
    a bare yes is YAML 1.1's boolean true, not a key)."""

    confirm: bool = False
    yes: bool = False
    parameters: dict[str, str] = {}

    @property
    def confirmed(self) -> bool:
        return self.confirm or self.yes


class RollbackConfig(dg.Config):
    """`runbook rollback --target <partition> --run RUN_ID --yes -p NAME VALUE`: nothing is assumed."""

    run_id: str                       # the run whose preflight backup to restore (required)
    confirm: bool = False             # must be true: a rollback replaces the database's contents
    yes: bool = False                 # the old name of confirm, still read
    parameters: dict[str, str] = {}   # e.g. discard_later_writes: "true"

    @property
    def confirmed(self) -> bool:
        return self.confirm or self.yes


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
    """Keeps one partition per target of the targets file (or of the fleet's group and its canaries)."""
    try:
        requests = partition_requests(context.instance, fleet)
    except connection.TargetError as exc:
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


def files_tag() -> str:
    """The phase files on disk, short: the sensor's run keys and the runs' tags."""
    return "-".join(digest[:12] for digest in promotion.phase_digests().values())


def start_tags(fleet: Fleet, name: str, stage: str) -> dict[str, str]:
    """What every run of the fleet says from its start, whoever launched it: stage, target, group, files."""
    try:
        group = fleet.plan().by_name(name).group
    except (connection.TargetError, StopIteration):
        group = None   # not in the file (any more): the run refuses it
    return {TAG + "stage": stage, TAG + "target": name, TAG + "group": group or "",
            TAG + "phase_files": files_tag(),
            **{TAG + "sha256." + Path(path).name: digest for path, digest in promotion.phase_digests().items()}}


def run_partition(context: dg.OpExecutionContext | dg.AssetExecutionContext, fleet: Fleet, plan, stage: str,
                  retry=retry_is_safe, after=None) -> dict:
    """`plan(target)` (a `runbook` command's library function) on the partition's target: the run's
    metadata when it passed, else a Failure naming the verdict, retried only where `retry` says so.
    Either way the run's tags say the verdict, record and seal, and `after(outcome, metadata)` is told."""
    name = context.partition_key
    _tag(context, start_tags(fleet, name, stage))
    try:
        outcome = plan(fleet.target(name))
    except cli.REFUSALS as exc:
        _tag(context, {TAG + "verdict": "refused"})
        raise dg.Failure(description=f"target {name!r} refused before anything changed: "
                                     + fleet_console.in_config_words(str(exc)),
                         metadata={"verdict": "refused", "exit_code": 2}, allow_retries=False) from None
    except storage.PublishError as exc:
        _tag(context, {TAG + "verdict": "not published"})
        raise dg.Failure(description=f"target {name!r}: {exc}", metadata={"exit_code": 1},
                         allow_retries=False) from None
    metadata = _metadata(outcome, fleet)
    _tag(context, {TAG + "verdict": outcome.verdict, TAG + "run_id": outcome.run_id,
                   TAG + "seal": metadata["seal"], TAG + "record": metadata["record"].value})
    if after is not None:
        after(outcome, metadata)
    if outcome.verdict != "passed":
        raise dg.Failure(description=f"target {name!r}: {outcome.verdict} (exit {outcome.exit_code}); "
                                     f"record {metadata['record'].value}: "
                                     + fleet_console.in_config_words(_first_error(outcome)),
                         metadata=metadata, allow_retries=retry(outcome))
    return metadata


def _metadata(outcome: runner.Outcome, fleet: Fleet) -> dict:
    location = fleet.records_location()
    record = location.record_url(outcome.run_id)
    return {"verdict": outcome.verdict, "exit_code": outcome.exit_code, "run_id": outcome.run_id,
            "record": dg.MetadataValue.url(record) if location.remote else dg.MetadataValue.path(record),
            "index": dg.MetadataValue.url(location.page_url(outcome.run_id)),
            "seal": _seal(outcome),
            "phase_files": dg.MetadataValue.json(promotion.phase_digests()),
            "notebooks": dg.MetadataValue.md("\n".join(
                f"- {nb['name']}: {records.outcome_text(nb)}" for nb in outcome.notebooks))}


def _seal(outcome: runner.Outcome) -> str:
    try:
        return outcome.record.seal()
    except (OSError, records.RecordError):
        return ""   # no manifest: nothing was sealed


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

def deploy_partition(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet,
                     stage: str) -> dg.MaterializeResult:
    """`runbook deploy --target <partition>` with the config's options; a Failure names the verdict."""
    def plan(target: connection.Target) -> runner.Outcome:
        return cli.deploy(target, _parameters(config.parameters, runner.DEPLOY_PLAN), confirmed=config.confirmed,
                          records_root=fleet.records_root(), progress=context.log.info)

    return dg.MaterializeResult(metadata=run_partition(context, fleet, plan, stage))


@dg.asset(partitions_def=STAGING_PARTITIONS, pool=POOL, retry_policy=RETRY_POLICY, group_name="truthsource",
          tags={TAG + "stage": "staging"},
          description="`runbook deploy` of each non-production target: its verdict, record and seal")
def staging_deployment(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    return deploy_partition(context, config, fleet, "staging")


@dg.asset(partitions_def=PRODUCTION_PARTITIONS, pool=POOL, retry_policy=RETRY_POLICY, group_name="truthsource",
          tags={TAG + "stage": "production"},
          deps=[dg.AssetDep(staging_deployment, partition_mapping=dg.AllPartitionMapping())],
          description="`runbook deploy` of each production target, after its group's canaries passed")
def production_deployment(context: dg.AssetExecutionContext, config: DeployConfig, fleet: Fleet) -> dg.MaterializeResult:
    return deploy_partition(context, config, fleet, "production")


deploy_staging = dg.define_asset_job("deploy_staging", selection=[staging_deployment],
                                     tags={TAG + "stage": "staging"})
deploy_production = dg.define_asset_job("deploy_production", selection=[production_deployment],
                                        tags={TAG + "stage": "production"})


# -- one target's verification and rollback ----------------------------------------------------

@dg.op(pool=POOL, out=dg.Out(str, description="the run id of the verification's record"))
def verify_target(context: dg.OpExecutionContext, fleet: Fleet) -> dg.Output:
    """`runbook verify --target <partition>`: changes nothing, and a failed verification is not retried."""
    metadata = run_partition(context, fleet, lambda target: cli.verify(target, fleet.records_root(),
                                                                       progress=context.log.info),
                             "verification", retry=never)
    return dg.Output(metadata["run_id"], metadata=metadata)


@dg.op(pool=POOL, out=dg.Out(str, description="the run id of the rollback's record"))
def roll_back(context: dg.OpExecutionContext, config: RollbackConfig, fleet: Fleet) -> dg.Output:
    """`runbook rollback --target <partition> --run RUN_ID`: refused without `confirm`, never retried."""
    def plan(target: connection.Target) -> runner.Outcome:
        return cli.rollback(target, config.run_id, _parameters(config.parameters, ("rollback",)),
                            confirmed=config.confirmed, records_root=fleet.records_root(),
                            progress=context.log.info, warn=context.log.warning)

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

    metadata = run_partition(context, fleet, plan, "rollback", retry=never, after=deployment_undone)
    return dg.Output(metadata["run_id"], metadata=metadata)


@dg.job(partitions_def=TARGET_PARTITIONS, tags={TAG + "stage": "verification"},
        description="`runbook verify` of one target a run: its verdict, record and seal")
def verify_targets():
    verify_target()


@dg.job(partitions_def=TARGET_PARTITIONS, tags={TAG + "stage": "rollback"},
        description="`runbook rollback` of one target: config run_id and confirm: true; never retried or sensed")
def rollback_target():
    roll_back()


# -- canaries per group ------------------------------------------------------------------------

def latest_run(instance: dg.DagsterInstance, stage: str, name: str) -> dg.DagsterRun | None:
    """The newest run of a stage on a target (by the tags every run of the fleet gets)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={TAG + "stage": stage, TAG + "target": name}), limit=1)
    return runs[0] if runs else None


def latest_deployment(instance: dg.DagsterInstance, asset, name: str) -> dict:
    """The metadata of a deployment partition's newest materialization ({}: none)."""
    found = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset.key, asset_partitions=[name]), limit=1).records
    return dict(found[0].asset_materialization.metadata) if found else {}


def not_deployed(instance: dg.DagsterInstance, asset, stage: str, name: str) -> str | None:
    """Why a target has not deployed the phase files on disk, in a few words (None: its latest run did)."""
    run = latest_run(instance, stage, name)
    ended = {dg.DagsterRunStatus.FAILURE: "failed", dg.DagsterRunStatus.CANCELED: "was canceled"}
    if run is not None and run.status in ended:
        return (f"its latest run {ended[run.status]}: {run.tags.get(TAG + 'verdict', 'no verdict')}, "
                f"Dagster run {run.run_id[:8]}")
    if run is not None and not run.is_finished:
        return f"deploying now, Dagster run {run.run_id[:8]}"
    metadata = latest_deployment(instance, asset, name)
    verdict = getattr(metadata.get("verdict"), "value", None)
    files = getattr(metadata.get("phase_files"), "value", None)
    if verdict is None:
        return "not deployed yet"
    if verdict != "passed":
        return f"its deployment says {verdict!r}"
    return None if files == promotion.phase_digests() else "it passed other phase files"


def canaries_not_passed(instance: dg.DagsterInstance, plan: fleet_plan.FleetPlan, group: str | None) -> list[str]:
    """'name (why)' for each canary of a group that has not passed the phase files on disk."""
    canaries = plan.canaries_of(group)
    if not canaries:
        return [f"none is named ([{fleet_plan.GROUPS_TABLE}.{group}] {fleet_plan.CANARIES_KEY} = [...]"
                if group else f"none is named ([{fleet_plan.FLEET_TABLE}] {fleet_plan.CANARIES_KEY} = [...]"]
    partitions = set(instance.get_dynamic_partitions(STAGING_PARTITIONS.name))
    found = []
    for name in canaries:
        why = ("not a partition yet (the sensor targets_file_partitions adds it)" if name not in partitions
               else not_deployed(instance, staging_deployment, "staging", name))
        if why:
            found.append(f"{name} ({why})")
    return found


def _group_label(group: str | None) -> str:
    return f"group {group}" if group else "the targets in no group"


def production_state(instance: dg.DagsterInstance, plan: fleet_plan.FleetPlan) -> tuple[list[str], list[str]]:
    """The production partitions the sensor may launch now, and why each of the others waits: its group's
    canaries have not passed the files on disk, it is quarantined (its last run failed), or it has them."""
    ready, waiting, said = [], [], set()
    for name in instance.get_dynamic_partitions(PRODUCTION_PARTITIONS.name):
        target = next((t for t in plan.targets if t.name == name), None)
        if target is None:
            continue   # no longer in the file: the partitions sensor removes it
        pending = canaries_not_passed(instance, plan, target.group)
        run = latest_run(instance, "production", name)
        if pending:
            if target.group not in said:
                said.add(target.group)
                waiting.append(f"{_group_label(target.group)} waits for its canaries: {', '.join(pending)}")
        elif run is not None and run.status == dg.DagsterRunStatus.FAILURE:
            waiting.append(f"{name} is quarantined: its last run failed ({run.tags.get(TAG + 'verdict', 'failed')}, "
                           f"Dagster run {run.run_id[:8]}); materialize its partition by hand to release it")
        elif not_deployed(instance, production_deployment, "production", name) is None:
            continue   # it has these files already
        elif run is not None and not run.is_finished:
            waiting.append(f"{name} is deploying now (Dagster run {run.run_id[:8]})")
        else:
            ready.append(name)
    return ready, waiting


@dg.sensor(job=deploy_production, minimum_interval_seconds=60)
def production_after_staging(context: dg.SensorEvaluationContext, fleet: Fleet):
    """Production runs, once per target and set of phase files, for the groups whose canaries passed them."""
    try:
        plan = fleet.plan()
    except connection.TargetError as exc:
        return dg.SkipReason(f"production waits: {exc}")
    ready, waiting = production_state(context.instance, plan)
    if not ready:
        return dg.SkipReason("; ".join(waiting) or "no production target waits for the phase files on disk")
    config = fleet.signoff()
    if config is None:
        return dg.SkipReason("; ".join([f"canaries passed for {', '.join(ready)}; production waits for the "
                                        f"change's sign-off file (${SIGNOFF_ENV})", *waiting]))
    for line in waiting:
        context.log.info(line)
    return [dg.RunRequest(run_key=f"{name}:{files_tag()}", partition_key=name,
                          tags=start_tags(fleet, name, "production"),
                          run_config={"ops": {"production_deployment": {"config": config}}, "loggers": CONSOLE})
            for name in ready]


defs = dg.Definitions(
    assets=[staging_deployment, production_deployment],
    jobs=[deploy_staging, deploy_production, verify_targets, rollback_target],
    sensors=[targets_file_partitions, production_after_staging],
    resources={"fleet": Fleet()},
    loggers={"console": fleet_console.console_logger},
)
