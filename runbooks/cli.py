"""`runbook`: a thin command line over the package (exit 0 success, 1 failed, 2 refused)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psycopg2

from . import connection, engine, records, runner, signoff
from .engine import EngineError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad usage or input: refused before anything changed (exit 2)."""


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--service", metavar="NAME", help="a libpq service from pg_service.conf (PGSERVICEFILE honoured)")
    group.add_argument("--target", metavar="NAME", help="an entry of the targets file")
    parser.add_argument("--targets-file", metavar="PATH",
                        help=f"the targets file (default ${connection.TARGETS_ENV} or ./{connection.DEFAULT_TARGETS_FILE})")


def _add_records(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", metavar="DIR", type=Path, default=records.DEFAULT_RECORDS_DIR,
                        help="where run records live (default ./records)")


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
    _add_records(p)

    p = commands.add_parser("maintain", help="the guide's daily, weekly or monthly maintenance tasks")
    p.add_argument("cadence", choices=("daily", "weekly", "monthly"))
    _add_target(p)
    p.add_argument("--yes", action="store_true", help="confirm deleting data (-p apply_retention true) on production")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    _add_records(p)

    p = commands.add_parser("status", help="what is applied, with checksums, and whether the files still match")
    _add_target(p)

    p = commands.add_parser("records", help="read records: list, show RUN_ID, verify RUN_ID")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_records(sub.add_parser("list", help="every record, oldest first"))
    for name, text in (("show", "a record's manifest, readably"), ("verify", "re-hash every file against the manifest")):
        q = sub.add_parser(name, help=text)
        q.add_argument("run_id", metavar="RUN_ID")
        _add_records(q)
    return parser


def resolve_target(args) -> connection.Target:
    if args.service:
        return connection.from_service(args.service)
    return connection.from_targets_file(args.target, args.targets_file)


def parse_value(text: str):
    """-p values as papermill's CLI reads them: booleans, numbers, null, else text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: list[list[str]], steps) -> dict:
    known: dict[str, object] = {}
    for step in steps:
        known.update(runner.notebook_parameters(step))
    reserved = {"run_id", "record_dir", "target_kind", "target_name", "targets_file"}
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
        values[name] = parse_value(raw)
    return values


# -- commands --------------------------------------------------------------------------------

def cmd_rehearse(args) -> int:
    from .rehearsal import rehearse

    return rehearse(records_root=args.records).exit_code


def cmd_deploy(args) -> int:
    target = resolve_target(args)
    params = parse_parameters(args.parameter, runner.DEPLOY_PLAN)
    problems = signoff.problems(params, production=target.production, confirmed=args.yes)
    if problems:
        raise UsageError("refused: " + "; ".join(problems))
    return runner.run_plan("deploy", runner.DEPLOY_PLAN, target, records_root=args.records,
                           parameters=params).exit_code


def cmd_verify(args) -> int:
    target = resolve_target(args)
    params = {}
    baseline = records.latest_with_snapshot(args.records, target.describe())
    if baseline:
        params["baseline_dir"] = str(baseline.resolve())
    return runner.run_plan("verify", ("verification",), target, records_root=args.records,
                           parameters=params).exit_code


def cmd_rollback(args) -> int:
    target = resolve_target(args)
    source = records.Record.open(args.records, args.run)
    manifest = source.manifest()
    if not manifest.get("backup") or not (source.path / "snapshot.json").is_file():
        raise UsageError(f"run {args.run} ({manifest.get('command')}) has no preflight backup and snapshot in its "
                         "record: only a deployment's preflight can be rolled back to")
    if not args.yes:
        raise UsageError(f"rollback replaces the contents of {target.name!r} with the backup of run {args.run}: "
                         "pass --yes to confirm")
    params = {"rollback_run_id": args.run, "rollback_record_dir": str(source.path.resolve())}
    return runner.run_plan("rollback", ("rollback",), target, records_root=args.records, parameters=params,
                           manifest_extra={"rolls_back": args.run}).exit_code


def cmd_maintain(args) -> int:
    target = resolve_target(args)
    params = parse_parameters(args.parameter, ("maintenance",))
    if params.get("apply_retention") and target.production and not args.yes:
        raise UsageError("apply_retention deletes data on a production target: pass --yes to confirm")
    params["cadence"] = args.cadence
    return runner.run_plan(f"maintain {args.cadence}", ("maintenance",), target, records_root=args.records,
                           parameters=params).exit_code


def cmd_status(args) -> int:
    target = resolve_target(args)
    conn = connection.connect(target, application_name="runbook status", readonly=True)
    try:
        history = engine.read_history(conn)
        states = engine.phase_states(conn, history)
        facts = connection.server_facts(conn)
    finally:
        conn.close()
    print(f"{target.kind} {target.name}: database {facts['database']} on {facts['server_address']}:"
          f"{facts['server_port']}, PostgreSQL {facts['server_version']}")
    drift = 0
    print(f"{'phase':<6} {'file':<36} {'state':<9} {'applied at':<25} {'by':<12} {'run':<24} files")
    for phase in states:
        row, on_disk = phase.applied, phase.on_disk
        if row is None:
            print(f"{phase.version:<6} {phase.path.name:<36} {'pending':<9} {'-':<25} {'-':<12} {'-':<24} "
                  f"sha256 {(on_disk or 'missing')[:12]}")
            continue
        same = phase.state == "applied, file matches"
        drift += not same
        print(f"{phase.version:<6} {row['file_name']:<36} {'applied':<9} {row['applied_at']:%Y-%m-%d %H:%M:%S %Z}  "
              f"{row['applied_by']:<12} {row['run_id']:<24} sha256 {row['sha256'][:12]} "
              + ("matches" if same else f"CHANGED on disk ({(on_disk or 'missing')[:12]})"))
    rollbacks = [r for r in history if r["action"] == "rollback"]
    if rollbacks:
        last = rollbacks[-1]
        print(f"last rollback: {last['applied_at']:%Y-%m-%d %H:%M:%S %Z} by {last['applied_by']} "
              f"(run {last['run_id']}), restored to {last['restored_to']:%Y-%m-%d %H:%M:%S %Z}")
    print(f"history: {len(history)} row(s); " + ("files on disk match what was applied" if not drift
                                                 else f"{drift} applied phase(s) changed on disk"))
    return EXIT_FAILED if drift else EXIT_OK


def cmd_records(args) -> int:
    if args.action == "list":
        rows = records.list_records(args.records)
        if not rows:
            print(f"no records in {args.records}")
        for r in rows:
            print(f"{r['run_id']}  {r['command'] or '?':<16} {r['target'] or '?':<20} {r['verdict']}")
        return EXIT_OK
    record = records.Record.open(args.records, args.run_id)
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


COMMANDS = {"rehearse": cmd_rehearse, "deploy": cmd_deploy, "verify": cmd_verify, "rollback": cmd_rollback,
            "maintain": cmd_maintain, "status": cmd_status, "records": cmd_records}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, connection.TargetError, records.RecordError, signoff.SignoffError, EngineError) as exc:
        print(f"runbook {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except psycopg2.Error as exc:
        print(f"runbook {args.command}: {str(exc).strip()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"runbook {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
