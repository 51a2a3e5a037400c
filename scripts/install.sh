#!/bin/sh
# Install this project (editable) with its dependencies into the virtualenv .venv in the repository
# root, keeping an installed torch:
#   sh scripts/install.sh        # the package        (then: .venv/bin/python -m llava.demo)
#   sh scripts/install.sh test   # and the test tools and lmms-eval (then: .venv/bin/python -m pytest -q)
#   sh scripts/install.sh lmms   # the package and lmms-eval (then: .venv/bin/lmms-eval --model globalcom2 ...)
#
# Which environment .venv is, first rule that applies:
#   1. .venv/bin/python exists: that environment is used as it is.
#   2. a virtualenv or conda env is active (VIRTUAL_ENV, else CONDA_PREFIX): .venv becomes a symlink
#      to it, so .venv/bin/python is that env's Python and the torch installed there is kept.
#   3. otherwise a new one: `python3 -m venv --system-site-packages .venv` (`python` where there is
#      no python3). It sees the base Python's packages, so a torch installed there (a GPU image's,
#      say) is kept. Where venv cannot put pip into it because ensurepip is missing (Debian or
#      Ubuntu without python3-venv), it is made --without-pip if the base Python has pip, which then
#      installs into .venv; with no pip either, this stops and says to apt-get install python3-venv.
# PYTHON=/path/to/python sh scripts/install.sh installs into that interpreter instead (no .venv).
#
# torch: an installed one is kept. Otherwise, with an NVIDIA GPU (nvidia-smi), PyPI's default build;
# without one a CPU build, since PyPI's default torch for Linux is a CUDA build with gigabytes of
# dependencies: a `+cpu` version that the configured indexes list, else PyTorch's CPU index.
#
# lmms-eval (`test`, `lmms`): the lean install, about 20 s: lmms-eval without its own dependencies (they
# include torchvision, wandb, opencv: 2.5 GB, and a torchvision build that may not match torch), plus the
# ones it needs to run generate_until tasks, with the installed torch required as it is so pip never
# replaces it; filelock<4 because lmms-eval imports filelock._api. `pip install -e .[lmms]` is the full one.
set -eu
cd "$(dirname "$0")/.."

die() {
    echo "install.sh: $*" >&2
    exit 1
}

extras=""
case "${1:-}" in
test) extras="[test]" ;;
lmms | "") ;;
*) die "unknown argument '$1' (nothing, test or lmms)" ;;
esac

if [ -n "${PYTHON:-}" ]; then
    where="$PYTHON (PYTHON; no .venv)"
elif [ -x .venv/bin/python ]; then
    PYTHON=.venv/bin/python
    where="$(pwd)/.venv (existing)"
else
    if [ -L .venv ]; then
        rm .venv  # a symlink to an environment that is gone
    elif [ -e .venv ]; then
        die "$(pwd)/.venv exists but has no bin/python: remove it and run this again"
    fi
    PYTHON=.venv/bin/python
    if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
        active=${VIRTUAL_ENV:-$CONDA_PREFIX}
        [ -x "$active/bin/python" ] || die "the active environment $active has no bin/python"
        ln -s "$active" .venv
        where="$(pwd)/.venv -> $active (the active environment)"
    else
        base=$(command -v python3 || command -v python || true)
        [ -n "$base" ] || die "no python3 (or python) on PATH to make .venv with"
        if made=$("$base" -m venv --system-site-packages .venv 2>&1); then
            where="$(pwd)/.venv (new, from $base with its site packages)"
        else
            rm -rf .venv
            if "$base" -c "import ensurepip" >/dev/null 2>&1 && ! echo "$made" | grep -q ensurepip; then
                echo "$made" >&2
                die "$base -m venv --system-site-packages .venv failed"
            fi
            if "$base" -m pip --version >/dev/null 2>&1 \
                && "$base" -m venv --system-site-packages --without-pip .venv >/dev/null 2>&1; then
                where="$(pwd)/.venv (new, from $base with its site packages; no ensurepip, so $base's pip installs into it)"
            else
                rm -rf .venv
                die "$base cannot make .venv: it has no ensurepip (nor pip); on Debian or Ubuntu run 'apt-get install python3-venv' (as root) and run this again"
            fi
        fi
    fi
fi

"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (if .venv is a broken virtualenv, remove it and run this again)"

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q torch
    else
        cpu_build=$("$PYTHON" -m pip index versions torch 2>/dev/null | tr ', ' '\n\n' | grep '+cpu$' | head -n 1 || true)
        if [ -n "$cpu_build" ]; then
            "$PYTHON" -m pip install -q "torch==$cpu_build"
        else
            "$PYTHON" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
fi

if [ -n "${1:-}" ]; then
    torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
    "$PYTHON" -m pip install -q --no-deps "lmms-eval==0.7.3"
    "$PYTHON" -m pip install -q "torch==$torch_version" loguru sacrebleu evaluate pytz tenacity "filelock<4" \
        pytablewriter
fi
"$PYTHON" -m pip install -q -e ".$extras"
echo "install.sh: installed into $where, Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
