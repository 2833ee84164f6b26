#!/usr/bin/env bash
# Set up and pass every check: Debian packages the tests need, a virtualenv with the project
# and its test extras, then ruff, mypy, the import contracts (pyproject's [tool.importlinter],
# read from the working tree: imageledger/'s symlinks make the top-level folders its
# subpackages) and the whole pytest suite. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv skopeo docker-registry libfuse2 erofs-utils zsh >/dev/null
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/python -m pytest "$@"
