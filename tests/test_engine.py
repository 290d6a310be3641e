"""The apply engine, against a real server: history, checksums, locks, atomicity, CONCURRENTLY."""

import getpass
import threading
import textwrap

import psycopg2
import pytest

from runbooks import engine, records
from runbooks.engine import ApplyEngine
from runbooks.paths import PHASES

from runhelpers import history, runbook
from sqlhelpers import wait_until, waiting_backend


def write(tmp_path, name, sql):
    path = tmp_path / name
    path.write_text(textwrap.dedent(sql).lstrip())
    return path


@pytest.fixture
def phase(tmp_path):
    return write(tmp_path, "100_demo.sql", """
        -- 100_demo.sql: a demo phase
        create table if not exists demo (id int primary key, note text);
        insert into demo values (1, 'one') on conflict do nothing;
        do $$ begin raise notice 'demo has % rows', (select count(*) from demo); end $$;
    """)


def make_engine(db, **kwargs):
    defaults = dict(run_id="test-run", operator="alice", lock_timeout="200ms", lock_retries=2,
                    retry_backoff=0.05, lock_wait=1)
    return ApplyEngine(db.target, **{**defaults, **kwargs})


def test_applying_a_phase_writes_a_history_row_with_checksum_operator_and_run(empty_db, phase):
    result = make_engine(empty_db).apply("100", phase)
    assert result.status == "applied"
    [row] = history(empty_db)
    assert (row["version"], row["file_name"], row["action"], row["applied_by"], row["run_id"]) == (
        "100", "100_demo.sql", "apply", "alice", "test-run")
    assert row["sha256"] == records.sha256_of(phase)
    assert row["duration_ms"] >= 0 and row["statements"] == 3
    assert empty_db.query("select note from demo") == [("one",)]


def test_per_statement_timings_and_notices_are_returned(empty_db, phase):
    seen = []
    result = make_engine(empty_db, progress=seen.append).apply("100", phase)
    assert [t.index for t in result.timings] == [1, 2, 3]
    assert [t.line for t in result.timings] == [2, 3, 4]
    assert result.timings[1].rowcount == 1
    assert result.timings[2].notices == ["NOTICE:  demo has 1 rows"]
    assert seen == result.timings


def test_an_unchanged_phase_is_skipped_unless_reapplied(empty_db, phase):
    make_engine(empty_db).apply("100", phase)
    assert make_engine(empty_db).apply("100", phase).status == "skipped"
    assert make_engine(empty_db).apply("100", phase, reapply=True).status == "reapplied"
    assert [r["action"] for r in history(empty_db)] == ["apply", "reapply"]


def test_a_phase_whose_file_changed_since_it_was_applied_is_refused_unless_forced(empty_db, phase):
    make_engine(empty_db).apply("100", phase)
    phase.write_text(phase.read_text() + "insert into demo values (2, 'two') on conflict do nothing;\n")
    with pytest.raises(engine.ChecksumMismatch, match=r"changed since it was applied.*alice.*test-run"):
        make_engine(empty_db).apply("100", phase)
    assert empty_db.query("select count(*) from demo") == [(1,)]
    assert make_engine(empty_db).apply("100", phase, force=True).status == "forced"
    assert [r["action"] for r in history(empty_db)] == ["apply", "forced"]


def test_a_failure_in_the_middle_of_a_file_leaves_no_partial_change(empty_db, tmp_path):
    broken = write(tmp_path, "101_broken.sql", """
        create table half (id int);
        insert into half values (1);
        select 1 / 0;
        create table never (id int);
    """)
    with pytest.raises(engine.StatementFailed, match=r"statement 3 at line 3 failed: \[22012\] division by zero"):
        make_engine(empty_db).apply("101", broken)
    assert empty_db.query("select to_regclass('half'), to_regclass('never')") == [(None, None)]
    assert history(empty_db) == []


def test_a_second_runner_is_kept_out_by_the_advisory_lock_and_told_who_holds_it(empty_db, phase):
    holder = empty_db.connect(application_name="runbook run other-run", autocommit=True)
    engine.acquire_advisory_lock(holder, engine.APPLY_LOCK, 1, "test")
    try:
        # the message says how long it waited: no wall-clock bound here (a busy machine is slow)
        with pytest.raises(engine.LockBusy, match=r"runbook run other-run.*waited 0.5s"):
            make_engine(empty_db, lock_wait=0.5).apply("100", phase)
    finally:
        holder.close()
    assert history(empty_db) == []


def test_the_second_runner_waits_and_proceeds_when_the_first_finishes(empty_db, phase):
    holder = empty_db.connect(autocommit=True)
    engine.acquire_advisory_lock(holder, engine.APPLY_LOCK, 1, "test")
    results = []
    worker = threading.Thread(target=lambda: results.append(make_engine(empty_db, lock_wait=600).apply("100", phase)))
    worker.start()
    try:   # the first runner finishes only once the second was seen asking for the lock and refused it
        tried_the_lock(empty_db, "runbook run test-run")
    finally:
        holder.close()
        worker.join(timeout=600)
    [result] = results
    assert result.status == "applied"


def tried_the_lock(db, application_name: str) -> None:
    """Returns once the session named so has asked for the advisory lock (observed in pg_stat_activity:
    it polls pg_try_advisory_lock, which never shows as a lock wait)."""
    wait_until(lambda: db.query("select 1 from pg_stat_activity where application_name = %s "
                                "and query like 'select pg_try_advisory_lock%%'", (application_name,)),
               f"{application_name!r} asking for the lock")


def test_a_table_lock_held_elsewhere_makes_the_engine_retry_then_fail_naming_the_blocker(empty_db, phase):
    empty_db.execute("create table demo (id int primary key, note text)")
    blocker = empty_db.connect(application_name="long report")
    with blocker.cursor() as cur:
        cur.execute("lock table demo in access exclusive mode")
    try:
        with pytest.raises(engine.LockRetriesExhausted,
                           match=r"lock timeout.*after 3 attempts.*long report.*Nothing was changed"):
            make_engine(empty_db).apply("100", phase)
    finally:
        blocker.rollback()
        blocker.close()
    assert empty_db.query("select count(*) from demo") == [(0,)]


def test_a_lock_released_during_the_retries_lets_the_phase_through(empty_db, phase):
    empty_db.execute("create table demo (id int primary key, note text)")
    blocker = empty_db.connect()
    with blocker.cursor() as cur:
        cur.execute("lock table demo in access exclusive mode")
    retries = []

    def release_on_first_retry(attempt, delay, reason):
        retries.append((attempt, reason))
        blocker.rollback()  # released while the engine pauses, so the next attempt must get through

    try:
        result = make_engine(empty_db, lock_retries=6, retry_backoff=0.1,
                             on_retry=release_on_first_retry).apply("100", phase)
    finally:
        blocker.close()
    assert result.status == "applied" and result.attempts == 2
    [(attempt, reason)] = retries
    assert attempt == 1 and reason.startswith("statement 2 at line 3 (insert into demo") and "lock timeout" in reason


def test_a_backend_terminated_mid_phase_reports_what_the_server_said_and_that_the_connection_was_lost(
        empty_db, phase):
    empty_db.execute("create table demo (id int primary key, note text)")
    blocker = empty_db.connect(application_name="holds demo")
    with blocker.cursor() as cur:
        cur.execute("lock table demo in access exclusive mode")
    raised = []

    def apply_and_keep_the_error():
        try:
            make_engine(empty_db, lock_timeout="5min").apply("100", phase)
        except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
            raised.append(exc)

    worker = threading.Thread(target=apply_and_keep_the_error)
    worker.start()
    try:
        pid = waiting_backend(empty_db, "runbook run test-run")
        empty_db.query("select pg_terminate_backend(%s)", (pid,))
        worker.join(timeout=60)
    finally:
        blocker.rollback()
        blocker.close()
    [error] = raised
    assert isinstance(error, engine.ConnectionLost), repr(error)
    message = str(error)
    assert "terminating connection due to administrator command" in message
    assert "connection to the server was lost" in message and "statement 2 at line 3" in message
    assert "connection already closed" not in message
    assert history(empty_db) == [] and empty_db.query("select count(*) from demo") == [(0,)]


def test_a_concurrently_statement_runs_after_the_transaction_and_the_file_still_works_in_psql(empty_db, tmp_path):
    path = write(tmp_path, "102_index.sql", """
        create table if not exists big (id int primary key, owner int);
        -- runbook: no-transaction
        create index concurrently if not exists big_owner_idx on public.big (owner);
    """)
    result = make_engine(empty_db).apply("102", path)
    assert [t.transactional for t in result.timings] == [True, False]
    assert empty_db.query("select indisvalid from pg_index where indexrelid = 'big_owner_idx'::regclass") == [(True,)]
    assert [r["statements"] for r in history(empty_db)] == [2]
    empty_db.psql_file(path)  # plain psql ignores the marker and autocommits each statement


def test_a_statement_marked_before_the_body_runs_on_its_own_first_and_a_failed_body_says_it_stayed(empty_db, tmp_path):
    path = write(tmp_path, "105_expand.sql", """
        -- runbook: no-transaction
        do $$ begin create table if not exists prepared (id int); commit; insert into prepared values (1); end $$;
        create table body_made (id int);
        select 1 / (select count(*) - 1 from prepared);
    """)
    statements = engine.parse_file(path)
    assert [(s.before_body, s.transactional) for s in statements] == [(True, False), (False, True), (False, True)]
    with pytest.raises(engine.StatementFailed, match="statements before it, which only prepare, were committed"):
        make_engine(empty_db).apply("105", path)
    assert empty_db.query("select count(*) from prepared") == [(1,)]
    assert empty_db.query("select to_regclass('body_made')") == [(None,)] and history(empty_db) == []
    empty_db.execute("insert into prepared values (2)")
    result = make_engine(empty_db).apply("105", path)
    assert [t.transactional for t in result.timings] == [False, True, True]
    assert [r["statements"] for r in history(empty_db)] == [3]


def test_a_concurrent_build_waits_for_its_lock_past_deadlock_timeout_where_an_autovacuum_in_its_way_is_cancelled(
        empty_db, tmp_path):
    """Its lock (SHARE UPDATE EXCLUSIVE) keeps no app query waiting, so it may wait past deadlock_timeout: there
    PostgreSQL cancels an autovacuum holding the table. A holder that is no autovacuum stands for one here."""
    empty_db.execute("create table slow (id int primary key, v int)")
    path = write(tmp_path, "106_build.sql", """
        select 1;
        -- runbook: no-transaction
        create index concurrently if not exists slow_v_idx on public.slow (v);
    """)
    holder = empty_db.connect()
    retries: list = []
    try:
        with holder.cursor() as cur:
            cur.execute("lock table slow in share update exclusive mode")
        engine = make_engine(empty_db, on_retry=lambda *args: retries.append(args))
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.update(result=engine.apply("106", path)))
        thread.start()
        # the server's own record of the wait: past deadlock_timeout (1 s) without giving up at lock_timeout
        wait_until(lambda: empty_db.query("""select 1 from pg_locks where relation = 'slow'::regclass and not granted
                                              and now() - waitstart > current_setting('deadlock_timeout')::interval"""),
                   "the build waiting past deadlock_timeout",
                   stopped=lambda: None if thread.is_alive() else f"the engine stopped waiting: {outcome}, retries {retries}")
        holder.rollback()
        thread.join()
    finally:
        holder.close()
    assert retries == [] and outcome["result"].status == "applied"


def test_an_invalid_index_left_by_a_failed_concurrent_build_is_rebuilt(empty_db, tmp_path):
    empty_db.execute("create table dup (id int, v int); insert into dup values (1, 1), (2, 1)")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        empty_db.execute("create unique index concurrently dup_v_key on dup (v)")
    assert empty_db.query("select indisvalid from pg_index where indexrelid = 'dup_v_key'::regclass") == [(False,)]
    empty_db.execute("update dup set v = 2 where id = 2")
    path = write(tmp_path, "103_unique.sql", """
        select 1;
        -- runbook: no-transaction
        create unique index concurrently if not exists dup_v_key on public.dup (v);
    """)
    make_engine(empty_db).apply("103", path)
    assert empty_db.query("select indisvalid from pg_index where indexrelid = 'dup_v_key'::regclass") == [(True,)]


@pytest.mark.parametrize("sql, message", [
    ("begin;\ncreate table t (id int);\ncommit;\n", r"1: transaction control \(begin\) does not belong"),
    ("create table t (x int);\n-- runbook: no-transaction\ncreate index concurrently i on t (x);\ncreate table u (id int);\n",
     r"4: a transactional statement follows .* after the body"),
    ("create table t (id int);\ncreate tabel u (id int);\n", r"does not parse near line 2"),
    ("-- nothing here\n", r"no SQL statements"),
])
def test_an_unusable_file_is_refused_before_anything_runs(tmp_path, sql, message):
    path = write(tmp_path, "104_bad.sql", sql)
    with pytest.raises(engine.FileError, match=message):
        engine.parse_file(path)


def test_a_rollback_in_history_undoes_what_was_applied_after_its_backup():
    from datetime import datetime, timedelta, timezone
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    row = lambda version, minutes, action="apply", restored_to=None: {  # noqa: E731
        "version": version, "applied_at": t0 + timedelta(minutes=minutes), "action": action,
        "restored_to": restored_to}
    rows = [row("000", 0), row("001", 10), row("002", 20),
            row("rollback", 30, "rollback", restored_to=t0 + timedelta(minutes=5)), row("001", 40)]
    assert sorted(engine.latest_applied(rows)) == ["000", "001"]
    assert engine.latest_applied(rows)["001"]["applied_at"] == t0 + timedelta(minutes=40)


def test_the_history_names_the_operator_the_os_user_and_the_database_role_each_in_its_own_field(empty_db, phase):
    make_engine(empty_db, operator="Dana DBA").apply("100", phase)
    [row] = history(empty_db)
    assert (row["applied_by"], row["os_user"], row["db_role"]) == (
        "Dana DBA", getpass.getuser(), empty_db.query("select current_user")[0][0])


def test_a_history_table_of_older_runbooks_gains_the_os_user_column_and_its_old_rows_still_read(empty_db, phase):
    older_ddl = engine.HISTORY_DDL.replace("  os_user text,\n", "").replace(engine.OS_USER_COMMENT, "")
    empty_db.execute(older_ddl + f"""
        insert into {engine.HISTORY_TABLE} (version, file_name, sha256, action, applied_by, duration_ms,
                                            statements, run_id)
        values ('099', '099_old.sql', repeat('a', 64), 'apply', 'root', 5, 1, 'old-run')""")
    make_engine(empty_db, operator="Dana DBA").apply("100", phase)
    old, new = history(empty_db)
    assert (old["applied_by"], old["os_user"], old["run_id"]) == ("root", None, "old-run")
    assert (new["applied_by"], new["os_user"]) == ("Dana DBA", getpass.getuser())


@pytest.mark.slow
def test_a_deploy_with_an_operator_records_dana_the_os_user_and_the_database_role_each_in_its_field(
        empty_db, tmp_path, capsys):
    code = runbook("deploy", "--service", empty_db.name, "-p", "operator", "Dana DBA", "--records", tmp_path)
    assert code == 0, capsys.readouterr()
    rows = history(empty_db)
    assert [r["version"] for r in rows] == [version for version, _ in PHASES]
    role = empty_db.query("select current_user")[0][0]
    assert {(r["applied_by"], r["os_user"], r["db_role"]) for r in rows} == {("Dana DBA", getpass.getuser(), role)}
