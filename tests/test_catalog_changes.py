"""The catalog change table a phase shows: altered objects one row, grants grouped (catalog_changes).

The lines are those snapshot.CATALOG_QUERIES writes (the shapes phase 001 produces on the legacy
fixture); the end-to-end view of them is the phase notebooks' nbval regression.
"""

from __future__ import annotations

from runbooks.catalog_changes import change_rows, summary


def rows_of(kind, added=(), removed=()):
    return [(r["change"], r["object"]) for r in change_rows({kind: {"added": list(added), "removed": list(removed)}})]


def test_a_column_whose_type_default_or_nullability_changed_is_one_altered_row_with_before_and_after():
    assert rows_of("columns", added=["public.products #6 price numeric(12,2) not null default 0"],
                   removed=["public.products #6 price numeric(10,2) default 0"]) == [
        ("altered", "public.products.price: numeric(10,2) default 0 → numeric(12,2) not null default 0")]


def test_a_column_moved_up_by_a_column_dropped_before_it_says_only_that_its_position_moved():
    assert rows_of("columns", added=["public.api_keys #4 created_by uuid"],
                   removed=["public.api_keys #6 created_by uuid", "public.api_keys #4 key text"]) == [
        ("altered", "public.api_keys.created_by: uuid (position #6 → #4)"),
        ("removed", "public.api_keys #4 key text")]


def test_columns_of_the_same_name_in_two_tables_are_not_taken_for_one_another():
    assert rows_of("columns", added=["public.a #1 id uuid"], removed=["public.b #1 id bigint"]) == [
        ("added", "public.a #1 id uuid"), ("removed", "public.b #1 id bigint")]


def test_a_quoted_column_name_with_spaces_is_one_name():
    assert rows_of("columns", added=['public.t #2 "unit price" numeric not null'],
                   removed=['public.t #2 "unit price" numeric']) == [
        ("altered", 'public.t."unit price": numeric → numeric not null')]


def test_grants_are_one_row_per_object_role_and_grantor_listing_the_privileges():
    removed = [f"TABLE public.api_keys: anon {p} (granted by postgres)" for p in ("DELETE", "INSERT", "SELECT")]
    removed += ["TABLE public.api_keys: authenticated TRUNCATE (granted by postgres)",
                "TABLE public.api_keys: authenticated UPDATE WITH GRANT OPTION (granted by postgres)",
                "TABLE public.api_keys: authenticated SELECT (granted by admin)"]
    added = ["FUNCTION private.admin_org_ids(): authenticated EXECUTE (granted by postgres)"]
    assert rows_of("grants", added=added, removed=removed) == [
        ("added", "FUNCTION private.admin_org_ids(): authenticated EXECUTE (granted by postgres)"),
        ("removed", "TABLE public.api_keys: anon DELETE, INSERT, SELECT (granted by postgres)"),
        ("removed", "TABLE public.api_keys: authenticated SELECT (granted by admin)"),
        ("removed", "TABLE public.api_keys: authenticated TRUNCATE, UPDATE WITH GRANT OPTION (granted by postgres)")]


def test_default_privileges_are_grouped_as_grants_are():
    added = [f"for role postgres in schema public on r: authenticated {p} (granted by postgres)"
             for p in ("INSERT", "SELECT")]
    assert rows_of("default_privileges", added=added) == [
        ("added", "for role postgres in schema public on r: authenticated INSERT, SELECT (granted by postgres)")]


def test_a_function_whose_settings_changed_shows_only_the_settings_that_changed():
    common = "public.f() returns trigger kind=f language=plpgsql"
    assert rows_of("functions", added=[f"{common} security_definer=f config=search_path=\"\" body_md5=bbb"],
                   removed=[f"{common} security_definer=t config= body_md5=aaa"]) == [
        ("altered", 'public.f(): security_definer=t config= body_md5=aaa → security_definer=f config=search_path="" '
                    "body_md5=bbb")]


def test_a_constraint_whose_definition_changed_shows_it_whole_before_and_after():
    assert rows_of("constraints", added=["c on public.t: CHECK (role = ANY (ARRAY['a'::text])) NOT VALID"],
                   removed=["c on public.t: CHECK (role <> ''::text)"]) == [
        ("altered", "c on public.t: CHECK (role <> ''::text) → CHECK (role = ANY (ARRAY['a'::text])) NOT VALID")]


def test_row_level_security_turned_on_is_one_altered_row():
    assert rows_of("rls", added=["public.t row_level_security=t forced=f"],
                   removed=["public.t row_level_security=f forced=f"]) == [
        ("altered", "public.t: row_level_security=f → row_level_security=t")]


def test_a_trigger_redefined_under_its_name_is_altered_and_one_renamed_is_added_and_removed():
    old = "CREATE TRIGGER t_upd BEFORE INSERT OR UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.a() enabled=O"
    new = "CREATE TRIGGER t_upd BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.b() enabled=O"
    renamed = "CREATE TRIGGER t_u BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.b() enabled=O"
    assert rows_of("triggers", added=[new, renamed], removed=[old]) == [
        ("added", renamed), ("altered", f"t_upd on public.t: {old} → {new}")]


def test_a_line_of_an_unknown_shape_is_shown_as_it_is():
    assert rows_of("columns", added=["something else"], removed=["something older"]) == [
        ("added", "something else"), ("removed", "something older")]


def test_the_summary_counts_rows_by_kind_then_added_altered_removed():
    rows = change_rows({"columns": {"added": ["public.t #1 a int not null", "public.t #2 b int"],
                                    "removed": ["public.t #1 a int"]},
                        "grants": {"added": [], "removed": ["TABLE public.t: anon SELECT (granted by x)",
                                                            "TABLE public.t: anon INSERT (granted by x)"]}})
    assert summary(rows) == "1 columns added, 1 columns altered, 1 grants removed"
    assert summary([]) == "no change"
