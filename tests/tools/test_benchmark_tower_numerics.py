"""tools/benchmark_tower_numerics.py on the tiny checkpoint's CLIP tower: both modes timed in the same
run, alternating, and their outputs apart in fp16 (the released code's rounding) but close in fp32."""

import argparse
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
from llava.tiny import TOWER_DIR

REPO = pathlib.Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("benchmark_tower_numerics",
                                               REPO / "tools" / "benchmark_tower_numerics.py")
benchmark = importlib.util.module_from_spec(_SPEC)
sys.modules["benchmark_tower_numerics"] = benchmark
_SPEC.loader.exec_module(benchmark)


@pytest.fixture(scope="module")
def tiny_tower(tiny_checkpoint):
    torch.manual_seed(0)
    return CLIPVisionTower(os.path.join(tiny_checkpoint, TOWER_DIR), argparse.Namespace(mm_vision_select_layer=-2))


@pytest.mark.parametrize("dtype, apart", [(torch.float16, True), (torch.float32, False)])
def test_both_modes_timed_alternately_and_compared(tiny_tower, dtype, apart):
    tower = tiny_tower.to(dtype)
    pixels = torch.randn(benchmark.VIEWS, 3, 336, 336, generator=torch.Generator().manual_seed(1)).to(dtype)
    measured = benchmark.measure(tower, pixels, repeats=3, warmup=1)
    assert {mode: len(times) for mode, times in measured["times"].items()} == {"sdpa": 3, "released": 3}
    result = benchmark.report(measured)
    medians = result["median_ms"]
    assert result["released_over_sdpa"] == pytest.approx(medians["released"] / medians["sdpa"])
    difference = result["max_abs_diff"]
    if apart:  # fp16: the scale before the product and the fp16 softmax round otherwise
        assert difference["features"] > 0 and difference["cls_logits_last"] > 0
    else:
        scale = measured["outputs"]["sdpa"].features.abs().max().item()
        assert difference["features"] <= 1e-5 * scale
    assert tower.numerics == "released"  # the last mode measured; a test of the alternation itself
