"""Helpers shared by the command's test files (tests/test_cli.py, tests/test_cli_errors.py)."""

from jaxdl import cli


def run_main(capsys, *argv):
    """Run ``main(argv)`` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
