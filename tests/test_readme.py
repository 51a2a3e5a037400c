"""The README's quick start is exactly two commands, each installing into the `.venv` virtualenv
with scripts/install.sh and then running `.venv/bin/python -m MODULE`: the first runs the demo, the
second (with the test tools) the test suite, and CI runs the second one verbatim."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"sh scripts/install\.sh(?P<test> test)? && \.venv/bin/python -m (?P<module>\S+)(?P<args>.*)")


def _quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_two_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2
    demo, tests = (COMMAND.fullmatch(command.strip()) for command in commands)
    assert demo and not demo["test"] and demo["module"] == "llava.demo", commands[0]
    assert tests and tests["test"] and tests["module"] == "pytest", commands[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[1].strip() in ci_lines


def test_the_install_script_documents_its_venv_rules():
    header = (ROOT / "scripts" / "install.sh").read_text().split("set -eu", 1)[0]
    for rule in (".venv/bin/python exists", "VIRTUAL_ENV", "CONDA_PREFIX", "--system-site-packages",
                 "--without-pip", "python3-venv", "PYTHON="):
        assert rule in header, rule
