"""scripts/install.sh chooses the environment it installs into by the rules in its header. It runs
here on a copy of the script, with a PATH of stand-ins: a fake python3 (and the Python it puts in
.venv) that logs each call and fakes venv and pip, so nothing is installed and nothing is fetched."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# The fake Python: logs "$0 ARGS", fakes `-m venv` (copying itself into DIR/bin/python) and pip.
# NO_ENSUREPIP: venv fails as Debian's does without python3-venv, unless --without-pip (it leaves a
# half-made DIR behind, as the real one does); NO_PIP: no pip module; NO_TORCH: torch is missing;
# FAIL_INSTALL: a `pip install` naming it fails.
FAKE_PYTHON = r"""#!/bin/sh
echo "$0 $*" >> "$INSTALL_LOG"
case "$1 $2" in
"-m venv")
    shift 2
    without_pip=no
    for arg; do
        [ "$arg" = --without-pip ] && without_pip=yes
        dir=$arg
    done
    mkdir -p "$dir/bin" && cp "$FAKE_PYTHON" "$dir/bin/python"
    if [ -n "${NO_ENSUREPIP:-}" ] && [ $without_pip = no ]; then
        echo "The virtual environment was not created successfully because ensurepip is not"
        echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
        exit 1
    fi
    exit 0 ;;
"-m pip")
    case "$3" in
    --version) [ -z "${NO_PIP:-}" ]; exit ;;
    index) echo "torch (2.5.0)"; echo "Available versions: 2.5.0, 2.4.1+cpu, 2.4.1, 2.4.0+cpu"; exit 0 ;;
    install) case "$*" in *"${FAIL_INSTALL:-(none)}"*) exit 1 ;; esac; exit 0 ;;
    esac
    exit 1 ;;
"-c import torch") [ -z "${NO_TORCH:-}" ]; exit ;;
"-c import ensurepip") [ -z "${NO_ENSUREPIP:-}" ]; exit ;;
"-c "*) echo 3.11.0 ;;
esac
"""
TOOLS = ["dirname", "rm", "ln", "grep", "tr", "head", "mkdir", "cp"]


@pytest.fixture
def sandbox(tmp_path):
    """A copy of the repository's install script; a bin/ with a fake python3; a PATH of that bin/
    and the few tools the script and the fake use (so no real Python and no nvidia-smi on it)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    (repo / "pyproject.toml").write_text('[project]\nname = "fake"\nversion = "0"\n')
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    bin_dir, tools = tmp_path / "bin", tmp_path / "tools"
    bin_dir.mkdir()
    tools.mkdir()
    shutil.copy(fake, bin_dir / "python3")
    for tool in TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": f"{bin_dir}:{tools}", "HOME": str(tmp_path), "INSTALL_LOG": str(log), "FAKE_PYTHON": str(fake)}
    return {"repo": repo, "bin": bin_dir, "fake": fake, "log": log, "env": env, "tmp": tmp_path}


def run(sandbox, *args, **env):
    result = subprocess.run([shutil.which("sh"), str(sandbox["repo"] / "scripts" / "install.sh"), *args],
                            env={**sandbox["env"], **env}, cwd=sandbox["tmp"], capture_output=True, text=True,
                            timeout=30)
    return result, sandbox["log"].read_text().splitlines()


def fake_env(sandbox, name):
    env = sandbox["tmp"] / name
    (env / "bin").mkdir(parents=True)
    shutil.copy(sandbox["fake"], env / "bin" / "python")
    return env


UPSTREAM_INSTALLS = [
    ".venv-upstream/bin/python -m pip install -q transformers==4.37.2 tokenizers==0.15.1 sentencepiece==0.1.99 "
    "accelerate==0.21.0 protobuf pillow",
    ".venv-upstream/bin/python -m pip install -q --no-deps llava-torch==1.2.2",
]


def test_without_an_environment_it_makes_a_venv_with_system_site_packages(sandbox):
    result, calls = run(sandbox, "test")
    assert result.returncode == 0, result.stderr
    venv = sandbox["repo"] / ".venv"
    assert f"{sandbox['bin']}/python3 -m venv --system-site-packages .venv" in calls
    assert (venv / "bin" / "python").exists() and not venv.is_symlink()
    ours = calls.index(".venv/bin/python -m pip install -q -e .[test]")
    assert calls[ours + 1] == ".venv/bin/python -c import sys; print(sys.version.split()[0])"
    assert calls[-2:] == UPSTREAM_INSTALLS  # then upstream LLaVA, for tests/upstream
    assert result.stdout.splitlines() == [
        f"install.sh: installed into {venv} (new, from {sandbox['bin']}/python3 with its site packages), Python 3.11.0",
        f"install.sh: installed upstream LLaVA 1.2.2 into {sandbox['repo']}/.venv-upstream (new, from "
        f"{sandbox['bin']}/python3 with its site packages)"]
    assert result.stderr == ""


def test_upstream_gets_its_own_venv_never_the_active_environment(sandbox):
    active = fake_env(sandbox, "active")
    result, calls = run(sandbox, "upstream", VIRTUAL_ENV=str(active))
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"{sandbox['bin']}/python3 -m venv --system-site-packages .venv-upstream"
    assert [call for call in calls if "pip install" in call] == UPSTREAM_INSTALLS
    assert not (sandbox["repo"] / ".venv").exists()
    first_run = len(calls)
    result, calls = run(sandbox, "upstream")  # again: the existing one is used
    assert not any("-m venv" in call for call in calls[first_run:])
    upstream = sandbox["repo"] / ".venv-upstream"
    assert result.stdout == f"install.sh: installed upstream LLaVA 1.2.2 into {upstream} (existing)\n"


def test_llava_next_gets_its_own_venv_with_what_the_official_code_needs(sandbox):
    result, calls = run(sandbox, "llava-next")
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"{sandbox['bin']}/python3 -m venv --system-site-packages .venv-llava-next"
    assert [call for call in calls if "pip install" in call] == [
        ".venv-llava-next/bin/python -m pip install -q transformers==4.40.2 einops accelerate pillow"]
    assert result.stdout.startswith(f"install.sh: installed the official LLaVA-NeXT code's dependencies into "
                                    f"{sandbox['repo']}/.venv-llava-next (new, ")


def test_the_test_install_goes_on_without_upstream(sandbox):
    result, calls = run(sandbox, "test", FAIL_INSTALL="llava-torch")
    assert result.returncode == 0
    assert ".venv/bin/python -m pip install -q -e .[test]" in calls and calls[-1] == UPSTREAM_INSTALLS[1]
    assert result.stdout.count("\n") == 1  # ours installed; upstream not
    assert result.stderr == "install.sh: upstream LLaVA could not be installed; tests/upstream will be skipped\n"
    result, _ = run(sandbox, "upstream", FAIL_INSTALL="llava-torch")
    assert result.returncode == 1  # on its own, a failure is one


def test_python_makes_the_venv_where_there_is_no_python3(sandbox):
    (sandbox["bin"] / "python3").rename(sandbox["bin"] / "python")
    result, calls = run(sandbox)
    assert result.returncode == 0, result.stderr
    assert calls[0] == f"{sandbox['bin']}/python -m venv --system-site-packages .venv"
    assert calls[-2] == ".venv/bin/python -m pip install -q -e ."


def test_no_python_at_all_says_so(sandbox):
    (sandbox["bin"] / "python3").unlink()
    result, _ = run(sandbox)
    assert result.returncode == 1
    assert result.stderr == "install.sh: no python3 (or python) on PATH to make .venv with\n"


def test_an_existing_venv_is_used_even_with_an_active_environment(sandbox):
    fake_env(sandbox, "repo/.venv")
    active = fake_env(sandbox, "active")
    result, calls = run(sandbox, VIRTUAL_ENV=str(active))
    assert result.returncode == 0, result.stderr
    assert not (sandbox["repo"] / ".venv").is_symlink()
    assert all(call.startswith(".venv/bin/python ") for call in calls), calls
    assert ".venv/bin/python -m pip install -q -e ." in calls
    assert result.stdout == f"install.sh: installed into {sandbox['repo']}/.venv (existing), Python 3.11.0\n"


@pytest.mark.parametrize("variable", ["VIRTUAL_ENV", "CONDA_PREFIX"])
def test_an_active_environment_becomes_a_venv_symlink(sandbox, variable):
    active = fake_env(sandbox, "active")
    result, calls = run(sandbox, "test", **{variable: str(active)})
    assert result.returncode == 0, result.stderr
    venv = sandbox["repo"] / ".venv"
    assert venv.is_symlink() and os.readlink(venv) == str(active)
    assert not any(call.endswith("-m venv --system-site-packages .venv") for call in calls)
    assert ".venv/bin/python -m pip install -q -e .[test]" in calls
    installed = f"install.sh: installed into {venv} -> {active} (the active environment), Python 3.11.0"
    assert result.stdout.splitlines()[0] == installed


def test_a_stale_venv_symlink_is_replaced(sandbox):
    (sandbox["repo"] / ".venv").symlink_to(sandbox["tmp"] / "gone")
    active = fake_env(sandbox, "active")
    result, _ = run(sandbox, VIRTUAL_ENV=str(active))
    assert result.returncode == 0, result.stderr
    assert os.readlink(sandbox["repo"] / ".venv") == str(active)


def test_a_venv_folder_without_python_is_left_alone(sandbox):
    (sandbox["repo"] / ".venv" / "lib").mkdir(parents=True)
    result, calls = run(sandbox)
    assert result.returncode == 1 and calls == []
    assert result.stderr == f"install.sh: {sandbox['repo']}/.venv exists but has no bin/python: remove it and run this again\n"
    assert (sandbox["repo"] / ".venv" / "lib").is_dir()


def test_without_ensurepip_the_base_pip_installs_into_a_venv_without_pip(sandbox):
    result, calls = run(sandbox, NO_ENSUREPIP="1")
    assert result.returncode == 0, result.stderr
    python3 = f"{sandbox['bin']}/python3"
    assert calls[:2] == [f"{python3} -m venv --system-site-packages .venv", f"{python3} -c import ensurepip"]
    assert f"{python3} -m venv --system-site-packages --without-pip .venv" in calls
    assert ".venv/bin/python -m pip install -q -e ." in calls
    assert "no ensurepip" in result.stdout and result.stdout.count("\n") == 1


def test_without_ensurepip_nor_pip_it_says_to_install_python3_venv(sandbox):
    result, calls = run(sandbox, NO_ENSUREPIP="1", NO_PIP="1")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "apt-get install python3-venv" in result.stderr
    assert not (sandbox["repo"] / ".venv").exists()  # the half-made one is removed
    assert not any("install" in call for call in calls if "-m pip" in call)


def test_an_explicit_python_is_installed_into_without_a_venv(sandbox):
    other = fake_env(sandbox, "other")
    result, calls = run(sandbox, PYTHON=str(other / "bin" / "python"), VIRTUAL_ENV=str(other))
    assert result.returncode == 0, result.stderr
    assert not (sandbox["repo"] / ".venv").exists()
    assert f"{other}/bin/python -m pip install -q -e ." in calls
    assert result.stdout.startswith(f"install.sh: installed into {other}/bin/python (PYTHON; no .venv)")


def test_a_missing_torch_is_the_newest_listed_cpu_build_without_a_gpu(sandbox):
    result, calls = run(sandbox, NO_TORCH="1")
    assert result.returncode == 0, result.stderr
    installs = [call for call in calls if "pip install" in call]
    assert installs == [".venv/bin/python -m pip install -q torch==2.4.1+cpu", ".venv/bin/python -m pip install -q -e ."]


def test_a_missing_torch_is_pypis_default_build_with_a_gpu(sandbox):
    gpu = sandbox["bin"] / "nvidia-smi"
    gpu.write_text("#!/bin/sh\n")
    gpu.chmod(0o755)
    result, calls = run(sandbox, NO_TORCH="1")
    assert result.returncode == 0, result.stderr
    assert [call for call in calls if "pip install" in call or "pip index" in call] == [
        ".venv/bin/python -m pip install -q torch", ".venv/bin/python -m pip install -q -e ."]


def test_an_installed_torch_is_kept(sandbox):
    _, calls = run(sandbox)
    assert ".venv/bin/python -c import torch" in calls
    assert not any("torch" in call for call in calls if "-m pip" in call)
