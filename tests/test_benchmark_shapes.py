"""The benchmark's legacy shapes (benchmarks/scale_fixture.py --shape) converge, online, at a tiny size.

Each shape is the generated legacy database changed into another shape the phases converge (a column
conversion, a table variant). Phase 2 runs the engine's way on each: no row of a core table is read or
written under its lock (api_keys' plaintext keys and flags excepted, by design, with the lookups of their
foreign key), no row is lost, and the columns end as an empty database's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg2
import pytest

from runbooks.contract import CORE_TABLES
from sqlhelpers import PHASE_FILES, apply_psql, contract_columns, row_counts
from test_sql_online_conversions import LOCKS_TAKEN, run_phase_two_measured

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # benchmarks/ is not installed
from benchmarks import scale_fixture  # noqa: E402

TINY = scale_fixture.parse_size("tiny")


def test_shapes_are_named_or_joined_from_transforms_and_unknown_ones_are_refused():
    assert scale_fixture.parse_shape("legacy") == ("legacy", ())
    assert scale_fixture.parse_shape("legacy+price_numeric+role_enum") == ("legacy+price_numeric+role_enum",
                                                                           ("price_numeric", "role_enum"))
    covered = {t for shape in scale_fixture.SHAPES.values() for t in shape}
    assert covered == set(scale_fixture.TRANSFORMS), "every transform is in a named shape"
    assert scale_fixture.template_name(TINY) != scale_fixture.template_name(TINY, "unseen")
    with pytest.raises(ValueError, match="shape 'legacy\\+bogus'"):
        scale_fixture.parse_shape("legacy+bogus")


@pytest.mark.parametrize("shape", list(scale_fixture.SHAPES))
def test_every_shape_converges_with_no_row_read_or_written_under_the_lock_and_none_lost(make_db, template_db, shape):
    db = make_db("bare")
    conn = psycopg2.connect(db.dsn)
    try:
        scale_fixture.generate(conn, TINY, progress=lambda *_: None, shape=shape)
    finally:
        conn.close()
    apply_psql(db, PHASE_FILES[0])
    before = row_counts(db)
    measured = run_phase_two_measured(db)
    locked = next(i for i, (text, _) in enumerate(measured) if LOCKS_TAKEN in text)
    # api_keys' rows rewritten under the lock make their foreign key look its organizations up, by index
    by_design = lambda work, table: table == "api_keys" or (table == "organizations" and work.get("api_keys", 0) > 0)
    assert {t: n for _, work in measured[locked:] for t, n in work.items() if n > 0 and not by_design(work, t)} == {}
    after = row_counts(db)
    assert {t: after[t] for t in before} == before
    columns = {(t, c): rest for t, c, *rest in contract_columns(db, CORE_TABLES)}
    expected = {(t, c): rest for t, c, *rest in contract_columns(template_db("empty@2"), CORE_TABLES)
                if (t, c) != ("audit_logs", "id")}
    assert {k: columns.get(k) for k in expected} == expected
