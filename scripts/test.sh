#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# No system packages are needed yet (GUI tests, when they come, add Xvfb and Mesa here).

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision are resolved together by pip (never a pinned local CPU file).
"$VENV/bin/python" -m pip install -q -e ".[test]"

# Tests never download weights: make any accidental hub access fail at once.
export HF_HUB_OFFLINE=1
export MEDCLIPSAM_HOME="$(mktemp -d)"
"$VENV/bin/python" -m ruff check napari_medclipsam tests benchmarks examples
"$VENV/bin/python" -m pytest "$@"
