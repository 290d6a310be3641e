"""Snapshots: row counts, an OID-free schema fingerprint, content checksums (every table, order-independent,
duplicates counted, older formats still comparable), and what differs (a work queue draining is no loss)."""

import json

import psycopg2
import pytest

from runbooks import engine
from runbooks.snapshot import (CHECKSUM_METHOD, LEGACY_CHECKSUM_METHOD, WORK_QUEUES, SnapshotError,
                               compare_snapshots, load_snapshot, save_snapshot, take_snapshot)

from runhelpers import snapshot_of

pytestmark = pytest.mark.both_versions   # the snapshot reads the catalogs of each version

APP = """
create table public.organizations (id int primary key, name text not null, updated_at timestamptz default now());
create table public.members (org_id int references public.organizations(id), user_name text, role text
                             check (role in ('owner', 'admin', 'member', 'viewer')));
insert into public.organizations (id, name) select i, 'org ' || i from generate_series(1, 30) i;
insert into public.members select i % 30 + 1, 'user ' || i, 'member' from generate_series(1, 100) i;
create function public.is_admin(u text) returns boolean language sql stable security definer set search_path = ''
  as $$ select exists (select 1 from public.members where user_name = u and role in ('owner', 'admin')) $$;
create function public.touch() returns trigger language plpgsql as $$ begin new.updated_at = now(); return new; end $$;
create trigger organizations_touch before update on public.organizations for each row execute function public.touch();
alter table public.organizations enable row level security;
create policy members_read on public.organizations for select to authenticated using (public.is_admin(current_user));
create index members_org_idx on public.members (org_id);
"""


@pytest.fixture
def db(empty_db):
    empty_db.execute(APP)
    return empty_db


def test_the_same_database_snapshotted_twice_is_identical(db):
    first, second = snapshot_of(db), snapshot_of(db)
    comparison = compare_snapshots(first, second)
    assert comparison.identical and comparison.ok_for_deploy and comparison.problems() == []
    assert first["fingerprint"] == second["fingerprint"] and first["content"] == second["content"]
    assert first["row_counts"]["public.organizations"] == 30 and first["row_counts"]["public.members"] == 100


def test_a_snapshot_is_json_and_survives_save_and_load(db, tmp_path):
    first = snapshot_of(db)
    path = save_snapshot(first, tmp_path / "snapshot.json")
    assert load_snapshot(path) == json.loads(json.dumps(first))
    assert compare_snapshots(load_snapshot(path), snapshot_of(db)).identical


def test_a_file_that_is_not_a_snapshot_is_refused(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(SnapshotError, match="not a snapshot"):
        load_snapshot(tmp_path / "x.json")


def test_the_fingerprint_covers_every_kind_and_holds_no_oid(db):
    first = snapshot_of(db)
    assert set(first["fingerprint_parts"]) == set(first["objects"]) >= {
        "schemas", "tables", "columns", "constraints", "indexes", "functions", "triggers", "policies",
        "rls", "grants", "sequences", "views", "default_privileges"}
    oids = [r[0] for r in db.query("select oid::text from pg_class where relname in ('organizations', 'members')")]
    text = json.dumps(first["objects"])
    assert not any(oid in text for oid in oids)
    assert any("organizations_touch" in line for line in first["objects"]["triggers"])


def test_lost_rows_are_FEWER_and_fail_the_deploy_check(db):
    before = snapshot_of(db)
    db.execute("delete from public.members where user_name = 'user 7'")
    comparison = compare_snapshots(before, snapshot_of(db))
    [lost] = comparison.lost_rows
    assert (lost.table, lost.before, lost.after, lost.status) == ("public.members", 100, 99, "FEWER")
    assert not comparison.ok_for_deploy and not comparison.identical
    assert "ROWS LOST" in comparison.problems()[0]


def test_a_table_that_is_gone_is_MISSING_and_fails_the_deploy_check(db):
    before = snapshot_of(db)
    db.execute("drop table public.members")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert [r.table for r in comparison.missing_tables] == ["public.members"]
    assert not comparison.ok_for_deploy


def test_new_rows_and_new_objects_pass_the_deploy_check_but_are_not_identical(db):
    before = snapshot_of(db)
    db.execute("""insert into public.organizations (id, name) values (31, 'new');
                  create schema extra; create table extra.log (id int);
                  create function public.validate_sku(sku text) returns boolean language sql as $$ select sku ~ '^[A-Z0-9]' $$""")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.ok_for_deploy and not comparison.identical
    statuses = {r.table: r.status for r in comparison.counts}
    assert statuses["public.organizations"] == "more" and statuses["extra.log"] == "new"
    assert statuses["public.members"] == "same"
    assert {"schemas", "tables", "functions"} <= set(comparison.differing_kinds)
    assert any("validate_sku" in line for line in comparison.differences["functions"]["added"])


def test_a_changed_function_body_is_named(db):
    before = snapshot_of(db)
    db.execute("""create or replace function public.touch() returns trigger language plpgsql
                  as $$ begin new.updated_at = clock_timestamp(); return new; end $$""")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.differing_kinds == ["functions"]
    [removed], [added] = comparison.differences["functions"]["removed"], comparison.differences["functions"]["added"]
    assert removed.startswith("public.touch()") and added.startswith("public.touch()")


def test_a_changed_policy_is_named(db):
    before = snapshot_of(db)
    db.execute("""drop policy members_read on public.organizations;
                  create policy members_read on public.organizations for select to authenticated, anon using (true)""")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.differing_kinds == ["policies"]
    assert "anon,authenticated using (true)" in comparison.differences["policies"]["added"][0]


def test_changed_grants_and_rls_flags_are_named(db):
    before = snapshot_of(db)
    db.execute("revoke select on public.members from anon; alter table public.organizations force row level security")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert set(comparison.differing_kinds) == {"grants", "rls"}
    assert comparison.differences["grants"]["removed"] == [
        "TABLE public.members: anon SELECT (granted by postgres)"]


def test_changed_rows_with_the_same_count_are_found_by_the_content_checksum(db):
    before = snapshot_of(db)
    db.execute("update public.members set role = 'admin' where user_name = 'user 3'")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.counts_equal and comparison.fingerprint_equal
    assert list(comparison.content_differences) == ["public.members"] and not comparison.identical


def test_the_content_checksum_does_not_depend_on_physical_row_order(db):
    before = snapshot_of(db)
    db.execute("""create temp table saved as select * from public.members;
                  delete from public.members;
                  insert into public.members select * from saved order by user_name desc""")
    assert compare_snapshots(before, snapshot_of(db)).identical


def test_every_table_is_checksummed_by_default_whatever_its_size(db):
    snap = snapshot_of(db)
    assert snap["checksum_row_limit"] is None and snap["checksum_method"] == CHECKSUM_METHOD
    tables = [t for t in snap["row_counts"] if t.startswith("public.")]
    assert tables and all(len(snap["content"][t]) == 32 for t in tables)
    assert not any(v.startswith("skipped") for v in snap["content"].values())


def test_one_changed_row_is_found_in_a_table_larger_than_a_limit_would_have_checksummed(db):
    # the old default skipped tables over 1M rows; a limit of 2 stands for it on a 3-row table
    db.execute("create table public.items (id int, label text); insert into public.items values (1, 'a'), (2, 'b'), (3, 'c')")
    assert snapshot_of(db, checksum_row_limit=2)["content"]["public.items"] == "skipped: 3 rows"
    before = snapshot_of(db)
    db.execute("update public.items set label = 'B' where id = 2")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.counts_equal and list(comparison.content_differences) == ["public.items"]


def test_the_content_checksum_is_the_same_for_the_same_rows_inserted_in_another_order(db):
    db.execute("""create table public.first (id int, label text); create table public.second (id int, label text);
                  insert into public.first select i, 'row ' || i from generate_series(1, 500) i order by i;
                  insert into public.second select i, 'row ' || i from generate_series(1, 500) i order by i desc""")
    content = snapshot_of(db)["content"]
    assert content["public.first"] == content["public.second"]


def test_an_enums_checksum_survives_its_type_being_made_again_with_new_oids(db):
    # a restore renumbers an enum's values; their hash would change, their text does not
    rows = "insert into public.moods values (1, 'glad'), (2, 'sad')"
    db.execute(f"create type public.mood as enum ('glad', 'sad'); create table public.moods (id int, m public.mood); {rows}")
    before = snapshot_of(db)
    db.execute(f"""drop table public.moods; drop type public.mood; create type public.mood as enum ('glad', 'sad');
                   create table public.moods (id int, m public.mood); {rows}""")
    assert compare_snapshots(before, snapshot_of(db)).content_differences == {}


def test_a_changed_value_of_a_type_without_a_hash_is_found_through_its_text(db):
    db.execute("""create domain public.label as text; create table public.odd_types (p point, j json, l public.label, a int[]);
                  insert into public.odd_types values (point(1, 2), '{"a": 1}', 'x', '{1,2}')""")
    before = snapshot_of(db)
    for change in ("p = point(1, 3)", """j = '{"a": 2}'""", "l = 'y'", "a = '{2,1}'"):
        db.execute(f"update public.odd_types set {change}")
        assert list(compare_snapshots(before, snapshot_of(db)).content_differences) == ["public.odd_types"], change
        before = snapshot_of(db)


def test_duplicate_rows_count_in_the_content_checksum(db):
    db.execute("""create table public.aab (v text); create table public.abb (v text);
                  insert into public.aab values ('a'), ('a'), ('b'); insert into public.abb values ('a'), ('b'), ('b')""")
    snap = snapshot_of(db)
    assert snap["row_counts"]["public.aab"] == snap["row_counts"]["public.abb"] == 3
    assert snap["content"]["public.aab"] != snap["content"]["public.abb"]


def test_tables_above_an_explicit_row_limit_are_counted_but_not_checksummed(db):
    limited = snapshot_of(db, checksum_row_limit=50)
    assert limited["content"]["public.members"] == "skipped: 100 rows"
    assert len(limited["content"]["public.organizations"]) == 32
    comparison = compare_snapshots(limited, snapshot_of(db, checksum_row_limit=50))
    assert comparison.identical and comparison.content_unverified == ["public.members"]


def test_a_table_counted_only_on_one_side_is_unverified_not_a_content_difference(db):
    comparison = compare_snapshots(snapshot_of(db), snapshot_of(db, checksum_row_limit=0))
    assert comparison.identical and comparison.content_differences == {}
    assert comparison.content_unverified == ["public.members", "public.organizations"]


def _as_format_1(snap: dict, db) -> dict:
    """The snapshot as an older version wrote it: no method named, md5-sorted checksums."""
    old = {k: v for k, v in snap.items() if k != "checksum_method"} | {"format": 1, "checksum_row_limit": 1_000_000}
    old["content"] = dict(snap["content"])
    for table in ("public.members", "public.organizations"):
        [(old["content"][table],)] = db.query(f"""select md5(coalesce(string_agg(md5(snapshot_row::text), ''
                                                  order by snapshot_row::text collate "C"), ''))
                                                  from {table} as snapshot_row""")
    return old


def test_a_snapshot_of_the_older_format_loads_and_compares_without_false_content_differences(db, tmp_path):
    before = load_snapshot(save_snapshot(_as_format_1(snapshot_of(db), db), tmp_path / "snapshot.json"))
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.identical and comparison.content_differences == {}
    assert comparison.content_incomparable == ["public.members", "public.organizations"]
    assert comparison.checksum_methods == (LEGACY_CHECKSUM_METHOD, CHECKSUM_METHOD)
    assert "different methods (md5-sorted before, rowsum-hash64 after)" in comparison.notes()[0]


def test_a_snapshot_of_the_older_format_still_shows_lost_rows_and_changed_sequences(db):
    db.execute("create sequence public.counter")
    before = _as_format_1(snapshot_of(db), db)
    db.execute("delete from public.members where user_name = 'user 7'; select nextval('public.counter')")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert [r.table for r in comparison.lost_rows] == ["public.members"]
    assert list(comparison.content_differences) == ["public.counter"]


def test_a_work_queue_that_drained_is_a_fact_not_lost_rows(db):
    # phase 2 interrupted at its post-commit rewrite: its re-run finds private.pending_rewrites emptied
    db.execute("""create schema private;
                  create table private.pending_rewrites (table_name text primary key, reason text not null);
                  insert into private.pending_rewrites values ('public.members', 'plaintext api keys removed')""")
    before = snapshot_of(db)
    db.execute("delete from private.pending_rewrites")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert "private.pending_rewrites" in WORK_QUEUES
    assert comparison.ok_for_deploy and comparison.lost_rows == [] and not comparison.identical
    [drained] = comparison.drained_queues
    assert (drained.table, drained.before, drained.after, drained.status) == ("private.pending_rewrites", 1, 0, "drained")
    assert comparison.problems() == ["private.pending_rewrites: 1 -> 0 rows (-1): work queue drained (not a loss)",
                                     "private.pending_rewrites: content differs"]


def test_the_same_rows_gone_from_a_table_that_is_not_a_work_queue_are_lost(db):
    db.execute("""create schema private; create table private.other_queue (table_name text primary key);
                  insert into private.other_queue values ('x')""")
    before = snapshot_of(db)
    db.execute("delete from private.other_queue")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert [r.table for r in comparison.lost_rows] == ["private.other_queue"] and not comparison.ok_for_deploy


def test_the_history_schema_is_left_out_and_platform_schemas_are_counted_but_not_fingerprinted(db):
    conn = db.connect()
    engine.ensure_history(conn)
    conn.commit()
    conn.close()
    before = snapshot_of(db)
    assert not any(t.startswith("truthsource.") for t in before["row_counts"])
    assert before["row_counts"]["auth.users"] == 0 and "auth.users" not in before["content"]
    assert "auth" not in before["app_schemas"] and "truthsource" not in before["app_schemas"]
    db.execute("""insert into auth.users (id) values (gen_random_uuid());
                  create function auth.extra() returns int language sql as 'select 1';
                  insert into truthsource.deployment_history (version, file_name, sha256, action, applied_by,
                    duration_ms, statements, run_id) values ('x', 'x.sql', repeat('a', 64), 'apply', 't', 1, 1, 'r')""")
    comparison = compare_snapshots(before, snapshot_of(db))
    assert comparison.fingerprint_equal
    assert {r.table: r.status for r in comparison.counts}["auth.users"] == "more"


def test_a_role_that_cannot_see_every_row_fails_loudly_instead_of_counting_fewer(db):
    conn = db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("set role authenticated")
        with pytest.raises(psycopg2.Error):
            take_snapshot(conn)
    finally:
        conn.close()


def test_a_connection_inside_a_transaction_is_refused(db):
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
        with pytest.raises(SnapshotError, match="not inside a transaction"):
            take_snapshot(conn)
    finally:
        conn.close()


def test_an_autocommit_connection_is_left_outside_any_transaction_with_its_settings(db):
    conn = db.connect(autocommit=True)
    try:
        take_snapshot(conn)
        with conn.cursor() as cur:
            cur.execute("select now() = statement_timestamp(), current_setting('search_path')")
            assert cur.fetchone() == (True, '"$user", public')
    finally:
        conn.close()


def test_an_interrupted_rewrites_copy_gone_after_the_rerun_is_a_drained_queue_not_a_missing_table():
    from runbooks.snapshot import _count_status
    assert _count_status("private.p2_rewrite_16501", 42, None) == "drained"
    assert _count_status("private.backfill_leftovers", 3, 0) == "drained"
    assert _count_status("public.p2_rewrite_notes", 42, None) == "MISSING"
