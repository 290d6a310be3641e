"""runbooks/contract.py names what the SQL files deploy: the names there and in the SQL agree."""

from __future__ import annotations

import re

import pytest

from runbooks import contract
from runbooks.paths import PHASES

pytestmark = pytest.mark.both_versions   # the contract is read from the catalogs of each version

PHASE_2 = dict(PHASES)["001"].read_text()


def test_phase_two_recognises_exactly_the_plaintext_key_columns_the_contract_names():
    [listed] = re.findall(r"and a\.attname in \(('key'[^)]*)\)", PHASE_2)
    assert tuple(re.findall(r"'(\w+)'", listed)) == contract.PLAINTEXT_KEY_COLUMNS


def test_phase_two_locks_the_core_tables_in_the_contract_s_order():
    lock_block = PHASE_2[PHASE_2.index("lock table public.%I in access exclusive mode") - 600:]
    [listed] = re.findall(r"foreach v_table in array array\[([^\]]*)\]", lock_block)[:1]
    assert tuple(re.findall(r"'(\w+)'", listed)) == contract.CORE_TABLES


def test_every_core_table_exists_after_phase_two(template_db):
    tables = template_db("empty@2").query("select relname from pg_class where relnamespace = 'public'::regnamespace "
                                          "and relkind = 'r'")
    assert set(contract.CORE_TABLES) <= {t for (t,) in tables}


def test_after_a_deployment_every_contract_function_has_the_contract_s_signature_and_no_other(template_db):
    found = template_db("legacy@3").query("""
        select p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)
          from pg_proc p where p.pronamespace = 'public'::regnamespace and p.proname = any(%s) order by 1, 2""",
                                          ([f.name for f in contract.FUNCTIONS],))
    assert sorted(found) == sorted(tuple(f) for f in contract.FUNCTIONS)


def test_after_a_deployment_every_contract_table_has_its_columns_of_the_contract_s_types(template_db):
    for base in ("empty", "legacy"):
        columns = template_db(f"{base}@3").query("""
            select c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
              from pg_attribute a join pg_class c on c.oid = a.attrelid
             where c.relnamespace = 'public'::regnamespace and a.attnum > 0 and not a.attisdropped""")
        types = {(t, c): typ for t, c, typ in columns}
        for table, spec in {**contract.CORE_TABLE_COLUMNS, **contract.PHASE3_TABLE_COLUMNS}.items():
            for column, accepted in spec.items():
                assert types.get((table, column)) in accepted, (base, table, column, types.get((table, column)))


def test_the_app_schema_rule_reads_the_same_in_python_and_in_sql(template_db):
    names = [n for (n,) in template_db("legacy@3").query("select nspname from pg_namespace order by 1")]
    in_sql = [n for (n,) in template_db("legacy@3").query(
        f"select n.nspname from pg_namespace n where {contract.app_schema_condition()} order by 1")]
    assert in_sql == [n for n in names if contract.is_app_schema(n)]
    assert "public" in in_sql and "auth" not in in_sql and contract.HISTORY_SCHEMA not in in_sql
