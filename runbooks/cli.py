"""`runbook`: a thin command line over the package (exit 0 success, 1 failed, 2 refused)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import psycopg2

from . import budgets, connection, engine, preflight, promotion, records, runner, signoff, storage
from .engine import EngineError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or input: refused before anything changed (exit 2)."""


# What refuses a command before anything changed (exit 2); the fleet's runs refuse on the same.
REFUSALS = (UsageError, connection.TargetError, records.RecordError, signoff.SignoffError, EngineError)


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()   # neither: libpq's environment, as the notebooks
    group.add_argument("--service", metavar="NAME", help="a libpq service from pg_service.conf (PGSERVICEFILE honoured); "
                       "without --service or --target: PGSERVICE, else PGHOST, PGPORT, PGDATABASE, PGUSER")
    group.add_argument("--target", metavar="NAME", help="an entry of the targets file")
    parser.add_argument("--targets-file", metavar="PATH",
                        help=f"the targets file (default ${connection.TARGETS_ENV}, else ./{connection.DEFAULT_TARGETS_FILE}, else the project root's)")


def _add_records(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", metavar="DIR", type=storage.argument, default=records.DEFAULT_RECORDS_DIR,
                        help="where run records live: a folder (default ./records) or s3://bucket/prefix")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runbook", description=__doc__.split(":")[1].strip())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("rehearse", help="a full deployment on a throwaway embedded PostgreSQL with the legacy fixture")
    _add_records(p)

    p = commands.add_parser("deploy", help="preflight (with backup), the three phases and verification on a target")
    _add_target(p)
    p.add_argument("--yes", action="store_true", help="confirm a production target")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter (sign-off: approver, change_ticket, maintenance_window, ...)")
    _add_records(p)

    p = commands.add_parser("verify", help="post-deployment verification alone")
    _add_target(p)
    _add_records(p)

    p = commands.add_parser("rollback", help="restore the backup a run took in its preflight, and prove it")
    _add_target(p)
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run whose backup to restore")
    p.add_argument("--yes", action="store_true", help="confirm: the database's contents are replaced")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="a notebook parameter (discard_later_writes true: roll back although rows were written "
                        "since the deployment)")
    _add_records(p)

    p = commands.add_parser("maintain", help="the guide's daily, weekly or monthly maintenance tasks")
    p.add_argument("cadence", choices=("daily", "weekly", "monthly"))
    _add_target(p)
    p.add_argument("--yes", action="store_true", help="confirm deleting data (-p apply_retention true) on production")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    _add_records(p)

    p = commands.add_parser("status", help="what is applied, with checksums, and whether the files still match")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--service", metavar="NAME", help="a libpq service from pg_service.conf (PGSERVICEFILE honoured); "
                       "without --service, --target or --all: PGSERVICE, else PGHOST, PGPORT, PGDATABASE, PGUSER")
    group.add_argument("--target", metavar="NAME", help="an entry of the targets file")
    group.add_argument("--all", action="store_true",
                       help="every target of the targets file: which phase file digests are applied where")
    p.add_argument("--targets-file", metavar="PATH",
                   help=f"the targets file (default ${connection.TARGETS_ENV}, else ./{connection.DEFAULT_TARGETS_FILE}, else the project root's)")
    _add_records(p)

    p = commands.add_parser("records", help="read records: list, show RUN_ID, verify RUN_ID; seal and finish runs")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_records(sub.add_parser("list", help="every record, oldest first"))
    for name, text in (("show", "a record's manifest, readably"), ("verify", "re-hash every file against the manifest"),
                       ("seal", "make a run stepped through by hand in JupyterLab a sealed record"),
                       ("finish", "finish the database's witness of a sealed run, left open (the target out of reach)")):
        q = sub.add_parser(name, help=text)
        q.add_argument("run_id", metavar="RUN_ID")
        _add_records(q)
        if name == "seal":
            q.add_argument("--notebooks", metavar="DIR", type=Path, default=None,
                           help="where JupyterLab saved the executed notebooks (default: the project's notebooks/)")

    p = commands.add_parser("sandbox", help="a throwaway embedded PostgreSQL that stays up, for practice by hand")
    p.add_argument("--from", dest="source", metavar="NAME",
                   help="a fresh copy of this target's database (a service, or a targets-file entry; "
                        "service:NAME or target:NAME when both exist) instead of the legacy fixture")
    p.add_argument("--targets-file", metavar="PATH", help="the targets file for --from")

    p = commands.add_parser("lab", help="JupyterLab on the notebooks, on the running sandbox (127.0.0.1, no browser)")
    p.add_argument("--port", type=int, default=None, help="JupyterLab's port (default: its own choice)")
    return parser


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


# What libpq reads to find a server when no service or target is named (the notebooks' target_kind = None).
LIBPQ_TARGET_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER")


def from_libpq_environment(say=None) -> connection.Target:
    """The target libpq's environment names (PGSERVICE, else PGHOST, PGPORT...), as a notebook whose
    target_kind is None resolves it; said on stderr. Nothing exported: refused, naming what to give."""
    say = say or _stderr
    if os.environ.get("PGSERVICE"):
        target = connection.from_environment()
        say(f"target: service {target.name!r} (from PGSERVICE; no --service or --target given)")
        return target
    given = [f"{name}={os.environ[name]}" for name in LIBPQ_TARGET_ENV if os.environ.get(name)]
    if not given:
        raise UsageError("no target: give --service NAME or --target NAME, or export PGSERVICE (as `runbook sandbox` "
                         "prints) or PGHOST, PGPORT, PGDATABASE and PGUSER")
    say(f"target: libpq's environment ({', '.join(given)}; no --service or --target given)")
    return connection.from_environment()


def resolve_target(args) -> connection.Target:
    if args.service:
        target = connection.from_service(args.service)
    elif args.target:
        target = connection.from_targets_file(args.target, args.targets_file)
    else:
        target = from_libpq_environment()
    try:  # a transaction-mode pooler is refused (TransactionPoolerError, exit 2) before anything runs
        connection.refuse_transaction_pooler(target)
    except psycopg2.OperationalError:
        pass  # unreachable, or the login failed: the command's own connection reports it
    return target


BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
INTEGER = re.compile(r"[+-]?[0-9]+")
NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def parse_value(name: str, text: str, parameter: runner.Parameter):
    """A -p value as its notebook's parameters cell types it, or a refusal naming what it accepts."""
    lowered = text.strip().lower()
    if parameter.nullable and lowered in ("none", "null"):
        return None
    if parameter.kind == "bool" and lowered in BOOLEANS:
        return BOOLEANS[lowered]
    if parameter.kind == "int" and INTEGER.fullmatch(text.strip()):
        return int(text)
    if parameter.kind == "float" and NUMBER.fullmatch(text.strip()):
        return float(text)
    if parameter.kind == "text":
        return text
    raise UsageError(f"parameter {name!r} takes {parameter.accepts} (default {parameter.default_text}), "
                     f"not {text!r}")


def parse_parameters(pairs: list[list[str]], steps) -> dict:
    """-p NAME VALUE pairs, each checked against the notebooks of the command before anything runs."""
    known: dict[str, runner.Parameter] = {}
    for step in steps:
        for name, parameter in runner.declared_parameters(step).items():
            known.setdefault(name, parameter)
    reserved = {"run_id", "record_dir", "target_kind", "target_name", "targets_file"}
    secrets = records.known_secrets()
    values = {}
    for name, raw in pairs:
        if any(word in name.lower() for word in ("password", "secret", "token", "passwd")):
            raise UsageError(f"parameter {name!r} looks like a secret: secrets never pass through parameters "
                             "(they would be written into the record); use .pgpass")
        if name in reserved:
            raise UsageError(f"parameter {name!r} is set by runbook itself")
        if name not in known:
            raise UsageError(f"unknown parameter {name!r}; the notebooks of this command take: "
                             + ", ".join(sorted(set(known) - reserved)))
        if any(secret in raw for secret in secrets):
            raise UsageError(f"the value of parameter {name!r} holds a password libpq would use (PGPASSWORD or "
                             ".pgpass): secrets never pass through parameters (they would be written into the "
                             "record); was it typed in the wrong place?")
        values[name] = parse_value(name, raw, known[name])
    return values


# Commands that read earlier records (a typo in --records would read as "no such run"); the
# others write a record and create the folder when only the folder itself is new.
READS_RECORDS = ("records", "rollback")


def check_records_folder(args) -> None:
    """Refuse a --records folder that cannot be meant, before anything runs (it changes nothing)."""
    folder = getattr(args, "records", None)
    if storage.is_url(folder):
        storage.location(folder).check()   # an object store: reachable, with the SDK's own credentials
        return
    if folder is None or folder.is_dir():
        return
    if folder.exists():
        raise UsageError(f"--records {folder}: not a folder")
    if args.command in READS_RECORDS:
        for run_id in (getattr(args, "run_id", None), getattr(args, "run", None)):
            if run_id is not None:
                records.check_run_id(run_id)   # a malformed run id is the more precise refusal
        raise UsageError(f"no records folder {folder} ({folder.resolve()} does not exist): check --records")
    if not folder.resolve().parent.is_dir():
        raise UsageError(f"--records {folder}: its parent folder {folder.resolve().parent} does not exist; "
                         "create it first if this is the place meant")


# -- commands --------------------------------------------------------------------------------

def finished(args, outcome: runner.Outcome) -> int:
    """A run's exit status; a refusal (nothing of it ran) is also said on stderr, as usage errors are."""
    if outcome.verdict == "refused":
        print(f"runbook {args.command}: refused: {outcome.error}", file=sys.stderr)
    return outcome.exit_code


def cmd_rehearse(args) -> int:
    from .rehearsal import rehearse

    return rehearse(records_root=args.records).exit_code


def cmd_deploy(args) -> int:
    target = resolve_target(args)
    params = parse_parameters(args.parameter, runner.DEPLOY_PLAN)
    return finished(args, deploy(target, params, confirmed=args.yes, records_root=args.records))


def deploy(target: connection.Target, params: dict, *, confirmed: bool, records_root: Path,
           progress=print) -> runner.Outcome:
    """`runbook deploy`'s plan on one target (the fleet's partitions run this too): the sign-off and
    the promotion rule are asked first, and a refusal raises UsageError before anything changes."""
    problems = signoff.problems(params, production=target.production, confirmed=confirmed)
    problems += changed_files_problem(target, force=bool(params.get("force")))
    decision = promotion.decide(target, records_root, override=params.get("promotion_override"),
                                max_age_days=params.get("promotion_max_age_days"))
    if not decision.allowed:
        problems.append(decision.problem)
    try:   # the disk the deployment needs, on the server and on the runner, against the free space known
        problems += [p for p in (budgets.refusal(target, records_root, params),) if p]
        if params.get("max_replica_lag") is not None:
            engine.replica_lag_setting(params["max_replica_lag"])
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise UsageError("refused: " + "; ".join(problems))
    return runner.run_plan("deploy", runner.DEPLOY_PLAN, target, records_root=records_root, parameters=params,
                           progress=progress)


def changed_files_problem(target: connection.Target, *, force: bool) -> list[str]:
    """An applied phase file that changed on disk since, unless forced (the preflight asks the same); an
    unreachable target says nothing here: the run reports it, with its record."""
    if force:
        return []
    try:
        conn = connection.connect(target, application_name="runbook deploy check", readonly=True, autocommit=True)
    except psycopg2.OperationalError:
        return []
    try:
        changed = preflight.changed_files(preflight.phase_states(conn))
    finally:
        conn.close()
    return [preflight.changed_refusal(changed)] if changed else []


def cmd_verify(args) -> int:
    return finished(args, verify(resolve_target(args), args.records))


def verify(target: connection.Target, records_root: Path, progress=print) -> runner.Outcome:
    """`runbook verify`'s plan on one target (the fleet's verification runs this too): row counts are
    compared with the newest preflight snapshot of that target in the records, when there is one."""
    params = {}
    baseline = storage.location(records_root).latest_with_snapshot(target.describe())
    if baseline:
        params["baseline_dir"] = str(baseline.resolve())
    return runner.run_plan("verify", ("verification",), target, records_root=records_root, parameters=params,
                           progress=progress)


def cmd_rollback(args) -> int:
    target = resolve_target(args)
    given = parse_parameters(args.parameter, ("rollback",))
    return finished(args, rollback(target, args.run, given, confirmed=args.yes, records_root=args.records))


def rollback(target: connection.Target, run_id: str, params: dict, *, confirmed: bool, records_root: Path,
             progress=print, warn=_stderr) -> runner.Outcome:
    """`runbook rollback`'s plan on one target (the fleet's rollback runs this too): the record, its
    backup against the database's witness, the target's identity and the writes since are examined,
    and a refusal raises UsageError, all before anything changes; `confirmed` is --yes."""
    from .rollback import RollbackRefused, examine_source

    if {"rollback_run_id", "rollback_record_dir"} & set(params):
        raise UsageError("the run to roll back is named by --run, not by a parameter")
    try:  # the record, the backup against its witness, the target's identity, writes since: before anything changes
        source = examine_source(target, storage.location(records_root).fetch(run_id), run_id,
                                bool(params.get("discard_later_writes", False)))
    except RollbackRefused as exc:
        raise UsageError(str(exc)) from None
    if not confirmed:
        raise UsageError(f"rollback replaces the contents of {target.name!r} with the backup of run {run_id}: "
                         "pass --yes to confirm")
    for warning in source.warnings:
        warn(f"runbook rollback: WARNING: {warning}")
    params = {**params, "rollback_run_id": run_id, "rollback_record_dir": str(source.folder.resolve())}
    return runner.run_plan("rollback", ("rollback",), target, records_root=records_root, parameters=params,
                           manifest_extra=source.manifest_extra, progress=progress)


def cmd_maintain(args) -> int:
    target = resolve_target(args)
    params = parse_parameters(args.parameter, ("maintenance",))
    if params.get("apply_retention") and target.production and not args.yes:
        raise UsageError("apply_retention deletes data on a production target: pass --yes to confirm")
    params["cadence"] = args.cadence
    return finished(args, runner.run_plan(f"maintain {args.cadence}", ("maintenance",), target,
                                          records_root=args.records, parameters=params))


def cmd_status(args) -> int:
    if args.all:
        return status_of_fleet(args)
    target = resolve_target(args)
    try:
        conn = connection.connect(target, application_name="runbook status", readonly=True)
    except psycopg2.OperationalError as exc:
        raise UsageError(runner.connect_refusal(target, exc)) from None
    try:
        history = engine.read_history(conn)
        states = engine.phase_states(conn, history)
        facts = connection.server_facts(conn)
    finally:
        conn.close()
    print(_fit(f"{target.kind} {target.name}" + (" (production)" if target.production else "")
               + f": database {facts['database']} on {facts['server_address']}:{facts['server_port']}, "
               f"PostgreSQL {facts['server_version']}"))
    print(f"{'phase':<6} {'file':<32} {'state':<8} {'applied at (UTC)':<20} by")
    drift = 0
    for phase in states:
        row, on_disk = phase.applied, phase.on_disk
        if row is None:
            print(f"{phase.version:<6} {phase.path.name:<32} {'pending':<8}")
            print(f"{'':<6} sha256 of the file {(on_disk or 'missing')[:12]}")
            continue
        same = phase.state == "applied, file matches"
        drift += not same
        print(_fit(f"{phase.version:<6} {row['file_name']:<32} {'applied':<8} {_utc(row['applied_at']):<20} "
                   f"{row['applied_by']}"))
        print(f"{'':<6} run {row['run_id']}, sha256 {row['sha256'][:12]}: "
              + ("the file matches" if same else f"CHANGED on disk (now {(on_disk or 'missing')[:12]})"))
    rollbacks = [r for r in history if r["action"] == "rollback"]
    if rollbacks:
        last = rollbacks[-1]
        print(_fit(f"last rollback: {_utc(last['applied_at'])} UTC by {last['applied_by']} (run {last['run_id']})"))
        print(f"{'':<15}restored the database as it was at {_utc(last['restored_to'])} UTC")
    print(f"history: {len(history)} row(s); " + ("files on disk match what was applied" if not drift
                                                 else f"{drift} applied phase(s) changed on disk"))
    return EXIT_FAILED if drift else EXIT_OK


def status_of_fleet(args) -> int:
    """Per target of the targets file, the digest of each phase file it has applied (= the file on
    disk, or the digest that differs), and what production may be given (the promotion rule)."""
    path = connection.targets_file_path(args.targets_file)
    targets = [connection.from_targets_file(name, path) for name in connection.target_names(path)]
    on_disk = {Path(name).name: digest for name, digest in promotion.phase_digests().items()}
    widths = [max(23, len(name) + 1) for name in on_disk]   # a file's name whole: the header names it
    print(f"{'target':<20} {'prod':<5} " + _columns(list(on_disk), widths))
    print(f"{'(files on disk)':<20} {'':<5} " + _columns([digest[:12] for digest in on_disk.values()], widths))
    for target in targets:
        try:
            applied = promotion.applied_digests(target)
            cells = [("=" if applied[name] == digest else "") + (applied[name] or "pending")[:12]
                     for name, digest in on_disk.items()]
        except psycopg2.OperationalError as exc:
            cells = ["unreachable: " + " ".join(str(exc).split())[:40]]
        print(_fit(f"{target.name[:20]:<20} {'yes' if target.production else 'no':<5} " + _columns(cells, widths)))
    print("(= : the applied file is the one on disk)")
    production = next((t for t in targets if t.production), None)
    if production is not None:
        decision = promotion.decide(production, args.records, targets_file=path)
        print(_fit("promotion: " + (f"the files on disk are proven by {decision.evidence.describe()}"
                                    if decision.evidence else
                                    f"no non-production deployment of the files on disk in the last "
                                    f"{decision.max_age_days:g} days: production would be refused"), 200))
    return EXIT_OK


def _columns(cells: list[str], widths: list[int]) -> str:
    """Cells padded to their columns' widths (the last one as it is)."""
    return " ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)).rstrip()


WIDTH = 100   # what `status` and `records list` print fits a terminal this wide


def _fit(line: str, width: int = WIDTH) -> str:
    """A line cut to the width (names can be long), with … where it was cut."""
    return line if len(line) <= width else line[:width - 1] + "…"


def _utc(moment) -> str:
    return f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S}" if moment else "-"


def cmd_records(args) -> int:
    location = storage.location(args.records)   # a folder, or an object store other workers published to
    if args.action == "list":
        rows = location.list_records()
        if not rows:
            print(f"no records in {args.records}")
            return EXIT_OK
        print(f"{'run id':<23}  {'command':<16} {'target':<20} {'started (UTC)':<19}  verdict")
        for r in rows:
            started = _utc(datetime.fromisoformat(r["started_at"])) if r.get("started_at") else "?"
            print(_fit(f"{r['run_id']}  {r['command'] or '?':<16} {r['target'] or '?':<20} {started:<19}  "
                       f"{r['verdict_text']}"))
        return EXIT_OK
    if args.action == "seal":
        from .by_hand import seal

        if location.remote:
            raise UsageError("records seal works on the local folder a run stepped through by hand was written to; "
                             "give that folder as --records")
        from .paths import NOTEBOOK_DIR

        return seal(args.records, args.run_id, args.notebooks or NOTEBOOK_DIR).exit_code
    if args.action == "finish":
        from .witness import finish

        if location.remote:
            raise UsageError("records finish works on the local folder of the run; give that folder as --records")
        return finish(args.records, args.run_id)
    record = location.open(args.run_id)
    if args.action == "show":
        print(records.describe(record))
        return EXIT_OK
    problems = record.verify()
    for problem in problems:
        print(problem)
    print(f"record {args.run_id}: " + ("intact: every file matches the manifest" if not problems
                                       else f"{len(problems)} problem(s)"))
    print(f"seal: sha256 of manifest.json {record.seal()} (compare it with the one noted when the run ended)")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_sandbox(args) -> int:
    from . import sandbox

    try:
        source = sandbox.source_target(args.source, args.targets_file) if args.source else None
        return sandbox.serve(source, say=lambda line: print(line, flush=True))
    except sandbox.SandboxError as exc:
        raise UsageError(str(exc)) from None


def cmd_lab(args) -> int:
    from . import sandbox

    return sandbox.lab(args.port)


COMMANDS = {"rehearse": cmd_rehearse, "sandbox": cmd_sandbox, "lab": cmd_lab, "deploy": cmd_deploy, "verify": cmd_verify, "rollback": cmd_rollback,
            "maintain": cmd_maintain, "status": cmd_status, "records": cmd_records}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        check_records_folder(args)
        return COMMANDS[args.command](args)
    except REFUSALS as exc:
        print(f"runbook {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (psycopg2.Error, storage.PublishError) as exc:
        print(f"runbook {args.command}: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"runbook {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
