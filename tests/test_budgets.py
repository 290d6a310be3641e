"""The disk and WAL a deployment needs, refused before anything changes when it does not fit (runbooks/budgets.py).

The runner's disk is a real small filesystem (a 1 MB tmpfs, mounted as root, filled but for a few
kilobytes); the server's free space is what `df` says through COPY FROM PROGRAM (the tests' superuser), or
what the DBA gives. A refusal exits 2 and leaves the database as it was.
"""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from runbooks import budgets, connection
from runbooks.checks import parse_bytes
from runhelpers import assert_identical, run_check, runbook, snapshot_of

HISTORY_SQL = "select to_regclass('truthsource.deployment_history') is not null"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs with 16 kB left free (root may mount one), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mount)], check=True)
    try:
        (mount / "filler").write_bytes(b"\0" * (1024 - 16) * 1024)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_deploy_is_refused_when_the_runners_disk_cannot_hold_the_backup(legacy_db, small_disk, capsys):
    before = snapshot_of(legacy_db)
    records = small_disk / "records"
    assert runbook("deploy", "--service", legacy_db.name, "--records", records) == 2
    said = capsys.readouterr().err
    assert "the runner's disk cannot hold the record" in said and str(small_disk) in said
    assert not records.exists(), "nothing was written"
    assert legacy_db.query(HISTORY_SQL) == [(False,)]
    assert_identical(before, snapshot_of(legacy_db))


def test_a_deploy_is_refused_when_the_server_disk_the_dba_gives_cannot_hold_it(legacy_db, tmp_path, capsys):
    assert runbook("deploy", "--service", legacy_db.name, "--records", tmp_path / "records",
                   "-p", "server_disk_free", "1MB") == 2
    said = capsys.readouterr().err
    assert "the server's disk cannot hold the deployment" in said and "-p server_disk_free says 1.0 MB free" in said
    assert legacy_db.query(HISTORY_SQL) == [(False,)]


def test_a_server_disk_free_that_is_no_size_is_refused_naming_it(legacy_db, tmp_path, capsys):
    assert runbook("deploy", "--service", legacy_db.name, "--records", tmp_path / "records",
                   "-p", "server_disk_free", "lots") == 2
    assert "server_disk_free: 'lots' is no size" in capsys.readouterr().err


def test_a_negative_max_replica_lag_is_refused_before_anything_runs(legacy_db, tmp_path, capsys):
    assert runbook("deploy", "--service", legacy_db.name, "--records", tmp_path / "records",
                   "-p", "max_replica_lag", "-1") == 2
    assert "max_replica_lag" in capsys.readouterr().err
    assert legacy_db.query(HISTORY_SQL) == [(False,)]


def test_the_preflight_says_what_each_phase_needs_and_what_the_server_has_free_as_df_says(legacy_db, tmp_path):
    check = run_check(legacy_db, budgets.disk_and_wal, legacy_db.target, tmp_path)
    assert check.status == "info", check.summary
    assert "df on the server" in check.summary and "both fit" in check.summary
    wheres = [row["where"] for row in check.rows]
    assert wheres == ["server, phase 000", "server, phase 001", "server, phase 002", "server, all phases", "runner"]
    phase_two = check.rows[1]
    # the log held copies of keys: its rewrite's copy carries its legacy columns, no pass of updates before it
    assert "tables that held plaintext keys rewritten (api_keys, audit_logs; audit_logs's legacy columns carried as it " \
           "is copied)" in phase_two["for"]
    assert "carried into every row" not in phase_two["for"]


def test_applied_phases_need_nothing_more(migrated_db, tmp_path):
    check = run_check(migrated_db, budgets.disk_and_wal, migrated_db.target, tmp_path)
    assert [row["where"] for row in check.rows] == ["server, all phases", "runner"]


def test_a_role_that_cannot_see_the_servers_disk_is_told_the_space_the_deployment_needs(server, legacy_db, tmp_path):
    role, password = f"deployer_{secrets.token_hex(4)}", secrets.token_urlsafe(18)
    server.admin_execute(f"create role {role} login password '{password}'")
    try:
        server.pg.add_pgpass(role, password)
        server.pg.add_service(f"{legacy_db.name}_as_{role}", legacy_db.name, user=role)
        target = connection.from_service(f"{legacy_db.name}_as_{role}")
        conn = connection.connect(target, readonly=True, autocommit=True)
        try:
            unknown = budgets.disk_and_wal(conn, target, tmp_path)
            given = budgets.disk_and_wal(conn, target, tmp_path, server_disk_free="1TB")
        finally:
            conn.close()
    finally:
        server.admin_execute(f"drop role {role}")
    assert unknown.status == "warning"
    assert "not known to this role" in unknown.summary and "make sure it has" in unknown.summary
    assert given.status == "info" and "-p server_disk_free: 1.0 TB free" in given.summary


def test_a_targets_file_may_say_the_servers_free_disk_and_a_wrong_size_is_refused(tmp_path):
    file = tmp_path / "targets.toml"
    entry = 'host = "db.example"\ndbname = "postgres"\nuser = "postgres"\n'
    file.write_text(f'[targets.prod]\n{entry}server_disk_free = "20GB"\n[targets.bad]\n{entry}server_disk_free = "big"\n')
    prod = connection.from_targets_file("prod", file)
    assert prod.server_disk_free == "20GB"
    assert budgets.given_sizes(None, prod) == [(20 * 1024 ** 3, "the targets file (prod)")]
    with pytest.raises(connection.TargetError, match="server_disk_free"):
        connection.from_targets_file("bad", file)


def test_what_a_phase_needs_grows_with_the_tables_it_rewrites():
    def sizes(scale):
        return [{"schema_name": "public", "table_name": t, "heap_bytes": scale * 100, "data_bytes": scale * 110,
                 "index_bytes": scale * 50, "total_bytes": scale * 160, "rows_estimated": scale}
                for t in ("organizations", "audit_logs", "api_keys")]
    legacy = [{"table_name": "api_keys", "holds_plaintext_keys": True, "legacy_log": False},
              {"table_name": "audit_logs", "holds_plaintext_keys": False, "legacy_log": True}]
    small, large = (budgets.phase_needs(sizes(s), legacy, {}, set())[1] for s in (1_000, 10_000))
    assert small.version == large.version == "001"
    fixed = budgets.FIXED_WAL["001"]
    assert large.disk_bytes == 10 * small.disk_bytes and large.wal_bytes - fixed == 10 * (small.wal_bytes - fixed)
    assert parse_bytes("1MB") == 1024 ** 2


def test_a_disk_is_as_full_as_df_says_not_as_its_size_with_reserved_blocks_would_make_it():
    # this machine's root: 252 GB in size, of which 44 GB used and 57 GB available (the rest never the server's)
    free = budgets.free_from_df(["/dev/vda 263174212 46137344 59768832 44% /"])
    assert (free.bytes, free.total) == (59768832 * 1024, (46137344 + 59768832) * 1024)
    assert "44 % used" in free.source
    need = budgets.PhaseNeed("001", 10 * 1024 ** 3, 0, [])
    assessment = budgets.Assessment([need], 0, "", budgets.Free(None), free, "", 0, False)
    assert assessment.problems() == []   # 54 GB of 101 GB once deployed: 53 %
    tight = budgets.free_from_df(["/dev/vda 263174212 83886080 16777216 84% /"])   # 80 GB used, 16 GB free
    assert "past 90%" in budgets.Assessment([need], 0, "", budgets.Free(None), tight, "", 0, False).problems()[0]
