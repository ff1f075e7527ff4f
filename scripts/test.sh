#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian/Ubuntu machine, then run them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages for the napari GUI tests: an X server (Xvfb, started by pytest-xvfb), Mesa's
# OpenGL (vispy needs GL; QT_QPA_PLATFORM=offscreen does not work) and Qt's xcb libraries.
GUI_PACKAGES="xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4
  libxcb-keysyms1 libxcb-image0 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0
  libxcb-xfixes0 libdbus-1-3 libfontconfig1"
if ! command -v Xvfb >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    if { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; } && command -v apt-get >/dev/null 2>&1; then
        # shellcheck disable=SC2086
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends \
            $GUI_PACKAGES >/dev/null \
            || echo "WARNING: could not install the GUI test packages ($GUI_PACKAGES)." >&2
    else
        echo "WARNING: Xvfb is missing and cannot be installed here (need root or sudo and" \
             "apt-get). Install: $GUI_PACKAGES. The napari widget tests will be skipped" \
             "or fail without a display." >&2
    fi
fi

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision are resolved together by pip (never a pinned local CPU file).
# sam2 is built from its source release; its optional CUDA extension is not needed here.
SAM2_BUILD_CUDA=${SAM2_BUILD_CUDA:-0} "$VENV/bin/python" -m pip install -q -e ".[test]"

# Tests never download weights: make any accidental hub access fail at once.
export HF_HUB_OFFLINE=1
export MEDCLIPSAM_HOME="$(mktemp -d)"
export MEDCLIPSAM_CONFIG_DIR="$MEDCLIPSAM_HOME/config"
"$VENV/bin/python" -m ruff check napari_medclipsam tests benchmarks examples
"$VENV/bin/python" -m pytest "$@"
