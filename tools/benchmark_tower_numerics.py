"""What the released tower numerics cost against SDPA, measured in one run.

A full-size CLIP ViT-L/14-336 tower (the architecture is built in; random weights, nothing
downloaded) encodes one image's five views (thumbnail + 2x2 crops) with the [CLS] scores GlobalCom2
asks for, in each tower numerics mode (`--tower-numerics`: `sdpa`, the default, and `released`, the
released code's attention). The modes alternate, so drifts of the machine hit both; the times are
medians over `--repeats` after `--warmup` passes of each. Also reported: how far the two modes' outputs
are apart in this dtype (the features and the [CLS] scores, largest absolute difference).

    python tools/benchmark_tower_numerics.py                    # CPU, fp32
    python tools/benchmark_tower_numerics.py --device cuda      # fp16 on CUDA, the paper's setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower, TOWER_NUMERICS  # noqa: E402

CLIP_L_336 = "openai/clip-vit-large-patch14-336"
VIEWS = 5                       # thumbnail + 2x2 crops: LLaVA-NeXT's largest grid of a square image
SIGNALS = {"cls_logits_last"}   # what GlobalCom2 asks the tower for


def random_tower(device: torch.device, dtype: torch.dtype) -> CLIPVisionTower:
    """CLIP ViT-L/14-336 with transformers' initialisation (seed 0), features from layer -2 as LLaVA-NeXT."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype, as a loaded checkpoint would be
    try:
        with torch.device(device):
            tower = CLIPVisionTower(CLIP_L_336, argparse.Namespace(mm_vision_select_layer=-2))
    finally:
        torch.set_default_dtype(previous)
    return tower.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure(tower: CLIPVisionTower, pixels: torch.Tensor, repeats: int, warmup: int) -> dict:
    """Milliseconds per forward of each mode (every pass, alternating) and the last outputs of each."""
    times = {mode: [] for mode in TOWER_NUMERICS}
    outputs = {}
    for step in range(warmup + repeats):
        for mode in TOWER_NUMERICS:
            tower.set_numerics(mode)
            synchronize(pixels.device)
            start = time.perf_counter()
            outputs[mode] = tower(pixels, SIGNALS)
            synchronize(pixels.device)
            if step >= warmup:
                times[mode].append(1000 * (time.perf_counter() - start))
    return dict(times=times, outputs=outputs)


def report(measured: dict) -> dict:
    """Medians, the released/SDPA time ratio and the two modes' largest output differences."""
    medians = {mode: statistics.median(times) for mode, times in measured["times"].items()}
    sdpa, released = measured["outputs"]["sdpa"], measured["outputs"]["released"]
    return dict(
        median_ms=medians,
        released_over_sdpa=medians["released"] / medians["sdpa"],
        max_abs_diff=dict(
            features=(sdpa.features - released.features).abs().max().item(),
            cls_logits_last=(sdpa.signals["cls_logits_last"] - released.signals["cls_logits_last"]).abs().max().item(),
        ),
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    tower = random_tower(device, dtype)
    pixels = torch.randn(VIEWS, 3, 336, 336, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    result = report(measure(tower, pixels, args.repeats, args.warmup))
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    result["setup"] = (f"CLIP ViT-L/14-336 (random weights), {VIEWS} views, {str(dtype).removeprefix('torch.')}, "
                       f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                       f"medians of {args.repeats}")
    print(result["setup"])
    for mode, milliseconds in result["median_ms"].items():
        print(f"{mode:>8}: {milliseconds:9.1f} ms per forward")
    print(f"released / sdpa: {result['released_over_sdpa']:.3f}; largest difference between the modes: features "
          f"{result['max_abs_diff']['features']:.3g}, [CLS] scores {result['max_abs_diff']['cls_logits_last']:.3g}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
