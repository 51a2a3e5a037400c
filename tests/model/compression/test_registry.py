"""The registry: listing, describing, `key=value` arguments, and the command line."""

import subprocess
import sys

import pytest

from llava.model.compression import describe, get_method, method_names, parse_method_args
from llava.model.compression.__main__ import run_name
from llava.model.compression.globalcom2 import GlobalCom2Args
from llava.model.compression.registry import row_args


def test_every_method_module_is_registered_under_its_own_name():
    assert {"globalcom2", "pooling", "random"} <= set(method_names()) and method_names() == sorted(method_names())
    for name in method_names():
        method = get_method(name)
        assert method.name == name and method.select.__module__ == f"llava.model.compression.{name}"


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown compression method 'fastv2'; choose one of: .*globalcom2"):
        get_method("fastv2")


def test_arguments_are_parsed_by_type_and_refused_in_one_line():
    assert parse_method_args("globalcom2", ["alpha=0", "allocation=uniform", "temperature=5"]) == GlobalCom2Args(
        alpha=0.0, allocation="uniform", temperature=5.0)
    for pairs, message in [(["alpha"], "has no argument 'alpha'"), (["allocation=best"], "'best' is not one of"),
                           (["temperature=hot"], "'hot' is not float"), (["alpha=2"], "alpha must be in"),
                           (["scores=local", "alpha=0.3"], "needs scores=both")]:
        with pytest.raises(ValueError, match=message) as refused:
            parse_method_args("globalcom2", pairs)
        assert "\n" not in str(refused.value)


def test_describe_and_the_list_command():
    assert "alpha=0.5 (float)" in describe("globalcom2") and "signals: cls_logits_last" in describe("globalcom2")
    listed = subprocess.run([sys.executable, "-m", "llava.model.compression", "--list"], capture_output=True,
                            text=True, check=True).stdout
    for name in method_names():
        assert f"{name} ({get_method(name).stage}):" in listed
    assert "fastv (in-llm):" in listed


def test_run_names_keep_default_globalcom2_names_and_tell_arguments_apart():
    assert run_name("globalcom2", []) == "" and run_name("globalcom2", ["alpha=0.5"]) == ""
    assert run_name("random", []) == "random"
    assert run_name("globalcom2", ["alpha=0"]) == run_name("globalcom2", ["alpha=0.0"])
    assert run_name("globalcom2", ["alpha=0"]) != run_name("globalcom2", ["alpha=1"])
    assert run_name("globalcom2", ["alpha=0"]).startswith("globalcom2-") and len(run_name("globalcom2", ["alpha=0"])) == 19


def test_row_args_name_the_non_default_arguments_and_always_the_mode():
    assert row_args(parse_method_args("globalcom2", ["alpha=0.5", "allocation=uniform"])) == {"allocation": "uniform"}
    assert row_args(parse_method_args("fastervlm", [])) == {"mode": "faithful"}
    assert row_args(parse_method_args("fastervlm", ["budget=matched", "mode=anyres"])) == {
        "budget": "matched", "mode": "anyres"}
    assert run_name("fastervlm", []) == "fastervlm"  # the file name still omits defaults
