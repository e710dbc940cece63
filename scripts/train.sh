#!/usr/bin/env bash
# Set up a fresh machine and train: create a virtual environment in <repo>/.venv if it is
# missing, install jaxdl into it (again whenever pyproject.toml changes), then run
# `jaxdl train` with this script's arguments, from the current directory.
#
#   bash scripts/train.sh                          # MLP on the bundled 5k MNIST, prints test accuracy
#   bash scripts/train.sh --model cnn --out runs/cnn
#
# Needs Python 3.11+ with the venv module (Debian/Ubuntu: apt install python3-venv) and, for the
# first run, access to the package index. PYTHON picks the interpreter (default: python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.jaxdl-installed"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "scripts/train.sh: creating $VENV ($("$PYTHON" --version 2>&1))" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    echo "scripts/train.sh: installing jaxdl and its dependencies into $VENV" >&2
    "$VENV/bin/python" -m pip install --upgrade pip >&2
    "$VENV/bin/python" -m pip install -e "$ROOT" >&2
    touch "$STAMP"
fi

exec "$VENV/bin/jaxdl" train "$@"
