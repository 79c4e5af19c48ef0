#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with fastcal and its test
# extras installed (not editable: what the tests import is what a user gets).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check ".[test]"
