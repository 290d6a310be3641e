"""The preflight backup: pg_dump -Fc with the server's own pg_dump, verified, and re-checkable."""

import hashlib
import json
from pathlib import Path

import pytest

from runbooks import backup, identity
from runbooks.backup import BackupError, take_backup, verify_backup

pytestmark = pytest.mark.both_versions   # pg_dump must match the server's major version

DATA = """
create schema app;
create table app.customers (id int primary key, name text not null);
insert into app.customers select i, 'customer ' || i from generate_series(1, 500) i;
create table public.notes (id bigint generated always as identity primary key, body text);
insert into public.notes (body) select md5(i::text) from generate_series(1, 300) i;
create function public.note_count() returns bigint language sql as 'select count(*) from public.notes';
"""


@pytest.fixture
def db(empty_db):
    empty_db.execute(DATA)
    return empty_db


def test_a_backup_of_a_database_with_data_is_verified_by_its_toc_and_sha256(db, tmp_path, server):
    info = take_backup(db.target, tmp_path, "run-1")
    dump = tmp_path / f"{db.name}-run-1.dump"
    assert info.path == str(dump.resolve()) and info.file_name == dump.name
    assert info.sha256 == hashlib.sha256(dump.read_bytes()).hexdigest()
    assert info.size_bytes == dump.stat().st_size > 0
    assert info.format == "CUSTOM" and info.toc_entries == sum(info.toc_summary.values())
    assert info.toc_summary["TABLE DATA"] >= 3 and info.toc_summary["FUNCTION"] >= 1
    assert info.pg_dump["major"] == server.pg.major and info.pg_dump["warning"] is None
    assert info.server_version_num // 10000 == server.pg.major and info.database == db.name
    assert info.taken_at <= info.finished_at and info.full_read
    assert not list(tmp_path.glob("*.partial"))


def test_backup_json_beside_the_dump_holds_the_same_facts_and_no_secret(db, tmp_path):
    info = take_backup(db.target, tmp_path, "run-2")
    recorded = json.loads((tmp_path / backup.INFO_FILE).read_text())
    assert recorded == info.as_dict()
    assert backup.BackupInfo.load(tmp_path) == info
    assert "password" not in (tmp_path / backup.INFO_FILE).read_text().lower()


def test_the_backup_records_which_database_it_is_of_beyond_its_name(db, tmp_path):
    [(oid, system_identifier)] = db.query("select (select oid from pg_database where datname = current_database()), "
                                          "(select system_identifier::text from pg_control_system())")
    before = take_backup(db.target, tmp_path / "before", "run-8").identity
    conn = db.connect()
    try:
        written, created = identity.ensure_identity(conn)
        conn.commit()
    finally:
        conn.close()
    after = take_backup(db.target, tmp_path / "after", "run-9").identity
    assert before == {"database": db.name, "database_oid": oid, "system_identifier": system_identifier,
                      "database_uuid": None}       # no preflight wrote an identity yet: the oid and the server's
    assert created and after == dict(before, database_uuid=written.database_uuid)
    assert backup.BackupInfo.load(tmp_path / "after").identity == after


def test_the_dump_holds_every_row_so_only_its_owner_may_read_it(db, tmp_path):
    info = take_backup(db.target, tmp_path, "run-3")
    assert Path(info.path).stat().st_mode & 0o777 == 0o600


def test_an_intact_backup_verifies_again(db, tmp_path):
    info = take_backup(db.target, tmp_path, "run-3")
    again = verify_backup(info.path, info.sha256)
    assert (again.sha256, again.toc_entries, again.toc_summary) == (info.sha256, info.toc_entries, info.toc_summary)


def test_a_truncated_dump_is_detected_by_its_sha256_and_by_pg_restore(db, tmp_path):
    info = take_backup(db.target, tmp_path, "run-4")
    dump = tmp_path / info.file_name
    dump.write_bytes(dump.read_bytes()[: info.size_bytes * 2 // 3])
    with pytest.raises(BackupError, match="does not match its recorded sha256"):
        verify_backup(dump, info.sha256)
    with pytest.raises(BackupError, match="pg_restore"):
        verify_backup(dump, None)   # even without the recorded checksum


def test_a_corrupted_byte_is_detected(db, tmp_path):
    info = take_backup(db.target, tmp_path, "run-5")
    dump = tmp_path / info.file_name
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="altered, truncated or replaced"):
        verify_backup(dump, info.sha256)


def test_a_missing_backup_is_named(tmp_path):
    with pytest.raises(BackupError, match="does not exist"):
        verify_backup(tmp_path / "nothing.dump", "0" * 64)


def test_an_existing_backup_is_never_overwritten(db, tmp_path):
    take_backup(db.target, tmp_path, "run-6")
    with pytest.raises(BackupError, match="already exists"):
        take_backup(db.target, tmp_path, "run-6")


def test_a_pg_dump_that_cannot_get_its_locks_fails_naming_why_and_leaves_no_file(db, tmp_path):
    conn = db.connect()
    with conn.cursor() as cur:
        cur.execute("lock table app.customers in access exclusive mode")
    try:
        with pytest.raises(BackupError) as failed:
            take_backup(db.target, tmp_path, "run-7", lock_wait_timeout="200ms")
    finally:
        conn.rollback()
        conn.close()
    message = str(failed.value)
    assert "pg_dump" in message and "LOCK TABLE" in message and "app.customers" in message
    assert not list(tmp_path.glob("*.dump*"))


def test_a_run_id_that_cannot_name_a_file_is_refused(db, tmp_path):
    with pytest.raises(BackupError, match="cannot name a file"):
        take_backup(db.target, tmp_path, "../escape")


def test_tool_output_never_carries_a_password():
    text = 'pg_dump: error: connection to "host=db password=hunter2 user=x" failed'
    assert "hunter2" not in backup.redact(text)
    assert backup.redact("no secret here") == "no secret here"


def test_toc_lines_parse_into_type_namespace_tag_and_owner():
    entry = backup.TocEntry.parse("3410; 3256 16457 POLICY public orgs p_sel postgres")
    assert (entry.type, entry.namespace, entry.tag, entry.owner) == ("POLICY", "public", "orgs p_sel", "postgres")
    entry = backup.TocEntry.parse("2; 3079 16407 EXTENSION - citext ")
    assert (entry.type, entry.namespace, entry.tag, entry.owner) == ("EXTENSION", None, "citext", "")
    entry = backup.TocEntry.parse("3412; 0 16444 TABLE DATA public orgs postgres")
    assert (entry.type, entry.tag, entry.known) == ("TABLE DATA", "orgs", True)
    assert not backup.TocEntry.parse("7; 0 0 SOMETHING NEW public x postgres").known
