#!/usr/bin/env bash
# The test command: set up what is missing, then run the whole suite. Tests that need
# root or /dev/kvm fail the run if they skip on a machine that has them (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: no tests were collected" >&2
fi
exit "$status"
