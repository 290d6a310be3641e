"""The code stays readable: no function in runbooks/ grows past 100 lines."""

import ast
from pathlib import Path

import runbooks

LIMIT = 100


def function_lengths() -> list[tuple[int, str]]:
    """(lines, 'module.py:line name') of every function and method in runbooks/, longest first."""
    found = []
    for path in sorted(Path(runbooks.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.name}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_no_function_in_runbooks_is_longer_than_a_hundred_lines():
    too_long = [f"{where} ({lines} lines)" for lines, where in function_lengths() if lines > LIMIT]
    assert not too_long, "split these into named steps: " + "; ".join(too_long)
