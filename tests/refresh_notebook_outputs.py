"""Refresh the expected outputs that the nbval regression compares with.

    .venv/bin/python tests/refresh_notebook_outputs.py

Runs the runbooks in deployment order (tests/notebook_chain.py) on a fresh embedded server
with the legacy fixture, then writes tests/notebook_expected/<name>.json: for each cell tagged
`nbval-check-output`, its id, source and outputs. It never writes into notebooks/ (the committed
notebooks carry no outputs). A checked cell whose new output differs from the expected one only
where nbval_sanitize.cfg says runs may differ (times, ids, digests) keeps the expected output,
so a refresh shows only real changes. Review the diff before committing it: it is the
regression's expectation.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import nbformat
import papermill

sys.path.insert(0, str(Path(__file__).resolve().parent))

from notebook_chain import (CHAIN, DATABASE, SANITIZE, checked_cells, expected_path, parameterized_copy,  # noqa: E402
                            read_expected, write_expected)
from runbooks import rehearsal, runner  # noqa: E402
from runbooks.embedded import EmbeddedPostgres  # noqa: E402


def sanitizers() -> list[tuple[re.Pattern, str]]:
    """nbval's sanitize file: `regex:` and `replace:` lines, a pair per section."""
    pairs, regex = [], None
    for line in SANITIZE.read_text().splitlines():
        if line.startswith("regex: "):
            regex = re.compile(line.removeprefix("regex: "))
        elif line.startswith("replace: "):
            pairs.append((regex, line.removeprefix("replace: ")))
    return pairs


def sanitized(outputs, rules) -> str:
    text = json.dumps(outputs, sort_keys=True)
    for regex, replacement in rules:
        text = regex.sub(replacement, text)
    return text


def execute_chain(work: Path) -> dict[str, nbformat.NotebookNode]:
    executed = {}
    with EmbeddedPostgres() as pg:
        pg.add_service(DATABASE, DATABASE)
        with runner.environment(pg.client_env()):
            rehearsal.prepare_database(pg, DATABASE)
            for name in CHAIN:
                copy = parameterized_copy(name, DATABASE, work / "records", work / "copies")
                out = work / "executed" / f"{name}.ipynb"
                out.parent.mkdir(parents=True, exist_ok=True)
                print(f"running {name} ...", flush=True)
                papermill.execute_notebook(str(copy), str(out), kernel_name="python3", progress_bar=False,
                                           cwd=str(copy.parent), kernel_manager_class=runner.IPCKernelManager)
                executed[name] = nbformat.read(out, as_version=4)
    return executed


def write_back(name: str, executed: nbformat.NotebookNode) -> int:
    """The checked cells' outputs into the notebook's expectations; how many changed."""
    before = {e["id"]: e["outputs"] for e in read_expected(name)} if expected_path(name).exists() else {}
    rules = sanitizers()
    cells, changed = [], 0
    for cell in checked_cells(executed):
        outputs = cell.outputs
        if cell.get("id") in before and sanitized(before[cell.get("id")], rules) == sanitized(outputs, rules):
            outputs = before[cell.get("id")]
        else:
            changed += 1
        cells.append({"id": cell.get("id"), "source": cell.source, "outputs": outputs})
    write_expected(name, cells)
    return changed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="nbval-refresh-") as tmp:
        executed = execute_chain(Path(tmp))
        for name in CHAIN:
            print(f"{name}: {write_back(name, executed[name])} checked cell(s) changed")


if __name__ == "__main__":
    main()
