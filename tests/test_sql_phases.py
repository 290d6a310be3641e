"""The three phase files converge an empty, a legacy and an unseen legacy database to one end state.

Template databases (tests/conftest.py) hold each starting point with phases 1..n applied through the
apply engine; tests clone them (make_db) or read them (template_db). Applying the files by hand, with
psql or plain psycopg2, is tested on clones of the starting points.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pglast
import psycopg2
import pytest

from runbooks import verification
from sqlhelpers import (CONTRACT_TABLES, NO_TRANSACTION, PHASE_FILES, PLAINTEXT_KEYS, SUMMARY_QUERIES, apply_phases,
                        apply_psql, apply_psycopg2, catalog_summary, contract_columns, data_fingerprint, find_text,
                        physical_hits, psql_error, row_counts, split_file, strip_sql_noise, uppercase_words)

pytestmark = pytest.mark.both_versions   # the phase files converge on what the catalogs of each version hold

BASES = ("empty", "legacy", "variant")
CHANGE_NOTICE = re.compile(r"^.*\b(dropped|renamed|added|carried|replaced|converted|rewritten|redacted|enabled|adopted|"
                           r"kept in legacy_data|built concurrently)\b.*$", re.MULTILINE)
LEGACIES = ("legacy", "variant")
PHASE_IDS = [p.name for p in PHASE_FILES]


# -- idempotency and one end state --------------------------------------------------------------------

@pytest.mark.parametrize("phase", [1, 2, 3], ids=PHASE_IDS)
@pytest.mark.parametrize("base", BASES)
def test_a_second_run_of_a_phase_changes_neither_schema_nor_data_and_reports_no_change(make_db, base, phase):
    db = make_db(f"{base}@{phase}")
    schema, data = db.schema_dump(), data_fingerprint(db)
    notices = apply_psql(db, PHASE_FILES[phase - 1]).stderr
    assert db.schema_dump() == schema
    assert data_fingerprint(db) == data
    assert not CHANGE_NOTICE.findall(notices), notices


@pytest.mark.parametrize("base", BASES)
def test_the_phases_applied_by_psycopg2_in_one_transaction_reach_the_end_state_psql_reaches(make_db, base):
    by_psql = make_db(base)  # not the base@3 template: the engine that built it adds its history table
    apply_phases(by_psql, how="psql")
    db = make_db(base)
    apply_phases(db, how="psycopg2")
    assert db.schema_dump() == by_psql.schema_dump()


@pytest.mark.parametrize("phase", [1, 2, 3], ids=PHASE_IDS)
@pytest.mark.parametrize("base", LEGACIES)
def test_legacy_databases_end_each_phase_with_the_functions_policies_rls_triggers_and_grants_of_an_empty_one(
        template_db, base, phase):
    empty = catalog_summary(template_db(f"empty@{phase}"))
    legacy = catalog_summary(template_db(f"{base}@{phase}"))
    if phase < 3:  # legacy functions of a later phase's names are that phase's to replace
        names = {row[:2] for row in empty["functions"]}
        legacy["functions"] = [row for row in legacy["functions"] if row[:2] in names]
    assert legacy["functions"] == empty["functions"]
    if phase == 1:  # phase 1 makes functions only; legacy tables keep their own state until phase 2
        return
    for part in ("policies", "rls", "triggers", "constraints", "table_privileges"):
        assert legacy[part] == empty[part], part
    assert set(empty["indexes"]) <= set(legacy["indexes"])


@pytest.mark.parametrize("base", LEGACIES)
def test_legacy_databases_end_with_the_contract_columns_of_an_empty_one(template_db, base):
    empty = {(t, c): (typ, default) for t, c, typ, default in contract_columns(template_db("empty@3"))}
    legacy = {(t, c): (typ, default) for t, c, typ, default in contract_columns(template_db(f"{base}@3"))}
    missing = sorted(set(empty) - set(legacy))
    assert not missing
    differ = {k: (empty[k], legacy[k]) for k in empty if legacy[k] != empty[k] and k != ("audit_logs", "id")}
    assert not differ, "audit_logs.id alone may keep its legacy type"


# -- legacy convergence: no row lost, no plaintext left, legacy data carried ------------------------

@pytest.mark.parametrize("base", LEGACIES)
def test_converging_a_legacy_database_loses_no_row_of_any_table(template_db, base):
    before = row_counts(template_db(base))
    assert sum(before.values()) > 20
    for phase in (1, 2, 3):
        after = row_counts(template_db(f"{base}@{phase}"))
        assert {t: after.get(t) for t in before} == before, f"after phase {phase}"


@pytest.mark.parametrize("base", LEGACIES)
def test_converging_leaves_the_legacy_timestamps_as_they_were(template_db, base):
    def stamps(db):
        columns = db.query("""
            select c.relname, a.attname from pg_class c join pg_attribute a on a.attrelid = c.oid and not a.attisdropped
             where c.relnamespace = 'public'::regnamespace and c.relkind = 'r' and a.attname in ('created_at', 'updated_at')
             order by 1, 2""")
        return {(t, c): db.query(f'select array_agg(extract(epoch from "{c}") order by extract(epoch from "{c}")) '
                                 f'from public."{t}"')[0][0] for t, c in columns}

    before = stamps(template_db(base))
    after = stamps(template_db(f"{base}@3"))
    assert {k: after[k] for k in before} == before


@pytest.mark.parametrize("base", LEGACIES)
def test_no_plaintext_api_key_is_left_in_any_column_of_any_table(template_db, base):
    keys = PLAINTEXT_KEYS[base]
    assert find_text(template_db(base), keys), "the fixture holds plaintext keys"
    for phase in (2, 3):
        assert find_text(template_db(f"{base}@{phase}"), keys) == []


@pytest.mark.parametrize("base", LEGACIES)
def test_no_plaintext_api_key_is_left_in_the_files_of_the_tables_that_held_one(template_db, base):
    keys = PLAINTEXT_KEYS[base]
    tables = ["public.api_keys", "public.audit_logs"]
    assert physical_hits(template_db(base), tables, keys), "the fixture's files hold plaintext keys"
    assert physical_hits(template_db(f"{base}@2"), tables, keys) == []
    assert template_db(f"{base}@2").query("select count(*) from private.pending_rewrites") == [(0,)]


def test_copies_of_keys_of_any_characters_are_redacted_wherever_they_stand_in_a_value(make_db):
    db = make_db("legacy@1")
    odd_keys = ["k3y+with/odd=chars.and-dots~42", "ключ-не-ascii-🔑-0123456789", "short-but-fine-key"]
    many_keys = [f"ts_bulk_{i:06d}_{'x' * (i % 7)}" for i in range(2000)]  # many keys, several lengths
    keys = odd_keys + many_keys[:3] + many_keys[-1:]
    db.execute("insert into public.api_keys (name, key) select 'k' || n, k from unnest(%s::text[]) with ordinality as x (k, n)",
               (odd_keys + many_keys,))
    db.execute("""insert into public.audit_logs (action, changes, user_agent) values
        ('a', jsonb_build_object('note', 'glued:' || %(k0)s || 'tail and ' || %(k1)s), 'agent ' || %(k2)s),
        ('b', jsonb_build_object(%(k3)s, 'as an object key', 'list', jsonb_build_array('x', %(k4)s)), 'xx' || %(k5)s || 'yy'),
        ('c', jsonb_build_object('clean', 'ts_bulk_ but no key, and a uuid ' || gen_random_uuid()), 'clean')""",
               {f"k{i}": k for i, k in enumerate(keys)})
    db.execute("create table public.notes (id int primary key, doc json, body text); "
               "insert into public.notes values (1, '{\"b\": 1,   \"a\": 2}', 'see ' || %s)", (keys[0],))
    apply_phases(db, count=2, start=2)
    assert find_text(db, keys) == []
    assert db.query("select count(*) from public.audit_logs where user_agent like '%[redacted api key %'") == [(2,)]
    # a column is rewritten only where it holds a key: the json beside it keeps its text to the letter
    assert db.query("select doc::text, body like 'see [redacted api key %' from public.notes") == [
        ('{"b": 1,   "a": 2}', True)]
    assert db.query("select new_data ->> 'clean' like 'ts_bulk_ but no key%' from public.audit_logs where action = 'c'") == [(True,)]


def test_legacy_plaintext_keys_become_a_sha256_hash_and_a_short_prefix(template_db):
    rows = template_db("legacy@3").query("""
        select name, key_prefix, key_hash, scopes, revoked_at::text, last_used_at::text, updated_at::text
          from public.api_keys order by id""")
    sha = [hashlib.sha256(k.encode()).hexdigest() for k in
           ("ts_live_9f8e7d6c5b4a39281706f5e4d3c2b1a0", "ts_live_0123456789abcdef0123456789abcdef",
            "ts_test_a1b2c3d4e5f60718293a4b5c6d7e8f90")]
    assert rows == [
        ("CI deploy", "ts_live_9f8e", sha[0], ["read", "write"], None, "2024-01-10 12:00:00+00", "2023-03-01 09:00:00+00"),
        ("Old integration", "ts_live_0123", sha[1], ["read"], "2023-11-01 09:00:00+00", "2023-09-30 12:00:00+00",
         "2023-11-01 09:00:00+00"),
        ("Reporting", "ts_test_a1b2", sha[2], ["read"], None, None, "2023-08-01 09:00:00+00"),
        ("Webhook signer", None, "b7e4c1d3a5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90", ["webhooks"], None, None,
         "2024-02-01 09:00:00+00"),
    ]


def test_variant_plaintext_keys_and_flags_are_converted_too(template_db):
    rows = template_db("variant@3").query(
        "select name, key_prefix, key_hash, scopes, revoked_at::text from public.api_keys order by id")
    assert rows == [
        ("Lab sensors", "uk_live_5f4e", hashlib.sha256(b"uk_live_5f4e3d2c1b0a99887766554433221100").hexdigest(),
         ["read", "write"], None),
        ("Hooli sync", "hk_9a8b7c6d", hashlib.sha256(b"hk_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d").hexdigest(), ["read"],
         "2022-09-01 08:00:00+00"),
    ]


def test_legacy_audit_rows_are_carried_into_the_contract_shape_keeping_what_does_not_convert(template_db):
    rows = template_db("legacy@3").query("""
        select id, action, table_name, record_id::text, old_data, new_data, host(ip_address), legacy_data
          from public.audit_logs order by id""")
    product = "0c000000-0000-4000-8000-000000000001"
    assert rows == [
        (1, "create", "product", product, None, {"sku": "WID-001", "name": "Widget", "price": 17.50}, "203.0.113.7", None),
        (2, "update", "product", product, {"price": 17.50}, {"price": 19.99}, "203.0.113.7", None),
        (3, "stock_adjustment", "inventory", None, None, {"quantity": 12}, None, {"ip": "unknown", "entity_id": "legacy-42"}),
        (4, "update", "organizations", "0a000000-0000-4000-8000-000000000001", None,
         {"settings": {"timezone": "Europe/Berlin"}}, None, {"ip": "10.0.0.1, 10.0.0.2", "entity_type": "organization"}),
        (5, "update", "products", "0c000000-0000-4000-8000-000000000005", None, {"price": 3.25}, None, None),
        (6, "api_key.created", "api_key", "0e000000-0000-4000-8000-000000000001", None,
         {"key": "[redacted api key ts_live_9f8e...]", "name": "CI deploy"}, "198.51.100.23", None),
        (7, "login_failed", None, None, None, {"email": "mallory@example.test"}, "192.0.2.66", None),
    ]


def test_variant_audit_rows_are_carried_too_and_naive_timestamps_read_as_utc(template_db):
    rows = template_db("variant@3").query("""
        select action, table_name, record_id::text, host(ip_address), created_at::text, legacy_data, user_id::text
          from public.audit_logs order by created_at""")
    assert rows == [
        ("INSERT", "products", "1c000000-0000-4000-8000-000000000001", "198.51.100.7", "2022-05-03 08:00:00+00", None,
         "1b000000-0000-4000-8000-000000000001"),
        ("UPDATE", "inventory", None, None, "2022-05-04 08:00:00+00", {"ip_addr": "localhost", "resource_id": "row 17"},
         "1b000000-0000-4000-8000-000000000002"),
        ("INSERT", "api_keys", "1e000000-0000-4000-8000-000000000002", "2001:db8::1", "2022-06-03 08:00:00+00", None,
         "1b000000-0000-4000-8000-000000000003"),
    ]


def test_variant_tables_in_other_shapes_reach_the_contract_keeping_their_rows(template_db):
    db = template_db("variant@3")
    assert db.query("select location, quantity, reserved_quantity, organization_id::text from public.inventory order by id") == [
        ("raccoon-city", 12, 2, "1a000000-0000-4000-8000-000000000001"),
        ("main", 300, 0, "1a000000-0000-4000-8000-000000000001"),
        ("main", 1, None, "1a000000-0000-4000-8000-000000000002"),
    ]
    assert db.query("select sku, price::text, currency from public.products order by id") == [
        ("T-VIRUS-01", "1250.00", "USD"), ("HAZ-SUIT-L", "89.99", "USD"), ("NUCLEUS", None, "USD")]
    assert db.query("select count(*), count(distinct id), count(legacy_id) from public.security_events") == [(2, 2, 2)]
    assert db.query("select full_name from public.profiles order by id") == [("Olga O.",), ("Pavel P.",), (None,)]
    assert db.query("select relrowsecurity from pg_class where oid = 'public.warehouses'::regclass") == [(True,)]


def test_legacy_rows_that_break_a_new_rule_are_kept_unchanged_and_reported(template_db):
    db = template_db("legacy@3")
    assert db.query("select sku, price::text from public.products where sku in ('wid-001', 'REFUND-ADJ') order by sku") == [
        ("REFUND-ADJ", "-5.00"), ("wid-001", "17.50")]
    assert db.query("select quantity, reserved_quantity from public.inventory where quantity < 0 or reserved_quantity > quantity "
                    "order by quantity") == [(-3, 0), (4, 10)]
    assert db.query("select slug from public.organizations where slug = 'Initech_Legacy'") == [("Initech_Legacy",)]
    assert db.query("select role from public.organization_members where user_id = '0b000000-0000-4000-8000-000000000008' "
                    "or role = 'editor' order by role") == [("editor",), ("member",)]
    report = {name: (status, rows) for name, status, rows, _ in db.query("select * from public.verify_data_integrity()")}
    assert {name: v for name, v in report.items() if v[0] != "ok"} == {
        "organizations_slug_format": ("warning", 1),
        "profiles_without_user": ("warning", 1),
        "members_without_user": ("warning", 1),
        "members_invalid_role": ("warning", 1),
        "products_sku_format": ("warning", 1),
        "products_duplicate_sku": ("warning", 2),
        "products_negative_price": ("warning", 1),
        "inventory_negative_stock": ("warning", 1),
        "inventory_reserved_out_of_range": ("warning", 2),
        "constraints_not_validated": ("warning", 10),
    }
    not_valid = db.query("select conname from pg_constraint where not convalidated and connamespace = 'public'::regnamespace "
                         "order by 1")
    assert [n for (n,) in not_valid] == [
        "api_keys_key_prefix_not_null_check", "inventory_quantity_nonnegative_check", "inventory_reserved_within_quantity_check",
        "organization_members_role_check", "organization_members_user_id_fkey", "organizations_slug_format_check",
        "products_price_nonnegative_check", "products_sku_format_check", "profiles_id_fkey"]


def test_an_update_that_leaves_a_legacy_row_breaking_its_rule_is_refused_and_one_that_fixes_it_passes(make_db):
    db = make_db("legacy@3")
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.CheckViolation, match="products_sku_format_check"):
                cur.execute("update public.products set name = 'Widget (2022)' where sku = 'wid-001'")
            conn.rollback()
            cur.execute("update public.products set name = 'Widget (2022)', sku = 'WID-001-OLD' where sku = 'wid-001'")
            assert cur.rowcount == 1
        conn.commit()
    finally:
        conn.close()


def test_legacy_checks_are_replaced_by_the_contracts_rules_and_legacy_indexes_adopted_or_dropped(template_db):
    legacy = template_db("legacy@3")
    assert legacy.query("select pg_get_constraintdef(oid) from pg_constraint where conname = 'organization_members_role_check'") == [
        ("CHECK ((role = ANY (ARRAY['owner'::text, 'admin'::text, 'member'::text, 'viewer'::text]))) NOT VALID",)]
    assert legacy.query("select count(*) from pg_constraint where conname = 'products_name_length'") == [(0,)]
    assert legacy.query("select indexname from pg_indexes where indexname in ('idx_organizations_slug', 'idx_products_sku')") == [
        ("idx_products_sku",)]
    variant = template_db("variant@3")
    assert variant.query("select indexname from pg_indexes where tablename = 'api_keys' order by 1") == [
        ("api_keys_created_by_idx",), ("api_keys_key_hash_key",), ("api_keys_organization_id_idx",), ("api_keys_pkey",)]
    assert variant.query("select pg_get_constraintdef(oid) from pg_constraint where conname = 'organization_members_pkey'") == [
        ("PRIMARY KEY (id)",)]


def test_a_legacy_trigger_of_another_purpose_is_kept_and_named(make_db):
    db = make_db("legacy@1")
    db.execute("""
        create function public.legacy_note() returns trigger language plpgsql as $$ begin return new; end $$;
        create trigger products_note before insert on public.products for each row execute function public.legacy_note();""")
    assert "legacy trigger products_note on products (calls legacy_note()) is kept" in apply_psql(db, PHASE_FILES[1]).stderr
    apply_psql(db, PHASE_FILES[2])
    assert db.query("select status, affected_rows from public.verify_data_integrity() where check_name = 'legacy_triggers'") == [
        ("warning", 1)]


# -- phase 1 specifics -------------------------------------------------------------------------------

@pytest.mark.parametrize("base", LEGACIES)
def test_after_phase_one_every_updated_at_trigger_calls_the_one_function_and_no_duplicate_is_left(template_db, base):
    db = template_db(f"{base}@1")
    functions = db.query("""
        select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where p.prorettype = 'trigger'::regtype and n.nspname !~ '^pg_' and n.nspname not in ('auth', 'information_schema')
         order by 1""")
    assert functions == [("update_updated_at_column()",)]
    triggers = db.query("""
        select c.relname, t.tgname, pg_get_triggerdef(t.oid)
          from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attname = 'updated_at'
          left join pg_trigger t on t.tgrelid = c.oid and not t.tgisinternal
         where c.relnamespace = 'public'::regnamespace and c.relkind = 'r' order by 1, 2""")
    assert triggers and all(
        name == f"update_{table}_updated_at"
        and definition.endswith(f"BEFORE UPDATE ON public.{table} FOR EACH ROW EXECUTE FUNCTION update_updated_at_column()")
        for table, name, definition in triggers), triggers


@pytest.mark.parametrize("base", LEGACIES)
def test_after_phase_one_updating_a_legacy_row_moves_its_updated_at(make_db, base):
    db = make_db(f"{base}@1")
    before = db.query("select id, updated_at from public.products order by id limit 1")[0]
    db.execute("update public.products set name = name || '' where id = %s", (before[0],))
    after = db.query("select updated_at from public.products where id = %s", (before[0],))[0][0]
    assert after > before[1]


LEGACY_ACME = "0a000000-0000-4000-8000-000000000001"
LEGACY_WIDGET = "0c000000-0000-4000-8000-000000000001"
LEGACY_PEOPLE = {"bob": "0b000000-0000-4000-8000-000000000002", "dave": "0b000000-0000-4000-8000-000000000004"}


def test_phase_one_moves_overloads_that_legacy_policies_call_to_private_and_leaves_those_policies_unchanged(template_db):
    db = template_db("legacy@1")
    assert db.query("""select tablename, policyname, qual, with_check from pg_policies
                        where policyname in ('Members can view products', 'inventory_admin_write', 'org_update') order by 1""") == [
        ("inventory", "inventory_admin_write", "private.retired_is_org_admin((auth.uid())::text, (organization_id)::text)", None),
        ("organizations", "org_update", "(id = private.retired_get_user_organization_id())", None),
        ("products", "Members can view products", "private.retired_is_org_member(organization_id)", None),
    ]
    assert db.query("select oid::regprocedure::text from pg_proc where proname in ('is_org_member', 'is_org_admin', "
                    "'get_user_organization_id') order by 1") == [
        ("get_user_organization_id(uuid)",), ("is_org_admin(uuid,uuid)",), ("is_org_member(uuid,uuid)",)]


def test_between_phases_one_and_two_an_admin_still_inserts_inventory_through_the_legacy_policy_and_a_viewer_cannot(make_db):
    db = make_db("legacy@1")
    insert = ("insert into public.inventory (organization_id, product_id, location, quantity) "
              "values (%s, %s, %s, 5) returning id")
    with db.connect() as conn, conn.cursor() as cur:
        verification.act_as(cur, "bob", LEGACY_PEOPLE)
        cur.execute(insert, (LEGACY_ACME, LEGACY_WIDGET, "between-phases"))
        assert cur.fetchone()
        conn.rollback()
        verification.act_as(cur, "dave", LEGACY_PEOPLE)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute(insert, (LEGACY_ACME, LEGACY_WIDGET, "between-phases"))
        conn.rollback()


@pytest.mark.parametrize("base", LEGACIES)
def test_phase_two_drops_the_overloads_that_phase_one_retired(template_db, base):
    assert template_db(f"{base}@1").query("select count(*) > 0 from pg_proc where proname like 'retired%'") == [(True,)]
    assert template_db(f"{base}@2").query("select proname from pg_proc where proname like 'retired%'") == []


def test_a_policy_outside_the_core_tables_on_a_retired_overload_works_until_phase_two_then_fails_closed(make_db):
    db = make_db("legacy")
    db.execute("""create table public.notes (id int primary key, organization_id uuid);
                  alter table public.notes enable row level security;
                  create policy notes_members on public.notes for select to authenticated using (is_org_member(organization_id))""")
    apply_phases(db, 1)
    assert db.query("select qual from pg_policies where policyname = 'notes_members'") == [
        ("private.retired_is_org_member(organization_id)",)]
    apply_phases(db, 2, start=2)
    assert db.query("select roles, cmd, qual from pg_policies where policyname = 'notes_members'") == [
        (["authenticated"], "SELECT", "false")]


def test_an_overload_retired_twice_with_the_same_arguments_gets_a_second_name(make_db):
    db = make_db("legacy@1")
    db.execute("""create function public.is_org_admin(a text, b text) returns boolean language sql as 'select false';
                  create table public.notes (id int primary key, organization_id uuid);
                  alter table public.notes enable row level security;
                  create policy notes_admins on public.notes for all to authenticated
                    using (is_org_admin(auth.uid()::text, organization_id::text))""")
    apply_phases(db, 1)
    assert db.query("select oid::regprocedure::text from pg_proc where proname like 'retired_is_org_admin%' order by 1") == [
        ("private.retired_is_org_admin(text,text)",), ("private.retired_is_org_admin_2(text,text)",)]


def test_the_guides_untyped_call_of_is_org_admin_reaches_the_contract_function(template_db):
    db = template_db("legacy@1")
    assert db.query("select is_org_admin('0b000000-0000-4000-8000-000000000002', '0a000000-0000-4000-8000-000000000001')") == [
        (True,)]


def test_phase_one_stops_and_names_a_function_named_like_an_updated_at_function_that_does_more(make_db):
    db = make_db("empty")
    db.execute("""
        create table public.notes (id uuid primary key, updated_at timestamptz, updated_by uuid);
        create function public.set_updated_at() returns trigger language plpgsql as $$
        begin new.updated_at := now(); new.updated_by := auth.uid(); return new; end $$;
        create trigger notes_touch before update on public.notes for each row execute function public.set_updated_at();""")
    schema = db.schema_dump()
    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState,
                       match=r"set_updated_at\(\) is named like an updated-at function but does more than stamp updated_at"):
        apply_psycopg2(db, PHASE_FILES[0])
    assert db.schema_dump() == schema


def test_phase_one_recognises_an_updated_at_function_by_its_body_whatever_its_name(make_db):
    db = make_db("empty")
    db.execute("""
        create table public.notes (id uuid primary key, body text, updated_at timestamptz);
        create function public.stamp_row() returns trigger language plpgsql as $$
        BEGIN
          /* keep it fresh */ NEW."updated_at" := clock_timestamp();
          RETURN NEW;
        END $$;
        create trigger notes_stamp before insert or update on public.notes for each row execute function public.stamp_row();
        create function public.notes_audit() returns trigger language plpgsql as $$
        begin new.body := upper(new.body); new.updated_at := now(); return new; end $$;
        create trigger notes_audit before update on public.notes for each row execute function public.notes_audit();""")
    apply_psql(db, PHASE_FILES[0])
    assert db.query("select tgname, tgfoid::regproc::text from pg_trigger where tgrelid = 'public.notes'::regclass order by 1") == [
        ("notes_audit", "notes_audit"), ("update_notes_updated_at", "update_updated_at_column")]
    assert db.query("select count(*) from pg_proc where proname = 'stamp_row'") == [(0,)]


def test_phase_one_stops_on_an_updated_at_trigger_that_stamps_another_column(make_db):
    db = make_db("empty")
    db.execute("""
        create table public.notes (id uuid primary key, modified_at timestamptz);
        create function public.touch_modified() returns trigger language plpgsql as $$
        begin new.modified_at = now(); return new; end $$;
        create trigger notes_touch before update on public.notes for each row execute function public.touch_modified();""")
    assert "touch_modified() stamps modified_at, not updated_at" in psql_error(db, PHASE_FILES[0])


def test_each_phase_refuses_to_run_before_what_it_requires(make_db):
    assert "requires Supabase's auth schema" in psql_error(make_db("bare"), PHASE_FILES[0])
    assert "requires 000_core_functions.sql" in psql_error(make_db("empty"), PHASE_FILES[1])
    assert "requires 001_core_schema.sql" in psql_error(make_db("empty@1"), PHASE_FILES[2])


# -- phase 2 and 3 stops -----------------------------------------------------------------------------

def test_phase_two_stops_before_changing_anything_when_duplicates_forbid_a_unique_rule(make_db):
    db = make_db("legacy@1")
    db.execute("insert into public.products (organization_id, sku, name, price) values "
                "('0a000000-0000-4000-8000-000000000001', 'GAD-100', 'Gadget (copy)', 1)")
    schema, data = db.schema_dump(), data_fingerprint(db)
    with pytest.raises(psycopg2.errors.UniqueViolation, match="products_organization_id_sku_key.*duplicated values such as"):
        apply_psycopg2(db, PHASE_FILES[1])
    assert db.schema_dump() == schema
    assert data_fingerprint(db) == data


def test_phase_two_stops_on_a_referenced_key_column_of_another_type(make_db):
    db = make_db("empty@1")
    db.execute("""
        create table public.products (id bigint primary key, organization_id uuid, sku text, name text);
        create table public.inventory (id uuid primary key, product_id bigint references public.products (id));""")
    with pytest.raises(psycopg2.errors.DatatypeMismatch, match="products.id is bigint but the contract needs uuid"):
        apply_psycopg2(db, PHASE_FILES[1])


def test_phase_three_stops_on_a_legacy_table_of_its_own_in_another_shape(make_db):
    db = make_db("empty@2")
    db.execute("create table public.rate_limits (id serial primary key, ip text, hits integer)")
    assert "rate_limits.key is missing (expected text)" in psql_error(db, PHASE_FILES[2])


# -- the files themselves ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", PHASE_FILES, ids=PHASE_IDS)
def test_the_phase_files_follow_the_projects_conventions(path: Path):
    text = path.read_text()
    assert text.isascii(), "ASCII only: the engine maps statement offsets from the parser (bytes) to text"
    lines = text.splitlines()
    assert re.match(rf"^-- {re.escape(path.name)}: \S", lines[0])
    header = list(__import__("itertools").takewhile(lambda line: line.startswith("--"), lines))
    assert any(line.startswith("-- Deploys:") for line in header)
    assert any(line.startswith("-- Requires:") for line in header)
    assert not [line for line in lines if line.lstrip().startswith("\\")], "no psql meta-commands"
    statements = pglast.split(text, with_parser=True)
    parsed = pglast.parse_sql(text)
    assert len(parsed) == len(statements)
    assert not [s for s in parsed if type(s.stmt).__name__ == "TransactionStmt"], "no begin/commit: the engine wraps"
    assert not uppercase_words(text), "lower-case SQL keywords and identifiers"
    # a statement that opens a section (after a blank line) comes right after its one-line comment
    located = json.loads(pglast.parser.parse_sql_json(text))["stmts"]
    previous_end = 0
    for stmt in located:
        start = stmt.get("stmt_location", 0)
        gap = text[previous_end:start]
        if "\n\n" in gap or previous_end == 0:
            assert gap.rstrip("\n").splitlines()[-1].startswith("--"), text[start:start + 80]
        previous_end = start + stmt["stmt_len"]
    # no-transaction statements: each marked right before it, all before or after the body, every concurrent
    # build among them
    head, body, tail_statements = split_file(path)
    assert "concurrently" not in strip_sql_noise(body)
    assert len(re.findall(rf"(?m)^{re.escape(NO_TRANSACTION)}$", text)) == len(head) + len(tail_statements), \
        "marked only before or after the body"
    for i, line in enumerate(lines):
        if line == NO_TRANSACTION:
            assert lines[i + 1].strip() and not lines[i + 1].startswith("--")


def test_squawk_finds_nothing_to_report_in_the_phase_files():
    squawk = Path(sys.executable).with_name("squawk")
    result = subprocess.run([str(squawk), *map(str, PHASE_FILES)], capture_output=True, text=True,
                            cwd=PHASE_FILES[0].parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_summary_queries_cover_every_contract_table(template_db):
    assert set(CONTRACT_TABLES) == {t for t, *_ in template_db("empty@3").query(SUMMARY_QUERIES["rls"],
                                                                                       {"tables": list(CONTRACT_TABLES)})}
