"""Phase 2 online: what leaves its locked transaction, and how an interruption there resumes.

Rules are added NOT VALID under the lock and validated after the commit; the logs' legacy columns are
carried after the commit in batches of pages (a trigger carries the app's writes meanwhile), then
dropped. A phase stopped in a batch leaves a database that a re-run of the same file finishes, to the
end state of a run that was never stopped.
"""

from __future__ import annotations

import threading

import psycopg2
import pytest

from runbooks.verification import act_as
from runbooks.watch import Heartbeat
from sqlhelpers import (LEGACY_PLAINTEXT_KEYS, PHASE_FILES, PLAINTEXT_KEYS, apply_psql, data_fingerprint, find_text,
                        split_file, start_phase, waiting_backend)

pytestmark = pytest.mark.both_versions   # the locks phase 2's statements take, and how long they wait, are the server's

PHASE_TWO = PHASE_FILES[1]
APP_NAME = "p2-online-test"
ORG_ONE_ADMIN = "0b000000-0000-4000-8000-000000000002"  # admin of the legacy fixture's first organization

# legacy audit rows in the first shape (entity_type, entity_id, changes, ip): enough to fill many pages
MORE_AUDIT_ROWS = """
insert into public.audit_logs (id, organization_id, action, entity_type, entity_id, changes, ip, user_agent, created_at)
select 1000 + n, '0a000000-0000-4000-8000-000000000001', 'update', 'product',
       case when n % 7 = 0 then 'legacy-' || n else '0c000000-0000-4000-8000-000000000001' end,
       case when n % 2 = 0 then jsonb_build_object('old', jsonb_build_object('n', n - 1), 'new', jsonb_build_object('n', n))
            else jsonb_build_object('n', n) end,
       case when n % 5 = 0 then 'unknown' else '203.0.113.' || (n % 250) end,
       case when n % 100 = 0 then 'curl/8 (key ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0)' end,
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 minute'
  from generate_series(1, 3000) as n
"""
# what the legacy app writes while the legacy columns still exist (the same row in both databases)
APP_AUDIT_ROW = """
insert into public.audit_logs (id, action, entity_type, entity_id, changes, ip, created_at)
values (99999, 'update', 'product', '0c000000-0000-4000-8000-000000000005',
        '{"old": {"price": 3}, "new": {"price": 4}}', 'not an address', '2024-06-01 00:00:00+00')
"""


def run_in_thread(conn, statement: str) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        except psycopg2.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def locks_held_by(db, pid: int) -> set[tuple[str, str]]:
    return set(db.query("""select c.relname, l.mode from pg_locks l join pg_class c on c.oid = l.relation
                           where l.pid = %s and l.granted and l.locktype = 'relation' and c.relnamespace = 'public'::regnamespace""", (pid,)))


def stop_in_a_batch(db, step: str, locked_row: str, settings: str = "") -> tuple[int, int]:
    """Phase 2 the engine's way (its body in one transaction, then its tail), stopped in the tail
    statement that contains `step`: a row lock on `locked_row` (a query of one audit row) makes the batch
    that reaches it wait, and the session is then terminated. (rows or pages done, total) at that moment."""
    phase, holder = db.connect(), db.connect()
    try:
        tail = start_phase(phase, PHASE_TWO, f"set application_name = '{APP_NAME}'; set truthsource.backfill_batch_pages = 1;"
                                             + settings)
        index = next(i for i, statement in enumerate(tail) if step in statement)
        with phase.cursor() as cur:
            for statement in tail[:index]:
                cur.execute(statement)
        with holder.cursor() as cur:
            cur.execute(f"select 1 from public.audit_logs where id = ({locked_row}) for update")
        thread, outcome = run_in_thread(phase, tail[index])
        pid = waiting_backend(db, APP_NAME)
        assert "AccessExclusiveLock" not in {mode for _, mode in locks_held_by(db, pid)}, \
            "a batch holds no lock that stops the app reading"
        progress = "\n".join(Heartbeat(db.target, applications=(APP_NAME,)).lines())
        db.query("select pg_terminate_backend(%s)", (pid,))
        thread.join()
        assert isinstance(outcome.get("error"), psycopg2.OperationalError)
        return progress
    finally:
        holder.rollback()
        holder.close()
        phase.close()


def unstopped_reference(make_db):
    reference = make_db("legacy@1")
    reference.execute(MORE_AUDIT_ROWS)
    reference.execute(APP_AUDIT_ROW)
    apply_psql(reference, PHASE_TWO)
    return reference


def test_phase_two_stopped_in_its_log_backfill_resumes_on_a_rerun_to_the_end_state_of_an_unstopped_run(make_db):
    reference = unstopped_reference(make_db)
    db = make_db("legacy@1")
    db.execute(MORE_AUDIT_ROWS)
    # (rewritten by CLUSTER, the log is carried by the batches: online, its copy carries it)
    progress = stop_in_a_batch(db, "set p2_carried = true where %s and %s", "select id from public.audit_logs "
                               "where ctid >= '(20,0)'::tid order by ctid limit 1", "set truthsource.rewrite_method = 'cluster'")
    [(done, total)] = db.query("select rows_done, rows_total from private.pending_backfills "
                               "where table_name = 'public.audit_logs' limit 1")
    assert 0 < done < total, "batches before the locked row committed, the rest did not"
    assert f"backfill of public.audit_logs: {done:,}/{total:,} rows" in progress

    # the legacy app writes on in the old shape, and its row is carried by the trigger
    db.execute(APP_AUDIT_ROW)
    assert db.query("select record_id::text, old_data, new_data, ip_address, legacy_data from public.audit_logs "
                    "where id = 99999") == [("0c000000-0000-4000-8000-000000000005", {"price": 3}, {"price": 4}, None,
                                            {"ip": "not an address"})]

    apply_psql(db, PHASE_TWO)
    assert db.query("select count(*) from private.pending_backfills") == [(0,)]
    assert db.schema_dump() == reference.schema_dump()
    assert data_fingerprint(db) == data_fingerprint(reference)


def test_phase_two_stopped_in_its_redaction_resumes_on_a_rerun_and_leaves_no_plaintext_copy(make_db):
    reference = unstopped_reference(make_db)
    db = make_db("legacy@1")
    db.execute(MORE_AUDIT_ROWS)
    progress = stop_in_a_batch(db, "set pages_done", "select id from public.audit_logs "
                               "where ctid >= '(20,0)'::tid and user_agent like '%ts_live_%' order by ctid limit 1")
    [(done, total)] = db.query("select pages_done, pages_total from private.pending_redactions "
                               "where table_name = 'audit_logs'")
    assert 0 < done < total
    assert f"redaction of audit_logs: {done:,}/{total:,} pages" in progress
    assert find_text(db, PLAINTEXT_KEYS["legacy"]), "copies behind the stopped batch are still there"

    # a copy the app writes meanwhile is redacted as it is written
    db.execute(APP_AUDIT_ROW)
    app = db.connect()
    try:
        with app.cursor() as cur:  # as the app does it: an admin of the organization, through the API role
            act_as(cur, "admin", users={"admin": ORG_ONE_ADMIN})
            cur.execute("update public.products set description = 'see ts_live_0123456789abcdef0123456789abcdef' "
                        "where sku = 'WID-001' returning description, updated_at > '2024-01-01'")
            assert cur.fetchall() == [("see [redacted api key ts_live_0123...]", True)]
        app.commit()
    finally:
        app.close()
    db.execute("update public.products set description = null where sku = 'WID-001'")

    apply_psql(db, PHASE_TWO)
    assert not find_text(db, PLAINTEXT_KEYS["legacy"])
    assert db.query("select count(*) from private.pending_redactions") == [(0,)]
    assert db.query("select count(*) from private.redaction_keys") == [(0,)]
    assert db.schema_dump() == reference.schema_dump()


def test_the_log_backfill_keeps_what_does_not_convert_as_the_locked_carry_did(make_db):
    db = make_db("legacy@1")
    db.execute(MORE_AUDIT_ROWS)
    apply_psql(db, PHASE_TWO)
    assert db.query("""select count(*) filter (where record_id is null and legacy_data ? 'entity_id'),
                              count(*) filter (where ip_address is null and legacy_data ? 'ip'),
                              count(*) filter (where old_data is not null)
                         from public.audit_logs where id >= 1000""") == [(428, 600, 1500)]
    assert db.query("select count(*) from pg_attribute where attrelid = 'public.audit_logs'::regclass "
                    "and attname in ('entity_type', 'entity_id', 'changes', 'ip', 'p2_carried') and not attisdropped") == [(0,)]
    assert db.query("select count(*) from pg_proc where proname like 'p2_backfill%'") == [(0,)]


def test_rules_are_validated_after_the_commit_and_legacy_rows_that_break_one_keep_it_not_valid(make_db):
    db = make_db("legacy@1")
    notices = apply_psql(db, PHASE_TWO).stderr
    assert "products: 1 legacy row(s) break products_sku_format_check: kept" in notices
    assert db.query("select convalidated from pg_constraint where conname = 'products_name_not_blank_check'") == [(True,)]
    assert db.query("select count(*) from pg_constraint where conname like '%%_not_null_check' and convalidated") == [(0,)]
    assert db.query("select attnotnull from pg_attribute where attrelid = 'public.products'::regclass "
                    "and attname = 'currency'") == [(True,)]


def test_the_redaction_batches_leave_updated_at_as_it_was(make_db):
    db = make_db("legacy@1")
    db.execute("alter table public.products disable trigger user; "
               "update public.products set description = 'old copy ts_live_0123456789abcdef0123456789abcdef' "
               "where sku = 'WID-001'; alter table public.products enable trigger user")
    [(before,)] = db.query("select updated_at from public.products where sku = 'WID-001'")
    apply_psql(db, PHASE_TWO)
    assert db.query("select description, updated_at from public.products where sku = 'WID-001'") == [
        ("old copy [redacted api key ts_live_0123...]", before)]


def test_the_types_that_only_widen_are_known_lossless_so_their_columns_convert_without_a_scan(make_db):
    """Under the lock a scan of a big table is what the app waits for: numeric(10,2) to numeric(12,2)
    (the legacy price) or varchar to text needs none; a narrowing still has every value checked."""
    text = PHASE_TWO.read_text()
    start = text.index("create or replace function pg_temp.p2_widens")
    helper = text[start:text.index("$fn$;", start) + len("$fn$;")]
    conn = make_db("bare").connect()
    try:
        with conn.cursor() as cur:
            cur.execute(helper)
            cur.execute("""select f || ' -> ' || t, pg_temp.p2_widens(f, t) from (values
                             ('numeric(10,2)', 'numeric(12,2)'), ('numeric(10,2)', 'numeric'), ('character varying(80)', 'text'),
                             ('character varying(80)', 'character varying(200)'), ('integer', 'bigint'),
                             ('numeric(12,2)', 'numeric(10,2)'), ('numeric(10,2)', 'numeric(12,3)'), ('numeric', 'numeric(12,2)'),
                             ('character varying(200)', 'character varying(80)'), ('bigint', 'integer'),
                             ('text', 'uuid')) as x (f, t)""")
            widens = dict(cur.fetchall())
    finally:
        conn.close()
    assert [pair for pair, yes in widens.items() if yes] == [
        "numeric(10,2) -> numeric(12,2)", "numeric(10,2) -> numeric", "character varying(80) -> text",
        "character varying(80) -> character varying(200)", "integer -> bigint"]


def test_the_swap_that_drops_the_logs_legacy_columns_reads_no_row_of_the_log(make_db):
    """The last transaction of the log's backfill holds ACCESS EXCLUSIVE: what escaped the batches is known
    without a pass over the log (the trigger saw every write since the commit, the batches every page)."""
    db = make_db("legacy@1")
    db.execute(MORE_AUDIT_ROWS)
    reads = "select seq_tup_read + coalesce(idx_tup_fetch, 0) from pg_stat_user_tables where relid = 'public.audit_logs'::regclass"
    conn = db.connect()
    try:
        # (rewritten by CLUSTER, the log is carried by the batches and finished here: online, in its swap)
        tail = start_phase(conn, PHASE_TWO, "set truthsource.rewrite_method = 'cluster'")
        swap = next(i for i, statement in enumerate(tail) if "pg_temp.p2_finish_backfills(b.rel)" in statement)
        with conn.cursor() as cur:
            for statement in tail[:swap]:
                cur.execute(statement)
            cur.execute("select pg_stat_force_next_flush()")
            cur.execute("select 1")   # the statistics of this session reach the shared ones
            [(before,)] = db.query(reads)
            cur.execute(tail[swap])
            cur.execute("select pg_stat_force_next_flush()")
            cur.execute("select 1")
    finally:
        conn.close()
    assert db.query(reads) == [(before,)]
    assert db.query("select count(*) from pg_attribute where attrelid = 'public.audit_logs'::regclass "
                    "and attname in ('entity_type', 'changes', 'p2_carried') and not attisdropped") == [(0,)]


def test_the_keys_are_hashed_before_the_locks_with_the_apps_new_and_rotated_keys_and_the_body_writes_no_key_row(make_db):
    db = make_db("legacy@1")
    head, body, _ = split_file(PHASE_TWO)
    sha = "encode(sha256(convert_to({}, 'UTF8')), 'hex')"
    stamps = "select id, updated_at from public.api_keys order by id"
    before = db.query(stamps)
    conn = db.connect()
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in head:
                cur.execute(statement)
        assert db.query(f"select count(*) from public.api_keys where key is not null and (key_hash is distinct from {sha.format('key')}"
                        " or key_prefix is null)") == [(0,)]
        assert db.query(stamps) == before, "hashing ahead leaves updated_at as it was"
        assert sorted(k for (k,) in db.query("select plaintext from private.redaction_keys")) == sorted(LEGACY_PLAINTEXT_KEYS)
        # the app meanwhile: a new key, and a key rotated without a hash (its stale hash would lock its owner out)
        db.execute("insert into public.api_keys (organization_id, name, key) values "
                   "('0a000000-0000-4000-8000-000000000001', 'new', 'ts_live_written_while_hashing_ahead_0001')")
        db.execute("update public.api_keys set key = 'ts_live_rotated_while_hashing_ahead_0002' where key = %s",
                   (LEGACY_PLAINTEXT_KEYS[0],))
        # (a key the legacy flag revokes gets its revoked_at under the lock: a few rows per organization)
        active = [i for (i,) in db.query("select id from public.api_keys where is_active is not false")]
        rows = "select id, xmin::text from public.api_keys where id = any(%s::uuid[]) order by id"
        written = db.query(rows, (active,))
        with conn.cursor() as cur:
            cur.execute("begin")
            cur.execute(body)
            cur.execute("commit")
        assert db.query(rows, (active,)) == written, "the body hashes no key under its locks"
    finally:
        conn.close()
    for plaintext in ("ts_live_written_while_hashing_ahead_0001", "ts_live_rotated_while_hashing_ahead_0002"):
        assert db.query(f"select count(*) from public.api_keys where key_hash = {sha.format('%s')} and key_prefix = left(%s, 12)",
                        (plaintext, plaintext)) == [(1,)]
    assert db.query("select to_regprocedure('private.p2_key_hash()'), count(*) from pg_trigger where tgname = 'zz_p2_key_hash'") \
        == [(None, 0)]
