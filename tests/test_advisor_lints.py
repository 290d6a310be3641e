"""Supabase's advisor lints (splinter) as the verification writes them, one rule at a time.

Each rule is broken once on a small object of a migrated database: the verification's security or
performance lints report it, at the level of whose object it is (an error on the deployment's objects;
elsewhere splinter's level, an error shown as a warning when no preflight baseline says whether it is
older); once fixed, it is gone. pg_graphql cannot be installed on the test servers: a stand-in of its
resolver, graphql.resolve(), makes the pg_graphql rules apply, as the extension does on Supabase.
"""

from __future__ import annotations

import pytest

from runbooks import verification
from runbooks.contract import CORE_TABLES, PHASE3_TABLES

from runhelpers import readonly
from supabase_project import GRAPHQL_STAND_IN

pytestmark = pytest.mark.both_versions   # the advisor rules read the catalogs of each version

# a schema of the project's own besides public (not the deployment's), and one the API serves
SHOP = """create schema shop; create table shop.items (id int primary key, name text);
          alter table shop.items enable row level security"""
API = """create schema api; grant usage on schema api to anon, authenticated"""
STORAGE = """create schema storage;
             create table storage.buckets (id text primary key, name text not null, public boolean default false);
             create table storage.objects (id uuid primary key, bucket_id text references storage.buckets (id), name text);
             alter table storage.objects enable row level security;
             insert into storage.buckets (id, name, public) values ('avatars', 'avatars', true)"""


def serve(db, schemas: str) -> str:
    """PostgREST's db_schemas for the database (the verification reads it on its next connection)."""
    return f"alter database {db.name} set pgrst.db_schemas = '{schemas}'"


# (lint, SQL that breaks the rule, the object reported, its level, SQL that fixes it); {serve_api} and
# {serve_queues}: the database serves schema api, or pgmq_public, through the API
CASES = {
    "two permissive policies for one role and command elsewhere than public": (
        "multiple_permissive_policies",
        SHOP + """; create policy items_low on shop.items for select to authenticated using (id < 10);
                    create policy items_high on shop.items for select to authenticated using (id > 5)""",
        "shop.items for authenticated select", "warning", "drop policy items_high on shop.items"),
    "two permissive policies on a table of the deployment": (
        "multiple_permissive_policies",
        "create policy products_select_twice on public.products for select to authenticated using (false)",
        "products for authenticated select", "error", "drop policy products_select_twice on public.products"),
    "a view the API roles read with its owner's rights": (
        "security_definer_view",
        "create view public.product_names as select name from public.products; "
        "grant select on public.product_names to authenticated",
        "product_names", "warning", "alter view public.product_names set (security_invoker = true)"),
    "a table without RLS in another schema the API serves": (
        "rls_disabled_in_public",
        API + "; create table api.notes (id int primary key); grant select on api.notes to anon; {serve_api}",
        "api.notes", "warning", "alter table api.notes enable row level security"),
    "a policy whose condition is always true elsewhere than public": (
        "policy_always_true",
        SHOP + "; create policy items_open on shop.items for update to authenticated using (1 = 1)",
        "items_open on shop.items", "warning", "alter policy items_open on shop.items using (id > 0)"),
    "a SECURITY DEFINER function in another schema the API serves": (
        "security_definer_function_executable_by_api_users",
        API + "; create function api.whoami() returns text language sql security definer set search_path = '' "
              "as 'select current_user::text'; {serve_api}",
        "api.whoami()", "warning", "revoke execute on function api.whoami() from public"),
    "a SECURITY DEFINER function with a mutable search_path elsewhere than public and private": (
        "function_search_path_mutable",
        SHOP + "; create function shop.item_count() returns bigint language sql security definer "
               "as 'select count(*) from shop.items'",
        "shop.item_count()", "warning", "alter function shop.item_count() set search_path = ''"),
    "a queue table without RLS while the API serves pgmq_public": (
        "insecure_queue_exposed_in_api",
        """create schema pgmq; create table pgmq.q_jobs (msg_id bigint primary key, message jsonb);
           grant usage on schema pgmq to anon; grant select on pgmq.q_jobs to anon; {serve_queues}""",
        "pgmq.q_jobs", "warning", "alter table pgmq.q_jobs enable row level security"),
    "an extension older than the server's default version": (
        "extension_versions_outdated",
        "create schema kit; create extension hstore with schema kit version '1.4'",
        "hstore", "warning", "alter extension hstore update"),
    "a public bucket listable through a SELECT policy on its whole bucket": (
        "public_bucket_allows_listing",
        STORAGE + """; create policy "Anyone signed in lists avatars" on storage.objects for select to authenticated
                       using (bucket_id = 'avatars')""",
        "bucket avatars", "warning", """drop policy "Anyone signed in lists avatars" on storage.objects"""),
    "a table many times the size its rows need": (
        "table_bloat",
        # 27 MB of rows, all deleted but the last (so that no vacuum can truncate the file), then analyzed
        SHOP + """; alter table shop.items set (autovacuum_enabled = false);
                    insert into shop.items select g, repeat('x', 200) from generate_series(1, 120000) g;
                    delete from shop.items where id < 120000; analyze shop.items""",
        "shop.items", "info", "vacuum full shop.items"),
}


def findings(db) -> dict[tuple[str, str], dict]:
    """{(lint, object): row} of the verification's advisor lints, no preflight baseline."""
    conn = readonly(db)
    try:
        rows = verification.security_lints(conn).rows + verification.performance_lints(conn).rows
    finally:
        conn.close()
    return {(r["lint"], r["object"]): r for r in rows if r["object"]}


def on(db, sql: str) -> None:
    db.execute(sql.replace("{serve_api}", serve(db, "public, api")).replace("{serve_queues}", serve(db, "public, pgmq_public")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_reports_what_breaks_it_at_the_level_of_whose_object_it_is_and_not_once_fixed(make_db, case):
    lint, breakage, obj, level, fix = CASES[case]
    db = make_db("empty@3")
    assert (lint, obj) not in findings(db)
    on(db, breakage)
    found = findings(db)
    assert (lint, obj) in found, sorted(k for k in found if k[0] == lint)
    assert found[(lint, obj)]["level"] == level
    on(db, fix)
    assert (lint, obj) not in findings(db)


def test_the_rules_splinter_has_and_the_verification_does_not_run_are_named_with_the_reason(make_db):
    db = make_db("empty@3")
    conn = readonly(db)
    try:
        rows = verification.security_lints(conn).rows + verification.performance_lints(conn).rows
    finally:
        conn.close()
    not_checked = {r["lint"]: r["detail"] for r in rows if r["detail"].startswith("not checked")}
    assert set(not_checked) == {"unused_index", "auth_allow_anonymous_sign_ins"}
    assert "without traffic" in not_checked["unused_index"]
    # where storage.buckets is missing, the bucket rule says so and finds nothing
    assert next(r for r in rows if r["lint"] == "public_bucket_allows_listing")["detail"] == \
        "ok: no storage.buckets here to read"


def graphql_findings(db) -> dict[str, dict]:
    """{object: row} of the two pg_graphql rules."""
    return {obj: dict(row, lint=lint) for (lint, obj), row in findings(db).items() if lint.startswith("pg_graphql_")}


@pytest.mark.parametrize("base", ["empty", "legacy", "variant"])
def test_with_pg_graphql_the_deployments_only_finding_is_the_contracts_intended_exposure_to_signed_in_users(make_db, base):
    db = make_db(f"{base}@3")
    assert graphql_findings(db) == {}                      # without pg_graphql, nothing is served through it
    on(db, GRAPHQL_STAND_IN)
    found = {obj: r for obj, r in graphql_findings(db).items() if verification.is_deployments(r["lint"], obj)}
    # the contract has authenticated read the core tables: a note naming the contract, never a warning
    assert {obj: (r["lint"], r["level"]) for obj, r in found.items()} == {
        t: ("pg_graphql_authenticated_table_exposed", "info") for t in CORE_TABLES}
    assert {r["detail"] for r in found.values()} == {verification.INTENDED_GRAPHQL_EXPOSURE}
    assert "the contract" in verification.INTENDED_GRAPHQL_EXPOSURE
    conn = readonly(db)
    try:
        assert verification.security_lints(conn).status != "error"
    finally:
        conn.close()


def test_with_pg_graphql_other_tables_signed_in_users_or_anon_may_read_are_reported_at_the_advisors_level(make_db):
    db = make_db("empty@3")
    on(db, GRAPHQL_STAND_IN)
    # a table the contract closes to clients, opened to authenticated: the deployment's, an error
    closed = PHASE3_TABLES[0]
    on(db, f"grant select on public.{closed} to authenticated")
    # someone else's table: the advisor's level, for anon and for authenticated
    on(db, SHOP + "; grant usage on schema shop to anon, authenticated; grant select on shop.items to anon, authenticated")
    found = findings(db)
    assert found[("pg_graphql_authenticated_table_exposed", closed)]["level"] == "error"
    assert found[("pg_graphql_authenticated_table_exposed", "shop.items")]["level"] == "warning"
    assert found[("pg_graphql_anon_table_exposed", "shop.items")]["level"] == "warning"

    on(db, f"revoke select on public.{closed} from authenticated; revoke select on shop.items from anon, authenticated")
    assert set(graphql_findings(db)) == set(CORE_TABLES)
    conn = readonly(db)
    try:
        check = verification.security_lints(conn)
    finally:
        conn.close()
    assert check.status == "ok" and "pg_graphql_authenticated_table_exposed" in check.summary.split("note(s): ")[1]
    on(db, "drop schema graphql cascade")                  # pg_graphql gone: nothing is exposed through it
    assert graphql_findings(db) == {}


# Storage as an older Supabase (or a project's own schema named storage) has it: buckets without `public`
OLD_STORAGE = """create schema storage;
                 create table storage.buckets (id text primary key, name text not null);
                 create table storage.objects (id uuid primary key, bucket_id text references storage.buckets (id));
                 alter table storage.objects enable row level security"""


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_lint_that_cannot_run_on_this_catalog_is_a_warning_naming_it_and_its_error_and_the_others_still_run(
        make_db, tmp_path, autocommit):
    db = make_db("empty@3")
    on(db, OLD_STORAGE)
    on(db, SHOP + "; create policy items_open on shop.items for update to authenticated using (1 = 1)")
    conn = db.connect(readonly=True, autocommit=autocommit)
    try:
        security = verification.security_lints(conn)
        baseline = verification.advisor_baseline(conn, tmp_path)
    finally:
        conn.close()
    said = "public_bucket_allows_listing could not run: [42703] column b.public does not exist"
    for check in (security, baseline):
        assert check.status == "warning", check.summary
        assert said in check.summary
    # the other lints ran: the open policy elsewhere than public is still reported
    assert ("policy_always_true", "items_open on shop.items") in {(r["lint"], r["object"]) for r in security.rows}
    assert (tmp_path / verification.ADVISOR_BASELINE_FILE).is_file()
