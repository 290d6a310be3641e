"""runbooks/contract.py names what the SQL files deploy: the names there and in the SQL agree."""

from __future__ import annotations

import re

from runbooks import contract
from runbooks.paths import PHASES

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
