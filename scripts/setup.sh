#!/usr/bin/env bash
# Sets up worldsim on a fresh Debian machine: system libraries for headless rendering, then a
# virtual environment in .venv with the project and its test dependencies.
# Idempotent: re-running reuses what is already there. WORLDSIM_FRESH_VENV=1 rebuilds .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

# Mesa's software OpenGL (llvmpipe) renders MuJoCo (Memory Maze) through EGL with no GPU.
# Xvfb, xwd (x11-apps) and xdotool: the tests open `worldsim play`'s window on a virtual X server,
# press keys in it and read the screen back.
need_debs=()
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri libglu1-mesa xvfb x11-apps xdotool; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if ((${#need_debs[@]})); then
    echo "installing Debian packages: ${need_debs[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

PYTHON=${PYTHON:-python3.11}
if [ "${WORLDSIM_FRESH_VENV:-0}" = "1" ]; then rm -rf .venv; fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: this version is a local CPU wheel; anything else pulls a multi-GB CUDA build.
pip_install() {
    # pipefail keeps pip's exit status; the filter only hides this machine's noisy index warnings.
    .venv/bin/pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
pip_install torch==2.13.0
pip_install -e ".[test]"
.venv/bin/python -c "import torch, worldsim; print('worldsim ready: torch', torch.__version__)"
