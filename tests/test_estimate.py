"""The preflight predicts each phase's duration and lock windows from table sizes (runbooks/estimate.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from runbooks import estimate
from runbooks.checks import fetch

GIB = estimate.GIB
WINDOW_START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def sizes(gib_per_table: float, plaintext: bool = True) -> list[dict]:
    return [{"table_name": t, "heap_bytes": int(gib_per_table * GIB), "rows_estimated": 0,
             "holds_plaintext_keys": plaintext and t == "api_keys"} for t in estimate.CONVERGED_TABLES]


def test_the_estimate_grows_in_proportion_to_the_data():
    small, large = (sum(p.seconds for p in estimate.estimate_phases(sizes(g), set())) for g in (0.5, 5))
    fixed = sum(estimate.estimate_phases(sizes(0), set())[i].seconds for i in range(3))
    assert large - fixed == pytest.approx(10 * (small - fixed))


def test_phase_two_blocks_the_converged_tables_for_its_body_and_the_swaps_of_the_tables_that_held_keys():
    one, two, three = estimate.estimate_phases(sizes(1), set())
    assert one.lock_seconds == three.lock_seconds == 0
    assert two.locked_tables == estimate.CONVERGED_TABLES
    assert 0 < two.lock_seconds < two.seconds  # the concurrent index builds do not block the app
    without_keys = estimate.estimate_phases(sizes(1, plaintext=False), set())[1]
    assert without_keys.lock_seconds < two.lock_seconds


def test_a_converted_table_costs_a_pass_over_its_rows_and_a_log_converts_in_its_carry_for_free():
    plain = estimate.estimate_phases(sizes(1), set())[1].seconds
    products = estimate.estimate_phases(sizes(1), set(), {"products": ["price numeric"]})[1].seconds
    assert products - plain == pytest.approx(estimate.RATES["phase 001 conversion per GiB of a converted table"])
    legacy_log = [{**r, "legacy_log": r["table_name"] == "audit_logs"} for r in sizes(1)]
    carried = estimate.estimate_phases(legacy_log, set())[1].seconds
    assert estimate.estimate_phases(legacy_log, set(), {"audit_logs": ["created_at timestamp"]})[1].seconds == carried


def test_phases_applied_with_the_same_file_are_not_counted():
    rows = [p.row() for p in estimate.estimate_phases(sizes(1), {"000", "001"})]
    assert [r["will run"] for r in rows] == ["no (applied)", "no (applied)", "yes"]
    assert rows[1]["estimated"] == "0s" and rows[1]["app blocked (ACCESS EXCLUSIVE)"] == "none"


def test_a_legacy_database_gets_an_estimate_per_phase(legacy_db):
    with legacy_db.connect(readonly=True) as conn:
        check = estimate.duration(conn)
    assert check.status == "info" and check.summary.startswith("about ")
    assert [r["phase"] for r in check.rows] == ["000", "001", "002"]
    assert "organizations" in check.rows[1]["app blocked (ACCESS EXCLUSIVE)"]
    assert estimate.SIZES_SQL.strip() in check.sql and estimate.COLUMN_TYPES_SQL.strip() in check.sql


def test_a_production_deployment_that_does_not_fit_the_rest_of_its_window_is_refused(legacy_db):
    window = "2026-01-01T00:00Z/2026-01-01T00:00:02Z"   # two seconds left: phase 2's fixed cost with the margin is more
    with legacy_db.connect(readonly=True) as conn:
        refused = estimate.duration(conn, production=True, maintenance_window=window, now=WINDOW_START)
        warned = estimate.duration(conn, production=False, maintenance_window=window, now=WINDOW_START)
        fits = estimate.duration(conn, production=True, maintenance_window="2026-01-01T00:00Z/2026-01-01T04:00Z",
                                 now=WINDOW_START)
    assert refused.status == "error" and "does not fit the 2s left of the maintenance window" in refused.summary
    assert warned.status == "warning"
    assert fits.status == "info" and "fits the 4h00m left of the window" in fits.summary


def test_a_migrated_database_has_nothing_left_to_estimate(migrated_db):
    with migrated_db.connect(readonly=True) as conn:
        check = estimate.duration(conn, production=True, maintenance_window="2026-01-01T00:00Z/2026-01-01T00:00:01Z",
                                  now=WINDOW_START)
    assert check.status == "info" and check.summary.startswith("about 0s")


def test_the_statement_timeout_grows_with_the_data_and_never_falls_below_the_floor(legacy_db):
    with legacy_db.connect(readonly=True) as conn:
        small = estimate.statement_timeout(conn, "001")
    assert small == f"{estimate.TIMEOUT_FLOOR}s"
    huge = estimate.estimate_phases(sizes(100), set())[1]   # 800 GiB of converged tables
    assert estimate.timeout_for(huge) == f"{round(estimate.TIMEOUT_FACTOR * huge.seconds)}s"
    assert round(estimate.TIMEOUT_FACTOR * huge.seconds) > estimate.TIMEOUT_FLOOR


def test_the_app_waits_for_the_body_and_one_short_swap_per_table_whatever_the_tables_sizes():
    def two(gib, plaintext=True, legacy_log=False, conversions=None):
        rows = [{**r, "legacy_log": legacy_log and r["table_name"] == "audit_logs",
                 "rows_estimated": 30_000 if r["table_name"] == "api_keys" else 0} for r in sizes(gib, plaintext)]
        return estimate.estimate_phases(rows, set(), conversions)[1]
    swap = estimate.RATES["phase 001 window: each table swapped"]
    assert two(1).lock_seconds == two(100).lock_seconds   # the batches and the online copies block nobody
    assert two(1).lock_seconds == pytest.approx(estimate.RATES["phase 001 window: body"] + 2 * swap
                                                + 30 * estimate.RATES["phase 001 window: body per 1,000 api keys"])
    assert two(1, plaintext=False, legacy_log=True).lock_seconds == pytest.approx(two(1, plaintext=False).lock_seconds + swap)
    assert two(1, conversions={"products": ["price numeric"]}).lock_seconds == pytest.approx(two(1).lock_seconds + swap)


def test_a_legacy_log_is_carried_in_batches_or_where_it_held_keys_by_its_online_copy_for_less():
    def two(plaintext, legacy_log):
        rows = [{**r, "legacy_log": legacy_log and r["table_name"] == "audit_logs"} for r in sizes(1, plaintext)]
        return estimate.estimate_phases(rows, set())[1].seconds
    dropped = estimate.RATES["phase 001 legacy columns dropped per GiB of those logs"]
    assert two(False, True) - two(False, False) == pytest.approx(
        estimate.RATES["phase 001 log backfill per GiB of the logs in a legacy shape"] + dropped)
    assert two(True, True) - two(True, False) == pytest.approx(estimate.RATES["phase 001 log carried in its copy per GiB"] + dropped)
    assert estimate.carried_in_copy([{**r, "legacy_log": r["table_name"] == "audit_logs"} for r in sizes(1)]) == {"audit_logs"}


def test_a_legacy_log_is_told_from_a_migrated_one(legacy_db, migrated_db):
    def legacy_logs(db):
        with db.connect(readonly=True) as conn:
            return {r["table_name"] for r in fetch(conn, estimate.SIZES_SQL) if r["legacy_log"]}
    assert legacy_logs(legacy_db) == {"audit_logs"}
    assert legacy_logs(migrated_db) == set()


def test_a_column_converted_by_reading_every_row_counts_and_a_widening_does_not():
    columns = [{"table_name": "products", "column_name": "price", "type": "numeric"},
               {"table_name": "products", "column_name": "sku", "type": "character varying(64)"},
               {"table_name": "inventory", "column_name": "quantity", "type": "numeric(10,2)"},
               {"table_name": "organizations", "column_name": "name", "type": "text"}]
    assert estimate.converted_tables(columns) == {"products": ["price numeric"], "inventory": ["quantity numeric(10,2)"]}
    assert estimate.converted_tables([{"table_name": "products", "column_name": "price", "type": "numeric(10,2)"}]) == {}
