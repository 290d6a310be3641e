"""Supabase's database advisors, as catalog queries, on every end state the phases reach.

Each lint runs on an empty Supabase-like database, the legacy fixture and the variant fixture, each
after the three phases. A lint returns the offending objects; none may be found.
"""

from __future__ import annotations

import pytest

from runbooks import verification

from sqlhelpers import CONTRACT_TABLES

pytestmark = pytest.mark.both_versions   # the rules read the catalogs and privileges (MAINTAIN exists from 17)

BASES = ("empty", "legacy", "variant")

# functions the API roles may execute (everything else in public and private is for the DBA and service_role)
CLIENT_FUNCTIONS = {
    "authenticated": {
        "public.export_user_data(uuid)",        # a user's own data
        "public.validate_sku(text)",            # the table rules call them as the writer
        "public.validate_org_slug(text)",
        "private.export_user_data(uuid)",       # what public.export_user_data() calls (checks its caller again)
        "private.member_org_ids()",             # what the policies call (the caller's own answer)
        "private.admin_org_ids()",
        "private.owner_org_ids()",
        "private.colleague_ids()",
    },
    "anon": set(),
}

LINTS = {
    "rls_disabled_in_public": """
        select c.relname from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and not c.relrowsecurity""",
    "auth_rls_initplan": r"""
        select tablename || '.' || policyname from pg_policies
         where schemaname = 'public'
           and regexp_replace(coalesce(qual, '') || ' ' || coalesce(with_check, ''),
                              '\( SELECT auth\.(uid|jwt|role|email)\(\) AS (uid|jwt|role|email)\)', '', 'g')
               ~ 'auth\.(uid|jwt|role|email)\(\)'""",
    "unindexed_foreign_keys": """
        select c.conrelid::regclass::text || ' ' || c.conname from pg_constraint c
         where c.contype = 'f' and c.connamespace = 'public'::regnamespace
           and not exists (
             select 1 from pg_index i
              where i.indrelid = c.conrelid and i.indisvalid
                and (select array_agg(k order by k) from unnest((i.indkey::int2[])[0:cardinality(c.conkey) - 1]) as k)
                    = (select array_agg(k order by k) from unnest(c.conkey) as k))""",
    "duplicate_index": """
        select string_agg(i.indexrelid::regclass::text, ' = ' order by i.indexrelid::regclass::text)
          from pg_index i join pg_class c on c.oid = i.indrelid
         where c.relnamespace = 'public'::regnamespace
         group by i.indrelid, i.indkey::text, i.indclass::text, i.indcollation::text, i.indoption::text,
                  coalesce(pg_get_expr(i.indexprs, i.indrelid), ''), coalesce(pg_get_expr(i.indpred, i.indrelid), '')
        having count(*) > 1""",
    "policy_always_true": """
        select tablename || '.' || policyname from pg_policies
         where schemaname = 'public' and (qual = 'true' or with_check = 'true')""",
    "multiple_permissive_policies": """
        select format('%s %s %s: %s', p.tablename, r.role, a.action, string_agg(p.policyname, ', '))
          from pg_policies p
          cross join lateral unnest(case when p.roles = '{public}' then array['anon', 'authenticated', 'service_role']::name[]
                                         else p.roles end) as r (role)
          cross join lateral unnest(case when p.cmd = 'ALL' then array['SELECT', 'INSERT', 'UPDATE', 'DELETE']
                                         else array[p.cmd] end) as a (action)
         where p.schemaname = 'public' and p.permissive = 'PERMISSIVE'
         group by p.tablename, r.role, a.action having count(*) > 1""",
    "no_primary_key": """
        select c.relname from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
           and not exists (select 1 from pg_constraint k where k.conrelid = c.oid and k.contype = 'p')""",
    "function_search_path_mutable": """
        select p.oid::regprocedure::text from pg_proc p
         where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace)
           and not exists (select 1 from pg_depend d where d.objid = p.oid and d.deptype = 'e')
           and not exists (select 1 from unnest(p.proconfig) as c where c like 'search_path=%')""",
    "security_definer_search_path_not_empty": """
        select p.oid::regprocedure::text from pg_proc p
         where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace) and p.prosecdef
           and not 'search_path=""' = any (coalesce(p.proconfig, '{}'))""",
    "security_definer_function_executable_by_api_users": """
        select p.oid::regprocedure::text from pg_proc p
         where p.pronamespace = 'public'::regnamespace and p.prosecdef
           and (has_function_privilege('anon', p.oid, 'execute') or has_function_privilege('authenticated', p.oid, 'execute'))""",
    "anon_table_privileges": """
        select c.relname from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p') and c.relname = any(%(tables)s)
           and has_table_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')""",
    "api_role_may_truncate": """
        select c.relname || ' ' || r from pg_class c, unnest(array['authenticated', 'service_role']) as r
         where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
           and (has_table_privilege(r, c.oid, 'TRUNCATE')
                or case when current_setting('server_version_num')::int >= 170000  -- MAINTAIN: vacuum, cluster, lock
                        then has_table_privilege(r, c.oid, 'MAINTAIN') else false end)
           and c.relname = any(%(tables)s)""",
    "rls_enabled_no_policy_but_granted": """
        select c.relname from pg_class c
         where c.relnamespace = 'public'::regnamespace and c.relrowsecurity and c.relname = any(%(tables)s)
           and not exists (select 1 from pg_policy p where p.polrelid = c.oid)
           and (has_table_privilege('authenticated', c.oid, 'SELECT, INSERT, UPDATE, DELETE')
                or has_table_privilege('anon', c.oid, 'SELECT, INSERT, UPDATE, DELETE'))""",
    "private_schema_usable_by_anon": """
        select 'private' where has_schema_privilege('anon', 'private', 'USAGE')""",
    "policy_for_anon_or_public": """
        select tablename || '.' || policyname from pg_policies
         where schemaname = 'public' and (roles && array['anon', 'public']::name[])""",
    "updated_at_without_trigger": """
        select c.relname from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attname = 'updated_at' and not a.attisdropped
         where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
           and (select count(*) from pg_trigger t
                 where t.tgrelid = c.oid and t.tgenabled = 'O' and t.tgfoid = 'public.update_updated_at_column()'::regprocedure) <> 1""",
    "other_updated_at_function": """
        select p.oid::regprocedure::text from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where p.prorettype = 'trigger'::regtype and n.nspname !~ '^pg_' and n.nspname not in ('information_schema', 'auth')
           and p.proname ~ '(updated|modified|timestamp|moddatetime)'
           and p.oid <> 'public.update_updated_at_column()'::regprocedure""",
}


def lint_query(lint: str) -> tuple[str, dict | None]:
    sql = LINTS[lint]
    return sql, ({"tables": list(CONTRACT_TABLES)} if "%(tables)s" in sql else None)


@pytest.fixture(params=BASES)
def end_state(template_db, request):
    return template_db(f"{request.param}@3")


@pytest.mark.parametrize("lint", sorted(LINTS))
def test_no_advisor_lint_finds_anything(end_state, lint):
    assert end_state.query(*lint_query(lint)) == []


def test_the_verifications_advisor_rules_find_nothing_the_deployment_answers_for(end_state):
    """Supabase's advisor rules as the verification writes them (splinter's scope: every schema but the
    platform's); an error there is a finding on the deployment's objects. What is left is someone else's."""
    conn = end_state.connect(autocommit=True)
    try:
        rows = verification.security_lints(conn).rows + verification.performance_lints(conn).rows
    finally:
        conn.close()
    assert [r for r in rows if r["object"] and r["level"] == "error"] == []
    others = {(r["lint"], r["object"]) for r in rows if r["object"]}
    # the variant's own table the contract does not know: closed by phase 2 (RLS on, no API grant), its
    # policies are its owner's to write
    assert others <= {("rls_enabled_no_policy", "warehouses"), ("anon_privileges_on_other_tables", "warehouses")}


@pytest.mark.parametrize("role", sorted(CLIENT_FUNCTIONS))
def test_functions_that_are_not_for_clients_are_not_executable_by_the_api_roles(end_state, role):
    executable = {name for (name,) in end_state.query("""
        select format('%%s.%%s(%%s)', n.nspname, p.proname,
                      (select string_agg(format_type(t, null), ',' order by k) from unnest(p.proargtypes::oid[]) with ordinality as a (t, k)))
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname in ('public', 'private') and has_function_privilege(%s, p.oid, 'execute')""", (role,))}
    assert executable == CLIENT_FUNCTIONS[role]


def test_the_guides_helpers_stay_callable_by_the_dba_and_service_role(end_state):
    helpers = ["public.get_user_organization_id(uuid)", "public.is_org_member(uuid,uuid)", "public.is_org_admin(uuid,uuid)",
               "public.verify_data_integrity()", "public.get_database_stats()", "public.apply_data_retention(boolean)",
               "public.detect_suspicious_activity(uuid,inet,uuid)", "public.log_security_event(text,text,uuid,uuid,inet,jsonb)",
               "public.check_rate_limit(text,integer,interval)", "public.export_user_data(uuid)", "public.anonymize_user(uuid)"]
    for helper in helpers:
        assert end_state.query("select has_function_privilege('service_role', %s, 'execute'), "
                               "has_function_privilege(current_user, %s, 'execute')", (helper, helper)) == [(True, True)], helper


def test_every_lint_would_find_what_it_looks_for(make_db):
    """The lints are not vacuous: break each rule once on a migrated database and watch its lint fire."""
    db = make_db("empty@3")
    breakage = {
        "rls_disabled_in_public": "alter table public.products disable row level security",
        "auth_rls_initplan": "create policy p_unwrapped on public.products for select to authenticated using (auth.uid() is not null)",
        "unindexed_foreign_keys": "drop index public.api_keys_created_by_idx",
        "duplicate_index": "create index products_sku_copy on public.products (organization_id, sku)",
        "policy_always_true": "create policy p_open on public.inventory for update to authenticated using (true)",
        "multiple_permissive_policies": "create policy p_second on public.products for select to authenticated using (false)",
        "no_primary_key": "create table public.no_pk (x int)",
        "function_search_path_mutable": "create function public.f_mutable() returns int language sql as 'select 1'",
        "security_definer_search_path_not_empty": "alter function public.anonymize_user(uuid) set search_path = public",
        "security_definer_function_executable_by_api_users": "grant execute on function public.anonymize_user(uuid) to authenticated",
        "anon_table_privileges": "grant select on public.products to anon",
        "api_role_may_truncate": "grant truncate on public.products to authenticated",
        "rls_enabled_no_policy_but_granted": "drop policy rate_limits_no_client_access on public.rate_limits; "
                                             "grant select on public.rate_limits to authenticated",
        "private_schema_usable_by_anon": "grant usage on schema private to anon",
        "policy_for_anon_or_public": "create policy p_anon on public.threat_intelligence for select to anon using (false)",
        "updated_at_without_trigger": "alter table public.products disable trigger update_products_updated_at",
        "other_updated_at_function": "create function public.touch_updated_at() returns trigger language plpgsql as "
                                     "'begin new.updated_at := now(); return new; end'",
    }
    assert set(breakage) == set(LINTS)
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            for lint, sql in breakage.items():
                cur.execute("savepoint lint")
                cur.execute(sql)
                cur.execute(*lint_query(lint))
                assert cur.fetchall(), lint
                cur.execute("rollback to savepoint lint")
        conn.rollback()
    finally:
        conn.close()
