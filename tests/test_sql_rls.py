"""Row-level security, as the API roles see it: every public table x seven callers x four actions.

Each case runs on one connection inside a savepoint that is rolled back (basejump style): the caller
becomes anon, authenticated (with request.jwt.claims naming a user) or service_role exactly as
PostgREST does it, then tries one action on rows of organization A.
"""

from __future__ import annotations

import psycopg2
import pytest

from sqlhelpers import CONTRACT_TABLES, HASH_A, ORG_A, ORG_B, PRODUCT_A2, SEED_SQL, USERS, act_as, module_cursor, savepoint

ROLES = ("anon", "viewer", "member", "admin", "owner", "other_admin", "service_role")
ACTIONS = ("select", "insert", "update", "delete")
OWNER = USERS["owner"]
SPARE = USERS["spare"]

# S, I, U, D: what each caller may do to organization A's rows (other_admin is admin of organization B)
MEMBER_DATA = {"anon": "", "viewer": "S", "member": "S", "admin": "SIUD", "owner": "SIUD", "other_admin": "",
               "service_role": "SIUD"}
ADMIN_ONLY = {"anon": "", "viewer": "", "member": "", "admin": "SIUD", "owner": "SIUD", "other_admin": "",
              "service_role": "SIUD"}
ADMIN_READ_LOG = {"anon": "", "viewer": "", "member": "", "admin": "S", "owner": "S", "other_admin": "",
                  "service_role": "SI"}
SERVICE_ONLY = {"anon": "", "viewer": "", "member": "", "admin": "", "owner": "", "other_admin": "",
                "service_role": "SIUD"}
EXPECTED = {
    # organizations are created by service_role and deleted by their owners only
    "organizations": {"anon": "", "viewer": "S", "member": "S", "admin": "SU", "owner": "SUD", "other_admin": "",
                      "service_role": "SIUD"},
    # the target is the owner's profile: colleagues read it, only its user writes it
    "profiles": {"anon": "", "viewer": "S", "member": "S", "admin": "S", "owner": "SU", "other_admin": "",
                 "service_role": "SIUD"},
    "organization_members": MEMBER_DATA,
    "products": MEMBER_DATA,
    "inventory": MEMBER_DATA,
    "audit_logs": ADMIN_READ_LOG,
    "api_keys": ADMIN_ONLY,
    "security_events": ADMIN_READ_LOG,
    "rate_limits": SERVICE_ONLY,
    "threat_intelligence": SERVICE_ONLY,
    "data_retention_policies": SERVICE_ONLY,
    "backup_verifications": SERVICE_ONLY,
}

IN_A = f"organization_id = '{ORG_A}'"
OPERATIONS = {
    "organizations": {
        "select": f"select count(*) from public.organizations where id = '{ORG_A}'",
        "insert": "insert into public.organizations (name, slug) values ('Newco', 'newco')",
        "update": f"update public.organizations set name = 'Alpha (renamed)' where id = '{ORG_A}'",
        "delete": f"delete from public.organizations where id = '{ORG_A}'"},
    "profiles": {
        "select": f"select count(*) from public.profiles where id = '{OWNER}'",
        "insert": f"insert into public.profiles (id, email) values ('{SPARE}', 'sam@spare.test')",
        "update": f"update public.profiles set full_name = 'Renamed' where id = '{OWNER}'",
        "delete": f"delete from public.profiles where id = '{OWNER}'"},
    "organization_members": {
        "select": f"select count(*) from public.organization_members where {IN_A}",
        "insert": f"insert into public.organization_members (organization_id, user_id, role) values ('{ORG_A}', '{SPARE}', 'member')",
        "update": f"update public.organization_members set role = 'member' where {IN_A} and user_id = '{USERS['viewer']}'",
        "delete": f"delete from public.organization_members where {IN_A} and user_id = '{USERS['viewer']}'"},
    "products": {
        "select": f"select count(*) from public.products where {IN_A}",
        "insert": f"insert into public.products (organization_id, sku, name, price) values ('{ORG_A}', 'ALPHA-NEW', 'New', 1)",
        "update": f"update public.products set name = 'Renamed' where {IN_A}",
        "delete": f"delete from public.products where {IN_A}"},
    "inventory": {
        "select": f"select count(*) from public.inventory where {IN_A}",
        "insert": "insert into public.inventory (organization_id, product_id, location, quantity) "
                  f"values ('{ORG_A}', '{PRODUCT_A2}', 'overflow', 5)",
        "update": f"update public.inventory set quantity = quantity + 1 where {IN_A}",
        "delete": f"delete from public.inventory where {IN_A}"},
    "audit_logs": {
        "select": f"select count(*) from public.audit_logs where {IN_A}",
        "insert": f"insert into public.audit_logs (organization_id, action, table_name) values ('{ORG_A}', 'manual.note', 'products')",
        "update": f"update public.audit_logs set action = 'edited' where {IN_A}",
        "delete": f"delete from public.audit_logs where {IN_A}"},
    "api_keys": {
        "select": f"select count(*) from public.api_keys where {IN_A}",
        "insert": "insert into public.api_keys (organization_id, name, key_prefix, key_hash) "
                  f"values ('{ORG_A}', 'New key', 'ts_new_0001', '{HASH_A.replace('a', 'd')}')",
        "update": f"update public.api_keys set name = 'Renamed' where {IN_A}",
        "delete": f"delete from public.api_keys where {IN_A}"},
    "security_events": {
        "select": f"select count(*) from public.security_events where {IN_A}",
        "insert": f"insert into public.security_events (organization_id, event_type, severity) values ('{ORG_A}', 'test', 'low')",
        "update": f"update public.security_events set severity = 'low' where {IN_A}",
        "delete": f"delete from public.security_events where {IN_A}"},
    "rate_limits": {
        "select": "select count(*) from public.rate_limits",
        "insert": "insert into public.rate_limits (key, window_start, window_length, max_requests, request_count) "
                  "values ('ip:192.0.2.1', '2024-01-01 00:00:00+00', '1 minute', 10, 1)",
        "update": "update public.rate_limits set request_count = 0",
        "delete": "delete from public.rate_limits"},
    "threat_intelligence": {
        "select": "select count(*) from public.threat_intelligence",
        "insert": "insert into public.threat_intelligence (ip_address, threat_type) values ('192.0.2.0/24', 'scanner')",
        "update": "update public.threat_intelligence set description = 'reviewed'",
        "delete": "delete from public.threat_intelligence"},
    "data_retention_policies": {
        "select": "select count(*) from public.data_retention_policies",
        "insert": "insert into public.data_retention_policies (table_name, timestamp_column, retention_period) "
                  "values ('backup_verifications', 'verified_at', '1 year')",
        "update": "update public.data_retention_policies set description = 'reviewed'",
        "delete": "delete from public.data_retention_policies"},
    "backup_verifications": {
        "select": "select count(*) from public.backup_verifications",
        "insert": "insert into public.backup_verifications (backup_label, backup_sha256, status) "
                  f"values ('manual.dump', '{'e' * 64}', 'passed')",
        "update": "update public.backup_verifications set details = '{\"reviewed\": true}'",
        "delete": "delete from public.backup_verifications"},
}

CASES = [(table, role, action) for table in EXPECTED for role in ROLES for action in ACTIONS]


@pytest.fixture(scope="module")
def cursor(server):
    """One connection on a seeded clone for the whole module; every case rolls back to a savepoint."""
    yield from module_cursor(server, "empty@3", seed=SEED_SQL)


def attempt(cur, role: str, sql: str) -> bool:
    """True when the action reached a row; False when RLS hid every row or a privilege refused it."""
    with savepoint(cur, "rls_case"):
        act_as(cur, role)
        try:
            cur.execute(sql)
        except psycopg2.errors.InsufficientPrivilege:  # no grant, an RLS check, an append-only log
            return False
        if sql.startswith("select"):
            return cur.fetchone()[0] > 0
        return cur.rowcount > 0


def test_the_matrix_covers_every_public_table_and_nothing_else(cursor):
    cursor.execute("select relname from pg_class where relnamespace = 'public'::regnamespace and relkind = 'r' order by 1")
    assert sorted(EXPECTED) == [name for (name,) in cursor.fetchall()] == sorted(CONTRACT_TABLES)


@pytest.mark.parametrize("table,role,action", CASES, ids=[f"{t}-{r}-{a}" for t, r, a in CASES])
def test_each_api_role_may_do_exactly_what_the_policies_allow(cursor, table, role, action):
    allowed = action[0].upper() in EXPECTED[table][role]
    assert attempt(cursor, role, OPERATIONS[table][action]) is allowed


@pytest.mark.parametrize("table", ["organization_members", "products", "inventory", "audit_logs", "api_keys",
                                   "security_events"])
def test_an_admin_sees_their_own_organization_and_nothing_of_another(cursor, table):
    with savepoint(cursor):
        act_as(cursor, "other_admin")
        cursor.execute(f"select organization_id::text, count(*) from public.{table} group by 1 order by 1")
        assert [org for org, _ in cursor.fetchall()] == [ORG_B]


def test_a_member_of_two_organizations_reads_both_and_writes_neither(cursor):
    with savepoint(cursor):
        act_as(cursor, "member")  # member of A, viewer of B
        cursor.execute("select count(distinct organization_id) from public.products")
        assert cursor.fetchone()[0] == 2
        cursor.execute("update public.products set name = name")
        assert cursor.rowcount == 0


def test_a_user_reads_the_profiles_of_colleagues_only(cursor):
    with savepoint(cursor):
        act_as(cursor, "other_admin")
        cursor.execute("select email from public.profiles order by email")
        assert [e for (e,) in cursor.fetchall()] == ["bea@b.test", "bo@b.test", "mia@a.test"]


def test_a_user_without_a_profile_creates_their_own_and_no_one_elses(cursor):
    with savepoint(cursor):
        act_as(cursor, "spare")
        cursor.execute(f"insert into public.profiles (id, email) values ('{SPARE}', 'sam@spare.test')")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="row-level security"):
            cursor.execute(f"insert into public.profiles (id) values ('{USERS['viewer']}')")


def test_an_authenticated_user_without_claims_sees_nothing(cursor):
    with savepoint(cursor):
        cursor.execute("set local role authenticated")
        for table in ("organizations", "products", "organization_members", "profiles"):
            cursor.execute(f"select count(*) from public.{table}")
            assert cursor.fetchone()[0] == 0, table


def test_no_api_role_may_truncate_a_table(cursor):
    for role in ("anon", "admin", "service_role"):
        for table in ("products", "audit_logs", "security_events", "rate_limits"):
            with savepoint(cursor):
                act_as(cursor, role)
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cursor.execute(f"truncate public.{table}")


def test_the_audit_trail_is_append_only_even_for_service_role_but_not_for_its_owner(cursor):
    for role in ("admin", "service_role"):
        with savepoint(cursor):
            act_as(cursor, role)
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cursor.execute("delete from public.audit_logs")
    with savepoint(cursor):
        cursor.execute("create role rls_test_writer bypassrls")
        cursor.execute("grant update, delete on public.audit_logs to rls_test_writer")
        cursor.execute("set local role rls_test_writer")
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="audit_logs is append-only"):
            cursor.execute("update public.audit_logs set action = 'rewritten'")
    with savepoint(cursor):
        cursor.execute("delete from public.audit_logs where organization_id = %s", (ORG_B,))
        assert cursor.rowcount > 0


# -- the helpers the policies call -----------------------------------------------------------------------------

HELPERS = ("member_org_ids", "admin_org_ids", "owner_org_ids", "colleague_ids")


def helper_answer(cur, who: str, helper: str) -> set[str]:
    with savepoint(cur, "helper"):
        act_as(cur, who)
        cur.execute(f"select unnest(private.{helper}())")
        return {str(value) for (value,) in cur.fetchall()}


def test_the_policy_helpers_answer_for_the_caller_and_nobody_else(cursor):
    assert helper_answer(cursor, "member", "member_org_ids") == {ORG_A, ORG_B}
    assert helper_answer(cursor, "viewer", "member_org_ids") == {ORG_A}
    assert helper_answer(cursor, "other_admin", "admin_org_ids") == {ORG_B}
    assert helper_answer(cursor, "owner", "owner_org_ids") == {ORG_A}
    assert helper_answer(cursor, "viewer", "colleague_ids") == {USERS[w] for w in ("owner", "admin", "member", "viewer")}
    assert helper_answer(cursor, "spare", "member_org_ids") == set()
    # service_role has no user of its own: the helpers tell it nothing (it bypasses RLS anyway)
    assert helper_answer(cursor, "service_role", "colleague_ids") == set()


@pytest.mark.parametrize("helper", HELPERS)
def test_asking_a_policy_helper_about_another_user_is_refused(cursor, helper):
    with savepoint(cursor):
        act_as(cursor, "viewer")
        with pytest.raises(psycopg2.errors.UndefinedFunction):
            cursor.execute(f"select * from private.{helper}(%s::uuid)", (USERS["other_admin"],))


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def helper_scans(cur, sql: str) -> list[tuple[str, int]]:
    """(helper, loops) of every plan node that calls a private helper (a function scan, or the ProjectSet of
    the hashed SubPlan or InitPlan that `in (select private.helper())` becomes) in the executed plan of sql."""
    cur.execute("explain (analyze, verbose, costs off, format json) " + sql)
    [[document]] = cur.fetchall()
    found = []
    for node in plan_nodes(document[0]["Plan"]):
        called = " ".join(node.get("Output", [])) + " " + node.get("Function Call", "")
        found += [(helper, node["Actual Loops"]) for helper in HELPERS if f"private.{helper}()" in called]
    return found


def helper_calls(cur, helper: str) -> int:
    cur.execute("select coalesce(pg_stat_get_xact_function_calls(%s::regprocedure), 0)", (f"private.{helper}()",))
    return cur.fetchone()[0]


@pytest.mark.parametrize("who,helper,sql", [
    ("member", "member_org_ids", "select * from public.products"),
    ("admin", "admin_org_ids", f"update public.products set name = name where organization_id = '{ORG_A}'"),
    ("viewer", "colleague_ids", "select * from public.profiles"),
], ids=["select", "update", "profiles"])
def test_the_policies_run_each_helper_once_per_query_however_many_rows_it_reads(cursor, who, helper, sql):
    with savepoint(cursor):
        cursor.execute(f"""insert into public.products (organization_id, sku, name, price)
                           select '{ORG_A}', 'BULK-' || g, 'Bulk ' || g, 1 from generate_series(1, 300) g""")
        cursor.execute("analyze public.products")
        cursor.execute("set local track_functions = 'all'")
        act_as(cursor, who)
        scans = helper_scans(cursor, sql)
        assert scans and {loops for _, loops in scans} == {1}, scans
        before = helper_calls(cursor, helper)
        cursor.execute(sql)
        assert helper_calls(cursor, helper) - before == len([s for s in scans if s[0] == helper]), scans
