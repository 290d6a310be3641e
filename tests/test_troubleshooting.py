"""Troubleshooting: the guide's four common issues, given to a migrated database on purpose,
are each found; by default nothing changes; with apply_fixes the SQL fixes take."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from runbooks import engine, runner, snapshot, troubleshooting
from runbooks.paths import PHASES

from runhelpers import checks_of, executed_notebook, make_run, notebook_text, wait_for_stats

PRODUCT = "0c000000-0000-4000-8000-000000000001"

# 1. a duplicate updated-at function with a dependent trigger
FUNCTION_CONFLICT = """
create function public.touch_updated_at() returns trigger language plpgsql as $$
begin
  new.updated_at = now();
  return new;
end $$;
create trigger touch_products_updated_at before update on public.products
  for each row execute function public.touch_updated_at();
"""
# 2. a table in a conflicting shape: a plaintext key column again, and a column of another type
TABLE_CONFLICT = """
alter table public.api_keys add column key text;
alter table public.products alter column currency type varchar(3);
"""
# 3. a role without the privileges it needs: authenticated cannot read products, nor run a policy's helper
PERMISSION_PROBLEM = """
revoke select on public.products from authenticated;
revoke execute on function private.member_org_ids() from authenticated;
"""
# 4. a foreign key without an index (a service_role-only table, RLS on, no API grants)
UNINDEXED_FOREIGN_KEY = """
create table public.order_lines (
  id bigint generated always as identity primary key,
  product_id uuid not null references public.products (id),
  quantity integer not null default 1
);
alter table public.order_lines enable row level security;
revoke all on public.order_lines from anon, authenticated;
insert into public.order_lines (product_id, quantity)
select p.id, g % 7 + 1 from public.products p, generate_series(1, 400) g;
"""
LOAD_QUERIES = 300


def give_the_four_issues(db) -> None:
    """Give a migrated database (make_db("legacy@3")) the four issues, the unindexed one under load."""
    db.execute(FUNCTION_CONFLICT + TABLE_CONFLICT + PERMISSION_PROBLEM + UNINDEXED_FOREIGN_KEY)
    # under load: the referencing table is read by a sequential scan per lookup
    conn = db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            for _ in range(LOAD_QUERIES):
                cur.execute("select count(*) from public.order_lines where product_id = %s", (PRODUCT,))
    finally:
        conn.close()
    wait_for_stats(db, "public.order_lines", LOAD_QUERIES)


def diagnose(db, tmp_path) -> dict:
    run = make_run(db, tmp_path)
    try:
        found = {}
        for function, kwargs in ((troubleshooting.function_conflicts, {"target": db.target}),
                                 (troubleshooting.table_conflicts, {"target": db.target}),
                                 (troubleshooting.permission_problems, {}),
                                 (troubleshooting.foreign_keys_without_index, {}),
                                 (troubleshooting.seq_scan_heavy_tables, {}),
                                 (troubleshooting.tables_never_analyzed, {})):
            check = function(run.conn, **kwargs)
            found[check.name] = check
        return found
    finally:
        run.close()


def test_a_migrated_database_has_none_of_the_four_issues(migrated_db, tmp_path):
    found = diagnose(migrated_db, tmp_path)
    assert {name: c.status for name, c in found.items()} == {
        "function_conflicts": "ok", "table_conflicts": "ok", "permission_problems": "ok",
        "foreign_keys_without_index": "ok", "seq_scan_heavy_tables": "ok", "tables_never_analyzed": "ok"}
    assert not troubleshooting.planned_fixes(list(found.values()))


def test_the_diagnoses_find_each_issue_with_the_objects_that_depend_on_it_and_the_least_fix(make_db, tmp_path):
    db = make_db("legacy@3")
    give_the_four_issues(db)
    found = diagnose(db, tmp_path)

    functions = found["function_conflicts"]
    assert functions.status == "warning"
    assert functions.rows == [{"function": "public.touch_updated_at()", "problem": "duplicate updated-at function",
                               "dependents": "trigger touch_products_updated_at on table products"}]
    [fix] = functions.fixes
    # products keeps its own trigger on the one function: the duplicate trigger goes, then the function, no CASCADE
    assert fix.sql.splitlines()[0].startswith("drop trigger touch_products_updated_at on public.products;")
    assert fix.sql.splitlines()[-1].startswith("drop function public.touch_updated_at();")
    assert "cascade" not in fix.sql.lower().replace("no cascade", "")

    tables = found["table_conflicts"]
    assert tables.status == "warning"
    assert {(r["table"], r["column"]) for r in tables.rows} == {("public.api_keys", "key"), ("public.products", "currency")}
    assert any("PLAINTEXT API KEY" in r["problem"] for r in tables.rows)
    [fix] = tables.fixes
    assert fix.sql is None and fix.command.startswith(f"runbook deploy --service {db.name} -p reapply true")

    permissions = found["permission_problems"]
    assert permissions.status == "warning"
    assert sorted(f.sql for f in permissions.fixes) == [
        "grant execute on function private.member_org_ids() to authenticated;",
        "grant select on table public.products to authenticated;"]
    assert "GRANT ALL" not in " ".join(f.sql for f in permissions.fixes).upper()
    policy_row = next(r for r in permissions.rows if "member_org_ids" in r["lacks"])
    assert "policy products_select_members on table products" in policy_row["why"]

    indexes = found["foreign_keys_without_index"]
    assert indexes.status == "warning"
    [fix] = indexes.fixes
    assert fix.sql == ("create index concurrently if not exists order_lines_product_id_idx "
                       "on public.order_lines (product_id);") and not fix.transactional
    scans = found["seq_scan_heavy_tables"]
    assert scans.status == "warning"
    [row] = scans.rows
    assert row["table_name"] == "public.order_lines" and row["seq_scans"] >= LOAD_QUERIES
    assert "order_lines_product_id_fkey" in row["likely cause"]


def test_the_guides_drop_function_fails_while_a_trigger_depends_on_it_and_the_fix_does_not(make_db, tmp_path):
    db = make_db("legacy@3")
    db.execute(FUNCTION_CONFLICT)
    conn = db.connect()
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.DependentObjectsStillExist):
            cur.execute("drop function if exists public.touch_updated_at()")   # the guide's advice
        conn.rollback()
    finally:
        conn.close()
    [fix] = diagnose(db, tmp_path)["function_conflicts"].fixes
    db.execute(fix.sql)
    assert db.query("select to_regprocedure('public.touch_updated_at()')") == [(None,)]
    # the table's updated_at is still maintained, by the one function
    [(before,)] = db.query("select updated_at from public.products where id = %s", (PRODUCT,))
    [(after,)] = db.query("update public.products set name = name || '' where id = %s returning updated_at", (PRODUCT,))
    assert after > before


def test_a_trigger_on_a_table_without_the_canonical_trigger_is_re_pointed_not_dropped(make_db, tmp_path):
    db = make_db("legacy@3")
    db.execute("drop trigger update_inventory_updated_at on public.inventory;"
               + FUNCTION_CONFLICT.replace("products", "inventory"))
    [fix] = diagnose(db, tmp_path)["function_conflicts"].fixes
    assert fix.sql.splitlines()[0] == ("create or replace trigger update_inventory_updated_at before update on "
                                       "public.inventory for each row execute function public.update_updated_at_column();")
    db.execute(fix.sql)
    assert db.query("""select tgname, tgfoid::regproc::text from pg_trigger
                       where tgrelid = 'public.inventory'::regclass and tgname like '%updated_at%'""") == [
        ("update_inventory_updated_at", "update_updated_at_column")]


def test_the_canonical_function_in_a_legacy_shape_is_replaced_by_phase_1s_own_definition(make_db, tmp_path):
    db = make_db("legacy@3")
    db.execute("alter function public.update_updated_at_column() security definer")
    [fix] = diagnose(db, tmp_path)["function_conflicts"].fixes
    assert fix.sql == troubleshooting.canonical_definition()
    assert fix.sql.startswith("create or replace function public.update_updated_at_column()\nreturns trigger")
    definition, revoke = fix.sql.split("\nrevoke ")
    phase1 = PHASES[0][1].read_text()
    assert definition.endswith("end;\n$$;") and definition in phase1 and f"revoke {revoke}" in phase1
    db.execute(fix.sql)
    assert diagnose(db, tmp_path)["function_conflicts"].status == "ok"


def test_an_overload_a_policy_depends_on_is_left_to_phase_1_and_a_table_named_twice_to_the_dba(make_db, tmp_path):
    db = make_db("legacy")        # the legacy fixture, not migrated: overloads with policies on them
    db.execute("create table app.api_keys (id bigserial primary key, key text)")
    found = diagnose(db, tmp_path)
    overload = next(f for f in found["function_conflicts"].fixes if f.key == "public.is_org_member(uuid)")
    assert overload.sql is None and "-p reapply true" in overload.command
    assert "policy Members can view products on table products" in overload.summary
    twice = next(r for r in found["table_conflicts"].rows if r["table"] == "app.api_keys")
    assert "has the name of public.api_keys" in twice["problem"]
    assert all(f.sql is None for f in found["table_conflicts"].fixes)


def test_a_failing_fix_rolls_back_every_transactional_fix_before_it(make_db, tmp_path):
    db = make_db("legacy@3")
    run = make_run(db, tmp_path)
    fixes = [troubleshooting.Fix("permissions", "a", "revoke", "revoke select on public.products from authenticated;"),
             troubleshooting.Fix("permissions", "b", "fails", "grant select on table public.no_such_table to authenticated;")]
    try:
        outcome = troubleshooting.apply_fixes(run, fixes, apply=True)
    finally:
        run.close()
    assert outcome.status == "error" and "rolled back" in outcome.summary
    assert [r["status"] for r in outcome.rows][0] == "rolled back"
    assert outcome.rows[1]["status"].startswith("FAILED: relation \"public.no_such_table\" does not exist")
    assert db.query("select has_table_privilege('authenticated', 'public.products', 'select')") == [(True,)]


@pytest.mark.slow
def test_troubleshooting_finds_the_four_issues_and_changes_nothing_by_default(make_db, tmp_path):
    db = make_db("legacy@3")
    give_the_four_issues(db)
    conn = db.connect(autocommit=True)
    before = snapshot.take_snapshot(conn)

    outcome = runner.run_plan("troubleshoot", ("troubleshooting",), db.target, records_root=tmp_path / "records",
                              progress=lambda *_: None)

    assert outcome.verdict == "passed", outcome.notebooks
    checks = checks_of(outcome)
    for name in ("function_conflicts", "table_conflicts", "permission_problems", "foreign_keys_without_index",
                 "seq_scan_heavy_tables"):
        assert checks[name]["status"] == "warning", (name, checks[name])
    assert checks["apply_fixes"]["status"] == "info" and "nothing was changed" in checks["apply_fixes"]["summary"]
    text = notebook_text(executed_notebook(outcome))
    for shown in ("drop trigger touch_products_updated_at on public.products;",
                  "drop function public.touch_updated_at();",
                  f"runbook deploy --service {db.name} -p reapply true",
                  "grant select on table public.products to authenticated;",
                  "grant execute on function private.member_org_ids() to authenticated;",
                  "create index concurrently if not exists order_lines_product_id_idx on public.order_lines (product_id);"):
        assert shown in text, shown
    assert (outcome.record.path / outcome.notebooks[0]["html"]).is_file()

    after = snapshot.take_snapshot(conn)
    conn.close()
    comparison = snapshot.compare_snapshots(before, after)
    assert comparison.identical, comparison.problems()


@pytest.mark.slow
def test_with_apply_fixes_the_sql_fixes_take_and_re_running_phase_2_fixes_the_table_shape(make_db, tmp_path):
    db = make_db("legacy@3")
    give_the_four_issues(db)

    outcome = runner.run_plan("troubleshoot", ("troubleshooting",), db.target, records_root=tmp_path / "records",
                              parameters={"apply_fixes": True}, progress=lambda *_: None)

    assert outcome.verdict == "passed", outcome.notebooks
    checks = checks_of(outcome)
    assert checks["apply_fixes"]["status"] == "ok", checks["apply_fixes"]
    assert checks["fixes_verified"]["status"] in ("ok", "warning"), checks["fixes_verified"]
    # 1. the duplicate and its trigger are gone; products keeps the one updated-at trigger
    assert db.query("select to_regprocedure('public.touch_updated_at()')") == [(None,)]
    assert db.query("""select tgname from pg_trigger where tgrelid = 'public.products'::regclass
                       and tgfoid = 'public.update_updated_at_column()'::regprocedure""") == [("update_products_updated_at",)]
    # 3. the least grants are back
    assert db.query("""select has_table_privilege('authenticated', 'public.products', 'select'),
                              has_function_privilege('authenticated', 'private.member_org_ids()', 'execute'),
                              has_table_privilege('authenticated', 'public.products', 'truncate')""") == [(True, True, False)]
    # 4. the index exists and is valid
    assert db.query("""select i.indisvalid from pg_index i
                       where i.indexrelid = to_regclass('public.order_lines_product_id_idx')""") == [(True,)]
    # 2. the table shape is not changed from here: the fix is phase 2, which the shown command re-runs
    found = diagnose(db, tmp_path)
    assert found["table_conflicts"].status == "warning"
    assert all(found[n].status == "ok" for n in ("function_conflicts", "permission_problems",
                                                  "foreign_keys_without_index"))
    # (force: the phase file may have been edited since this test applied it; the shape fix is the same)
    engine.ApplyEngine(db.target, run_id="test-reapply", operator="test").apply("001", dict(PHASES)["001"],
                                                                               reapply=True, force=True)
    assert diagnose(db, tmp_path)["table_conflicts"].status == "ok"
