"""The embedded server: starts as an unprivileged user, reports its version, stops cleanly."""

import os
import subprocess
import sys
import textwrap

import psycopg2
import pytest

from runbooks import fixtures
from runbooks.embedded import EmbeddedPostgres, EmbeddedPostgresError, find_bin_dir


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may not reap the detached postmaster)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return False


def test_the_server_runs_as_an_unprivileged_user_and_reports_its_version(server):
    pg = server.pg
    conn = psycopg2.connect(pg.conninfo())
    with conn.cursor() as cur:
        cur.execute("select current_setting('server_version_num')::int / 10000")
        (major,) = cur.fetchone()
        cur.execute("select pg_postmaster_start_time() is not null")
    conn.close()
    assert major == pg.major
    owner = os.stat(pg.data_dir).st_uid
    assert owner != 0, "PostgreSQL must never run as root"


def test_the_server_listens_on_loopback_only_and_asks_for_a_password(server):
    conn = psycopg2.connect(server.pg.conninfo())
    with conn.cursor() as cur:
        cur.execute("select current_setting('listen_addresses'), current_setting('password_encryption')")
        assert cur.fetchone() == ("127.0.0.1", "scram-sha-256")
    conn.close()
    env = {k: v for k, v in os.environ.items() if k not in ("PGPASSFILE", "PGPASSWORD")}
    env["PGPASSFILE"] = "/dev/null"
    probe = subprocess.run(
        [sys.executable, "-c", f"import psycopg2; psycopg2.connect({server.pg.conninfo()!r})"],
        env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "password" in probe.stderr


def test_the_server_stops_and_leaves_nothing_behind():
    pg = EmbeddedPostgres().start()
    data_dir = pg.data_dir
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    pg.stop()
    assert not data_dir.exists()
    assert not _running(pid)


def test_the_server_stops_when_its_process_is_interrupted(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        from runbooks.embedded import EmbeddedPostgres
        pg = EmbeddedPostgres().start()
        print(pg.data_dir, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    """)
    # the timeout only bounds a hang: initdb and start on a machine whose cores are saturated take long
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    data_dir = proc.stdout.strip().splitlines()[0]
    assert proc.returncode != 0  # KeyboardInterrupt
    assert not os.path.exists(data_dir)


def test_missing_binaries_are_named_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("RUNBOOKS_PG_BIN", str(tmp_path))
    with pytest.raises(EmbeddedPostgresError, match="no usable PostgreSQL binaries in .*missing initdb"):
        find_bin_dir()


def test_the_shim_is_applied_once_and_skipped_where_auth_exists(make_db):
    db = make_db("bare")
    conn = db.connect()
    assert fixtures.load_shim(conn) is True
    assert fixtures.load_shim(conn) is False
    conn.close()
    assert db.query("select count(*) from pg_namespace where nspname = 'auth'") == [(1,)]


def test_the_shim_refuses_by_itself_when_run_by_hand_on_a_database_with_auth(empty_db):
    conn = empty_db.connect()
    with pytest.raises(psycopg2.errors.DuplicateSchema, match="shim is only for plain PostgreSQL"):
        fixtures.run_script(conn, fixtures.SHIM_FILE)
    conn.close()


def test_auth_functions_read_the_request_claims_as_supabase_does(empty_db):
    conn = empty_db.connect()
    with conn.cursor() as cur:
        cur.execute("""select set_config('request.jwt.claims',
                         '{"sub": "00000000-0000-0000-0000-000000000001", "role": "authenticated", "email": "a@example.com"}', true)""")
        cur.execute("select auth.uid(), auth.role(), auth.email(), auth.jwt() ->> 'role'")
        assert cur.fetchone() == ("00000000-0000-0000-0000-000000000001", "authenticated", "a@example.com", "authenticated")
    conn.rollback()
    conn.close()
