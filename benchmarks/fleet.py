"""How long does a fleet take? N targets through Dagster with pool limits 1, 2 and 4, against the same
deploys one after another by the CLI. Measures and prints; asserts nothing (speed is no test).

    .venv/bin/python benchmarks/fleet.py [--targets 20] [--pools 1,2,4]     # needs the fleet extra

The fleet: N small targets in two groups, eu and us, each with its own staging (its canary) and
(N - 2) / 2 production targets; every target is a database of one embedded PostgreSQL, cloned from a
template with the Supabase shim and the legacy fixture, fresh for each round. A round deploys the two
staging targets, then every production target (sign-off given, promotion finding the staging records).

- CLI: `runbook deploy --target NAME` in a new process per target, one after another. The median
  production deploy is "one target's deploy time" (T); the goal for a pool of K is N / K x T x 1.3.
- Dagster: `dagster dev` (runbooks.fleet_dev: webserver, daemon, code server) on an instance on SQLite
  storage whose pool `truthsource_runbook` has limit K and which starts at most 2K runs at once; the
  runs are submitted through Dagster's GraphQL API as the UI does (staging, then production once
  staging ended: what the canary sensor would ask for, without its 60 s tick). Each run is Dagster's
  default: a run worker process, then a step process running the package's `cli.deploy`.

Per Dagster run: its wall (submitted to ended), its launch (submitted to the run worker's start: the
daemon's queue and the worker process), the pool wait (blocked by the pool until its step started) and
its own overhead (the run's duration less the pool wait and less the runbook's own time, from the record).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg2

from runbooks import records, rehearsal, runner
from runbooks.embedded import EmbeddedPostgres

TEMPLATE = "fleet_template"
POOL = "truthsource_runbook"
SIGNOFF = {"approver": "Bench", "change_ticket": "CHG-BENCH", "stakeholders_notified": "true",
           "rollback_plan_confirmed": "true"}


def window() -> str:
    now = datetime.now(timezone.utc)
    return f"{now - timedelta(hours=1):%Y-%m-%dT%H:%MZ}/{now + timedelta(hours=12):%Y-%m-%dT%H:%MZ}"


# -- the fleet ---------------------------------------------------------------------------------

def fleet_names(count: int) -> list[tuple[str, str, bool]]:
    """(name, group, production) of N targets: a staging per group, then the production targets."""
    per_group = (count - 2) // 2
    names = [(f"{g}-staging", g, False) for g in ("eu", "us")]
    for number in range(1, per_group + 1):
        names += [(f"{g}-prod-{number:02d}", g, True) for g in ("eu", "us")]
    return names


def admin(pg: EmbeddedPostgres, sql: str) -> None:
    conn = psycopg2.connect(pg.conninfo("postgres"), passfile=str(pg.client.pgpass_file))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def database_of(round_name: str, name: str) -> str:
    return f"{round_name}_{name}".replace("-", "_")


def make_fleet(pg: EmbeddedPostgres, round_name: str, folder: Path, count: int) -> Path:
    """Fresh databases for a round (clones of the template) and the targets file naming them."""
    entries = []
    for name, group, production in fleet_names(count):
        admin(pg, f'drop database if exists "{database_of(round_name, name)}" with (force)')
        admin(pg, f'create database "{database_of(round_name, name)}" template {TEMPLATE}')
        entries.append(f'[targets.{name}]\nhost = "{pg.host}"\nport = {pg.port}\n'
                       f'dbname = "{database_of(round_name, name)}"\nuser = "postgres"\nsslmode = "disable"\n'
                       f'group = "{group}"\n' + ("production = true\n" if production else ""))
    targets = folder / "targets.toml"
    targets.write_text("\n".join(entries))
    return targets


def drop_fleet(pg: EmbeddedPostgres, round_name: str, count: int) -> None:
    for name, _, _ in fleet_names(count):
        admin(pg, f'drop database if exists "{database_of(round_name, name)}" with (force)')


# -- the CLI, one after another ----------------------------------------------------------------

def cli_round(pg: EmbeddedPostgres, folder: Path, count: int) -> dict:
    targets = make_fleet(pg, "cli", folder, count)
    seconds, started = {}, time.perf_counter()
    for name, _, production in fleet_names(count):
        extra = ["--yes", *[x for k, v in {**SIGNOFF, "maintenance_window": window()}.items() for x in ("-p", k, v)]]
        one = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "runbooks.cli", "deploy", "--target", name, "--targets-file",
                               str(targets), "--records", str(folder / "records"), *(extra if production else [])],
                              capture_output=True, text=True)
        seconds[name] = time.perf_counter() - one
        if done.returncode != 0:
            print(f"  cli: {name} exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
    wall = time.perf_counter() - started
    drop_fleet(pg, "cli", count)
    production = [seconds[name] for name, _, prod in fleet_names(count) if prod]
    return {"wall": wall, "one": statistics.median(production), "seconds": seconds}


# -- through Dagster -----------------------------------------------------------------------------

def dagster_home(folder: Path, pool: int) -> Path:
    home = folder / "dagster-home"
    home.mkdir()
    (home / "dagster.yaml").write_text(f"telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: {pool}\n"
                                       f"  runs:\n    max_concurrent_runs: {2 * pool}\n")
    return home


def serving(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5).status == 200
    except OSError:
        return False


def start_dagster(home: Path, env: dict, port: int) -> subprocess.Popen:
    dev = subprocess.Popen([sys.executable, "-m", "runbooks.fleet_dev", "-h", "127.0.0.1", "-p", str(port)],
                           cwd=home.parent, env={**os.environ, **env, "DAGSTER_HOME": str(home)},
                           stdout=subprocess.DEVNULL, stderr=open(home.parent / "dagster-dev.log", "w"))
    give_up = time.monotonic() + 600
    while not serving(port):
        if dev.poll() is not None or time.monotonic() > give_up:
            raise SystemExit(f"dagster dev did not start: see {home.parent / 'dagster-dev.log'}")
        time.sleep(0.5)
    return dev


def submit_wave(client, names: list[str], job: str, config: dict) -> dict[str, tuple[str, float]]:
    """Each partition's run, submitted as the UI does: run id and when."""
    submitted = {}
    for name in names:
        run_id = client.submit_job_execution(job, run_config=config, tags={"dagster/partition": name})
        submitted[name] = (run_id, time.time())
    return submitted


def wait_for(client, runs: dict) -> None:
    from dagster import DagsterRunStatus

    finished = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    pending = {run_id for run_id, _ in runs.values()}
    while pending:
        pending = {run_id for run_id in pending if client.get_run_status(run_id) not in finished}
        time.sleep(1)


def dagster_round(pg: EmbeddedPostgres, folder: Path, count: int, pool: int) -> dict:
    import dagster as dg
    from dagster_graphql import DagsterGraphQLClient

    from runbooks import fleet

    targets = make_fleet(pg, f"pool{pool}", folder, count)
    home = dagster_home(folder, pool)
    env = {"RUNBOOK_TARGETS": str(targets), "RUNBOOK_RECORDS": str(folder / "records")}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        fleet.sync_partitions(instance, fleet.Fleet(targets_file=str(targets)))
    port = _free_port()
    dev = start_dagster(home, env, port)
    try:
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        names = fleet_names(count)
        started = time.perf_counter()
        staging = submit_wave(client, [n for n, _, p in names if not p], "deploy_staging", {"loggers": fleet.CONSOLE})
        wait_for(client, staging)
        production_config = {"loggers": fleet.CONSOLE, "ops": {"production_deployment": {"config": {
            "confirm": True, "parameters": {**SIGNOFF, "maintenance_window": window()}}}}}
        production = submit_wave(client, [n for n, _, p in names if p], "deploy_production", production_config)
        wait_for(client, production)
        wall = time.perf_counter() - started
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=600)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        per_run = [run_facts(instance, run_id, submitted, folder / "records")
                   for run_id, submitted in {**staging, **production}.values()]
    drop_fleet(pg, f"pool{pool}", count)
    return {"wall": wall, "runs": per_run}


def run_facts(instance, run_id: str, submitted: float, records_root: Path) -> dict:
    """One run's wall, launch, pool wait and Dagster's own overhead (seconds)."""
    import dagster as dg

    record = instance.get_run_record_by_id(run_id)
    events = [e for e in instance.all_logs(run_id) if e.dagster_event]
    first = {}
    for event in events:
        first.setdefault(event.dagster_event.event_type_value, event.timestamp)
    blocked = [e.timestamp for e in events if f"blocked by limit for pool {POOL}" in (e.dagster_event.message or "")]
    step_start = first.get("STEP_START", record.end_time)
    pool_wait = step_start - blocked[0] if blocked else 0.0
    tags = record.dagster_run.tags
    own = 0.0
    if tags.get("truthsource/run_id"):
        manifest = records.Record.open(records_root, tags["truthsource/run_id"]).manifest()
        own = (datetime.fromisoformat(manifest["finished_at"]) - datetime.fromisoformat(manifest["started_at"])).total_seconds()
    duration = record.end_time - record.start_time
    return {"ok": record.dagster_run.status == dg.DagsterRunStatus.SUCCESS, "wall": record.end_time - submitted,
            "launch": record.start_time - submitted, "pool_wait": pool_wait, "own": own,
            "overhead": duration - pool_wait - own, "target": tags.get("dagster/partition")}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the report ----------------------------------------------------------------------------------

def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def report(count: int, cli: dict, rounds: dict[int, dict]) -> None:
    one = cli["one"]
    print(f"\nfleet of {count} targets (2 staging, {count - 2} production), {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f} at the end")
    print(f"{'CLI, one after another':<34} wall {cli['wall']:8.1f}s   one production deploy (median) {one:6.1f}s")
    for pool, result in rounds.items():
        runs = result["runs"]
        failed = [r["target"] for r in runs if not r["ok"]]
        ideal = count / pool * one
        print(f"{f'Dagster, pool {pool}':<34} wall {result['wall']:8.1f}s   x{cli['wall'] / result['wall']:.2f} of the CLI, "
              f"{result['wall'] / ideal:.2f} of N/K x T ({ideal:.0f}s; goal 1.3)"
              + (f"   FAILED: {', '.join(failed)}" if failed else ""))
        print(f"{'':<34} per run (median): launch {median(r['launch'] for r in runs):5.1f}s, "
              f"pool wait {median(r['pool_wait'] for r in runs):6.1f}s, runbook {median(r['own'] for r in runs):6.1f}s, "
              f"Dagster's own overhead {median(r['overhead'] for r in runs):5.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=20, help="how many targets (even, at least 4)")
    parser.add_argument("--pools", default="1,2,4", help="the pool limits to measure, comma-separated")
    args = parser.parse_args()
    if args.targets < 4 or args.targets % 2:
        parser.error("--targets must be even and at least 4")
    pools = [int(p) for p in args.pools.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="truthsource-fleet-bench-"))
    try:
        with EmbeddedPostgres() as pg, runner.environment(pg.client_env()):
            rehearsal.prepare_database(pg, TEMPLATE)
            print(f"embedded PostgreSQL {pg.version}; {args.targets} targets; pools {pools}; work in {folder}")
            cli_dir = folder / "cli"
            cli_dir.mkdir()
            cli = cli_round(pg, cli_dir, args.targets)
            print(f"CLI: {cli['wall']:.1f}s")
            rounds = {}
            for pool in pools:
                pool_dir = folder / f"pool{pool}"
                pool_dir.mkdir()
                rounds[pool] = dagster_round(pg, pool_dir, args.targets, pool)
                print(f"Dagster pool {pool}: {rounds[pool]['wall']:.1f}s")
            report(args.targets, cli, rounds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
