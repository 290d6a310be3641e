"""A phase notebook's apply step: it says each lock-timeout retry as it happens, and a phase that
never gets its locks changes nothing."""

from __future__ import annotations

import pytest

from runbooks import engine, phases

from runhelpers import assert_identical, history, make_run, snapshot_of
from sqlhelpers import tables_in


def test_a_phase_blocked_by_a_lock_held_elsewhere_prints_each_retry_and_then_changes_nothing(legacy_db, tmp_path,
                                                                                            capsys):
    tables = tables_in(legacy_db, ["public"])
    before = snapshot_of(legacy_db)
    blocker = legacy_db.connect(application_name="a long report")
    with blocker.cursor() as cur:
        cur.execute(f"lock table {', '.join(tables)} in exclusive mode")  # reads go on, writes and DDL wait
    run = make_run(legacy_db, tmp_path / "run")
    try:
        with pytest.raises(engine.LockRetriesExhausted, match=r"after 2 attempts.*a long report.*Nothing was changed"):
            phases.Phase(run, "000").apply(lock_timeout="100ms", lock_retries=1)
    finally:
        blocker.rollback()
        blocker.close()
        run.conn.close()
    printed = capsys.readouterr().out
    assert "attempt 1/2 rolled back, statement " in printed and "lock timeout; retrying in 1.0s" in printed
    assert history(legacy_db) == []
    assert_identical(before, snapshot_of(legacy_db))
