"""The post-deployment row state: taken in one read, kept in the record, read back exactly."""

import gzip
import json

from runbooks import later_writes


def test_a_state_saved_as_one_json_object_by_an_earlier_version_still_loads(tmp_path):
    old = {"format": 1, "taken_at": "2026-12-07T15:00:00.000000+00:00", "tables": {
        "public.keyed": {"schema": "public", "table": "keyed", "key": ["id"], "rows": {'{"id" : 1}': "00000000000000ab"}},
        "public.keyless": {"schema": "public", "table": "keyless", "key": [], "rows": {"00000000000000ab": 2}}}}
    path = tmp_path / later_writes.ROW_STATE_FILE
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(old, f, sort_keys=True)
    assert later_writes.load_row_state(path) == old


def test_a_state_of_format_2_loads_its_keys_as_written_backslashes_and_all(tmp_path):
    key = '{"id" : "back\\\\slash \\"quote\\""}'
    path = tmp_path / later_writes.ROW_STATE_FILE
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"format": 2, "taken_at": "t", "tables": {
            "public.keyed": {"schema": "public", "table": "keyed", "key": ["id"], "lines": 1}}}) + "\n")
        f.write(f"{key}\t00000000000000ab\n")
    assert later_writes.load_row_state(path)["tables"]["public.keyed"]["rows"] == {key: "00000000000000ab"}


def test_the_state_of_a_database_round_trips_through_the_record(legacy_db, tmp_path):
    # keys that hold a tab, a backslash, a newline, a quote, a line separator: COPY writes what a fetch reads
    legacy_db.execute("create table public.odd (k text primary key, v int); "
                      "insert into public.odd values (E'a\\tb\\\\c\\nd\"e', 1), ('plain', 2), (E'l\\u2028s é', 3); "
                      "create table public.bag (v int); insert into public.bag values (1), (1), (2)")
    with legacy_db.connect() as conn:
        path, rows, tables = later_writes.write_row_state(conn, tmp_path / later_writes.ROW_STATE_FILE)
        state = later_writes.load_row_state(path)
        # compared with the rows as a fetch reads them now: the same keys and hashes, nothing written since
        assert not later_writes.compare(conn, state).any
        assert rows == sum(len(t["rows"]) if t["key"] else sum(t["rows"].values()) for t in state["tables"].values())
        assert tables == len(state["tables"])
        assert len(state["tables"]["public.odd"]["rows"]) == 3
        assert sorted(state["tables"]["public.bag"]["rows"].values()) == [1, 2]
        legacy_db.execute("update public.odd set v = 3 where k = 'plain'; insert into public.bag values (2)")
        writes = {t.table: t for t in later_writes.compare(conn, later_writes.load_row_state(path)).tables}
    assert writes["public.odd"].updated == ['{"k" : "plain"}'] and not writes["public.odd"].inserted
    assert len(writes["public.bag"].inserted) == 1 and not writes["public.bag"].deleted


def test_a_state_of_the_md5_format_is_compared_by_the_md5_of_each_rows_text(legacy_db, tmp_path):
    # a deployment recorded before the row hash changed is still rolled back knowing its later writes
    legacy_db.execute("create table public.odd (k text primary key, v int); insert into public.odd values ('a', 1), ('b', 2); "
                      "create table public.bag (v int); insert into public.bag values (1), (1)")
    md5 = {k: h for k, h in legacy_db.query("select json_build_object('k', k)::text, left(md5(r::text), 16) from public.odd r")}
    bag = {h: n for h, n in legacy_db.query("select left(md5(r::text), 16), count(*) from public.bag r group by 1")}
    state = {"format": 2, "taken_at": "2026-12-07T15:00:00.000000+00:00", "tables": {
        "public.odd": {"schema": "public", "table": "odd", "key": ["k"], "rows": md5},
        "public.bag": {"schema": "public", "table": "bag", "key": [], "rows": bag}}}
    legacy_db.execute("update public.odd set v = 3 where k = 'b'; delete from public.bag where ctid = "
                      "(select min(ctid) from public.bag)")
    with legacy_db.connect() as conn:
        writes = later_writes.compare(conn, state)
        script = later_writes.later_writes_sql(conn, writes, "run-1")
    by_table = {t.table: t for t in writes.tables}
    assert by_table["public.odd"].updated == ['{"k" : "b"}'] and not by_table["public.odd"].inserted
    assert len(by_table["public.bag"].deleted) == 1 and "left(md5(r::text), 16)" in script


def test_a_row_deleted_from_a_table_without_a_key_is_deleted_again_by_its_hash(legacy_db, tmp_path):
    legacy_db.execute("create table public.bag (v int, note text); insert into public.bag values (1, 'x'), (1, 'x'), (2, 'y')")
    with legacy_db.connect() as conn:
        path, _, _ = later_writes.write_row_state(conn, tmp_path / later_writes.ROW_STATE_FILE)
        state = later_writes.load_row_state(path)
        legacy_db.execute("delete from public.bag where v = 2")
        script = later_writes.later_writes_sql(conn, later_writes.compare(conn, state), "run-1")
    legacy_db.execute("insert into public.bag values (2, 'y')")   # as a restore would put it back
    legacy_db.execute(script.replace("BEGIN;", "").replace("COMMIT;", ""))
    assert legacy_db.query("select v, note from public.bag order by v") == [(1, "x"), (1, "x")]
