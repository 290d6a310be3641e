"""A notebook's kernel dies with its runner.

`runbook` runs each notebook in a kernel, a child process. A runner killed outright (SIGKILL, a
lost SSH session, the OOM killer) cannot stop it, and a kernel left alive goes on applying the
current phase unseen. So the runner starts the kernel through this module::

    python -m runbooks.kernel_guard RUNNER_PID -- python -m ipykernel_launcher -f ...

On Linux it asks the operating system to SIGKILL this process the moment its parent dies
(``prctl(PR_SET_PDEATHSIG)``), checks that the parent is still the runner (it may have died
before the request took effect), then execs the kernel: the same process, and the request
survives the exec. The kernel's connections then close and the server rolls back whatever
transaction it had open; a phase is one transaction, so it leaves nothing behind.

Why not only a watchdog in the kernel (ipykernel polls its parent pid once a second, and still
does, as a second line): a watchdog is a Python thread that needs the GIL and its next tick, so
the kernel runs on for up to a second, long enough to commit a phase; the operating system's
signal needs nothing of the kernel. Why an exec'd wrapper, not ``Popen(preexec_fn=...)``: that
runs Python in the forked child of a threaded process (the runner has ZMQ and event-loop
threads), which can deadlock. The signal follows the *thread* that started the kernel:
jupyter_client starts it from the thread that runs the notebook (or its event-loop thread),
which outlives the kernel. Elsewhere than Linux the kernel is exec'd without the request, and
ipykernel's watchdog remains.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def command(kernel_cmd: list[str], parent_pid: int | None = None) -> list[str]:
    """The kernel command, wrapped so that the kernel dies with `parent_pid` (this process)."""
    return [sys.executable, "-m", "runbooks.kernel_guard", str(parent_pid or os.getpid()), "--", *kernel_cmd]


def die_with_parent() -> bool:
    """Ask for SIGKILL when the parent dies (Linux); False where that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m runbooks.kernel_guard PARENT_PID -- KERNEL COMMAND...")
    parent, kernel_cmd = int(argv[0]), argv[2:]
    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)   # the runner died before the request took effect: no kernel at all
    os.execvp(kernel_cmd[0], kernel_cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
