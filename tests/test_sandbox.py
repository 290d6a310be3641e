"""`runbook sandbox`: a practice server that stays up until Ctrl-C, then leaves nothing behind;
`runbook lab`'s command and environment; a targets.toml at the project root found from notebooks/."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest

from runbooks import connection, runner, sandbox
from runbooks.paths import NOTEBOOK_DIR, PROJECT_ROOT

pytestmark = pytest.mark.slow

HANG = 300   # bounds a hang of the stopping sandbox, not a duration


def start_sandbox(tmp_path: Path, *args: str, env: dict | None = None):
    """`runbook sandbox` as a subprocess, read line by line until it says how to stop it: the
    process, what it printed, and the exports it gave."""
    env = {**os.environ, sandbox.FILE_ENV: str(tmp_path / "sandbox.env"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "runbooks.cli", "sandbox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("Ctrl-C stops"):
            break
    else:
        proc.wait()
        pytest.fail("the sandbox ended before it was ready:\n" + "\n".join(lines))
    exports = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                   for line in lines if line.startswith("export "))
    return proc, lines, exports


def stop(proc, signum=signal.SIGINT) -> tuple[int, str]:
    proc.send_signal(signum)
    rest = proc.stdout.read()
    return proc.wait(timeout=HANG), rest


def data_dir_of(lines: list[str]) -> Path:
    return Path(next(line for line in lines if line.startswith("data directory: ")).split(": ", 1)[1])


def sandbox_rows(exports: dict, sql: str):
    with runner.environment(exports):
        conn = psycopg2.connect(f"service={exports['PGSERVICE']}")
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()


def test_the_sandbox_serves_the_legacy_fixture_through_its_service_until_ctrl_c_then_leaves_nothing(tmp_path):
    proc, lines, exports = start_sandbox(tmp_path, env={"PGSERVICE": "an_old_sandbox"})   # exported earlier
    try:
        assert "service: sandbox" in lines and exports["PGSERVICE"] == "sandbox"
        assert set(exports) == {"PGSERVICEFILE", "PGPASSFILE", "PGSERVICE"}
        # the legacy fixture: plaintext API keys, products with data
        [(has_key_column, products)] = sandbox_rows(exports, """
            select exists (select from information_schema.columns
                            where table_schema = 'public' and table_name = 'api_keys' and column_name = 'key'),
                   (select count(*) from public.products)""")
        assert has_key_column and products > 0
        assert (tmp_path / "sandbox.env").read_text().count("export ") == 3   # what `runbook lab` reads
        data_dir = data_dir_of(lines)
        assert data_dir.is_dir()
    finally:
        code, rest = stop(proc)
    assert code == 0, rest
    assert "stopped" in rest
    assert not data_dir.exists() and not Path(exports["PGSERVICEFILE"]).exists()
    assert not (tmp_path / "sandbox.env").exists()


def test_a_sandbox_from_a_target_is_a_fresh_copy_of_its_database_and_sigterm_stops_it(legacy_db, tmp_path):
    legacy_db.execute("insert into public.organizations (name) values ('only in the source')")
    proc, lines, exports = start_sandbox(tmp_path, "--from", f"service:{legacy_db.name}")
    try:
        [(copied,)] = sandbox_rows(exports, "select count(*) from public.organizations where name = 'only in the source'")
        assert copied == 1
        # the copy is the sandbox's own: a change there leaves the source as it was
        sandbox_rows(exports, "delete from public.audit_logs returning 1")
        assert legacy_db.query("select count(*) > 0 from public.audit_logs") == [(True,)]
    finally:
        code, rest = stop(proc, signal.SIGTERM)
    assert code == 0, rest
    assert not data_dir_of(lines).exists()


def test_a_sandbox_from_an_unknown_target_is_refused_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "runbooks.cli", "sandbox", "--from", "no_such_service"],
                          capture_output=True, text=True, env={**os.environ, sandbox.FILE_ENV: str(tmp_path / "e")})
    assert done.returncode == 2
    assert "no_such_service" in done.stderr and "neither a service" in done.stderr


def test_lab_binds_to_localhost_without_a_browser_and_allows_root_only_as_root():
    command = sandbox.lab_command()
    assert command[1:3] == ["-m", "jupyterlab"]
    assert ["--ip", "127.0.0.1"] == command[3:5] and "--no-browser" in command
    assert f"--notebook-dir={NOTEBOOK_DIR}" in command
    assert ("--allow-root" in command) == (os.geteuid() == 0)


def test_lab_gives_the_notebooks_the_running_sandboxs_service(tmp_path, monkeypatch):
    env_file = tmp_path / "sandbox.env"
    env_file.write_text("# the running sandbox\nexport PGSERVICEFILE=/tmp/x/pg_service.conf\n"
                        "export PGPASSFILE=/tmp/x/pgpass\nexport PGSERVICE=sandbox\n")
    monkeypatch.setenv(sandbox.FILE_ENV, str(env_file))
    monkeypatch.delenv("PGSERVICE", raising=False)
    said = []
    env = sandbox.lab_environment(said.append)
    assert env["PGSERVICE"] == "sandbox" and env["PGPASSFILE"] == "/tmp/x/pgpass"
    monkeypatch.setenv("PGSERVICE", "staging")   # exported by the DBA: theirs wins
    assert sandbox.lab_environment(said.append)["PGSERVICE"] == "staging"


def test_a_targets_file_at_the_project_root_is_found_from_the_notebooks_folder(monkeypatch):
    monkeypatch.delenv(connection.TARGETS_ENV, raising=False)
    monkeypatch.chdir(NOTEBOOK_DIR)
    root_file = PROJECT_ROOT / connection.DEFAULT_TARGETS_FILE
    if root_file.exists():
        pytest.skip(f"{root_file} exists: the test would overwrite it")
    root_file.write_text('[targets.practice]\nhost = "127.0.0.1"\ndbname = "postgres"\nuser = "postgres"\n')
    try:
        target = connection.from_targets_file("practice")
    finally:
        root_file.unlink()
    assert target.targets_file == str(root_file) and target.params["host"] == "127.0.0.1"


def test_runbook_lab_starts_jupyterlab_on_localhost_as_any_user_root_included(tmp_path):
    with socket.socket() as s:   # a port free now (JupyterLab moves on to the next if it is taken since)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, sandbox.FILE_ENV: str(tmp_path / "none.env")}
    proc = subprocess.Popen([sys.executable, "-m", "runbooks.cli", "lab", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        said = []
        for line in proc.stdout:
            said.append(line)
            if "http://127.0.0.1:" in line:
                break
        assert any("http://127.0.0.1:" in line for line in said), "".join(said)
        assert not any("Running as root is not" in line for line in said)
    finally:
        proc.terminate()
        proc.wait(timeout=HANG)
