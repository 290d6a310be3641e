"""Smoke test of the scale benchmark (benchmarks/scale_fixture.py, benchmarks/scale.py) at a tiny size.

It checks results only, never timings: the generated database has the legacy shapes and the counts
asked for, the benchmark's report has every figure, and the phases converge on the generated
database without losing a legacy row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # benchmarks/ is not installed
from benchmarks import scale, scale_fixture  # noqa: E402

TINY = scale_fixture.parse_size("tiny")
UUID_TEXT = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


@pytest.fixture
def generated(make_db):
    """A database with the tiny size generated into it (closed: it is cloned from)."""
    db = make_db("bare")
    conn = psycopg2.connect(db.dsn)
    try:
        scale_fixture.generate(conn, TINY, progress=lambda *_: None)
    finally:
        conn.close()
    return db


def one(db, sql: str):
    return db.query(sql)[0][0]


def test_sizes_are_named_or_given_as_orgs_x_products_and_bad_ones_are_refused():
    assert scale_fixture.parse_size("1M") == scale_fixture.Size("1M", 1_000, 1_000_000)
    assert scale_fixture.parse_size("3x300").per_org == 100
    for bad in ("huge", "3x301", "1x100", "2x20"):
        with pytest.raises(ValueError, match="size"):
            scale_fixture.parse_size(bad)


def test_a_step_that_outruns_its_timeout_is_stopped_and_reported(server, make_db):
    db = make_db("bare")
    step, value = scale.run_step(server.pg, "sleep", lambda: db.query("select pg_sleep(600)"), 0.5, db.name)
    assert (step.status, step.shown(), value) == ("timeout", "did not finish in 0.5 s", None)
    assert db.query("select count(*) from pg_stat_activity where query like 'select pg_sleep(600)%'") == [(0,)]


def test_the_generated_database_has_the_counts_asked_for(generated):
    for table, expected in scale_fixture.expected_counts(TINY).items():
        assert one(generated, f"select count(*) from {table}") == expected, table


def test_the_generated_database_has_the_legacy_shapes(generated):
    columns = set(generated.query("""select table_name || '.' || column_name || ' ' || data_type
                                     from information_schema.columns where table_schema = 'public'"""))
    for column in ("audit_logs.changes jsonb", "audit_logs.entity_id text", "api_keys.key text",
                   "api_keys.permissions jsonb", "api_keys.is_active boolean"):
        assert (column,) in columns
    trigger_functions = {f for (f,) in generated.query(
        """select distinct p.pronamespace::regnamespace || '.' || p.proname from pg_trigger t
           join pg_proc p on p.oid = t.tgfoid where not t.tgisinternal""")}
    assert {"public.update_updated_at", "public.handle_updated_at", "public.set_updated_at",
            "public.update_updated_at_column", "app.update_updated_at_column"} <= trigger_functions
    assert one(generated, f"select count(*) from audit_logs where entity_id !~ '{UUID_TEXT}'") > 0
    assert one(generated, "select count(*) from audit_logs where ip = 'unknown' or ip like '%,%'") > 0
    assert one(generated, "select count(*) from audit_logs where changes ? 'old' and changes ? 'new'") > 0
    assert one(generated, "select count(*) from audit_logs where changes is null and new_data is not null") > 0


def test_the_generated_plaintext_keys_are_copied_into_the_audit_trail(generated):
    keys = one(generated, "select count(*) from api_keys where key is not null")
    assert keys == 5   # two per organization, and the third where the organization is even
    assert one(generated, "select count(*) from audit_logs a join api_keys k on a.changes ->> 'key' = k.key") == keys
    assert one(generated, "select count(*) from audit_logs a join api_keys k on strpos(a.user_agent, k.key) > 0") == 2
    assert one(generated, "select count(*) from api_keys where key is null and key_hash is not null") == 1


def test_the_generated_database_has_rows_that_break_the_new_rules(generated):
    breakers = {
        "a lowercase SKU": "select count(*) from products where sku <> upper(sku)",
        "a negative price": "select count(*) from products where price < 0",
        "a negative quantity": "select count(*) from inventory where quantity < 0",
        "more reserved than held": "select count(*) from inventory where reserved_quantity > quantity",
        "an invalid slug": "select count(*) from organizations where slug ~ '[A-Z_]'",
        "a member whose user is gone": "select count(*) from organization_members m "
                                       "where not exists (select 1 from auth.users u where u.id = m.user_id)",
        "a role that is no contract role": "select count(*) from organization_members where role = 'editor'",
    }
    for what, sql in breakers.items():
        assert one(generated, sql) > 0, what


def test_the_benchmark_reports_every_figure_and_the_phases_keep_every_legacy_row(server, generated):
    settings = scale.Settings(timeout=120)
    report = scale.run_benchmark(server.pg, [TINY], settings, progress=lambda *_: None, template=generated.name)
    result = report["sizes"][0]

    assert {"date", "machine", "server", "git", "sql_sha256", "settings"} <= set(report["meta"])
    missing = [f["figure"] for f in result["figures"] if f["value"] is None]
    assert not missing, f"figures without a value: {missing}"
    for how in ("engine", "psql"):
        assert [p["step"]["status"] for p in result[how]["phases"]] == ["ok", "ok", "ok"], how
        for phase in result[how]["phases"]:
            assert phase["traffic"]["statements"] >= settings.clients
            assert {"longest_wait_s", "writes_blocked_s", "failed_by_sqlstate", "rejected_by_sqlstate"} <= set(
                phase["traffic"])
            assert phase["access_exclusive"]["samples"] > 0
        assert result[how]["rows_kept"]["all_kept"], result[how]["rows_kept"]
        assert result[how]["rows_kept"]["tables"]["products"]["after"] == TINY.products
    assert [p["step"]["status"] for p in result["alone"]["phases"]] == ["ok", "ok"]
    timed = result["alone"]["phases"][1]["statements"]
    assert any(t["transactional"] for t in timed) and any(not t["transactional"] for t in timed)
    assert all(t["seconds"] >= 0 and t["line"] > 0 for t in timed)
    assert result["rollback"]["rollback_counts_equal"] is True
    assert result["verification"]["integrity_rows"] and result["verification"]["stats_tables"] >= 8
    assert result["org_products"]["authenticated"]["rows"] == result["org_products"]["service_role"]["rows"] == 50
    for phase in result["engine"]["phases"]:   # production conditions: what every record measures, per phase
        assert phase["resources"]["wal_bytes"] > 0 and phase["resources"]["problem"] is None
        assert phase["impact"]["problem"] is None
    assert set(result["predicted"]["wal"]) == {"000", "001", "002"} and result["predicted"]["runner_bytes"] > 0
    deploy = result["deploy"]
    assert deploy["exit_code"] == 0 and deploy["record"]["verdict"] == "passed", deploy.get("output_tail")
    assert [n["name"] for n in deploy["record"]["notebooks"]] == ["preflight", "phase1", "phase2", "phase3",
                                                                  "verification"]
    assert set(deploy["record"]["footprint"]) == {"000", "001", "002"} and deploy["record"]["record_bytes"] > 0

    text = scale.render(report)
    assert all(f["figure"] in text for f in result["figures"])
    for table in ("WAL, replica and disk per phase", "the preflight's predictions", "runbook deploy as a process"):
        assert table in text
    bigger = {**result, "size": {**result["size"], "label": "tiny again"}}
    grown = scale.render({**report, "sizes": [result, bigger]}, markdown=True)
    assert "How each figure grows" in grown and "| products" in grown
    assert "How phase 2's slowest statements grow" in grown and "the locked transaction" in grown
    # a size run with --skip psql,alone renders, its passes said not run
    files = [(f"{i:03d}", Path(p["file"])) for i, p in enumerate(result["engine"]["phases"])]
    skipped = {**result, "size": {**result["size"], "label": "tiny, passes skipped"},
               "psql": scale.not_run(files, "psql"), "alone": scale.not_run(files[:2], "alone")}
    skipped["figures"] = scale.figures(skipped)
    shown = scale.render({**report, "sizes": [result, skipped]}, markdown=True)
    assert "not run (--skip psql)" in shown and "not run (--skip alone)" in shown
    left = {name for (name,) in generated.query(
        "select datname from pg_database where datname like 'bench\\_%'")}
    assert not left, f"the benchmark left databases behind: {left}"

