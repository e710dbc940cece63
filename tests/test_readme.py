"""The README's Python examples run as written (in order, sharing one namespace)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102


def test_ci_runs_the_readme_test_command_word_for_word():
    # .ci/run runs the README's install-and-test command on each of its legs, as a string.
    commands = re.findall(r"```bash\n(python3 -m venv \.venv && .*?)\n```", README.read_text())
    assert len(commands) == 1, commands
    ci = (README.parent / ".ci" / "run").read_text()
    assert f"TEST_COMMAND='{commands[0]}'" in ci
