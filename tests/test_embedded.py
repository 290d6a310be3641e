"""The embedded server: starts as an unprivileged user, reports its version, stops cleanly."""

import os
import signal
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


@pytest.mark.both_versions   # RUNBOOKS_PG_BIN: the embedded server runs Debian's binaries too
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


# The child, started as from a terminal (SIGINT at its default: a runner started in the background
# may hand its children SIGINT ignored, and Python then keeps it ignored), waits for the interrupt
# inside the product's run. The wake-up pipe makes the wait race-free: an interrupt that lands
# between the print and the read still leaves a byte to read, and KeyboardInterrupt is raised.
INTERRUPTED_CHILD = textwrap.dedent("""
    import os, signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from runbooks.embedded import EmbeddedPostgres
    pg = EmbeddedPostgres().start()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    print(pg.data_dir, flush=True)
    os.read(wake_read, 1)
""")


def test_the_server_stops_when_its_process_is_interrupted():
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED_CHILD],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        data_dir = child.stdout.readline().strip()   # observed: the server is up, the child waits
        assert data_dir and os.path.isdir(data_dir), f"the child did not start a server: {child.stderr.read()}"
        child.send_signal(signal.SIGINT)
        child.wait(timeout=600)   # bounds a hang only
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0, child.stderr.read()   # KeyboardInterrupt, not a clean exit
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
