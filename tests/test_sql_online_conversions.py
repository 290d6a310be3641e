"""Phase 2 converts a legacy shape it never saw without reading or rewriting a table under its lock.

tests/fixtures/legacy_unseen.sql was written after the online conversion and not used while writing it:
columns whose type must change with a read or a rewrite (unbounded numeric to numeric(12,2), an enum and
character(3) to text, numeric and smallint to integer, json to jsonb, text to uuid and inet, a timestamp
without time zone under an index), nullable columns the contract makes NOT NULL, checks missing, foreign
keys ON DELETE RESTRICT. Phase 2 runs the engine's way (the body statement by statement in one
transaction, then its tail in autocommit), while the numbers of rows each statement reads and writes are
taken from pg_stat_xact_user_tables: after the statement that takes the locks, none. Then the end state is
the one an empty database reaches, and no row is lost.
"""

from __future__ import annotations

import collections
import uuid

import psycopg2
import pytest

from runbooks.contract import CORE_TABLES
from runbooks.engine import parse_file, split_phase
from sqlhelpers import (PHASE_FILES, app_writing, apply_psycopg2, catalog_summary, contract_columns, data_fingerprint,
                        row_counts, start_phase, wait_until)

PHASE_TWO = PHASE_FILES[1]
LOCKS_TAKEN = "lock table public.%I in access exclusive mode"
# every table with a backfill copied by the online rewrite, whatever its size, one page per batch
COPY_EVERY_TABLE = "set truthsource.copy_backfills_min_pages = 0; set truthsource.backfill_batch_pages = 1"
ROW_WORK_SQL = """
select relname, seq_tup_read + coalesce(idx_tup_fetch, 0) + n_tup_ins + n_tup_upd + n_tup_del
  from pg_stat_xact_user_tables where schemaname = 'public' and relname = any(%s)"""
FILES_SQL = """
select c.relname, c.relfilenode from pg_class c join pg_index i on i.indexrelid = c.oid or i.indrelid = c.oid
 where i.indrelid = any(array(select ('public.' || t)::regclass from unnest(%s::text[]) as t))"""
# what the legacy app does between the commit and the swap, in the legacy shape
LEGACY_APP_WRITES = """
update public.products set price = 7.125 where sku = 'UNSEEN-00010';
update public.products set price = 19.5 where sku = 'UNSEEN-00011';
insert into public.products (id, organization_id, sku, name, price, currency, created_at)
values (md5('app-product-1')::uuid, md5('unseen-org-1')::uuid, 'APP-00001', 'Written meanwhile', 3.14159, 'GBP', '2024-01-01 12:00');
insert into public.organization_members (id, organization_id, user_id, role, created_at)
values (md5('app-member-1')::uuid, md5('unseen-org-2')::uuid, md5('unseen-user-1')::uuid, 'viewer', '2024-01-01 12:00');
insert into public.audit_logs (organization_id, action, ip_address, created_at)
values ('0b5ec23a-7b4e-4e1b-9a3e-2a5ad3bd6c0a', 'app', '192.0.2.1', '2024-01-01 12:00')"""


def unseen_db(make_db):
    return make_db("unseen@1")


def rows_worked(cur) -> dict[str, int]:
    """Rows read or written per core table so far, as the statistics say once this session's are flushed."""
    cur.execute("select pg_stat_force_next_flush()")
    cur.execute("select pg_stat_clear_snapshot()")   # the flush happened as the session went idle in between
    cur.execute(ROW_WORK_SQL.replace("pg_stat_xact_user_tables", "pg_stat_user_tables"), (list(CORE_TABLES),))
    return dict(cur.fetchall())


def run_phase_two_measured(db, between: str = "", settings: str = "",
                           notices: list | None = None) -> list[tuple[str, dict[str, int]]]:
    """Phase 2 as the engine runs it; (statement, rows read or written per core table): first the statements
    before the body together ("before the body"), then each body statement; `between` runs after the body's
    commit, before the tail (the app meanwhile); `settings` (SET statements) first; the server's notices are
    added to `notices`."""
    head, body, tail = split_phase(parse_file(PHASE_TWO))
    conn = db.connect()
    conn.notices = collections.deque()   # (a list keeps the last 50 only)
    measured = []
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            if settings:
                cur.execute(settings)
            start = rows_worked(cur)
            for statement in head:
                cur.execute(statement.text)
            end = rows_worked(cur)
            measured.append(("before the body", {t: end.get(t, 0) - start.get(t, 0) for t in end}))
        conn.autocommit = False
        for attempt in range(1, 121):   # the body again whole when a lock is not granted, as the engine does
            try:
                body_measured = []
                with conn.cursor() as cur:
                    seen: dict[str, int] = {}
                    for statement in body:
                        cur.execute(statement.text)
                        cur.execute(ROW_WORK_SQL, (list(CORE_TABLES),))
                        now = dict(cur.fetchall())
                        body_measured.append((statement.text, {t: now.get(t, 0) - seen.get(t, 0) for t in now}))
                        seen = now
                conn.commit()
                break
            except psycopg2.errors.LockNotAvailable:
                conn.rollback()
                assert attempt < 120, "the body's locks were never granted"
        measured += body_measured
        if between:
            db.execute(between)
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in tail:
                cur.execute(statement.text)
        if notices is not None:
            notices.extend(conn.notices)
    finally:
        conn.close()
    return measured


def test_a_legacy_shape_never_seen_converges_without_a_row_read_or_written_under_the_lock_and_loses_no_row(
        make_db, template_db):
    db = unseen_db(make_db)
    before = row_counts(db)
    files = dict(db.query(FILES_SQL, (list(CORE_TABLES),)))

    measured = run_phase_two_measured(db, between=LEGACY_APP_WRITES)

    locked = next(i for i, (text, _) in enumerate(measured) if LOCKS_TAKEN in text)
    assert sum(n for _, work in measured[:locked] for n in work.values()) > 0, "the unique rules are read before the locks"
    under_lock = {t: n for _, work in measured[locked:] for t, n in work.items() if n}
    assert under_lock == {}, "no statement under ACCESS EXCLUSIVE reads or writes a row of a core table"
    body_files = dict(db.query(FILES_SQL, (list(CORE_TABLES),)))
    assert not [name for name, node in files.items() if name in body_files and body_files[name] != node]

    after = row_counts(db)
    assert {t: after[t] for t in before} == {**before, "public.products": before["public.products"] + 1,
                                              "public.organization_members": before["public.organization_members"] + 1,
                                              "public.audit_logs": before["public.audit_logs"] + 1}
    empty = template_db("empty@2")
    ours, theirs = catalog_summary(db, tables=CORE_TABLES), catalog_summary(empty, tables=CORE_TABLES)
    for part in ("policies", "rls", "triggers", "constraints", "table_privileges"):
        assert ours[part] == theirs[part], part
    assert set(theirs["indexes"]) <= set(ours["indexes"])
    columns = {(t, c): rest for t, c, *rest in contract_columns(db, CORE_TABLES)}
    expected = {(t, c): rest for t, c, *rest in contract_columns(empty, CORE_TABLES)}
    assert {k: columns.get(k) for k in expected if k != ("audit_logs", "id")} == \
        {k: v for k, v in expected.items() if k != ("audit_logs", "id")}


def test_values_that_convert_are_converted_and_the_others_kept_in_legacy_data_the_apps_meanwhile_included(make_db):
    db = unseen_db(make_db)
    run_phase_two_measured(db, between=LEGACY_APP_WRITES)
    assert db.query("""select sku, price::text, legacy_data, currency from public.products
                        where sku in ('UNSEEN-00010', 'UNSEEN-00011', 'UNSEEN-00079', 'UNSEEN-00080', 'UNSEEN-00007', 'APP-00001')
                        order by sku""") == [
        ("APP-00001", None, {"price": 3.14159}, "GBP"),
        ("UNSEEN-00007", "1.75", None, "usd"),
        ("UNSEEN-00010", None, {"price": 7.125}, "EUR"),
        ("UNSEEN-00011", "19.50", None, "EUR"),
        ("UNSEEN-00079", None, {"price": 12.345}, "EUR"),
        ("UNSEEN-00080", None, {"price": 1000000000000000}, "EUR"),
    ]
    assert db.query("select quantity, legacy_data from public.inventory where quantity is null or quantity < 0 "
                    "order by quantity") == [(-4, None), (None, {"quantity": 2.5})]
    assert db.query("select role, count(*) from public.organization_members group by role order by role") == [
        ("guest", 20), ("owner", 20), ("viewer", 1)]
    assert db.query("""select organization_id = md5('unseen-org-' || (id % 20 + 1))::uuid,
                              record_id = md5('unseen-product-' || (id % 3000 + 1))::uuid, host(ip_address), legacy_data
                         from public.audit_logs where action = 'app' or id in (5, 100) order by id""") == [
        (None, True, "198.51.100.5", {"organization_id": "not-an-org"}),
        (True, None, "198.51.100.100", {"record_id": "row 100"}),
        (False, None, "192.0.2.1", None)]
    assert db.query("select created_at::text from public.organizations where slug = 'unseen-1'") == [("2023-02-02 00:00:00+00",)]
    assert db.query("""select conname, confdeltype, convalidated from pg_constraint
                        where conname in ('products_organization_id_fkey', 'inventory_product_id_fkey') order by 1""") == [
        ("inventory_product_id_fkey", "c", True), ("products_organization_id_fkey", "c", True)]
    assert db.query("select count(*) from private.pending_backfills") == [(0,)]


def test_tables_converted_by_a_copy_end_as_the_batches_of_updates_leave_them_the_apps_writes_meanwhile_included(
        make_db):
    by_updates = unseen_db(make_db)
    run_phase_two_measured(by_updates, between=LEGACY_APP_WRITES)
    by_copies = unseen_db(make_db)
    notices: list[str] = []
    run_phase_two_measured(by_copies, between=LEGACY_APP_WRITES, notices=notices, settings=COPY_EVERY_TABLE)
    said = "".join(notices)
    for table in ("products", "inventory", "organization_members", "organizations"):
        assert f"{table}: carried as it is rewritten online below" in said, table
        assert f"{table}: rewritten online:" in said, table
    assert "its rows converted as they are copied" in said
    assert "products: column price converted from numeric to numeric(12,2) as the table was copied" in said
    assert by_copies.schema_dump() == by_updates.schema_dump()
    core = [f"public.{t}" for t in CORE_TABLES]
    assert (data_fingerprint(by_copies, tables=core, leaving_out=("updated_at",))
            == data_fingerprint(by_updates, tables=core, leaving_out=("updated_at",)))
    assert by_copies.query("select count(*) from private.pending_rewrites") == [(0,)]
    assert by_copies.query("""select count(*) from pg_class where relnamespace = 'private'::regnamespace
                               and relname like 'p2\\_%'""") == [(0,)]


def test_a_legacy_app_writing_products_while_they_are_copied_converted_loses_no_write(make_db):
    db = unseen_db(make_db)
    prices: dict[str, float] = {}   # product id -> the price the app wrote last

    def write_a_product(cur, n):
        product = str(uuid.uuid4())
        cur.execute("insert into public.products (id, organization_id, sku, name, price, currency) values "
                    "(%s, md5('unseen-org-1')::uuid, %s, 'Written meanwhile', %s, 'GBP')", (product, f"APP-{n:05}", n + 0.25))
        prices[product] = n + 0.25
        cur.execute("update public.products set price = price + 1 where id = %s", (product,))
        prices[product] = n + 1.25

    notices: list[str] = []
    with app_writing(db, write_a_product) as failures:
        # lock_timeout as the engine sets it: the body gives up its locks before the app's inserts, which lock
        # products and then organizations (their foreign key), could be cancelled for a deadlock with it
        run_phase_two_measured(db, notices=notices, settings=COPY_EVERY_TABLE + "; set lock_timeout = '500ms'")
    assert failures == []
    said = "".join(notices)
    replayed = int(said.split("products: rewritten online: ")[1].split(" pages copied, ")[1].split(" ")[0])
    assert replayed > 0, "the app wrote while the products were copied"
    stored = dict(db.query("select id::text, price::float from public.products where sku like 'APP-%%'"))
    assert stored == prices
    assert db.query("select pg_catalog.format_type(atttypid, atttypmod) from pg_attribute "
                    "where attrelid = 'public.products'::regclass and attname = 'price'") == [("numeric(12,2)",)]


def test_a_table_to_copy_that_can_no_longer_be_copied_is_converted_by_batches_of_updates_never_by_cluster(make_db):
    db = unseen_db(make_db)
    conn = db.connect()
    tail = start_phase(conn, PHASE_TWO, COPY_EVERY_TABLE)
    rewrites = next(i for i, statement in enumerate(tail) if "pg_temp.p2_rewrite_swap(v_rel)" in statement)
    with conn.cursor() as cur:
        for statement in tail[:rewrites]:   # the products left for their copy
            cur.execute(statement)
    conn.close()
    assert db.query("select carries from private.pending_rewrites where table_name = 'products'") == [(True,)]
    db.execute("create table public.products_archive () inherits (public.products)")   # no copy can carry that

    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="products: cannot be rewritten online any more"):
        apply_psycopg2(db, PHASE_TWO, COPY_EVERY_TABLE)
    notices = "\n".join(apply_psycopg2(db, PHASE_TWO, COPY_EVERY_TABLE))
    assert "products: rewritten by CLUSTER" not in notices
    assert "products: column price converted from numeric to numeric(12,2) in batches" in notices
    assert db.query("select count(*) from private.pending_rewrites") == [(0,)]
    assert db.query("select price::text, legacy_data from public.products where sku in ('UNSEEN-00007', 'UNSEEN-00079') "
                    "order by sku") == [("1.75", None), (None, {"price": 12.345})]


def test_a_unique_rule_built_early_on_a_column_converted_later_is_built_again_on_the_converted_column(make_db):
    db = unseen_db(make_db)
    db.execute("alter table public.inventory alter column location type character(40)")   # converted by a hidden column
    notices: list[str] = []
    run_phase_two_measured(db, notices=notices)
    assert "inventory: column location converted from character(40) to text" in "".join(notices)
    assert db.query("""select pg_get_indexdef(i.indexrelid), i.indisvalid, c.contype
                         from pg_index i join pg_constraint c on c.conindid = i.indexrelid
                        where c.conname = 'inventory_product_id_location_key'""") == [
        ("CREATE UNIQUE INDEX inventory_product_id_location_key ON public.inventory USING btree (product_id, location)", True, "u")]
    assert db.query("select pg_catalog.format_type(atttypid, atttypmod) from pg_attribute "
                    "where attrelid = 'public.inventory'::regclass and attname = 'location'") == [("text",)]


def test_a_view_reading_a_column_whose_type_must_change_stops_the_phase_before_anything_changes_naming_it(make_db):
    db = unseen_db(make_db)
    db.execute("create view public.price_list as select sku, price from public.products")
    schema = db.schema_dump()
    with pytest.raises(psycopg2.errors.DependentObjectsStillExist,
                       match="but the contract needs text, and view price_list depend.s. on it"):
        apply_psycopg2(db, PHASE_TWO)
    assert db.schema_dump() == schema
