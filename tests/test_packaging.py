"""The project's own files agree with each other: dependencies, CLI documentation, CI."""

import re
import tomllib
from pathlib import Path

from runbooks import cli

ROOT = Path(__file__).resolve().parent.parent


def _pip_requirements_of_environment_yml() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    found = []
    for line in lines[start + 1:]:
        match = re.match(r"^\s+- (.+)$", line)
        if not match:
            break
        if not match.group(1).startswith("-e "):
            found.append(match.group(1).strip())
    return found


def test_environment_yml_and_pyproject_name_the_same_dependencies():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(_pip_requirements_of_environment_yml()) == sorted(pyproject)


def test_environment_yml_names_the_extras_as_pyproject_does():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    commented = re.findall(r"^#\s+- (\S+)$", (ROOT / "environment.yml").read_text(), re.MULTILINE)
    assert sorted(commented) == sorted({name for extra in extras.values() for name in extra})


def test_make_test_installs_the_fleet_extra_so_its_tests_run_wherever_it_is_run_and_ci_runs_just_that():
    makefile = (ROOT / "Makefile").read_text()
    test_needs = re.search(r"^test: (\S+)$", makefile, re.MULTILINE).group(1)
    recipe = makefile.split(f"\n{test_needs}:", 1)[1].split("\n\n", 1)[0]
    assert "-e '.[fleet]'" in recipe
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("exec make test")


def test_the_python_floor_agrees():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert pyproject == ">=3.11"
    assert "python>=3.11" in (ROOT / "environment.yml").read_text()


def test_every_cli_command_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert f"`runbook {name}" in readme, f"runbook {name} is not documented in README.md"
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in readme, f"runbook {name} {option} is not documented in README.md"


def test_the_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make rehearse", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec make test" in ci
