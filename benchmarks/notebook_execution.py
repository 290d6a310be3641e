"""How fast does a plan run? Measures and prints ratios; asserts nothing (speed is no test).

    .venv/bin/python benchmarks/notebook_execution.py [--repeat N]

- embedded server start and stop;
- one small notebook through papermill's Python API in this process (what `runbook` does)
  against papermill's CLI in a new process each time (what a shell script would do);
- a whole rehearsal (`runbook rehearse`), end to end.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import papermill

from runbooks import connection, rehearsal, runner
from runbooks.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "sql_inspection.ipynb"


def timed(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def report(name: str, times: list[float]) -> float:
    median = statistics.median(times)
    print(f"{name:<48} median {median:7.3f}s  (min {min(times):.3f}s, max {max(times):.3f}s, n={len(times)})")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    server = report("embedded server start + stop", timed(lambda: EmbeddedPostgres().start().stop(), args.repeat))

    with EmbeddedPostgres() as pg, tempfile.TemporaryDirectory() as tmp:
        pg.add_service("bench", "bench")
        with runner.environment(pg.client_env()):
            rehearsal.prepare_database(pg, "bench", legacy=False)
            params = {**connection.from_service("bench").as_parameters(), "record_dir": tmp}
            out = str(Path(tmp) / "out.ipynb")

            def in_process():
                papermill.execute_notebook(str(NOTEBOOK), out, parameters=params, progress_bar=False,
                                           kernel_manager_class=runner.IPCKernelManager)

            def cli():
                flags = [x for k, v in params.items() for x in ("-p", k, str(v))]
                subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", str(NOTEBOOK), out, *flags],
                               check=True, capture_output=True)

            api = report("notebook via papermill API, in process", timed(in_process, args.repeat))
            shell = report("notebook via papermill CLI, new process", timed(cli, args.repeat))
    print(f"{'ratio CLI / API per notebook':<48} {shell / api:7.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        whole = report("runbook rehearse, end to end", timed(
            lambda: rehearsal.rehearse(Path(tmp), progress=lambda *_: None), 1))
    print(f"{'ratio rehearsal / server start':<48} {whole / server:7.1f}x")


if __name__ == "__main__":
    main()
