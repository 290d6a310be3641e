"""The post-deployment row state: taken in one read, kept in the record, read back exactly."""

import gzip
import json

from runbooks import later_writes


def a_state() -> dict:
    awkward = ['{"id" : "tab\\tand \\"quote\\" and back\\\\slash"}', '{"id" : "line\\u2028sep é"}', '{"id" : 1}']
    return {"format": later_writes.FORMAT, "taken_at": "2026-12-07T15:00:00.000000+00:00", "tables": {
        "public.keyed": {"schema": "public", "table": "keyed", "key": ["id"],
                         "rows": {k: f"{i:016x}" for i, k in enumerate(awkward)}},
        "public.keyless": {"schema": "public", "table": "keyless", "key": [], "rows": {"00000000000000ab": 2}},
        "public.empty": {"schema": "public", "table": "empty", "key": ["id"], "rows": {}}}}


def test_a_saved_state_loads_back_exactly_whatever_its_keys_hold(tmp_path):
    path = later_writes.save_row_state(a_state(), tmp_path / later_writes.ROW_STATE_FILE)
    assert later_writes.load_row_state(path) == a_state()


def test_a_state_saved_as_one_json_object_by_an_earlier_version_still_loads(tmp_path):
    old = {**a_state(), "format": 1}
    path = tmp_path / later_writes.ROW_STATE_FILE
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(old, f, sort_keys=True)
    assert later_writes.load_row_state(path) == old


def test_the_state_of_a_database_round_trips_through_the_record(legacy_db, tmp_path):
    legacy_db.execute("create table public.odd (k text primary key, v int); "
                      "insert into public.odd values (E'a\\tb\\\\c\\nd\"e', 1), ('plain', 2); "
                      "create table public.bag (v int); insert into public.bag values (1), (1), (2)")
    with legacy_db.connect() as conn:
        state = later_writes.take_row_state(conn)
        path = later_writes.save_row_state(state, tmp_path / later_writes.ROW_STATE_FILE)
        assert later_writes.load_row_state(path) == state
        assert len(state["tables"]["public.odd"]["rows"]) == 2
        assert sorted(state["tables"]["public.bag"]["rows"].values()) == [1, 2]
        legacy_db.execute("update public.odd set v = 3 where k = 'plain'; insert into public.bag values (2)")
        writes = {t.table: t for t in later_writes.compare(conn, later_writes.load_row_state(path)).tables}
    assert writes["public.odd"].updated == ['{"k" : "plain"}'] and not writes["public.odd"].inserted
    assert len(writes["public.bag"].inserted) == 1 and not writes["public.bag"].deleted
