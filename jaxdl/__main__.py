"""``python -m jaxdl``: the same command as the ``jaxdl`` console script (see `jaxdl.cli`)."""

from jaxdl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
