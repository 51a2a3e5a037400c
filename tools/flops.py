"""Theoretical cost of the language model's prefill and decode for a number of visual tokens.

LLM-Viewer's counting, per decoder layer and `s` prompt tokens (hidden `h`, MLP width `I`):

- every linear layer costs `2 * in * out * s`: q, k, v, o (`4 * h*h`, or less with grouped-query
  attention) and gate, up, down (`3 * h*I`);
- attention's two matmuls, `q.k` and `scores.v`, cost `2 * s^2 * head_dim * heads` each;
- optionally (`--elementwise`) softmax (5 ops per score), the two RMSNorms (4 ops per value), SiLU
  and the gate product (5 per MLP value) and the two residual adds.

The paper's TFLOPs columns count `s = 2880 * R` visual tokens and nothing else (no text, no
lm_head), which is the default here. Its 7B column counts the linear layers and attention matmuls
only (41.65 / 30.42 / 19.74 / 9.60 / 3.77 in its two-decimal version); its 13B column also counts
the element-wise ops (without them 79.9 / 58.6 / 38.2 / 18.7 / 7.4, not the printed 80.0 / 58.7 / 38.3):

    python tools/flops.py --model llava-next-7b --ratios 1 0.75 0.5 0.25 0.1          # 41.7 ... 3.8
    python tools/flops.py --model llava-next-13b --elementwise                         # 80.0 ... 7.4
    python tools/flops.py --model llava-next-13b --ratios 1 0.1 --json
    python tools/flops.py --config path/to/config.json --text-tokens 60 --ratios 0.25
    python tools/flops.py --model llava-next-7b --answers answers.jsonl                 # per recorded sample
    python tools/flops.py --model llava-next-7b --layer-tokens 2880x2 288x30           # FastV K=2, 10% after
    python tools/flops.py --model llava-onevision-7b --ratios 1 0.75 0.5 0.25 0.15 0.1  # 7290 * R tokens

LLaVA-OneVision (Qwen2 language models; their q/k/v biases are not counted, as LLM-Viewer does not
count element-wise adds) counts `7290 * R` visual tokens by the same convention: a thumbnail and
anyres_max_9's nine crops' worth of SigLIP-384 views, 27 x 27 = 729 tokens each, newlines not
counted (LLaVA-NeXT's 2880 is its thumbnail and four crops of 576). `--vanilla-tokens` sets another
count per image at R = 1.

A method that prunes inside the language model (FastV, PDrop, compositions such as
`globalcom2+fastv`) runs each layer on its own number of tokens: `--layer-tokens` takes that
schedule as `COUNTxLAYERS` groups (summing to the model's layers), and prefill FLOPs are then the
sum over layers of one layer's cost at that layer's count (`schedule_prefill_flops`; attention
is `s_l^2` at layer l, since every later query and key is a kept token). The row also gives the
"equivalent tokens", the layer average `sum_l s_l / L` (spec `baselines/in-llm-pruning.md` 6,
the convention of the SparseVLM and PDrop papers), and the tokens left after the last prune
("post-pruning"). The scores the method recomputes at its scoring layers (a few query rows'
q.k) are not counted. `--answers` reads each sample's recorded per-layer counts
(`layer_image_tokens` of each image; images without them count their tokens at every layer).

Decode FLOPs are per generated token at the end of the prompt (the cache holds the `s` prompt
tokens, plus the lm_head, which every decode step needs); the KV cache is `2 * layers * s *
kv_heads * head_dim` values (fp16 by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

TOKENS_PER_VIEW = 576
MAX_VISUAL_TOKENS = 5 * TOKENS_PER_VIEW  # thumbnail + 4 crops: the paper's "2880 tokens"
ONEVISION_TOKENS_PER_VIEW = 27 * 27  # SigLIP so400m-patch14-384
ONEVISION_MAX_VISUAL_TOKENS = (1 + 9) * ONEVISION_TOKENS_PER_VIEW  # thumbnail + anyres_max_9's crops: 7290


@dataclasses.dataclass(frozen=True)
class LanguageModel:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config: dict) -> "LanguageModel":
        """From a Llama/Mistral-style `config.json` (a LLaVA checkpoint's own config works)."""
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                   config["vocab_size"])


PRESETS = {
    "llava-next-7b": LanguageModel(4096, 11008, 32, 32, 32, 32000),    # Vicuna-7B v1.5
    "llava-next-13b": LanguageModel(5120, 13824, 40, 40, 40, 32000),   # Vicuna-13B v1.5
    "llava-onevision-0.5b": LanguageModel(896, 4864, 24, 14, 2, 151936),  # Qwen2-0.5B
    "llava-onevision-7b": LanguageModel(3584, 18944, 28, 28, 4, 152064),  # Qwen2-7B
}
# Visual tokens per image at R = 1 the ratio rows scale, per preset (a --config counts LLaVA-NeXT's)
PRESET_VISUAL_TOKENS = {"llava-next-7b": MAX_VISUAL_TOKENS, "llava-next-13b": MAX_VISUAL_TOKENS,
                        "llava-onevision-0.5b": ONEVISION_MAX_VISUAL_TOKENS,
                        "llava-onevision-7b": ONEVISION_MAX_VISUAL_TOKENS}


def linear_flops_per_token(model: LanguageModel) -> int:
    """All seven linear layers of one decoder layer, for one token."""
    kv_width = model.num_kv_heads * model.head_dim
    attention = model.hidden_size * (2 * model.hidden_size + 2 * kv_width)  # q, o and k, v
    mlp = 3 * model.hidden_size * model.intermediate_size
    return 2 * (attention + mlp)


def elementwise_flops(model: LanguageModel, tokens: int, keys: int) -> int:
    """Softmax over `tokens x keys` scores per head, norms, SiLU, gate product, residual adds."""
    softmax = 5 * tokens * keys * model.num_heads
    norms = 2 * 4 * tokens * model.hidden_size
    mlp = 5 * tokens * model.intermediate_size
    residuals = 2 * tokens * model.hidden_size
    return softmax + norms + mlp + residuals


def prefill_flops(model: LanguageModel, tokens: int, elementwise: bool = False) -> int:
    attention = 2 * 2 * tokens * tokens * model.head_dim * model.num_heads
    per_layer = linear_flops_per_token(model) * tokens + attention
    if elementwise:
        per_layer += elementwise_flops(model, tokens, tokens)
    return model.num_layers * per_layer


def schedule_prefill_flops(model: LanguageModel, layer_tokens: list[int], elementwise: bool = False) -> int:
    """Prefill FLOPs when layer l runs on `layer_tokens[l]` tokens (one count per layer): the sum
    of one layer's `prefill_flops` at each count; a constant schedule is `prefill_flops`."""
    if len(layer_tokens) != model.num_layers:
        raise ValueError(f"a schedule of {len(layer_tokens)} layers for a model of {model.num_layers}: give one "
                         "count per layer (--config of the model the schedule was recorded on)")
    one_layer = dataclasses.replace(model, num_layers=1)
    return sum(prefill_flops(one_layer, tokens, elementwise) for tokens in layer_tokens)


def schedule_row(model: LanguageModel, layer_tokens: list[int], elementwise: bool = False) -> dict:
    """Post-pruning and equivalent tokens of a per-layer schedule, its prefill TFLOPs and their
    ratio to the unpruned prefill (the first layer's count at every layer)."""
    flops = schedule_prefill_flops(model, layer_tokens, elementwise)
    return dict(layer_0_tokens=layer_tokens[0], post_pruning_tokens=layer_tokens[-1],
                equivalent_tokens=sum(layer_tokens) / len(layer_tokens), prefill_tflops=flops / 1e12,
                prefill_vs_unpruned=flops / prefill_flops(model, layer_tokens[0], elementwise))


def parse_layer_tokens(groups: list[str]) -> list[int]:
    """`["2880x2", "288x30"]` -> 2 x [2880] + 30 x [288] (a bare count is one layer)."""
    counts = []
    for group in groups:
        count, _, layers = group.partition("x")
        if not count.isdigit() or not (layers or "1").isdigit():
            raise ValueError(f"--layer-tokens takes COUNTxLAYERS groups (e.g. 2880x2 288x30), got {group!r}")
        counts += [int(count)] * int(layers or 1)
    return counts


def decode_flops_per_token(model: LanguageModel, context: int, elementwise: bool = False) -> int:
    """One new token attending to `context` cached tokens, plus the lm_head."""
    attention = 2 * 2 * (context + 1) * model.head_dim * model.num_heads
    per_layer = linear_flops_per_token(model) + attention
    if elementwise:
        per_layer += elementwise_flops(model, 1, context + 1)
    return model.num_layers * per_layer + 2 * model.hidden_size * model.vocab_size


def kv_cache_bytes(model: LanguageModel, tokens: int, bytes_per_value: int = 2) -> int:
    return 2 * model.num_layers * tokens * model.num_kv_heads * model.head_dim * bytes_per_value


def cost(model: LanguageModel, visual_tokens: int, text_tokens: int = 0, elementwise: bool = False,
         bytes_per_value: int = 2) -> dict:
    tokens = visual_tokens + text_tokens
    return dict(visual_tokens=visual_tokens, text_tokens=text_tokens,
                prefill_tflops=prefill_flops(model, tokens, elementwise) / 1e12,
                decode_gflops_per_token=decode_flops_per_token(model, tokens, elementwise) / 1e9,
                kv_cache_mb=kv_cache_bytes(model, tokens, bytes_per_value) / 2**20)


def ratio_rows(model: LanguageModel, ratios: list[float], text_tokens: int = 0, elementwise: bool = False,
               bytes_per_value: int = 2, vanilla_tokens: int = MAX_VISUAL_TOKENS) -> list[dict]:
    """One row per retention ratio, `vanilla_tokens * R` visual tokens (the paper's upper bound per
    ratio: 2880 * R on LLaVA-NeXT)."""
    rows = [dict(ratio=ratio, **cost(model, int(vanilla_tokens * ratio), text_tokens, elementwise, bytes_per_value))
            for ratio in ratios]
    baseline = rows[0]["prefill_tflops"] if rows and rows[0]["ratio"] == 1 else None
    for row in rows:
        row["prefill_vs_r1"] = row["prefill_tflops"] / baseline if baseline else None
    return rows


def answers_rows(model: LanguageModel, answers_file: str, elementwise: bool = False, bytes_per_value: int = 2) -> list[dict]:
    """Per sample of an answers file, from the visual tokens its runner recorded (text not counted)."""
    from llava.eval.jsonl import read_jsonl

    rows = []
    for answer in read_jsonl(answers_file):
        meta = answer.get("metadata", {})
        if "visual_tokens" not in meta:
            continue
        row = dict(question_id=answer["question_id"], **cost(model, meta["visual_tokens"], 0, elementwise, bytes_per_value))
        layer_tokens = recorded_layer_tokens(meta, model.num_layers)
        if layer_tokens is not None:  # pruned inside the language model: its per-layer schedule
            pruned = schedule_row(model, layer_tokens, elementwise)
            row.update(visual_tokens=pruned["post_pruning_tokens"], equivalent_tokens=pruned["equivalent_tokens"],
                       prefill_tflops=pruned["prefill_tflops"])
        row["vanilla_prefill_tflops"] = prefill_flops(model, meta["visual_tokens_before"], elementwise) / 1e12
        rows.append(row)
    return rows


def recorded_layer_tokens(meta: dict, num_layers: int) -> list[int] | None:
    """A sample's visual tokens per layer, from its images' records: an in-LLM image's
    `layer_image_tokens`, any other image's `tokens_after` at every layer; None when no image
    was pruned inside the language model."""
    images = meta.get("images") or []
    if not any("layer_image_tokens" in image for image in images):
        return None
    per_image = [image.get("layer_image_tokens") or [image["tokens_after"]] * num_layers for image in images]
    if any(len(counts) != num_layers for counts in per_image):
        raise ValueError(f"the answers were recorded on a model with {len(per_image[0])} layers, this one has "
                         f"{num_layers}: pass --config of that model")
    return [sum(counts) for counts in zip(*per_image)]


def format_table(rows: list[dict]) -> str:
    columns = [name for name in rows[0] if rows[0][name] is not None]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[name]:.4g}" if isinstance(row[name], float) else str(row[name])
                                       for name in columns) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=sorted(PRESETS), default="llava-next-7b")
    source.add_argument("--config", help="a language model's config.json instead of a preset")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 0.75, 0.5, 0.25, 0.1])
    parser.add_argument("--vanilla-tokens", type=int, default=None, metavar="N",
                        help="visual tokens per image at R = 1 (default: the preset's, 2880 for LLaVA-NeXT and a "
                             "--config, 7290 for OneVision)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text tokens in the prompt (paper: 0)")
    parser.add_argument("--elementwise", action="store_true", help="also count softmax, norms, SiLU, residuals")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per cached value (fp16: 2)")
    parser.add_argument("--answers", help="an answers file: FLOPs per sample from its recorded token counts")
    parser.add_argument("--layer-tokens", nargs="+", metavar="COUNTxLAYERS",
                        help="a per-layer token schedule (in-LLM pruning), e.g. 2880x2 288x30")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config:
        with open(args.config) as file:
            model = LanguageModel.from_config(json.load(file))
    else:
        model = PRESETS[args.model]
    try:
        if args.layer_tokens:
            rows = [schedule_row(model, parse_layer_tokens(args.layer_tokens), args.elementwise)]
        elif args.answers:
            rows = answers_rows(model, args.answers, args.elementwise, args.kv_bytes)
        else:
            vanilla_tokens = args.vanilla_tokens or (MAX_VISUAL_TOKENS if args.config
                                                     else PRESET_VISUAL_TOKENS[args.model])
            rows = ratio_rows(model, args.ratios, args.text_tokens, args.elementwise, args.kv_bytes, vanilla_tokens)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not rows:
        print("error: nothing to count (no ratios, or no answers with recorded visual tokens)", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
