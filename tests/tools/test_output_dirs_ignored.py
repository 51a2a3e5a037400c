"""The tools' default output folders are git-ignored, so a run in the repository leaves it clean."""

import importlib.util
import pathlib

from llava.visualize import build_parser

REPO = pathlib.Path(__file__).resolve().parents[2]


def _benchmark_efficiency_parser():
    spec = importlib.util.spec_from_file_location("benchmark_efficiency", REPO / "tools" / "benchmark_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_default_output_folders_are_ignored_at_the_root():
    ignored = set((REPO / ".gitignore").read_text().split())
    defaults = [_benchmark_efficiency_parser().get_default("out"),  # efficiency
                build_parser("").get_default("out_dir")]  # mask_visualization.py, attn_visualization.py
    assert [f"/{folder}/" in ignored for folder in defaults] == [True, True], defaults
