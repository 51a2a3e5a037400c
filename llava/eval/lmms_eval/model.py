"""GlobalCom2 (and every registered compression method) as an lmms-eval model, id `globalcom2`:

    lmms-eval --model globalcom2 --tasks gqa --batch_size 4 --output_path ./logs --log_samples \
        --model_args pretrained=./checkpoints/llava-next-7b,retention_ratio=0.25,method=globalcom2

Model arguments (`--model_args key=value,...`; all but `pretrained` optional):
  pretrained, model_base    the checkpoint, as the runners' `--model-path` / `--model-base`
  method, retention_ratio | visual_tokens, token_layout, text_tower
                            as the runners' `--method`, `--retention-ratio`, `--visual-tokens`,
                            `--token-layout`, `--text-tower`; left out, `llava_arch`'s defaults apply
  method_args               the method's arguments, `;`-separated (lmms-eval splits model_args at
                            commas): `method_args=alpha=0;temperature=5` (quote it for the shell)
  tower_numerics            sdpa | released, as the runners' `--tower-numerics` (released: the released
                            code's CLIP attention, bit for bit; the one to reproduce the paper's fp16 runs)
  reverse_crops             true: each image's AnyRes crops in reversed order, thumbnail first (the runners'
                            `--reverse-crops`, the positional-bias study); recorded per image
  conv_template             the chat template (default: inferred from the checkpoint as
                            `llava.generation.infer_conv_mode`, `vicuna_v1` for LLaVA-NeXT Vicuna)
  dtype, device             float32 | float16 | bfloat16 (default: fp16 on CUDA, fp32 on CPU); cpu, cuda:0 ...
  batch_size                prompts per `generate` call (`llava.generation.answer_batch`, left padded),
                            sorted by expected length within windows of 16 batches as the runners sort
                            theirs; here or lmms-eval's `--batch_size` (a value in model_args wins)
  allow_truncation          cut over-long prompts instead of refusing them (the runners' flag)
  accounting_file           JSONL of every sample's token accounting (default
                            `globalcom2_accounting_<date>_<time>.jsonl` in the working directory)

A bad setting is refused in one line by the runners' own validation before the model loads.
Prompts are built as `python -m llava.eval.model_vqa_loader` builds them: the task's text as the
user turn, one `<image>` line per image before it unless the text already places them
(`image_prompt`), in the conversation template; several images per sample go in together.
Greedy answers equal the runner's on the same questions (tested on the tiny checkpoint).

Each sample's accounting (visual tokens kept and before compression, per image as the runners'
answers record it in `metadata.images`, the settings, prompt and new tokens) is appended to the
accounting file, keyed by task, split and doc_id as lmms-eval's logged samples are; lmms-eval's
samples also carry the language model's prompt and new tokens in `token_counts`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from llava.conversation import first_turn_prompt, get_conv_template
from llava.eval.instructions import science_instruction, vqa_instruction
from llava.generation import (GROUPING_WINDOW_BATCHES, Answer, add_compression_arguments, answer_batch,
                              compression_arguments, compression_label, configure_model, expected_prompt_tokens,
                              image_prompt, infer_conv_mode)
from llava.mm_utils import is_anyres, to_rgb
from llava.model.builder import load_pretrained_model, resolve_dtype

# A task that sets no `max_new_tokens`: lmms-eval's own LLaVA wrapper's default.
DEFAULT_MAX_NEW_TOKENS = 1024

# The task `generation_kwargs` the model honours; others (e.g. `image_aspect_ratio: original`, which
# lmms-eval's LLaVA wrapper applies to the config) are left out with a warning: the checkpoint's AnyRes stays.
HONOURED_GENERATION_KWARGS = {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams"}

# The compression model arguments and the runners' flags that parse and check them.
COMPRESSION_FLAGS = {"method": "--method", "method_args": "--method-arg", "retention_ratio": "--retention-ratio",
                     "visual_tokens": "--visual-tokens", "token_layout": "--token-layout", "text_tower": "--text-tower",
                     "tower_numerics": "--tower-numerics"}


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def compression_namespace(method=None, method_args=None, retention_ratio=None, visual_tokens=None, token_layout=None,
                          text_tower=None, tower_numerics=None) -> argparse.Namespace:
    """The compression model arguments as the runners' parsed command line (for `configure_model`),
    checked by the runners' own parser and `compression_arguments`: a bad value is a ValueError in
    one line naming the model argument."""
    given = dict(method=method, retention_ratio=retention_ratio, visual_tokens=visual_tokens,
                 token_layout=token_layout, text_tower=text_tower, tower_numerics=tower_numerics)
    argv = [part for key, value in given.items() if value is not None for part in (COMPRESSION_FLAGS[key], str(value))]
    pairs = [pair.strip() for pair in str(method_args or "").split(";") if pair.strip()]
    argv += [part for pair in pairs for part in ("--method-arg", pair)]
    parser = _RaisingParser(prog="globalcom2", add_help=False, exit_on_error=False)
    add_compression_arguments(parser)
    try:
        args = parser.parse_args(argv)
        compression_arguments(args)  # parses the method's arguments
    except (ValueError, argparse.ArgumentError) as error:
        message = str(error)
        # longest first: --method is a prefix of --method-arg
        for key, flag in sorted(COMPRESSION_FLAGS.items(), key=lambda item: -len(item[1])):
            message = message.replace(f"argument {flag}", key).replace(flag, key)
        raise ValueError(f"globalcom2 model_args: {message}") from None
    return args


def generation_settings(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """A task's `generation_kwargs` as `answer_batch` keywords, and its stop strings (`until`).
    Greedy unless `do_sample` is true, or, where the task does not say, unless `temperature` > 0
    (lmms-eval's LLaVA wrapper's rule); sampling asked for at temperature 0 uses transformers'
    default temperature, 1."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature") or 0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    elif temperature == 0:
        temperature = 1.0
    top_p = gen_kwargs.get("top_p")
    return dict(temperature=temperature, top_p=None if top_p is None else float(top_p),
                num_beams=int(gen_kwargs.get("num_beams") or 1),
                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)), until


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest of the stop strings it contains (lmms-eval's `until`)."""
    ends = [text.find(stop) for stop in until if stop and stop in text]
    return text[:min(ends)] if ends else text


def task_instruction(context: str) -> str:
    """What a text-conditioned method reads for a task's context: the question (with its options)
    without the answer-format lines the runners also leave out (`llava.eval.instructions`)."""
    return vqa_instruction(science_instruction(context))


def accounting_record(task: str, split: str, doc_id, result: Answer) -> dict:
    """One sample's line of the accounting file: the runners' answer metadata keys."""
    compression = result.compression
    return dict(task=task, split=split, doc_id=doc_id, method=compression["method"],
                method_args=compression["method_args"], retention_ratio=compression["retention_ratio"],
                budget_visual_tokens=compression["visual_tokens"], token_layout=compression["layout"],
                visual_tokens=result.visual_tokens,
                visual_tokens_before=sum(record["tokens_before"] for record in result.accounting),
                prompt_tokens=result.prompt_tokens, new_tokens=result.new_tokens, images=result.accounting)


class GlobalCom2(lmms):
    """lmms-eval's `simple` model interface over `answer_batch`; see the module docstring."""

    is_simple = True

    def __init__(self, pretrained: str, model_base: str | None = None, method: str | None = None,
                 method_args: str | None = None, retention_ratio: float | None = None,
                 visual_tokens: int | None = None, token_layout: str | None = None, text_tower: str | None = None,
                 tower_numerics: str | None = None, reverse_crops: bool = False,
                 conv_template: str | None = None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, allow_truncation: bool = False,
                 accounting_file: str | None = None, **unknown):
        super().__init__()
        if unknown:
            valid = [name for name in inspect.signature(GlobalCom2.__init__).parameters
                     if name not in ("self", "unknown", "max_batch_size")]
            raise ValueError(f"globalcom2 model_args: unknown {', '.join(sorted(unknown))}; "
                             f"valid: {', '.join(valid)}")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise ValueError("globalcom2 runs in one process (no data parallelism across ranks): start one "
                             "lmms-eval per device instead of accelerate launch / torchrun")
        self.args = compression_namespace(method, method_args, retention_ratio, visual_tokens, token_layout,
                                          text_tower, tower_numerics)
        self.args.allow_truncation = allow_truncation is True
        if reverse_crops not in (True, False):
            raise ValueError(f"globalcom2 model_args: reverse_crops must be true or false, got {reverse_crops!r}")
        self.reverse_crops = reverse_crops
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            self.batch_size = 0
        if self.batch_size < 1:
            raise ValueError(f"globalcom2 model_args: batch_size must be a whole number >= 1, got {batch_size!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        resolve_dtype(dtype, device)  # an unknown dtype stops here, before the load
        if conv_template is not None:
            try:
                get_conv_template(conv_template)
            except KeyError as error:
                raise ValueError(f"globalcom2 model_args: conv_template: {error.args[0]}") from None
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            pretrained, model_base, device=device, torch_dtype=dtype)
        configure_model(self.model, self.args)
        aspect_ratio = getattr(self.model.config, "image_aspect_ratio", None)
        if reverse_crops and not is_anyres(aspect_ratio):
            raise ValueError(f"globalcom2 model_args: reverse_crops: {pretrained} sends one view per image "
                             f"(image_aspect_ratio {aspect_ratio!r}): there are no crops to reverse")
        self.conv_template = conv_template or infer_conv_mode(pretrained, self.model.config)
        self.accounting_file = accounting_file or f"globalcom2_accounting_{time.strftime('%Y%m%d_%H%M%S')}.jsonl"
        self.ignored_generation_kwargs: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """As lmms-eval's, except that `batch_size` or `device` given in model_args win over the
        command line's `--batch_size` / `--device` (which lmms-eval passes too, 1 by default),
        instead of being given twice."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in args}
        return cls(**args, **extra)

    def prompt_of(self, request) -> tuple[str, list[Image.Image], list[str] | None]:
        """A request's rendered prompt, its images (RGB, as the runners load them) and the
        instructions for text-conditioned methods (one per image)."""
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [] if visuals is None else [visuals]
        others = sorted({type(visual).__name__ for visual in visuals if not isinstance(visual, Image.Image)})
        if others:
            raise ValueError(f"globalcom2 takes images; task {task!r} doc {doc_id} gives {', '.join(others)} "
                             "(video and audio are not supported)")
        images = [to_rgb(visual) for visual in visuals]
        instructions = [task_instruction(context)] * len(images) if images else None
        return first_turn_prompt(self.conv_template, image_prompt(context, len(images))), images, instructions

    def windows(self, requests) -> list[list[int]]:
        """Request indices in the requests' order, in windows of `batch_size` x `GROUPING_WINDOW_BATCHES`
        (of one request at batch size 1), a window sharing one task's generation settings (one `generate`
        call samples one way)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        size = self.batch_size * GROUPING_WINDOW_BATCHES if self.batch_size > 1 else 1
        return [group[start:start + size] for group in groups.values() for start in range(0, len(group), size)]

    def generate_until(self, requests) -> list[GenerationResult]:
        """Each window's images are loaded, its prompts sorted by expected length (as the runners sort
        theirs: the least padding) and answered `batch_size` at a time; results in the requests' order."""
        results: list[GenerationResult | None] = [None] * len(requests)
        kept = before = 0
        progress = tqdm(total=len(requests), desc="globalcom2", disable=None)
        with open(self.accounting_file, "a", encoding="utf-8") as accounting:
            for window in self.windows(requests):
                asked = {index: self.prompt_of(requests[index]) for index in window}
                if self.batch_size > 1:
                    window = sorted(window, key=lambda index: expected_prompt_tokens(
                        self.model, self.tokenizer, asked[index][0], [image.size for image in asked[index][1]]))
                gen_kwargs = requests[window[0]].args[1]
                settings, until = generation_settings(gen_kwargs)
                self.warn_ignored(set(gen_kwargs) - HONOURED_GENERATION_KWARGS)
                for start in range(0, len(window), self.batch_size):
                    batch = window[start:start + self.batch_size]
                    prompts, images, instructions = zip(*(asked[index] for index in batch))
                    answers = answer_batch(self.model, self.tokenizer, self.image_processor, list(prompts),
                                           list(images), instructions=list(instructions),
                                           reverse_crops=self.reverse_crops, **settings)
                    for index, result in zip(batch, answers):
                        _, _, _, doc_id, task, split = requests[index].args
                        record = accounting_record(task, split, doc_id, result)
                        accounting.write(json.dumps(record) + "\n")
                        kept, before = kept + record["visual_tokens"], before + record["visual_tokens_before"]
                        results[index] = GenerationResult(
                            text=cut_at_stop(result.text, until),
                            token_counts=TokenCounts(input_tokens=result.prompt_tokens,
                                                     output_tokens=result.new_tokens))
                    accounting.flush()
                    progress.update(len(batch))
        progress.close()
        if requests:
            label = compression_label(self.model.compression_settings().record())
            print(f"globalcom2: {len(requests)} answers, visual tokens per sample {kept / len(requests):.1f} of "
                  f"{before / len(requests):.1f} ({100 * kept / max(before, 1):.1f}%), {label}; per sample in "
                  f"{os.path.abspath(self.accounting_file)}", file=sys.stderr)
        return results

    def warn_ignored(self, keys: set[str]) -> None:
        """Once per key: a task's generation setting this model does not apply."""
        if keys - self.ignored_generation_kwargs:
            print(f"globalcom2: ignoring the task's generation_kwargs {', '.join(sorted(keys))} (the model honours "
                  f"{', '.join(sorted(HONOURED_GENERATION_KWARGS))})", file=sys.stderr)
            self.ignored_generation_kwargs |= keys

    def loglikelihood(self, requests):
        raise NotImplementedError("globalcom2 answers generate_until tasks only (GQA, VizWiz, ScienceQA-IMG, TextVQA, "
                                  "POPE, MME, MMBench, MM-Vet, SEED, AI2D, MMStar ...); loglikelihood is not "
                                  "implemented")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("globalcom2 answers single-round generate_until tasks; multi-round generation is "
                                  "not implemented")
