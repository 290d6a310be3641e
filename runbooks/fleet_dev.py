"""`dagster dev` on the fleet's code location, stoppable by SIGINT and SIGTERM wherever it was started.

    .venv/bin/python -m runbooks.fleet_dev -h 127.0.0.1 -p 3000     # = dagster dev -m runbooks.fleet -h ... -p ...

Why not `dagster dev` itself: it stops on SIGTERM by giving SIGTERM the handler SIGINT has
(dagster._utils.interrupts.setup_interrupt_handlers), and a process started with SIGINT ignored (a
background job of a script, `cmd &` in a non-interactive shell, nohup) keeps SIGINT ignored: so SIGTERM
becomes ignored too, and `dagster dev` with its webserver, daemon and code server runs on until each is
killed. This launcher gives both signals their default disposition back, then execs `dagster dev` (the
same process: its pid is the one to signal), which then shuts its services down on either.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

CODE_LOCATION = "runbooks.fleet"


def command(args: list[str]) -> list[str]:
    """`dagster dev -m runbooks.fleet ARGS`, with the dagster of this environment."""
    dagster = Path(sys.executable).with_name("dagster")
    return [str(dagster), "dev", "-m", CODE_LOCATION, *args]


def main(args: list[str]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)   # an ignored disposition would survive the exec
    cmd = command(args)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
