"""Phase 2 rewrites the tables that held plaintext keys online, and leaves what the CLUSTER rewrite leaves.

The legacy fixture is decorated with what a table can carry (a publication with a column list and a row
filter, comments, column grants, statistics targets and options, extended statistics, storage options,
replica identity, a view, a legacy index and trigger, an identity column, a foreign key pointing at a
rewritten table, forced row level security). The rewrite (copy, log of the app's writes, batches, swap;
sql/001_core_schema.sql section 11) is stopped at each of its steps by terminating its backend while it
waits there (observed in pg_locks and private.pending_rewrites, never by a timer), and a re-run of the file
finishes it: the catalog is the one the CLUSTER rewrite leaves, and no key is left in the old files.
"""

from __future__ import annotations

import threading

import psycopg2

from sqlhelpers import (PHASE_FILES, PLAINTEXT_KEYS, app_writing, apply_psql, apply_psycopg2, data_fingerprint, physical_hits,
                        start_phase, wait_until)

PHASE_TWO = PHASE_FILES[1]
APP_NAME = "p2-rewrite-test"
REWRITE_STEP = "pg_temp.p2_rewrite_swap(v_rel)"
MORE_AUDIT_ROWS = """
insert into public.audit_logs (id, organization_id, action, entity_type, entity_id, changes, ip, user_agent, created_at)
select 1000 + n, '0a000000-0000-4000-8000-000000000001', 'update', 'product', '0c000000-0000-4000-8000-000000000001',
       jsonb_build_object('n', n), '203.0.113.' || (n % 250),
       case when n % 100 = 0 then 'curl/8 (key ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0)' end,
       timestamptz '2024-01-01 00:00:00+00' + n * interval '1 minute'
  from generate_series(1, 3000) as n;
select setval('public.audit_logs_id_seq', 10000)
"""
# what a table can carry, on the tables the rewrite handles (audit_logs, api_keys, key_uses)
DECORATIONS = """
do $$ begin create role p2_auditor nologin; exception when duplicate_object then null; end $$;
grant select (id, action, created_at) on public.audit_logs to p2_auditor;
comment on column public.audit_logs.action is 'What was done';
create index audit_logs_action_legacy_idx on public.audit_logs (action);
comment on index public.audit_logs_action_legacy_idx is 'kept from the legacy app';
alter table public.audit_logs alter column action set statistics 500;
alter table public.audit_logs alter column user_agent set (n_distinct = 100);
alter table public.audit_logs set (fillfactor = 90);
alter table public.audit_logs replica identity full;
create statistics public.audit_logs_org_action (ndistinct) on organization_id, action from public.audit_logs;
create view public.recent_audit as select id, action, created_at from public.audit_logs;
create function public.legacy_note() returns trigger language plpgsql as $$ begin return null; end $$;
create trigger audit_logs_note after insert on public.audit_logs for each row execute function public.legacy_note();
alter table public.audit_logs enable always trigger audit_logs_note;
create table public.key_uses (id bigint generated always as identity primary key,
                              key_id uuid not null references public.api_keys (id) on delete cascade, note text);
insert into public.key_uses (key_id, note) select id, 'used ' || key from public.api_keys where key is not null;
alter table public.key_uses enable row level security;
alter table public.key_uses force row level security;
create publication p2_audit for table public.audit_logs (id, action, created_at) where (action <> 'noise')
  with (publish = 'insert');
alter publication p2_audit add table public.api_keys;
"""
EXTRA_CATALOG_SQL = """
select 'owner', c.relname, pg_get_userbyid(c.relowner) from pg_class c
 where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'S', 'v', 'i')
union all
select 'sequence', s.sequencename, s.last_value::text from pg_sequences s where s.schemaname = 'public'
union all
select 'leftover', c.relname, c.relkind::text from pg_class c
 where c.relnamespace = 'private'::regnamespace and c.relname like 'p2\\_%%'
union all
select 'trigger', tgrelid::regclass::text, tgname from pg_trigger where tgname like 'zz\\_p2\\_%%'
order by 1, 2, 3"""


def decorated(make_db):
    db = make_db("legacy@1")
    db.execute(MORE_AUDIT_ROWS)
    db.execute(DECORATIONS)
    return db


def carried(db) -> tuple[str, list, dict]:
    """What the swap must carry over, as the catalog shows it: the schema, owners and sequence values (and
    that nothing of the rewrite is left), and the rows."""
    return db.schema_dump(), db.query(EXTRA_CATALOG_SQL), data_fingerprint(db)


def run_phase_two(db, settings: str = "") -> str:
    """The whole phase (batches of one page), with session settings; the notices."""
    return "\n".join(apply_psycopg2(db, PHASE_TWO, f"set truthsource.backfill_batch_pages = 1; {settings}"))


def cluster_reference(make_db):
    db = decorated(make_db)
    notices = run_phase_two(db, "set truthsource.rewrite_method = 'cluster'")
    assert "audit_logs: rewritten by CLUSTER (old row versions hold plaintext api keys)" in notices
    return carried(db)


def test_the_online_rewrite_carries_over_everything_the_cluster_rewrite_keeps(make_db):
    reference = cluster_reference(make_db)
    db = decorated(make_db)
    notices = run_phase_two(db)
    for table in ("api_keys", "audit_logs", "key_uses"):
        assert f"{table}: rewritten online:" in notices
    # the log's legacy columns ride on its copy: one pass over the log, not a pass of batches and then a copy
    assert "audit_logs: carried as it is rewritten online below" in notices
    assert "carried into old_data/new_data (jsonb) for 3007 row(s) as the table was copied, then dropped" in notices
    ours = carried(db)
    assert ours[0] == reference[0], "the schema as pg_dump shows it"
    assert ours[1:] == reference[1:]


def test_no_old_row_version_keeps_a_key_in_the_files_the_table_had_or_has(make_db):
    db = decorated(make_db)
    keys = PLAINTEXT_KEYS["legacy"]
    tables = ["public.api_keys", "public.audit_logs", "public.key_uses"]
    assert physical_hits(db, tables, keys), "the legacy files hold the keys"
    old_files = [path for (path,) in db.query(
        """select pg_relation_filepath(c.oid) from pg_class c where c.oid = any(%s::regclass[])
           union all select pg_relation_filepath(c.reltoastrelid) from pg_class c where c.oid = any(%s::regclass[]) and c.reltoastrelid <> 0""",
        (tables, tables))]
    run_phase_two(db)
    assert physical_hits(db, tables, keys) == []
    for path in old_files:   # gone, or emptied until the next checkpoint removes it
        [(data,)] = db.query("select pg_read_binary_file(%s, 0, 100000000, true)", (path,))
        assert not data or not any(key.encode() in bytes(data) for key in keys), path


def phase_up_to_the_rewrite(db):
    """Phase 2 the engine's way up to the rewrite statement; (connection, the rewrite statement)."""
    conn = db.connect()
    tail = start_phase(conn, PHASE_TWO, f"set application_name = '{APP_NAME}'; set truthsource.backfill_batch_pages = 1")
    index = next(i for i, statement in enumerate(tail) if REWRITE_STEP in statement)
    with conn.cursor() as cur:
        for statement in tail[:index]:
            cur.execute(statement)
    return conn, tail[index]


def step_of(db, table: str = "audit_logs") -> str | None:
    rows = db.query("select step from private.pending_rewrites where table_name = %s", (table,))
    return rows[0][0] if rows else None


def blocked_at(db, step: str) -> int:
    """The phase's pid once the audit_logs rewrite is at `step` and its backend waits for a lock."""
    def seen():
        pid = db.query("""select a.pid from pg_stat_activity a join pg_locks l using (pid)
                           where a.application_name = %s and not l.granted""", (APP_NAME,))
        return pid[0][0] if pid and step_of(db) == step else None
    return wait_until(seen, f"the rewrite of audit_logs waiting at its {step} step")


def stop_rewrite_at(db, step: str) -> None:
    """Run the rewrite until audit_logs' copy waits at `step` (held there by the test's own sessions,
    each taking a lock the step needs), then terminate the phase's backend."""
    oid = db.query("select 'public.audit_logs'::regclass::oid")[0][0]
    shadow, log = f"private.p2_rewrite_{oid}", f"private.p2_rewrite_log_{oid}"
    app, holder = db.connect(), db.connect()
    conn, rewrite = phase_up_to_the_rewrite(db)
    thread = None
    try:
        with app.cursor() as cur:   # a write in flight: the log's trigger waits for it
            cur.execute("lock table public.audit_logs in row exclusive mode")
        if step == "swap":   # a reader in flight: the swap's lock waits for it
            with holder.cursor() as cur:
                cur.execute("select 1 from public.audit_logs limit 1")
        outcome: dict = {}

        def run():
            try:
                with conn.cursor() as cur:
                    cur.execute(rewrite)
            except psycopg2.Error as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        pid = blocked_at(db, "trigger")
        if step in ("copy", "index", "replay"):
            row_in_page_20 = db.query("select id from public.audit_logs where ctid >= '(20,0)'::tid order by ctid limit 1")[0][0]
            with holder.cursor() as cur:
                cur.execute({"copy": f"insert into {shadow} select * from public.audit_logs where id = {row_in_page_20}",
                             "index": f"lock table {shadow} in row exclusive mode",
                             "replay": f"lock table {log} in share mode"}[step])
        if step != "trigger":
            app.rollback()
            pid = blocked_at(db, step if step != "swap" else "replay")
        if step == "copy":
            [(done, total)] = db.query("select pages_done, pages_total from private.pending_rewrites where table_name = 'audit_logs'")
            assert 0 < done < total
        db.query("select pg_terminate_backend(%s)", (pid,))
        thread.join()
        assert isinstance(outcome.get("error"), psycopg2.OperationalError)
    finally:
        for session in (app, holder):
            session.rollback()
            session.close()
        conn.close()


def test_the_online_rewrite_stopped_at_each_of_its_steps_resumes_on_a_rerun_to_what_the_cluster_rewrite_leaves(make_db):
    reference = cluster_reference(make_db)
    for step in ("trigger", "copy", "index", "replay", "swap"):
        db = decorated(make_db)
        stop_rewrite_at(db, step)
        assert step_of(db) == (step if step != "swap" else "replay"), step
        apply_psql(db, PHASE_TWO)
        assert carried(db) == reference, f"stopped at {step}"
    # stopped after the swap, before the constraints it added back NOT VALID were validated
    db = decorated(make_db)
    conn, rewrite = phase_up_to_the_rewrite(db)
    with conn.cursor() as cur:
        cur.execute(rewrite)
    conn.close()
    assert step_of(db, "api_keys") == "validate"
    assert db.query("select convalidated from pg_constraint where conname = 'key_uses_key_id_fkey'") == [(False,)]
    apply_psql(db, PHASE_TWO)
    assert carried(db) == reference


def test_a_legacy_app_writing_audit_rows_throughout_phase_two_loses_none(make_db):
    db = decorated(make_db)
    written: list[int] = []
    in_legacy_shape: list[int] = []
    legacy_gone = threading.Event()

    def write_an_audit_row(cur, n):
        try:
            if not legacy_gone.is_set():   # in the legacy shape, while it lasts
                cur.execute("insert into public.audit_logs (action, user_agent, entity_type, changes) values "
                            "('app-write', 'legacy-app/1', 'product', '{\"old\": {\"n\": 1}, \"new\": {\"n\": 2}}') "
                            "returning id")
                in_legacy_shape.append(cur.fetchone()[0])
                written.append(in_legacy_shape[-1])
            else:
                cur.execute("insert into public.audit_logs (action, user_agent) values ('app-write', 'legacy-app/1') "
                            "returning id")
                written.append(cur.fetchone()[0])
        except psycopg2.errors.UndefinedColumn:
            legacy_gone.set()   # phase 2 dropped the legacy columns

    with app_writing(db, write_an_audit_row) as failures:
        notices = run_phase_two(db)
    assert failures == []
    replayed = int(notices.split("audit_logs: rewritten online: ")[1].split(" pages copied, ")[1].split(" ")[0])
    assert replayed > 0, "the app wrote while the log was copied"
    stored = {i for (i,) in db.query("select id from public.audit_logs where action = 'app-write'")}
    assert stored == set(written)
    # written in the legacy shape before the swap, carried by the trigger or the copy: the same either way
    assert db.query("select table_name, old_data, new_data, count(*) from public.audit_logs where id = any(%s) "
                    "group by 1, 2, 3", (in_legacy_shape,)) == [("product", {"n": 1}, {"n": 2}, len(in_legacy_shape))]
    assert legacy_gone.is_set() and len(in_legacy_shape) > 20
