"""A transaction-mode pooler is refused before anything runs; a session of our own is accepted.

Against a real PgBouncer (Debian's ``pgbouncer`` package) in front of the test server, on
loopback, run as the server's unprivileged account: transaction mode is refused by its behaviour
(whatever the pool size), session mode and a direct connection are accepted.
"""

import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from runbooks import connection
from runbooks.embedded import _free_port

from runhelpers import runbook

PGBOUNCER = shutil.which("pgbouncer") or next(
    (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).is_file()), None)
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None, reason="pgbouncer is not installed (Debian: apt-get install -y pgbouncer); "
    "the transaction-pooler refusal is proven against a real PgBouncer only")

POOLED_ROLE = "pooled_deployer"


class PgBouncer:
    """One PgBouncer on 127.0.0.1 in front of the test server, reachable as a libpq service."""

    def __init__(self, server, dbname: str, password: str, *, pool_mode: str, pool_size: int):
        self.pg = server.pg
        self.port = _free_port()
        self.service = f"{dbname}_{pool_mode}_{pool_size}"
        self.folder = Path(tempfile.mkdtemp(prefix="truthsource-pgbouncer-"))
        (self.folder / "userlist.txt").write_text(f'"{POOLED_ROLE}" "{password}"\n')
        (self.folder / "pgbouncer.ini").write_text(f"""
[databases]
* = host={self.pg.host} port={self.pg.port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.folder / 'userlist.txt'}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = 20
logfile = {self.folder / 'pgbouncer.log'}
""")
        self._give_to_server_account()
        account = self.pg.account   # PgBouncer refuses to run as root, like PostgreSQL
        as_user = {} if account is None else {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.process = subprocess.Popen([PGBOUNCER, str(self.folder / "pgbouncer.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_user)
        self._wait_until_listening()
        with open(self.pg.client.pgpass_file, "a") as f:
            f.write(f"127.0.0.1:{self.port}:*:{POOLED_ROLE}:{password}\n")
        with open(self.pg.client.service_file, "a") as f:
            f.write(f"\n[{self.service}]\nhost=127.0.0.1\nport={self.port}\nuser={POOLED_ROLE}\n"
                    f"dbname={dbname}\nsslmode=disable\n")

    def _give_to_server_account(self) -> None:
        account = self.pg.account
        if account is not None:
            for path in (self.folder, *self.folder.iterdir()):
                shutil.chown(path, account.pw_uid, account.pw_gid)
        (self.folder / "userlist.txt").chmod(0o600)

    def _wait_until_listening(self, deadline: float = 30) -> None:
        give_up = time.monotonic() + deadline
        while self.process.poll() is None and time.monotonic() < give_up:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        log_file = self.folder / "pgbouncer.log"
        log = log_file.read_text(errors="replace") if log_file.exists() else ""
        self.stop()
        raise RuntimeError(f"pgbouncer did not start listening on port {self.port}:\n{log}")

    @property
    def target(self) -> connection.Target:
        return connection.from_service(self.service)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def pgbouncer(server, empty_db):
    """Factory: pgbouncer('transaction', 2) -> a running PgBouncer in front of empty_db."""
    password = secrets.token_urlsafe(18)
    server.admin_execute(f"create role {POOLED_ROLE} login password '{password}'")
    started: list[PgBouncer] = []

    def start(pool_mode: str, pool_size: int = 2) -> PgBouncer:
        started.append(PgBouncer(server, empty_db.name, password, pool_mode=pool_mode, pool_size=pool_size))
        return started[-1]

    try:
        yield start
    finally:
        for bouncer in started:
            bouncer.stop()
        server.admin_execute(f"drop role if exists {POOLED_ROLE}")


@pytest.mark.parametrize("pool_size", [2, 1])
def test_a_transaction_mode_pgbouncer_is_refused_by_its_behaviour_whatever_the_pool_size(pgbouncer, pool_size):
    bouncer = pgbouncer("transaction", pool_size)
    assert bouncer.port != connection.SUPAVISOR_TRANSACTION_PORT   # not the port: the behaviour gives it away
    evidence = connection.transaction_pooler_evidence(bouncer.target)
    assert any("server session" in e for e in evidence), evidence
    with pytest.raises(connection.TransactionPoolerError, match="connect directly to the database"):
        connection.refuse_transaction_pooler(bouncer.target)


def test_a_session_mode_pgbouncer_and_a_direct_connection_are_accepted(pgbouncer, empty_db):
    assert connection.transaction_pooler_evidence(pgbouncer("session").target) == []
    assert connection.transaction_pooler_evidence(empty_db.target) == []
    connection.refuse_transaction_pooler(empty_db.target)


def test_a_session_pool_of_one_is_accepted_after_a_bounded_wait_for_a_second_session(pgbouncer):
    # the probe's second connection queues behind the first one's session: it gives up after
    # NEWCOMER_WAIT instead of waiting for PgBouncer's query_wait_timeout error
    assert connection.transaction_pooler_evidence(pgbouncer("session", pool_size=1).target) == []


def test_runbook_deploy_through_a_transaction_pooler_exits_2_with_the_advice_and_changes_nothing(
        pgbouncer, empty_db, tmp_path, capsys):
    bouncer = pgbouncer("transaction")
    before = empty_db.query("select count(*) from pg_class")
    code = runbook("deploy", "--service", bouncer.service, "--records", tmp_path / "records")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "transaction-mode connection pooler" in err and "connect directly to the database" in err
    assert empty_db.query("select count(*) from pg_class") == before
    assert empty_db.query("select to_regnamespace('truthsource') is null") == [(True,)]
    assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())
