"""Measured cost of one image + question at several retention ratios, in one run.

For each R (default 1, 0.75, 0.5, 0.25, 0.1), medians over `--repeats` after a warm-up:

- vision tower (+ projector) time, with the [CLS] scores when R < 1;
- compression time (`image_sequence`: GlobalCom2's selection and layout);
- LLM prefill time (the language model's forward over the spliced prompt) and time to first
  token (preprocessed pixels in, first token out: tower, compression, splice, prefill);
- decode speed (tokens/s over `--new-tokens` cached steps);
- peak memory (CUDA: max allocated; CPU: peak RSS, reset per ratio through /proc/self/clear_refs)
  and the KV cache's bytes after the prefill; the number of visual tokens;
- every quantity also as a ratio to R = 1 from the same run, next to the theoretical prefill
  FLOPs ratio (`tools/flops.py` on the same language model and token counts; an in-LLM method's
  from its per-layer token schedule);
- an in-LLM method (`--method fastv`, `globalcom2+fastv`, ...): its equivalent tokens (the layer
  average) and the shares of the prefill spent scoring and in the keep rule (`scoring_share`,
  `pruning_share`), from a profiled pass after all timings.

Models (random weights, nothing downloaded):

    python tools/benchmark_efficiency.py                    # CPU preset: tiny CLIP + a 4-layer, 768-wide LLM
    python tools/benchmark_efficiency.py --preset llava-next-7b --device cuda   # full-size LLaVA-NeXT-7B in fp16
    python tools/benchmark_efficiency.py --preset cpu-onevision        # tiny SigLIP + a 4-layer, 768-wide Qwen2
    python tools/benchmark_efficiency.py --preset llava-onevision-0.5b --device cuda  # SigLIP so400m + Qwen2-0.5B
    python tools/benchmark_efficiency.py --model-path checkpoints/llava-next-tiny

On a SigLIP tower (OneVision: no [CLS]) GlobalCom2 runs by default with `score=neg_cos_mean`, the
paper's [CLS]-free score; any `--method-arg` given replaces that default.

Writes `--out` (default `efficiency/`): `efficiency.json`, `efficiency.md` and `efficiency.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import LanguageModel, prefill_flops  # noqa: E402  (a sibling tool)

from llava.files import atomic_write, write_text  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from llava.conversation import get_conv_template  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402
from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM  # noqa: E402
from llava.model.compression.registry import method_choices  # noqa: E402
from llava.model.language_model import pruning  # noqa: E402
from llava.model.llava_arch import CACHE_KEY  # noqa: E402
from llava.model.multimodal_encoder.image_processor import CLIPImagePreprocessor  # noqa: E402
from llava.model.multimodal_encoder.siglip_encoder import SigLipImagePreprocessor, SigLipVisionTower  # noqa: E402
from llava.tiny import (ONEVISION_OUT, SIGLIP_TOWER_DIR, TOWER_DIR, V16_PINPOINTS, build_qwen_tokenizer,  # noqa: E402
                        build_tiny_onevision_checkpoint, build_tokenizer, ensure_tiny_checkpoint, onevision_configs)

QUESTION = "Describe this image in detail."  # the instruction text-conditioned methods (CDPruner) read
PROMPT = ("A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
          f"{QUESTION} ASSISTANT:")
LANGUAGE_MODELS = {
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12),
    "llava-next-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llava-next-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    # Qwen2 language models of LLaVA-OneVision: the CPU one as "cpu" with Qwen2's grouped-query attention
    "cpu-onevision": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                          num_key_value_heads=2),
    "llava-onevision-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                 num_key_value_heads=2, vocab_size=151936),  # Qwen2-0.5B
}
ONEVISION_PRESETS = ("cpu-onevision", "llava-onevision-0.5b")
SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
# A method's arguments when none are given and the tower is SigLIP, which offers no [CLS] signal
SIGLIP_METHOD_ARGS = {"globalcom2": ["score=neg_cos_mean"]}


def build_random_model(preset: str, device: str, dtype: torch.dtype):
    """(tokenizer, model, image processor) of a LLaVA-NeXT or LLaVA-OneVision with random weights,
    built from its config.

    The full-size presets use CLIP ViT-L/14-336 or SigLIP so400m-patch14-384 (architectures built
    in, no download); the CPU presets use the tiny checkpoints' towers so that the language model's
    prefill dominates.
    """
    if preset in ONEVISION_PRESETS:
        return build_random_onevision(preset, device, dtype)
    tower = "openai/clip-vit-large-patch14-336"
    tokenizer = build_tokenizer()
    if preset == "cpu":
        tower = os.path.join(os.path.abspath(ensure_tiny_checkpoint()), TOWER_DIR)
    config = LlavaConfig(
        **LANGUAGE_MODELS[preset], vocab_size=32000 if preset != "cpu" else len(tokenizer),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5, image_aspect_ratio="anyres", image_grid_pinpoints=V16_PINPOINTS,
        mm_hidden_size=1024 if preset != "cpu" else 32, mm_patch_merge_type="spatial_unpad",
        mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        mm_vision_tower=tower, tokenizer_model_max_length=4096, tokenizer_padding_side="right",
    )
    return tokenizer, _instantiate(LlavaLlamaForCausalLM, config, device, dtype), CLIPImagePreprocessor()


def build_random_onevision(preset: str, device: str, dtype: torch.dtype):
    """LLaVA-OneVision with random weights: the tiny checkpoint's config keys (anyres_max_9, its
    pinpoints, spatial_unpad, mlp2x_gelu) with the preset's Qwen2 and tower."""
    tokenizer = build_qwen_tokenizer()
    config_dict, _ = onevision_configs(len(tokenizer))
    language = dict(LANGUAGE_MODELS[preset])
    if preset == "cpu-onevision":
        if not os.path.isfile(os.path.join(ONEVISION_OUT, SIGLIP_TOWER_DIR, "config.json")):
            build_tiny_onevision_checkpoint(ONEVISION_OUT)
        tower = os.path.abspath(os.path.join(ONEVISION_OUT, SIGLIP_TOWER_DIR))
        tower_width = config_dict["mm_hidden_size"]
    else:
        tower, tower_width = SIGLIP_SO400M, 1152
    config_dict.update(language, mm_vision_tower=tower, mm_hidden_size=tower_width,
                       max_window_layers=language["num_hidden_layers"])
    config = LlavaQwenConfig(**{key: value for key, value in config_dict.items()
                                if key not in ("architectures", "model_type", "torch_dtype")})
    return tokenizer, _instantiate(LlavaQwenForCausalLM, config, device, dtype), SigLipImagePreprocessor()


def _instantiate(model_class, config, device: str, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model in fp32 would need 28 GB
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def chat_prompt(model) -> str:
    """The question in the model family's template: OneVision's qwen_1_5, else a Vicuna prompt."""
    if not isinstance(model, LlavaQwenForCausalLM):
        return PROMPT
    conversation = get_conv_template("qwen_1_5")
    conversation.append_message(conversation.roles[0], f"<image>\n{QUESTION}")
    conversation.append_message(conversation.roles[1], None)
    return conversation.get_prompt()


class Clock:
    """Wall time with CUDA synchronisation around the measured work."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.ms = (time.perf_counter() - self.start) * 1e3


class PeakMemory:
    """Peak memory of the measured block: CUDA max allocated, else the process's peak RSS."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            with contextlib.suppress(OSError):  # without it the peak covers the whole process so far
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.bytes = _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cache_bytes(cache) -> int:
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers for tensor in (layer.keys, layer.values))


@torch.inference_mode()
def measure_ratio(model, tokenizer, pixel_values, image_size, ratio: float, args, device) -> dict:
    model.set_compression(ratio, args.layout, method=args.method, method_args=args.method_arg)
    settings = model.compression_settings()
    input_ids = tokenizer_image_token(chat_prompt(model), tokenizer, return_tensors="pt")[None].to(device)
    views = pixel_values[0]
    samples = {name: [] for name in ("tower_ms", "compression_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")}
    for repeat in range(args.warmup + args.repeats):
        with Clock(device) as tower:  # the vision tower, and the text tower where the method reads the question
            features, signals = model.encode_images(views, settings.signals - settings.instruction_signals)
            signals.update(model.signals_from_instructions(settings, [QUESTION], 1)[0])
        with Clock(device) as compression:
            model.image_sequence(features, signals, image_size, settings)
        with PeakMemory(device) as memory:
            with Clock(device) as ttft:
                embeds = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, pixel_values,
                                                                    [image_size], instructions=[QUESTION])[4]
                with Clock(device) as prefill:
                    output = model(inputs_embeds=embeds, use_cache=True)
                next_token = output.logits[:, -1].argmax(-1, keepdim=True)
            cache = getattr(output, CACHE_KEY)
            kv_bytes = cache_bytes(cache)  # before decoding grows it
            with Clock(device) as decode:
                for _ in range(args.new_tokens):
                    output = model(input_ids=next_token, use_cache=True, **{CACHE_KEY: cache})
                    next_token = output.logits[:, -1].argmax(-1, keepdim=True)
        if repeat < args.warmup:
            continue
        samples["tower_ms"].append(tower.ms)
        samples["compression_ms"].append(compression.ms)
        samples["prefill_ms"].append(prefill.ms)
        samples["ttft_ms"].append(ttft.ms)
        samples["decode_tokens_per_s"].append(args.new_tokens / (decode.ms / 1e3))
    record = model.last_accounting[0]
    visual_tokens = record["tokens_after"]
    language_model = LanguageModel.from_config(model.config.to_dict())
    prompt_tokens = int(embeds.shape[1])
    row = dict(ratio=ratio, visual_tokens=visual_tokens, prompt_tokens=prompt_tokens,
               **{name: statistics.median(values) for name, values in samples.items()},
               peak_memory_mb=memory.bytes / 2**20, kv_cache_mb=kv_bytes / 2**20,
               prefill_tflops=prefill_flops(language_model, prompt_tokens) / 1e12)
    if "layer_image_tokens" in record:  # an in-LLM method: FLOPs from its per-layer token schedule
        text_tokens = prompt_tokens - record["in_llm"]["span_tokens"]
        one_layer = dataclasses.replace(language_model, num_layers=1)
        row.update(visual_tokens=record["post_pruning_image_tokens"],
                   equivalent_tokens=record["equivalent_image_tokens"],
                   prefill_tflops=sum(prefill_flops(one_layer, text_tokens + tokens)
                                      for tokens in record["layer_image_tokens"]) / 1e12)
    return row


def in_llm_shares(model, tokenizer, pixel_values, image_size, ratio: float, args, device) -> dict:
    """An in-LLM method's overheads at `ratio` as shares of its prefill, from `args.repeats` profiled
    prefills, run after every ratio's timings and memory so the profiler disturbs none of them:
    `scoring_share` (`pruning.SCORES_RANGE`: the query rows' q.k against the cached keys, SparseVLM's
    raters, DART's pivot features) and `pruning_share` (`pruning.PRUNE_RANGE`: the keep rule, the
    shrink, SparseVLM's recycling); each range's total over the prefill's, CPU time on CPU and device
    time on CUDA, so the profiler's own overhead falls on both sides of the ratio."""
    model.set_compression(ratio, args.layout, method=args.method, method_args=args.method_arg)
    input_ids = tokenizer_image_token(chat_prompt(model), tokenizer, return_tensors="pt")[None].to(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler, torch.no_grad():
        for _ in range(args.repeats):
            embeds = model.prepare_inputs_labels_for_multimodal(input_ids, None, None, None, None, pixel_values,
                                                                [image_size], instructions=[QUESTION])[4]
            with torch.profiler.record_function("prefill"):
                model(inputs_embeds=embeds, use_cache=True)
    totals = {event.key: (event.device_time_total if device.type == "cuda" else event.cpu_time_total)
              for event in profiler.key_averages()}
    prefill = totals["prefill"]
    return dict(scoring_share=totals.get(pruning.SCORES_RANGE, 0.0) / prefill,
                pruning_share=totals.get(pruning.PRUNE_RANGE, 0.0) / prefill)


def add_relative(rows: list[dict]) -> None:
    """`<quantity>_vs_r1` for every measured quantity, against the R = 1 row of the same run."""
    baseline = next((row for row in rows if row["ratio"] == 1), None)
    if baseline is None:
        return
    for row in rows:
        for name in ("visual_tokens", "tower_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_memory_mb",
                     "kv_cache_mb", "prefill_tflops"):
            row[f"{name}_vs_r1"] = row[name] / baseline[name]


def prefill_check(rows: list[dict]) -> str:
    """The CPU target: at the smallest R, measured prefill time / R = 1 within 1.5x of the FLOPs ratio."""
    if "prefill_ms_vs_r1" not in rows[0]:
        return ""
    smallest = min(rows, key=lambda row: row["ratio"])
    factor = smallest["prefill_ms_vs_r1"] / smallest["prefill_tflops_vs_r1"]
    return (f"prefill time at R {smallest['ratio']:g}: {smallest['prefill_ms_vs_r1']:.3f} of R = 1, FLOPs "
            f"{smallest['prefill_tflops_vs_r1']:.3f}: {factor:.2f}x the theoretical ratio (target within 1.5x)")


def markdown(rows: list[dict], header: str) -> str:
    columns = ["ratio", "visual_tokens", "tower_ms", "compression_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s",
               "peak_memory_mb", "kv_cache_mb", "prefill_tflops", "prefill_ms_vs_r1", "prefill_tflops_vs_r1",
               "equivalent_tokens", "scoring_share", "pruning_share"]  # the last three: in-LLM methods
    columns = [name for name in columns if name in rows[0]]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[name]:.4g}" if isinstance(row[name], float) else str(row[name])
                                       for name in columns) + " |")
    return "\n".join(lines + ["", prefill_check(rows)]) + "\n"


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [row["ratio"] for row in rows]
    figure, (times, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in [("ttft_ms", "time to first token"), ("prefill_ms", "LLM prefill"), ("tower_ms", "vision tower"),
                        ("compression_ms", "compression")]:
        times.plot(ratios, [row[name] for row in rows], marker="o", label=label)
    times.set(xlabel="retention ratio R", ylabel="ms", title="time (median)")
    times.legend()
    memory.plot(ratios, [row["peak_memory_mb"] for row in rows], marker="o", label="peak memory")
    memory.plot(ratios, [row["kv_cache_mb"] for row in rows], marker="s", label="KV cache")
    memory.set(xlabel="retention ratio R", ylabel="MiB", title="memory")
    memory.legend()
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_write(path, "wb") as out:
        figure.savefig(out, format="png", dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(LANGUAGE_MODELS), default="cpu")
    parser.add_argument("--model-path", help="a checkpoint instead of a random-weight preset")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 0.75, 0.5, 0.25, 0.1])
    parser.add_argument("--layout", choices=["official", "spatial"], default="official")
    parser.add_argument("--method", choices=method_choices(), default="globalcom2", help="compression method")
    parser.add_argument("--method-arg", action="append", default=None, metavar="KEY=VALUE",
                        help="an argument of the method (repeatable; default: none, on a SigLIP tower GlobalCom2's "
                             "score=neg_cos_mean)")
    parser.add_argument("--image-size", type=int, nargs=2, default=[1000, 1000], metavar=("W", "H"),
                        help="a square image fills LLaVA-NeXT's 2x2 grid (2928 visual tokens at R = 1) and "
                             "OneVision's 3x3 (7371)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps timed per repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="efficiency", help="folder for efficiency.{json,md,png}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.model_path:
        tokenizer, model, processor, _ = load_pretrained_model(args.model_path, device=str(device), torch_dtype=dtype)
        name = os.path.basename(os.path.normpath(args.model_path))
    else:
        tokenizer, model, processor = build_random_model(args.preset, str(device), dtype)
        name = f"{args.preset} (random weights)"
    if args.method_arg is None:
        siglip = isinstance(model.get_vision_tower(), SigLipVisionTower)
        args.method_arg = SIGLIP_METHOD_ARGS.get(args.method, []) if siglip else []
    image = Image.new("RGB", tuple(args.image_size), (120, 160, 200))
    try:  # its input changes shape the views; a method the tower cannot serve stops here, in one line
        model.set_compression(method=args.method, method_args=args.method_arg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pixel_values = process_images([image], processor, model.input_config()).to(device, dtype)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine())
    header = (f"{name}, {args.dtype or dtype}, {machine}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; "
              f"image {args.image_size[0]}x{args.image_size[1]}, {args.method} {' '.join(args.method_arg)}, "
              f"layout {args.layout}, medians of {args.repeats}")
    rows = []
    for ratio in args.ratios:
        rows.append(measure_ratio(model, tokenizer, pixel_values, tuple(args.image_size), ratio, args, device))
        print(f"R {ratio:g}: {rows[-1]['visual_tokens']} visual tokens, prefill {rows[-1]['prefill_ms']:.1f} ms",
              file=sys.stderr)
    for row in rows:
        if "equivalent_tokens" in row:
            image_size = tuple(args.image_size)
            row.update(in_llm_shares(model, tokenizer, pixel_values, image_size, row["ratio"], args, device))
    add_relative(rows)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rows, header)
    print(table, end="")
    write_text(os.path.join(args.out, "efficiency.md"), table)
    write_text(os.path.join(args.out, "efficiency.json"), json.dumps({"setup": header, "rows": rows}, indent=2))
    plot(rows, header.split(";")[0], os.path.join(args.out, "efficiency.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
