"""A reader of the server in the background, on a connection of its own, while a step runs.

The app's waits (``impact.py``) and the WAL, replica lag and disk a phase uses (``resources.py``) are
sampled beside the phase, never by it: a sampler reads (read-only, autocommit), keeps what it saw, and
stops with the step. One that cannot read (the server went away, the role may not) keeps what it has
and says why in ``problem``; it never stops the step it watches.
"""

from __future__ import annotations

import threading

from . import connection
from .backup import redact


class Sampler:
    """Subclasses say what to read first (``begin``), at each sample (``sample``) and at the end
    (``finish``), and how long to wait before the next sample (``next_interval``)."""

    application_name = "runbook sampler"

    def __init__(self, target: connection.Target):
        self.target = target
        self.samples = 0
        self.problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn = None

    # -- what a subclass says ------------------------------------------------------------------
    def begin(self, cur) -> None:
        """Read the figures the step starts from."""

    def sample(self, cur) -> None:
        raise NotImplementedError

    def finish(self, cur) -> None:
        """Read the figures the step ends with (one last sample by default)."""
        self.sample(cur)

    def next_interval(self) -> float:
        raise NotImplementedError

    # -- the thread ----------------------------------------------------------------------------
    def __enter__(self):
        try:
            self._conn = connection.connect(self.target, application_name=self.application_name,
                                            readonly=True, autocommit=True)
            with self._conn.cursor() as cur:
                self.begin(cur)
        except Exception as exc:   # the step still runs: the sampler only says what it could not read
            self._failed(exc)
            return self
        self._thread = threading.Thread(target=self._run, name=self.application_name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None and self.problem is None:
            try:
                with self._conn.cursor() as cur:
                    self.finish(cur)
            except Exception as error:
                self._failed(error)
        self._close()

    def _run(self) -> None:
        while True:
            try:
                with self._conn.cursor() as cur:
                    self.sample(cur)
                self.samples += 1
            except Exception as exc:
                self._failed(exc)
                return
            if self._stop.wait(self.next_interval()):
                return

    def _failed(self, exc: Exception) -> None:
        if self.problem is None:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.problem = f"could not read the server: {redact(first)}"
        self._close()

    def _close(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
