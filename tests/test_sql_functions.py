"""The contract's functions, positive and negative, and every validation rule on insert and update.

Tests share one connection per database (seeded, and the converged legacy fixture) and roll back
to a savepoint after each; the caller is the DBA (the tables' owner) unless a test acts as an API role.
"""

from __future__ import annotations

import json
import uuid

import psycopg2
import pytest

from sqlhelpers import (HASH_A, INVENTORY_A1, KEY_A, ORG_A, ORG_B, PHASE_FILES, PRODUCT_A1, PRODUCT_A2, PRODUCT_B1,
                        SEED_SQL, USERS, act_as, apply_psql, error_of, module_cursor, psql_error, savepoint)

OTHER = str(uuid.UUID(int=42))


@pytest.fixture(scope="module")
def seeded(server):
    yield from module_cursor(server, "empty@3", seed=SEED_SQL)


@pytest.fixture(scope="module")
def legacy(server):
    yield from module_cursor(server, "legacy@3")


@pytest.fixture
def cur(seeded):
    with savepoint(seeded, "test"):
        yield seeded


def one(cur, sql, params=None):
    cur.execute(sql, params)
    return cur.fetchone()


def rows(cur, sql, params=None):
    cur.execute(sql, params)
    return cur.fetchall()


# -- update_updated_at_column and the guide's helpers -------------------------------------------------

@pytest.mark.parametrize("who", [None, "admin"])
def test_updating_a_row_moves_updated_at_and_leaves_created_at(cur, who):
    created, updated = one(cur, "select created_at, updated_at from public.products where id = %s", (PRODUCT_A1,))
    if who:
        act_as(cur, who)
    cur.execute("update public.products set name = 'Anvil, heavy' where id = %s", (PRODUCT_A1,))
    assert cur.rowcount == 1
    assert one(cur, "select created_at, updated_at > %s from public.products where id = %s", (updated, PRODUCT_A1)) == (created, True)


def test_update_updated_at_column_cannot_be_called_directly(cur):
    exc = error_of(cur, "select public.update_updated_at_column()")
    assert exc is not None and "trigger functions can only be called as triggers" in str(exc)


@pytest.mark.parametrize("user,expected", [
    ("owner", ORG_A),          # profiles.organization_id
    ("member", ORG_A),         # no profile organization: the earliest membership (A, before B)
    ("other_admin", ORG_B),
    ("spare", None),           # no profile, no membership
])
def test_get_user_organization_id_reads_the_profile_then_the_earliest_membership(cur, user, expected):
    assert one(cur, "select public.get_user_organization_id(%s)::text", (USERS[user],)) == (expected,)


def test_get_user_organization_id_of_an_unknown_or_null_user_is_null(cur):
    assert one(cur, "select public.get_user_organization_id(%s), public.get_user_organization_id(null)", (OTHER,)) == (None, None)


@pytest.mark.parametrize("user,org,member,admin", [
    ("owner", ORG_A, True, True), ("admin", ORG_A, True, True), ("member", ORG_A, True, False),
    ("viewer", ORG_A, True, False), ("other_admin", ORG_A, False, False), ("other_admin", ORG_B, True, True),
    ("member", ORG_B, True, False), ("spare", ORG_A, False, False),
])
def test_is_org_member_and_is_org_admin_follow_the_roles(cur, user, org, member, admin):
    assert one(cur, "select public.is_org_member(%s, %s), public.is_org_admin(%s, %s)",
               (USERS[user], org, USERS[user], org)) == (member, admin)


def test_is_org_member_and_is_org_admin_are_false_for_nulls(cur):
    assert one(cur, "select public.is_org_member(null, %s), public.is_org_admin(%s, null)", (ORG_A, USERS["owner"])) == (
        False, False)


def test_the_guides_helpers_are_for_the_dba_and_service_role_not_for_api_users(cur):
    for who, allowed in (("service_role", True), ("admin", False), ("anon", False)):
        exc = error_of(cur, "select public.is_org_admin(%s, %s), public.get_user_organization_id(%s)",
                       (USERS["admin"], ORG_A, USERS["admin"]), who=who)
        assert (exc is None) is allowed, who


@pytest.mark.parametrize("sku,valid", [
    ("ABC", True), ("WID-001", True), ("A_B-9", True), ("9LIVES", True), ("X" * 64, True),
    ("AB", False), ("X" * 65, False), ("wid-001", False), ("-ABC", False), ("_ABC", False), ("AB C", False),
    ("ABC!", False), ("", False), (None, False),
])
def test_validate_sku(cur, sku, valid):
    assert one(cur, "select public.validate_sku(%s)", (sku,)) == (valid,)


@pytest.mark.parametrize("slug,valid", [
    ("acme", True), ("a1b", True), ("acme-corp", True), ("a-b-c", True), ("x" * 63, True),
    ("ab", False), ("x" * 64, False), ("Acme", False), ("acme--corp", False), ("-acme", False), ("acme-", False),
    ("acme_corp", False), ("acme corp", False), ("", False), (None, False),
])
def test_validate_org_slug(cur, slug, valid):
    assert one(cur, "select public.validate_org_slug(%s)", (slug,)) == (valid,)


# -- security ---------------------------------------------------------------------------------------

def test_log_security_event_stores_the_event_and_returns_its_id(cur):
    (event_id,) = one(cur, "select public.log_security_event('mfa_disabled', 'high', %s, %s, '192.0.2.9', '{\"by\": \"admin\"}')",
                      (ORG_A, USERS["admin"]))
    assert uuid.UUID(event_id)
    assert one(cur, "select event_type, severity, organization_id::text, host(ip_address), details from public.security_events "
                    "where id = %s", (event_id,)) == ("mfa_disabled", "high", ORG_A, "192.0.2.9", {"by": "admin"})


def test_log_security_event_refuses_an_unknown_severity_and_a_missing_type(cur):
    exc = error_of(cur, "select public.log_security_event('x', 'urgent', null, null, null, null)")
    assert exc.diag.constraint_name == "security_events_severity_check"
    assert isinstance(error_of(cur, "select public.log_security_event(null, 'low', null, null, null, null)"),
                      psycopg2.errors.NotNullViolation)


def test_check_rate_limit_is_true_while_under_the_limit_and_counts_every_call(cur):
    results = [one(cur, "select public.check_rate_limit('user:abc/login', 3, '1 minute')")[0] for _ in range(5)]
    assert results == [True, True, True, False, False]
    assert one(cur, "select request_count, max_requests from public.rate_limits where key = 'user:abc/login'") == (5, 3)
    assert one(cur, "select public.check_rate_limit('user:other', 3, '1 minute')") == (True,)


@pytest.mark.parametrize("args", ["'', 3, '1 minute'", "null, 3, '1 minute'", "'k', 0, '1 minute'", "'k', null, '1 minute'",
                                  "'k', 3, '0 seconds'", "'k', 3, '-1 minute'", "'k', 3, '1 month'", "'k', 3, null"])
def test_check_rate_limit_refuses_bad_arguments(cur, args):
    assert isinstance(error_of(cur, f"select public.check_rate_limit({args})"), psycopg2.errors.InvalidParameterValue)


def test_a_clean_address_is_not_suspicious_and_nothing_is_logged(cur):
    before = one(cur, "select count(*) from public.security_events")[0]
    assert one(cur, "select * from public.detect_suspicious_activity(%s, '192.0.2.200', %s)", (ORG_A, USERS["viewer"])) == (
        False, 0, [])
    assert one(cur, "select count(*) from public.security_events")[0] == before


def test_an_address_in_a_listed_network_is_suspicious_and_logged(cur):
    suspicious, score, reasons = one(cur, "select * from public.detect_suspicious_activity(%s, '203.0.113.77', null)", (ORG_A,))
    assert (suspicious, score) == (True, 50)
    assert reasons == ["address 203.0.113.77 is listed in threat intelligence (botnet, high)"]
    assert one(cur, "select severity, details->>'risk_score', host(ip_address) from public.security_events "
                    "where event_type = 'suspicious_activity'") == ("high", "50", "203.0.113.77")


def test_failures_and_rate_limit_hits_add_up_to_suspicious(cur):
    for _ in range(5):
        cur.execute("select public.log_security_event('login_failed', 'medium', %s, null, '198.51.100.77', null)", (ORG_A,))
    assert one(cur, "select is_suspicious, risk_score from public.detect_suspicious_activity(%s, '198.51.100.77', null)",
               (ORG_A,)) == (False, 20)
    for key in ("ip:198.51.100.77", "ip:198.51.100.77/login"):
        for _ in range(3):
            cur.execute("select public.check_rate_limit(%s, 2, '1 minute')", (key,))
    suspicious, score, reasons = one(cur, "select * from public.detect_suspicious_activity(%s, '198.51.100.77', null)", (ORG_A,))
    assert (suspicious, score) == (True, 50)
    assert reasons == ["5 failed or denied attempts in the last hour", "2 rate limit(s) exceeded in the last hour"]


def test_a_user_seen_from_many_addresses_with_serious_events_scores_higher(cur):
    for n in range(4):
        cur.execute("select public.log_security_event('token_reuse', 'critical', %s, %s, %s, null)",
                    (ORG_A, USERS["viewer"], f"192.0.2.{n + 1}"))
    suspicious, score, reasons = one(cur, "select * from public.detect_suspicious_activity(%s, null, %s)", (ORG_A, USERS["viewer"]))
    assert (suspicious, score) == (False, 45)
    assert reasons == ["4 high or critical security event(s) in the last hour", "4 different addresses for the user in the last hour"]


def test_the_security_functions_are_not_for_api_users(cur):
    for sql in ("select public.check_rate_limit('k', 1, '1 minute')",
                "select * from public.detect_suspicious_activity(null, '192.0.2.1', null)",
                "select public.log_security_event('x', 'low', null, null, null, null)"):
        assert isinstance(error_of(cur, sql, who="admin"), psycopg2.errors.InsufficientPrivilege)
        assert error_of(cur, sql, who="service_role") is None


# -- monitoring ------------------------------------------------------------------------------------

def test_get_database_stats_has_one_row_per_public_table_with_exact_counts(cur):
    stats = {r[0]: r for r in rows(cur, "select * from public.get_database_stats()")}
    tables = [t for (t,) in rows(cur, "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind = 'r'")]
    assert sorted(stats) == sorted(tables)
    for table in tables:
        assert stats[table][1] == one(cur, f"select count(*) from public.{table}")[0]
    assert stats["products"][2] > stats["products"][3] > 0


def test_verify_data_integrity_is_all_ok_on_a_clean_database(cur):
    report = rows(cur, "select check_name, status, affected_rows from public.verify_data_integrity()")
    assert len(report) == 24
    assert [r for r in report if r[1] != "ok" or r[2] != 0] == []


def test_verify_data_integrity_reports_errors_the_phases_should_have_prevented(cur):
    cur.execute("alter table public.products disable row level security")
    cur.execute("alter table public.inventory disable trigger update_inventory_updated_at")
    report = {r[0]: r[1:] for r in rows(cur, "select * from public.verify_data_integrity()")}
    assert report["rls_disabled"][:2] == ("error", 1) and "products" in report["rls_disabled"][2]
    assert report["updated_at_triggers_missing"][:2] == ("error", 1) and "inventory" in report["updated_at_triggers_missing"][2]


def test_verify_data_integrity_reports_rows_written_around_the_guards(cur):
    cur.execute("alter table public.inventory disable trigger validate_inventory_product")
    cur.execute("insert into public.inventory (organization_id, product_id, location) values (%s, %s, 'stray')", (ORG_A, PRODUCT_B1))
    cur.execute("alter table public.inventory enable trigger validate_inventory_product")
    report = {r[0]: r[1:] for r in rows(cur, "select * from public.verify_data_integrity()")}
    assert report["inventory_organization_mismatch"][:2] == ("warning", 1)
    # the guard checks only what it guards: the stray row's other columns may still change
    cur.execute("update public.inventory set quantity = 3 where location = 'stray'")
    assert cur.rowcount == 1


def test_the_monitoring_functions_are_for_the_dba_and_service_role(cur):
    for sql in ("select * from public.get_database_stats()", "select * from public.verify_data_integrity()"):
        assert error_of(cur, sql, who="service_role") is None
        assert isinstance(error_of(cur, sql, who="owner"), psycopg2.errors.InsufficientPrivilege)


# -- retention -------------------------------------------------------------------------------------

def _old_rows(cur):
    cur.execute("insert into public.security_events (event_type, severity, created_at) values ('ancient', 'low', '2000-01-01')")
    cur.execute("insert into public.audit_logs (action, created_at) values ('ancient', '2000-01-01')")


def test_apply_data_retention_by_default_only_counts(cur):
    _old_rows(cur)
    before = one(cur, "select (select count(*) from public.security_events), (select count(*) from public.audit_logs), "
                      "(select count(*) from public.rate_limits)")
    assert dict(rows(cur, "select * from public.apply_data_retention()")) == {
        "audit_logs": 1, "rate_limits": 1, "security_events": 1, "threat_intelligence": 0}
    assert one(cur, "select (select count(*) from public.security_events), (select count(*) from public.audit_logs), "
                    "(select count(*) from public.rate_limits)") == before


def test_apply_data_retention_deletes_only_expired_rows_of_enabled_policies_and_records_the_run(cur):
    _old_rows(cur)
    cur.execute("update public.data_retention_policies set is_enabled = false where table_name = 'rate_limits'")
    assert dict(rows(cur, "select * from public.apply_data_retention(false)")) == {
        "audit_logs": 1, "security_events": 1, "threat_intelligence": 0}
    assert one(cur, "select count(*) from public.security_events where event_type = 'ancient'") == (0,)
    assert one(cur, "select count(*) from public.rate_limits") == (1,)
    assert rows(cur, "select table_name, new_data->>'rows_deleted' from public.audit_logs "
                     "where action = 'data_retention.applied' order by 1") == [
        ("audit_logs", "1"), ("security_events", "1"), ("threat_intelligence", "0")]
    assert dict(rows(cur, "select * from public.apply_data_retention()")) == {
        "audit_logs": 0, "security_events": 0, "threat_intelligence": 0}


def test_apply_data_retention_refuses_a_null_mode_and_api_users(cur):
    assert isinstance(error_of(cur, "select * from public.apply_data_retention(null)"), psycopg2.errors.InvalidParameterValue)
    assert isinstance(error_of(cur, "select * from public.apply_data_retention()", who="owner"),
                      psycopg2.errors.InsufficientPrivilege)


# -- compliance ------------------------------------------------------------------------------------

def test_a_user_exports_their_own_data(cur):
    act_as(cur, "member")
    (data,) = one(cur, "select public.export_user_data(%s)", (USERS["member"],))
    assert set(data) == {"user_id", "exported_at", "account", "profile", "memberships", "api_keys_created", "audit_logs",
                         "security_events"}
    assert data["account"]["email"] == "mia@a.test" and data["profile"]["full_name"] == "Mia Member"
    assert sorted(m["role"] for m in data["memberships"]) == ["member", "viewer"]
    assert [e["event_type"] for e in data["security_events"]] == ["login_failed"]
    assert sorted(a["table_name"] for a in data["audit_logs"]) == ["organization_members", "organization_members"]


def test_an_export_never_contains_a_key_hash(cur):
    (data,) = one(cur, "select public.export_user_data(%s)", (USERS["admin"],))
    assert [k["name"] for k in data["api_keys_created"]] == ["Alpha CI"]
    assert HASH_A not in json.dumps(data)


@pytest.mark.parametrize("who", ["viewer", "owner", "anon"])
def test_no_api_user_exports_someone_elses_data(cur, who):
    exc = error_of(cur, "select public.export_user_data(%s)", (USERS["member"],), who=who)
    assert isinstance(exc, psycopg2.errors.InsufficientPrivilege)


def test_the_private_export_body_checks_its_caller_as_well(cur):
    exc = error_of(cur, "select private.export_user_data(%s)", (USERS["member"],), who="viewer")
    assert isinstance(exc, psycopg2.errors.InsufficientPrivilege) and "only their own data" in str(exc)


@pytest.mark.parametrize("who", ["service_role", None])
def test_service_role_and_the_dba_export_anyone(cur, who):
    if who:
        act_as(cur, who)
    (data,) = one(cur, "select public.export_user_data(%s)", (USERS["viewer"],))
    assert data["profile"]["email"] == "vic@a.test"


def _mentions(cur, needle):
    return one(cur, """select (select count(*) from public.audit_logs a where strpos(a::text, %(n)s) > 0)
                            + (select count(*) from public.security_events e where strpos(e::text, %(n)s) > 0)""", {"n": needle})[0]


def test_anonymize_user_erases_personal_data_and_keeps_the_audit_rows_pseudonymised(cur):
    member = USERS["member"]
    audit_before = one(cur, "select count(*) from public.audit_logs")[0]
    assert _mentions(cur, member) > 0
    cur.execute("select public.anonymize_user(%s)", (member,))
    email, full_name = one(cur, "select email, full_name from public.profiles where id = %s", (member,))
    assert email.startswith("anonymized-") and email.endswith("@anonymized.invalid") and full_name is None
    assert one(cur, "select email = %s, raw_user_meta_data from auth.users where id = %s", (email, member)) == (True, {})
    assert one(cur, "select count(*) from public.organization_members where user_id = %s", (member,)) == (0,)
    # two memberships ended (audited) and the erasure itself is recorded: every earlier row is still there
    assert one(cur, "select count(*) from public.audit_logs")[0] == audit_before + 3
    assert _mentions(cur, member) == 0 and _mentions(cur, "mia@a.test") == 0 and _mentions(cur, "Mia Member") == 0
    (pseudonym,) = one(cur, "select record_id::text from public.audit_logs where action = 'user.anonymized'")
    assert _mentions(cur, pseudonym) >= 4
    assert one(cur, "select user_id::text, ip_address from public.security_events where event_type = 'login_failed' "
                    "and organization_id = %s", (ORG_A,)) == (pseudonym, None)


def test_anonymize_user_refuses_an_unknown_user_and_api_users(cur):
    assert isinstance(error_of(cur, "select public.anonymize_user(%s)", (OTHER,)), psycopg2.errors.NoDataFound)
    assert isinstance(error_of(cur, "select public.anonymize_user(null)"), psycopg2.errors.InvalidParameterValue)
    assert isinstance(error_of(cur, "select public.anonymize_user(%s)", (USERS["member"],), who="owner"),
                      psycopg2.errors.InsufficientPrivilege)
    assert error_of(cur, "select public.anonymize_user(%s)", (USERS["member"],), who="service_role") is None


def test_legacy_rows_that_break_rules_do_not_block_anonymising_their_users(legacy):
    with savepoint(legacy):
        for user in ("0b000000-0000-4000-8000-000000000001", "0b000000-0000-4000-8000-000000000006",
                     "0b000000-0000-4000-8000-000000000008"):
            legacy.execute("select public.anonymize_user(%s)", (user,))
        assert one(legacy, "select count(*) from public.profiles where email like 'anonymized-%%'") == (3,)
        assert _mentions(legacy, "alice@acme.test") == 0 and _mentions(legacy, "0b000000-0000-4000-8000-000000000001") == 0


def test_the_legacy_integrity_report_has_warnings_and_no_error(legacy):
    statuses = {status for _, status, _, _ in rows(legacy, "select * from public.verify_data_integrity()")}
    assert statuses == {"ok", "warning"}


# -- every validation rule: refused on insert and on update, naming itself ----------------------------

NEW_USER = str(uuid.UUID(int=7))
RULES = [
    # (rule, as whom (None: the DBA), a breaking insert, a breaking update)
    ("organizations_slug_format_check", None, "insert into public.organizations (name, slug) values ('X', 'Bad Slug')",
     f"update public.organizations set slug = 'Bad_Slug' where id = '{ORG_A}'"),
    ("organizations_name_not_blank_check", None, "insert into public.organizations (name, slug) values ('  ', 'blank')",
     f"update public.organizations set name = '' where id = '{ORG_A}'"),
    ("organizations_slug_key", None, "insert into public.organizations (name, slug) values ('Copy', 'alpha')",
     f"update public.organizations set slug = 'alpha' where id = '{ORG_B}'"),
    ("organization_members_role_check", None,
     f"insert into public.organization_members (organization_id, user_id, role) values ('{ORG_A}', '{USERS['spare']}', 'editor')",
     f"update public.organization_members set role = 'superuser' where user_id = '{USERS['viewer']}'"),
    ("organization_members_organization_id_user_id_key", None,
     f"insert into public.organization_members (organization_id, user_id) values ('{ORG_A}', '{USERS['viewer']}')",
     f"update public.organization_members set user_id = '{USERS['other_owner']}' where user_id = '{USERS['other_admin']}'"),
    ("organization_members_user_id_fkey", None,
     f"insert into public.organization_members (organization_id, user_id) values ('{ORG_A}', '{NEW_USER}')",
     f"update public.organization_members set user_id = '{NEW_USER}' where user_id = '{USERS['viewer']}'"),
    ("organization_members_organization_immutable_check", None, None,
     f"update public.organization_members set organization_id = '{ORG_B}' where user_id = '{USERS['viewer']}'"),
    ("organization_members_owner_change_check", "admin",
     f"insert into public.organization_members (organization_id, user_id, role) values ('{ORG_A}', '{USERS['spare']}', 'owner')",
     f"update public.organization_members set role = 'owner' where user_id = '{USERS['viewer']}'"),
    ("organization_members_last_owner_check", "owner", None,
     f"update public.organization_members set role = 'admin' where user_id = '{USERS['owner']}'"),
    ("products_sku_format_check", None,
     f"insert into public.products (organization_id, sku, name) values ('{ORG_A}', 'ab', 'Short')",
     f"update public.products set sku = 'lower-case' where id = '{PRODUCT_A1}'"),
    ("products_name_not_blank_check", None,
     f"insert into public.products (organization_id, sku, name) values ('{ORG_A}', 'ALPHA-009', ' ')",
     f"update public.products set name = '' where id = '{PRODUCT_A1}'"),
    ("products_price_nonnegative_check", None,
     f"insert into public.products (organization_id, sku, name, price) values ('{ORG_A}', 'ALPHA-009', 'Refund', -0.01)",
     f"update public.products set price = -1 where id = '{PRODUCT_A1}'"),
    ("products_currency_format_check", None,
     f"insert into public.products (organization_id, sku, name, currency) values ('{ORG_A}', 'ALPHA-009', 'Euro', 'eur')",
     f"update public.products set currency = 'EURO' where id = '{PRODUCT_A1}'"),
    ("products_organization_id_sku_key", None,
     f"insert into public.products (organization_id, sku, name) values ('{ORG_A}', 'ALPHA-001', 'Copy')",
     f"update public.products set sku = 'ALPHA-001' where id = '{PRODUCT_A2}'"),
    ("products_organization_id_fkey", None,
     f"insert into public.products (organization_id, sku, name) values ('{NEW_USER}', 'ORPHAN', 'Orphan')", None),
    ("products_organization_immutable_check", None, None,
     f"update public.products set organization_id = '{ORG_B}' where id = '{PRODUCT_A1}'"),
    ("inventory_quantity_nonnegative_check", None,
     f"insert into public.inventory (organization_id, product_id, location, quantity) values ('{ORG_A}', '{PRODUCT_A2}', 'x', -1)",
     f"update public.inventory set quantity = -1 where id = '{INVENTORY_A1}'"),
    ("inventory_reserved_within_quantity_check", None,
     "insert into public.inventory (organization_id, product_id, location, quantity, reserved_quantity) "
     f"values ('{ORG_A}', '{PRODUCT_A2}', 'x', 1, 2)",
     f"update public.inventory set reserved_quantity = 11 where id = '{INVENTORY_A1}'"),
    ("inventory_location_not_blank_check", None,
     f"insert into public.inventory (organization_id, product_id, location) values ('{ORG_A}', '{PRODUCT_A2}', ' ')",
     f"update public.inventory set location = '' where id = '{INVENTORY_A1}'"),
    ("inventory_product_id_location_key", None,
     f"insert into public.inventory (organization_id, product_id, location) values ('{ORG_A}', '{PRODUCT_A1}', 'main')",
     f"insert into public.inventory (product_id, location) values ('{PRODUCT_A1}', 'spare'); "
     f"update public.inventory set location = 'main' where product_id = '{PRODUCT_A1}' and location = 'spare'"),
    ("inventory_product_id_fkey", None,
     f"insert into public.inventory (organization_id, product_id, location) values ('{ORG_A}', '{NEW_USER}', 'x')",
     f"update public.inventory set product_id = '{NEW_USER}' where id = '{INVENTORY_A1}'"),
    ("inventory_organization_matches_product_check", None,
     f"insert into public.inventory (organization_id, product_id, location) values ('{ORG_A}', '{PRODUCT_B1}', 'x')",
     f"update public.inventory set product_id = '{PRODUCT_B1}', location = 'x' where id = '{INVENTORY_A1}'"),
    ("inventory_organization_immutable_check", None, None,
     f"update public.inventory set organization_id = '{ORG_B}' where id = '{INVENTORY_A1}'"),
    ("api_keys_name_not_blank_check", None,
     f"insert into public.api_keys (organization_id, name, key_prefix, key_hash) values ('{ORG_A}', '', 'ts_x_0001', '{'1' * 64}')",
     f"update public.api_keys set name = ' ' where id = '{KEY_A}'"),
    ("api_keys_key_hash_format_check", None,
     f"insert into public.api_keys (organization_id, name, key_prefix, key_hash) values ('{ORG_A}', 'K', 'ts_x_0001', 'plain')",
     None),
    ("api_keys_key_prefix_length_check", None,
     f"insert into public.api_keys (organization_id, name, key_prefix, key_hash) values ('{ORG_A}', 'K', 'ts', '{'1' * 64}')",
     f"update public.api_keys set key_prefix = 'a_much_too_long_prefix' where id = '{KEY_A}'"),
    ("api_keys_organization_id_fkey", None,
     f"insert into public.api_keys (organization_id, name, key_prefix, key_hash) values ('{NEW_USER}', 'K', 'ts_x_0001', '{'1' * 64}')",
     None),
    ("api_keys_created_by_fkey", None,
     "insert into public.api_keys (organization_id, name, key_prefix, key_hash, created_by) "
     f"values ('{ORG_A}', 'K', 'ts_x_0001', '{'1' * 64}', '{NEW_USER}')",
     f"update public.api_keys set created_by = '{NEW_USER}' where id = '{KEY_A}'"),
    ("api_keys_key_hash_key", None,
     f"insert into public.api_keys (organization_id, name, key_prefix, key_hash) values ('{ORG_A}', 'K', 'ts_x_0001', '{HASH_A}')",
     None),
    ("api_keys_revocation_final_check", None, None,
     f"update public.api_keys set revoked_at = now() where id = '{KEY_A}'; update public.api_keys set revoked_at = null where id = '{KEY_A}'"),
    ("api_keys_organization_immutable_check", None, None,
     f"update public.api_keys set organization_id = '{ORG_B}' where id = '{KEY_A}'"),
    ("profiles_id_fkey", None, f"insert into public.profiles (id) values ('{NEW_USER}')",
     f"update public.profiles set id = '{NEW_USER}' where id = '{USERS['viewer']}'"),
    ("profiles_organization_id_fkey", None,
     f"insert into public.profiles (id, organization_id) values ('{USERS['spare']}', '{NEW_USER}')",
     f"update public.profiles set organization_id = '{NEW_USER}' where id = '{USERS['viewer']}'"),
    ("organization_members_organization_id_fkey", None,
     f"insert into public.organization_members (organization_id, user_id) values ('{NEW_USER}', '{USERS['spare']}')", None),
    ("profiles_organization_membership_check", "spare",
     f"insert into public.profiles (id, organization_id) values ('{USERS['spare']}', '{ORG_A}')", None),
    ("profiles_organization_membership_check", "admin", None,
     f"update public.profiles set organization_id = '{ORG_B}' where id = '{USERS['admin']}'"),
    ("audit_logs_action_not_blank_check", None, "insert into public.audit_logs (action) values ('')",
     "update public.audit_logs set action = ' '"),
    ("security_events_severity_check", None, "insert into public.security_events (event_type, severity) values ('x', 'urgent')",
     "update public.security_events set severity = 'info'"),
    ("security_events_event_type_not_blank_check", None, "insert into public.security_events (event_type) values ('')",
     "update public.security_events set event_type = ' '"),
    ("rate_limits_key_not_blank_check", None,
     "insert into public.rate_limits (key, window_start, window_length, max_requests) values (' ', now(), '1 minute', 1)",
     "update public.rate_limits set key = ''"),
    ("rate_limits_max_requests_positive_check", None,
     "insert into public.rate_limits (key, window_start, window_length, max_requests) values ('k', now(), '1 minute', 0)",
     "update public.rate_limits set max_requests = -1"),
    ("rate_limits_request_count_nonnegative_check", None,
     "insert into public.rate_limits (key, window_start, window_length, max_requests, request_count) "
     "values ('k', now(), '1 minute', 1, -1)",
     "update public.rate_limits set request_count = -1"),
    ("rate_limits_window_positive_check", None,
     "insert into public.rate_limits (key, window_start, window_length, max_requests) values ('k', now(), '0 seconds', 1)",
     "update public.rate_limits set window_length = '-1 minute'"),
    ("threat_intelligence_severity_check", None,
     "insert into public.threat_intelligence (ip_address, threat_type, severity) values ('192.0.2.1', 'spam', 'severe')",
     "update public.threat_intelligence set severity = 'none'"),
    ("threat_intelligence_threat_type_not_blank_check", None,
     "insert into public.threat_intelligence (ip_address, threat_type) values ('192.0.2.1', '')",
     "update public.threat_intelligence set threat_type = ' '"),
    ("threat_intelligence_seen_order_check", None,
     "insert into public.threat_intelligence (ip_address, threat_type, first_seen_at, last_seen_at) "
     "values ('192.0.2.1', 'spam', '2024-02-01', '2024-01-01')",
     "update public.threat_intelligence set last_seen_at = first_seen_at - interval '1 day'"),
    ("threat_intelligence_ip_address_threat_type_key", None,
     "insert into public.threat_intelligence (ip_address, threat_type) values ('203.0.113.0/24', 'botnet')", None),
    ("data_retention_policies_table_allowed_check", None,
     "insert into public.data_retention_policies (table_name, retention_period) values ('products', '1 year')",
     "update public.data_retention_policies set table_name = 'profiles' where table_name = 'audit_logs'"),
    ("data_retention_policies_timestamp_column_check", None,
     "insert into public.data_retention_policies (table_name, timestamp_column, retention_period) "
     "values ('backup_verifications', 'updated_at', '1 year')",
     "update public.data_retention_policies set timestamp_column = 'id' where table_name = 'audit_logs'"),
    ("data_retention_policies_period_minimum_check", None,
     "insert into public.data_retention_policies (table_name, retention_period) values ('backup_verifications', '1 hour')",
     "update public.data_retention_policies set retention_period = '0 days' where table_name = 'audit_logs'"),
    ("backup_verifications_status_check", None,
     f"insert into public.backup_verifications (backup_label, backup_sha256, status) values ('b', '{'1' * 64}', 'ok')",
     "update public.backup_verifications set status = 'unknown'"),
    ("backup_verifications_sha256_format_check", None,
     "insert into public.backup_verifications (backup_label, backup_sha256, status) values ('b', 'abc', 'passed')",
     "update public.backup_verifications set backup_sha256 = upper(backup_sha256)"),
    ("backup_verifications_backup_format_check", None,
     f"insert into public.backup_verifications (backup_label, backup_sha256, status, backup_format) values ('b', '{'1' * 64}', 'passed', 'zip')",
     "update public.backup_verifications set backup_format = 'sql'"),
    ("backup_verifications_backup_bytes_nonnegative_check", None,
     f"insert into public.backup_verifications (backup_label, backup_sha256, status, backup_bytes) values ('b', '{'1' * 64}', 'passed', -1)",
     "update public.backup_verifications set backup_bytes = -5"),
    ("backup_verifications_toc_entries_nonnegative_check", None,
     f"insert into public.backup_verifications (backup_label, backup_sha256, status, toc_entries) values ('b', '{'1' * 64}', 'passed', -1)",
     "update public.backup_verifications set toc_entries = -1"),
]


@pytest.mark.parametrize("rule,who,insert,update", RULES, ids=[f"{r[0]}-{r[1] or 'dba'}" for r in RULES])
def test_every_rule_refuses_a_breaking_insert_and_update_with_an_error_that_names_it(cur, rule, who, insert, update):
    statements = [s for s in (insert, update) if s]
    assert statements
    for sql in statements:
        exc = error_of(cur, sql, who=who)
        assert exc is not None, f"{rule} let this through: {sql}"
        assert exc.diag.constraint_name == rule, str(exc)
        assert rule in str(exc)


def test_every_rule_is_covered_by_the_rule_tests(cur):
    names = {r[0] for r in RULES}
    constraints = {n for (n,) in rows(cur, """
        select conname from pg_constraint where connamespace = 'public'::regnamespace and contype in ('c', 'u', 'f')""")}
    # a row whose organization does not exist is refused earlier by inventory_organization_matches_product_check
    # (its product's organization exists); the foreign key stays as the declarative backstop
    assert constraints - names == {"inventory_organization_id_fkey"}


def test_valid_writes_pass_every_rule(cur):
    cur.execute(f"insert into public.products (organization_id, sku, name, price, currency) values ('{ORG_A}', 'ALPHA-010', 'Awl', 0, 'EUR')")
    cur.execute(f"insert into public.inventory (product_id, location, quantity, reserved_quantity) "
                f"values ('{PRODUCT_A2}', 'dock', 5, 5)")
    assert one(cur, "select organization_id::text from public.inventory where location = 'dock'") == (ORG_A,)
    act_as(cur, "owner")
    cur.execute(f"update public.organization_members set role = 'owner' where user_id = '{USERS['admin']}'")
    cur.execute(f"update public.organization_members set role = 'member' where user_id = '{USERS['owner']}'")
    assert cur.rowcount == 1


# -- a database the previous release migrated: policy helpers that took a user argument ----------------------

OLD_HELPERS_SQL = """
create function private.member_org_ids(p_user uuid) returns setof uuid language sql stable security definer
  set search_path = '' as $$ select m.organization_id from public.organization_members as m where m.user_id = p_user $$;
create function private.admin_org_ids(p_user uuid) returns setof uuid language sql stable security definer
  set search_path = '' as $$ select m.organization_id from public.organization_members as m
                              where m.user_id = p_user and m.role in ('owner', 'admin') $$;
create function private.owner_org_ids(p_user uuid) returns setof uuid language sql stable security definer
  set search_path = '' as $$ select m.organization_id from public.organization_members as m
                              where m.user_id = p_user and m.role = 'owner' $$;
create function private.colleague_ids(p_user uuid) returns setof uuid language sql stable security definer
  set search_path = '' as $$ select o.user_id from public.organization_members as mine
                              join public.organization_members as o using (organization_id) where mine.user_id = p_user $$;
grant execute on function private.member_org_ids(uuid), private.admin_org_ids(uuid), private.owner_org_ids(uuid),
  private.colleague_ids(uuid) to authenticated, service_role;
drop policy products_select_members on public.products;
create policy products_select_members on public.products for select to authenticated
  using (organization_id in (select private.member_org_ids((select auth.uid()))));
drop policy profiles_select_self_and_colleagues on public.profiles;
create policy profiles_select_self_and_colleagues on public.profiles for select to authenticated
  using (id = (select auth.uid()) or id in (select private.colleague_ids((select auth.uid()))));
"""
OLD_SIGNATURES_SQL = """
select p.oid::regprocedure::text from pg_proc p
 where p.pronamespace = 'private'::regnamespace and p.proname ~ '_ids$' order by 1"""
NEW_SIGNATURES = [("private.admin_org_ids()",), ("private.colleague_ids()",), ("private.member_org_ids()",),
                  ("private.owner_org_ids()",)]


def test_re_applying_the_phases_replaces_the_helpers_that_answered_for_anyone(make_db):
    db = make_db("legacy@3")
    db.execute(OLD_HELPERS_SQL)
    for path in PHASE_FILES[1:]:
        apply_psql(db, path)
    assert db.query(OLD_SIGNATURES_SQL) == NEW_SIGNATURES
    assert db.query("""select count(*) from pg_policies where schemaname = 'public'
                        and coalesce(qual, '') || coalesce(with_check, '') ~ '_ids\\(\\( SELECT'""") == [(0,)]
    # and again: nothing left to replace
    apply_psql(db, PHASE_FILES[1])
    assert db.query(OLD_SIGNATURES_SQL) == NEW_SIGNATURES


def test_an_old_helper_that_another_object_still_calls_stops_phase_2_naming_it_and_is_never_cascaded(make_db):
    db = make_db("legacy@3")
    db.execute(OLD_HELPERS_SQL + """
        create table public.team_notes (id int primary key, organization_id uuid);
        alter table public.team_notes enable row level security;
        create policy team_notes_members on public.team_notes for select to authenticated
          using (organization_id in (select private.member_org_ids((select auth.uid()))));""")
    error = psql_error(db, PHASE_FILES[1])
    assert "the old helper private.member_org_ids(uuid) answers for any user it is asked about" in error
    assert "policy team_notes_members on table team_notes" in error
    assert "private.member_org_ids()" in error                      # the hint: what to call instead
    assert db.query("select count(*) from pg_policies where policyname = 'team_notes_members'") == [(1,)]
    assert ("private.member_org_ids(uuid)",) in db.query(OLD_SIGNATURES_SQL)


def test_verify_data_integrity_reports_a_redaction_or_a_backfill_left_for_a_rerun_as_errors(cur):
    cur.execute("insert into private.pending_redactions (table_name, text_expr, first_column, prefix) "
                "values ('products', 'concat_ws(chr(1), t.name::text)', 'name', '')")
    cur.execute("insert into private.pending_backfills (table_name, kind, target, source, stash_key, from_type, to_type) "
                "values ('public.audit_logs', 'carry', 'ip_address', 'ip', 'ip', 'text', 'inet')")
    report = {r[0]: r[1:] for r in rows(cur, "select * from public.verify_data_integrity()")}
    assert report["plaintext_rewrite_pending"][:2] == ("error", 1) and "products" in report["plaintext_rewrite_pending"][2]
    assert report["legacy_backfill_pending"][:2] == ("error", 1) and "public.audit_logs.ip" in report["legacy_backfill_pending"][2]


# -- a database the previous release migrated: policy helpers that returned sets ------------------------------

SETOF_HELPERS_SQL = """
do $$
declare r record;
begin
  for r in select distinct p.polname, p.polrelid::regclass as tbl from pg_depend d join pg_policy p on p.oid = d.objid
            where d.refobjid in ('private.member_org_ids()'::regprocedure, 'private.colleague_ids()'::regprocedure) loop
    execute format('drop policy %I on %s', r.polname, r.tbl);
  end loop;
end $$;
drop function private.member_org_ids(), private.colleague_ids();
create function private.member_org_ids() returns setof uuid language sql stable security definer
  set search_path = '' as $$ select m.organization_id from public.organization_members as m where m.user_id = (select auth.uid()) $$;
create function private.colleague_ids() returns setof uuid language sql stable security definer
  set search_path = '' as $$ select o.user_id from public.organization_members as mine
                              join public.organization_members as o using (organization_id) where mine.user_id = (select auth.uid()) $$;
grant execute on function private.member_org_ids(), private.colleague_ids() to authenticated, service_role;
create policy products_select_members on public.products for select to authenticated
  using (organization_id in (select private.member_org_ids()));
create policy profiles_select_self_and_colleagues on public.profiles for select to authenticated
  using (id = (select auth.uid()) or id in (select private.colleague_ids()));
"""
HELPER_RESULTS_SQL = """
select p.oid::regprocedure::text, p.proretset, format_type(p.prorettype, null) from pg_proc p
 where p.pronamespace = 'private'::regnamespace and p.proname ~ '_ids' order by 1"""


def test_re_applying_phase_2_replaces_the_set_returning_helpers_with_array_ones(make_db):
    db = make_db("legacy@3")
    db.execute(SETOF_HELPERS_SQL)
    apply_psql(db, PHASE_FILES[1])
    assert db.query(HELPER_RESULTS_SQL) == [(name, False, "uuid[]") for (name,) in NEW_SIGNATURES]
    assert db.query("""select count(*) from pg_policies where schemaname = 'public'
                        and coalesce(qual, '') || coalesce(with_check, '') ~* ' in \\( select private'""") == [(0,)]


def test_a_set_returning_helper_that_another_object_still_calls_stops_phase_2_naming_it(make_db):
    db = make_db("legacy@3")
    db.execute(SETOF_HELPERS_SQL + """
        create table public.team_notes (id int primary key, organization_id uuid);
        alter table public.team_notes enable row level security;
        create policy team_notes_members on public.team_notes for select to authenticated
          using (organization_id in (select private.member_org_ids()));""")
    error = psql_error(db, PHASE_FILES[1])
    assert "the previous policy helper private.member_org_ids_setof() (a set) is still called by policy team_notes_members" in error
    # never dropped while called (psql -f commits statement by statement: it stays renamed, and still answers)
    assert ("private.member_org_ids_setof()", True, "uuid") in db.query(HELPER_RESULTS_SQL)
