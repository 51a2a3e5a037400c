"""Time every compression method's selection step and the cost of each vision-tower signal.

1. GlobalCom2 on one AnyRes image (thumbnail + 2x2 crops, 576 patches each, D = 4096, random
   features and logit-like scores): `compress_image_features` in both layouts against the
   released code's loops (`released_compress_image`), per retention ratio, with a check that
   the official layout equals the released output (without its fp16 cast).
2. Every registered method (`llava.model.compression`) on the same image: its selection plus
   the shared arrangement into the language model's sequence, per ratio (target: a few ms).
3. The CLIP ViT-L/14-336 tower with random weights on one image's views, with and without
   GlobalCom2's scores, and each signal a method can ask for timed alone on its layer's input,
   as a share of the tower without signals; the project's target is at most 2% each.

    python tools/benchmark_compression.py [--ratios 0.25 0.1] [--skip-tower] [--json out.json]

Prints a Markdown table; medians of wall time after warm-up calls. A line on stderr announces
each timed stage (the whole run takes minutes).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from llava.files import write_text
from llava.model.compression import get_method, method_names
from llava.model.compression.common import LAYOUTS, Budget, arrange_tokens, crop_geometry, project_merge
from llava.model.compression.globalcom2 import compress_image_features
from llava.model.compression.registry import SIGNALS, example_signals
from llava.model.globalcom2_released import released_compress_image
from llava.model.multimodal_encoder.clip_encoder import SIGNAL_FUNCTIONS, SIGNAL_LAYERS, CLIPVisionTower

SCORES = frozenset({"cls_logits_last"})  # the tower signal GlobalCom2 asks for

IMAGE_SIZE = (1000, 700)  # PIL (width, height): wider than the 2x2 canvas, so rows get unpadded
GRID = (2, 2)
NUM_PATCHES = 576
HIDDEN_SIZE = 4096
TOWER_WIDTH, TOWER_HEADS = 1024, 16  # CLIP ViT-L/14-336
TOWER_NAME = "openai/clip-vit-large-patch14-336"
SCORE_OVERHEAD_TARGET = 0.02


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of ours per ratio and layout")
    parser.add_argument("--released-repeats", type=int, default=5, help="timed calls of the slow baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the compression step")
    parser.add_argument("--views", type=int, default=5, help="tower batch: thumbnail + crops of one image")
    parser.add_argument("--tower-repeats", type=int, default=5)
    parser.add_argument("--tower-threads", type=int, help="torch threads for the tower (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--skip-tower", action="store_true")
    parser.add_argument("--skip-released", action="store_true")
    parser.add_argument("--skip-methods", action="store_true", help="skip the table of every registered method")
    parser.add_argument("--json", metavar="PATH", help="also write every number here")
    args = parser.parse_args()
    if args.dtype != "float32" and not args.device.startswith("cuda"):
        parser.error("float16/bfloat16 are for --device cuda")
    return args


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def progress(stage: str) -> None:
    """Say on stderr what is being timed now (stdout keeps the tables alone)."""
    print(f"[benchmark] {stage}...", file=sys.stderr, flush=True)


def median_ms(call, repeats: int, warmups: int, device: torch.device) -> float:
    for _ in range(warmups):
        call()
    return statistics.median(timed_ms(call, device) for _ in range(repeats))


def timed_ms(call, device: torch.device) -> float:
    # CUDA kernels run asynchronously: without the syncs the clock would stop at the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def compression_inputs(device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    num_views = 1 + GRID[0] * GRID[1]
    inputs = dict(
        image_feature=torch.randn(num_views, NUM_PATCHES, HIDDEN_SIZE, generator=generator),
        cls_attn_scores=torch.randn(num_views, NUM_PATCHES, generator=generator) * 2 + 5,  # spread of real logits
        image_newline=torch.randn(HIDDEN_SIZE, generator=generator),
    )
    return {name: tensor.to(device=device, dtype=dtype) for name, tensor in inputs.items()}


def bench_ratio(inputs: dict, ratio: float, args: argparse.Namespace, device: torch.device) -> dict:
    def ours(layout: str) -> torch.Tensor:
        return compress_image_features(inputs["image_feature"], inputs["cls_attn_scores"], IMAGE_SIZE, GRID,
                                       inputs["image_newline"], ratio, layout=layout)

    row = {"ratio": ratio}
    for layout in LAYOUTS:
        progress(f"R {ratio:g}: ours {layout} ({args.repeats} repeats)")
        row[f"{layout}_tokens"] = ours(layout).shape[0]
        row[f"{layout}_ms"] = median_ms(lambda: ours(layout), args.repeats, warmups=5, device=device)
    if not args.skip_released:
        # The released code builds its canvas on the host, so it only runs on CPU tensors.
        host = {name: tensor.cpu() for name, tensor in inputs.items()}

        def released(cast_to_fp16: bool) -> torch.Tensor:
            return released_compress_image(host["image_feature"], host["cls_attn_scores"], IMAGE_SIZE, GRID,
                                           host["image_newline"], ratio, cast_to_fp16=cast_to_fp16)

        progress(f"R {ratio:g}: released code ({args.released_repeats} repeats)")
        row["released_ms"] = median_ms(lambda: released(True), args.released_repeats, warmups=1,
                                      device=torch.device("cpu"))
        row["speedup_vs_official"] = row["released_ms"] / row["official_ms"]
        row["official_equals_released"] = torch.equal(ours("official").cpu(), released(False))
    return row


def bench_methods(inputs: dict, ratio: float, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every registered method's selection and arrangement (default arguments, on the input the
    method's official code sends: FasterVLM's without unpadding), each fed every signal it may read
    (CLIP-L shapes); merges in CLIP space widened to D without the projector's cost."""
    views = inputs["image_feature"]
    generator = torch.Generator().manual_seed(1)
    signals = {name: (inputs["cls_attn_scores"] if SIGNALS[name].shape == ("V", "P") else example.to(views))
               for name, example in example_signals(SIGNALS, views.shape[0], NUM_PATCHES, TOWER_WIDTH, TOWER_HEADS,
                                                    generator).items()}
    # Merges in CLIP space go through the model's projector, whose cost (the same per token as the
    # views' own projection) is the model's, not the selection's: here a copy to the LLM's width.
    def projector(features: torch.Tensor) -> torch.Tensor:
        return features.repeat(1, HIDDEN_SIZE // TOWER_WIDTH)
    rows = []
    for name in method_names("pre-llm"):
        method = get_method(name)
        merge_type = method.input_changes(method.args()).get("mm_patch_merge_type", "spatial_unpad")
        geometry = crop_geometry(IMAGE_SIZE, GRID, int(NUM_PATCHES**0.5), unpad="unpad" in merge_type)
        budget = Budget.resolve(geometry, ratio)
        newline = inputs["image_newline"] if geometry.unpad else None

        def compress() -> torch.Tensor:
            selection = project_merge(method.select(views, signals, geometry, budget, method.args()), projector)
            return arrange_tokens(views, selection, newline, "official")

        progress(f"R {ratio:g}: method {name} ({args.repeats} repeats)")
        rows.append({"method": name, "ratio": ratio, "tokens": compress().shape[0],
                     "ms": median_ms(compress, args.repeats, warmups=3, device=device)})
    return rows


def bench_tower(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    progress(f"tower with and without scores ({args.tower_repeats} repeats each)")
    tower_args = SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    tower = CLIPVisionTower(TOWER_NAME, tower_args).to(device=device, dtype=dtype).eval()
    images = torch.randn(args.views, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    times = {True: [], False: []}
    with torch.inference_mode():
        for with_scores in times:
            tower(images, SCORES if with_scores else frozenset())
        for repeat in range(args.tower_repeats):
            # Interleaved, alternating which goes first, so drift and noise hit both alike.
            for with_scores in (True, False) if repeat % 2 == 0 else (False, True):
                times[with_scores].append(timed_ms(lambda: tower(images, SCORES if with_scores else frozenset()), device))
        # The two whole-tower medians differ by less than this machine's noise, so each signal's
        # extraction is also timed on its own, on its layer's input.
        layers = tower.vision_tower.vision_model.encoder.layers
        layer_input = torch.randn(args.views, NUM_PATCHES + 1, layers[-1].embed_dim, device=device, dtype=dtype)
        signals_ms = {}
        for name, extract in SIGNAL_FUNCTIONS.items():
            progress(f"signal {name} alone ({10 * args.tower_repeats} repeats)")
            layer = layers[SIGNAL_LAYERS[name]]
            signals_ms[name] = median_ms(lambda: extract(layer, layer_input), 10 * args.tower_repeats, warmups=2,
                                         device=device)
    with_ms, without_ms = statistics.median(times[True]), statistics.median(times[False])
    return {"views": args.views, "with_scores_ms": with_ms, "without_scores_ms": without_ms,
            "overhead": with_ms / without_ms - 1, "signals_ms": signals_ms,
            "signals_share": {name: ms / without_ms for name, ms in signals_ms.items()},
            "threads": torch.get_num_threads()}


def print_compression_table(rows: list[dict], skip_released: bool) -> None:
    print(f"\n## Compression: one image, {GRID[0]}x{GRID[1]} grid, size {IMAGE_SIZE}, D = {HIDDEN_SIZE}\n")
    header = ["ratio", "M official", "M spatial", "ours official ms", "ours spatial ms"]
    if not skip_released:
        header += ["released ms (fp16 cast)", "speed-up released/official", "official == released (no cast)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row['ratio']:g}", str(row["official_tokens"]), str(row["spatial_tokens"]),
                 f"{row['official_ms']:.2f}", f"{row['spatial_ms']:.2f}"]
        if not skip_released:
            cells += [f"{row['released_ms']:.1f}", f"{row['speedup_vs_official']:.0f}x",
                      "yes" if row["official_equals_released"] else "**NO**"]
        print("| " + " | ".join(cells) + " |")


def print_methods_table(rows: list[dict]) -> None:
    print(f"\n## Every method: selection + arrangement, one image, {GRID[0]}x{GRID[1]} grid, size {IMAGE_SIZE}, "
          f"D = {HIDDEN_SIZE}, official layout\n")
    print("| method | ratio | tokens | ms |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['ratio']:g} | {row['tokens']} | {row['ms']:.2f} |")


def print_tower_table(tower: dict) -> None:
    print(f"\n## Vision tower: {TOWER_NAME} (random weights), {tower['views']} views, {tower['threads']} thread(s)\n")
    print(f"Whole tower with GlobalCom2's scores {tower['with_scores_ms']:.0f} ms, without {tower['without_scores_ms']:.0f} "
          f"ms ({tower['overhead']:+.2%}).\n")
    print("| signal | alone ms | share of the tower | target |")
    print("|---|---|---|---|")
    for name, share in tower["signals_share"].items():
        verdict = "within" if share <= SCORE_OVERHEAD_TARGET else "**over**"
        print(f"| {name} | {tower['signals_ms'][name]:.1f} | {share:.2%} | {verdict} {SCORE_OVERHEAD_TARGET:.0%} |")


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    default_threads = torch.get_num_threads()
    machine = machine_description(device)
    print(f"{machine}; torch {torch.__version__}; {device} {args.dtype}; compression threads {args.threads}")

    torch.set_num_threads(args.threads)
    inputs = compression_inputs(device, dtype)
    rows = [bench_ratio(inputs, ratio, args, device) for ratio in args.ratios]
    print_compression_table(rows, args.skip_released)
    results = {"machine": machine, "torch": torch.__version__, "device": str(device), "dtype": args.dtype,
               "threads": args.threads, "compression": rows}
    if not args.skip_methods:
        results["methods"] = [row for ratio in args.ratios for row in bench_methods(inputs, ratio, args, device)]
        print_methods_table(results["methods"])

    if not args.skip_tower:
        torch.set_num_threads(args.tower_threads or default_threads)
        results["tower"] = bench_tower(args, device, dtype)
        print_tower_table(results["tower"])

    if args.json:
        write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
