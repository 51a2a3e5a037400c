"""`llava.model.defaults`: llava_arch's compression defaults read from its source, without torch."""

import subprocess
import sys

import pytest

from llava.model import defaults, llava_arch


def test_the_defaults_are_llava_arch_s():
    assert defaults.read_defaults() == {name: getattr(llava_arch, name) for name in defaults.NAMES}


def test_the_last_assignment_wins_and_a_missing_one_is_named(tmp_path):
    source = tmp_path / "arch.py"
    source.write_text("retention_ratio = 0.25\ntoken_layout = 'spatial'\nretention_ratio = 0.1\n"
                      "compression_method = 'fastv'\n")
    assert defaults.read_defaults(source) == dict(retention_ratio=0.1, token_layout="spatial",
                                                  compression_method="fastv")
    source.write_text("retention_ratio = 0.25\n")
    with pytest.raises(ValueError, match="assigns no literal token_layout, compression_method"):
        defaults.read_defaults(source)


def test_the_command_prints_them_without_starting_torch():
    code = ("import runpy, sys; runpy.run_module('llava.model.defaults', run_name='__main__'); "
            "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [f"{llava_arch.retention_ratio} {llava_arch.token_layout} "
                                f"{llava_arch.compression_method}", "[]"]
