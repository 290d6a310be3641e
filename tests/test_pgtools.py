"""Client tools for a server: its own major version first, newer with a warning, older refused."""

import pytest

from runbooks import embedded, pgtools
from runbooks.pgtools import ToolError, find_companion, find_tool

pytestmark = pytest.mark.both_versions   # the tools chosen depend on the server's major version


def test_the_servers_own_major_version_is_chosen(server):
    tool = find_tool("pg_dump", server.pg.major)
    assert tool.major == server.pg.major
    assert tool.warning is None
    assert tool.path.is_file()


def test_a_newer_client_is_accepted_with_a_warning_saying_so():
    tool = find_tool("pg_dump", 14)   # no PostgreSQL 14 client here; 15 or 18 are
    assert tool.major > 14
    assert tool.warning and "newer than the server" in tool.warning and "14" in tool.warning


def test_an_older_client_only_is_refused_naming_what_was_found_and_what_is_needed():
    with pytest.raises(ToolError) as refused:
        find_tool("pg_dump", 99)
    message = str(refused.value)
    assert "PostgreSQL 99" in message and "only older versions" in message
    assert str(find_tool("pg_dump", None).path) in message


def test_without_a_server_the_newest_client_is_chosen():
    newest = find_tool("pg_restore", None)
    assert all(newest.major >= find_tool("pg_restore", m).major for m in (15, 18))


def test_runbooks_pg_bin_is_tried_before_everything_else(server, monkeypatch):
    own = find_tool("psql", server.pg.major)
    monkeypatch.setenv(embedded.BIN_ENV, str(own.path.parent))
    chosen = find_tool("psql", server.pg.major)
    assert chosen.origin == f"${embedded.BIN_ENV}" and chosen.path == own.path


def test_a_tool_that_is_nowhere_is_refused_clearly():
    with pytest.raises(ToolError, match="no pg_nonexistent_tool found"):
        find_tool("pg_nonexistent_tool", 18)


def test_psql_comes_from_the_same_installation_as_pg_restore(server):
    pg_restore = find_tool("pg_restore", server.pg.major)
    psql = find_companion(pg_restore, "psql", server.pg.major)
    assert psql.path.parent == pg_restore.path.parent and psql.major == pg_restore.major


def test_tool_descriptions_are_json_ready(server):
    described = find_tool("pg_dump", server.pg.major).as_dict()
    assert set(described) == {"name", "path", "version", "major", "origin", "warning"}
    assert isinstance(described["path"], str)


def test_the_tool_environment_keeps_libpq_settings(monkeypatch):
    monkeypatch.setenv("PGSERVICEFILE", "/somewhere/pg_service.conf")
    env = pgtools.tool_env()
    assert env["PGSERVICEFILE"] == "/somewhere/pg_service.conf" and env["LC_MESSAGES"] == "C"
