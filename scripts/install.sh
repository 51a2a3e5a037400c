#!/bin/sh
# Install this project (editable) with its dependencies into the virtualenv .venv in the repository
# root, keeping an installed torch:
#   sh scripts/install.sh        # the package        (then: .venv/bin/python -m llava.demo)
#   sh scripts/install.sh test   # and the test tools and lmms-eval (then: .venv/bin/python -m pytest -q)
#   sh scripts/install.sh lmms   # the package and lmms-eval (then: .venv/bin/lmms-eval --model globalcom2 ...)
#   sh scripts/install.sh upstream  # upstream LLaVA 1.2.2 in .venv-upstream (then: tests/upstream runs)
#   sh scripts/install.sh llava-next  # .venv-llava-next: what the official LLaVA-NeXT (OneVision) code needs
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
#
# upstream (also tried by `test`, which goes on without it): a separate environment, .venv-upstream, made
# as rule 3 makes .venv (never the active one; torch as above), with upstream LLaVA's own pins --
# transformers 4.37.2, tokenizers 0.15.1, sentencepiece 0.1.99, accelerate 0.21.0 -- plus protobuf and
# pillow, and `llava-torch==1.2.2` without its dependencies (gradio, bitsandbytes, a torch 2.1 pin). Its
# package is also called `llava`, hence the separate environment. About 10 s and 130 MB where the base
# Python has torch.
#
# llava-next: .venv-llava-next, made the same way, with transformers 4.40.2 (the release nearest the
# commit the official LLaVA-NeXT code pins), einops, accelerate and pillow. The code itself is a clone
# (not on PyPI): tests/upstream/test_onevision_official.py puts it on the path (LLAVA_NEXT_REPO).
set -eu
cd "$(dirname "$0")/.."

die() {
    echo "install.sh: $*" >&2
    exit 1
}

# new_venv DIR: a virtualenv at DIR seeing the base Python's packages (rule 3 above); sets `where`.
new_venv() {
    base=$(command -v python3 || command -v python || true)
    [ -n "$base" ] || die "no python3 (or python) on PATH to make $1 with"
    if made=$("$base" -m venv --system-site-packages "$1" 2>&1); then
        where="$(pwd)/$1 (new, from $base with its site packages)"
        return
    fi
    rm -rf "$1"
    if "$base" -c "import ensurepip" >/dev/null 2>&1 && ! echo "$made" | grep -q ensurepip; then
        echo "$made" >&2
        die "$base -m venv --system-site-packages $1 failed"
    fi
    if "$base" -m pip --version >/dev/null 2>&1 \
        && "$base" -m venv --system-site-packages --without-pip "$1" >/dev/null 2>&1; then
        where="$(pwd)/$1 (new, from $base with its site packages; no ensurepip, so $base's pip installs into it)"
    else
        rm -rf "$1"
        die "$base cannot make $1: it has no ensurepip (nor pip); on Debian or Ubuntu run 'apt-get install python3-venv' (as root) and run this again"
    fi
}

# ensure_torch PYTHON: keep an installed torch, else install the build for this machine (see above).
ensure_torch() {
    "$1" -m pip --version >/dev/null 2>&1 || die "$1 has no pip (if its virtualenv is broken, remove it and run this again)"
    "$1" -c "import torch" >/dev/null 2>&1 && return
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$1" -m pip install -q torch
    else
        cpu_build=$("$1" -m pip index versions torch 2>/dev/null | tr ', ' '\n\n' | grep '+cpu$' | head -n 1 || true)
        if [ -n "$cpu_build" ]; then
            "$1" -m pip install -q "torch==$cpu_build"
        else
            "$1" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
}

# reference_venv DIR PACKAGE...: the virtualenv DIR of a reference codebase (existing, or made as rule 3
# makes .venv; torch as above) with PACKAGEs installed. Each step must succeed, also where `test` runs
# it as `( install_upstream ) || ...`, in which `set -e` does not apply.
reference_venv() {
    dir=$1
    shift
    { [ -x "$dir/bin/python" ] && where="$(pwd)/$dir (existing)" || new_venv "$dir"; } &&
        ensure_torch "$dir/bin/python" &&
        "$dir/bin/python" -m pip install -q "$@"
}

# install_upstream: .venv-upstream with upstream LLaVA's pins (see above).
install_upstream() {
    reference_venv .venv-upstream "transformers==4.37.2" "tokenizers==0.15.1" "sentencepiece==0.1.99" \
        "accelerate==0.21.0" protobuf pillow &&
        .venv-upstream/bin/python -m pip install -q --no-deps "llava-torch==1.2.2" &&
        echo "install.sh: installed upstream LLaVA 1.2.2 into $where"
}

extras=""
case "${1:-}" in
test) extras="[test]" ;;
lmms | "") ;;
upstream)
    install_upstream
    exit
    ;;
llava-next)
    reference_venv .venv-llava-next "transformers==4.40.2" einops accelerate pillow
    echo "install.sh: installed the official LLaVA-NeXT code's dependencies into $where (the code: a clone of" \
        "LLaVA-VL/LLaVA-NeXT, named by LLAVA_NEXT_REPO)"
    exit
    ;;
*) die "unknown argument '$1' (nothing, test, lmms, upstream or llava-next)" ;;
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
        new_venv .venv
    fi
fi

ensure_torch "$PYTHON"

if [ -n "${1:-}" ]; then
    torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
    "$PYTHON" -m pip install -q --no-deps "lmms-eval==0.7.3"
    "$PYTHON" -m pip install -q "torch==$torch_version" loguru sacrebleu evaluate pytz tenacity "filelock<4" \
        pytablewriter
fi
"$PYTHON" -m pip install -q -e ".$extras"
echo "install.sh: installed into $where, Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ "$extras" = "[test]" ]; then
    ( install_upstream ) || echo "install.sh: upstream LLaVA could not be installed; tests/upstream will be skipped" >&2
fi
