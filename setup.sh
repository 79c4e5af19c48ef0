#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with fastcal and its test
# extras installed at the versions in constraints.txt (not editable: what the tests import is what a
# user gets).
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The exact tested versions (constraints.txt) of the ranges pyproject.toml declares. pip also applies
# any constraint file in its own configuration (pip config list; e.g. a machine-wide cap such as
# /etc/xdg/pip/constraints.txt): both must allow the pins, or pip stops with ResolutionImpossible.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt ".[test]"
# WordNet 3.0 for DOR's outlier vocabulary: Debian's packages, made readable by nltk by `fastcal wordnet`.
# Never fails the set-up.
if ! .venv/bin/fastcal wordnet 2>/dev/null; then
    packages="wordnet-base wordnet-sense-index"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        { apt-get install -y -qq $packages || { apt-get update -qq && apt-get install -y -qq $packages; }; } \
            >/dev/null 2>&1 && .venv/bin/fastcal wordnet || echo "WordNet (for DOR): not installed" >&2
    else
        echo "WordNet (for DOR): run 'sudo apt-get install -y $packages && .venv/bin/fastcal wordnet'" >&2
    fi
fi
