#!/bin/sh
# Install this project (editable) into the current Python environment, keeping an installed torch.
#   sh scripts/install.sh        # the package
#   sh scripts/install.sh test   # the package and the test tools
# PyPI's default torch for Linux is a CUDA build with gigabytes of dependencies, so when torch is
# missing this picks a CPU build on a machine without an NVIDIA GPU.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    cpu_build=$("$PYTHON" -m pip index versions torch 2>/dev/null | tr ', ' '\n\n' | grep '+cpu$' | head -n 1 || true)
    if [ -n "$cpu_build" ]; then
        "$PYTHON" -m pip install -q "torch==$cpu_build"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q torch
    else
        "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

extras=""
if [ "${1:-}" = "test" ]; then
    extras="[test]"
fi
"$PYTHON" -m pip install -q -e ".$extras"
