"""One prompt + images in, answer and its measurements out; shared by `run_llava` and the chat CLI."""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.mm_utils import (get_anyres_image_grid_shape, get_model_name_from_path, is_anyres, process_images,
                            tokenizer_image_token)
from llava.model import llava_arch
from llava.model.compression import parse_method_args
from llava.model.compression.registry import get_method, method_choices
from llava.model.compression.common import LAYOUTS, Budget, check_retention_ratio, check_visual_tokens
from llava.model.multimodal_encoder.clip_encoder import TOWER_NUMERICS


def infer_conv_mode(model_path: str, config) -> str:
    """Chat template for a checkpoint: upstream's name rules, with the LLM family from the config.

    Upstream falls back to `llava_v0` (LLaVA v0's template); LLaVA-NeXT Vicuna checkpoints
    under other names (e.g. `llava-next-7b`) are evaluated with `vicuna_v1`, so that is the
    fallback here.
    """
    name = get_model_name_from_path(model_path).lower()
    model_type = f"{getattr(config, 'model_type', '')} {' '.join(getattr(config, 'architectures', None) or [])}".lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name or "mistral" in model_type:
        return "mistral_instruct"
    if "qwen" in name or "qwen" in model_type:  # LLaVA-OneVision (LlavaQwenForCausalLM)
        return "qwen_1_5"
    if "34b" in name:
        return "chatml_direct"
    if "mpt" in name:
        return "mpt"
    if "v1" in name:
        return "llava_v1"
    return "vicuna_v1"


class FirstTokenTimer(StoppingCriteria):
    """Records when the first new token is ready (stopping criteria run after every token)."""

    def __init__(self):
        self.first_token_time = None

    def __call__(self, input_ids, scores, **kwargs):
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclasses.dataclass
class Answer:
    text: str
    image_sizes: list[tuple[int, int]]
    grids: list[tuple[int, int] | None]  # AnyRes crop grid (columns, rows) per image
    visual_tokens: int                   # visual tokens the language model received
    accounting: list[dict]               # per image: tokens before/after compression, per-crop counts
    compression: dict                    # the settings: method, method_args, retention_ratio, visual_tokens, layout
    prompt_tokens: int                   # whole prompt after splicing (text + visual)
    new_tokens: int
    time_to_first_token_s: float
    tokens_per_second: float | None      # decode rate after the first token

    def summary(self) -> str:
        sizes = "+".join(f"{w}x{h}" for w, h in self.image_sizes) or "none"
        grids = "+".join(f"{g[0]}x{g[1]}" if g else "1x1" for g in self.grids) or "-"
        rate = f"{self.tokens_per_second:.1f} tokens/s" if self.tokens_per_second is not None else "- tokens/s"
        before = sum(record["tokens_before"] for record in self.accounting)
        kept = f" of {before} ({100 * self.visual_tokens / before:.1f}%)" if before else ""
        return (
            f"[summary] image {sizes} | grid {grids} | visual tokens {self.visual_tokens}{kept} | "
            f"{compression_label(self.compression)} | prompt tokens {self.prompt_tokens} | new tokens {self.new_tokens} | "
            f"TTFT {self.time_to_first_token_s * 1000:.0f} ms | {rate}"
        )

    def compression_lines(self) -> list[str]:
        """One line per compressed AnyRes image: what the thumbnail kept and each crop's share."""
        lines = []
        for number, record in enumerate(self.accounting, 1):
            if "in_llm" in record:  # pruned inside the language model: both counts (fastv.md 3, in-llm-pruning.md 6)
                stages = ", ".join(f"layer {layer}: {kept}" for layer, kept in record["in_llm"]["stages"]) or "none"
                params = "".join(f" | {name} {value:.4g}" if isinstance(value, float) else f" | {name} {value}"
                                 for name, value in record["in_llm"].get("schedule_params", {}).items())
                lines.append(f"[in-llm] image {number}: {record['in_llm']['span_tokens']} tokens in (newlines "
                             f"included) | kept from {stages} | post-pruning {record['post_pruning_image_tokens']} | "
                             f"equivalent {record['equivalent_image_tokens']:.1f} (average over "
                             f"{len(record['layer_image_tokens'])} layers){params}")
                continue
            if record["retained"] == 1 or not record["crop_valid"]:
                continue
            ratios = record.get("crop_ratios")
            crops = " ".join(f"{kept}/{valid}" + (f"@{ratios[index]:.3f}" if ratios else "") for index, (kept, valid)
                             in enumerate(zip(record["crop_kept"], record["crop_valid"])))
            lines.append(f"[compression] image {number}: {record['tokens_after']}/{record['tokens_before']} tokens | "
                         f"thumbnail {record['thumbnail_kept']} | crops kept/valid{'@ratio' if ratios else ''} {crops}")
        return lines


def reverse_crop_order(pixel_values):
    """Each image's AnyRes views with the crops in reversed order, thumbnail still first: `[N, V, 3, S, S]`
    or a list of `[V_i, 3, S, S]`, as `process_images` gives them. The model then places the last crop
    in the first crop's slot of the canvas, and so on: every method selects, and the language model
    reads, the views in this order (the positional-bias study, `tools/positional_bias.py`). A view
    count of 1 or 2 (no crop, one crop) is unchanged. One view per image (`[N, 3, S, S]`: no AnyRes)
    has no crops to reverse: a ValueError."""
    if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
        raise ValueError("reverse_crops needs AnyRes views (image_aspect_ratio 'anyres'): these images have one "
                         "view each, no crops to reverse")

    def reversed_views(views: torch.Tensor) -> torch.Tensor:
        return torch.cat([views[:1], views[1:].flip(0)])

    if isinstance(pixel_values, torch.Tensor):
        return torch.stack([reversed_views(views) for views in pixel_values])
    return [reversed_views(views) for views in pixel_values]


def compression_label(compression: dict) -> str:
    """`globalcom2 R 0.25 official` (method, budget, layout; `R 1 (off)` when nothing is compressed)."""
    if compression["visual_tokens"] is not None:
        budget = f"N {compression['visual_tokens']}"
    elif compression["retention_ratio"] == 1:
        return f"{compression['method']} R 1 (off)"
    else:
        budget = f"R {compression['retention_ratio']:g}"
    return f"{compression['method']} {budget} {compression['layout']}"


def image_prompt(query: str, num_images: int) -> str:
    """The user turn: one `<image>` line per image unless the query already places them."""
    placed = query.count(DEFAULT_IMAGE_TOKEN)
    if placed == 0:
        return (DEFAULT_IMAGE_TOKEN + "\n") * num_images + query
    if placed != num_images:
        raise ValueError(f"the query places {placed} {DEFAULT_IMAGE_TOKEN} tokens but {num_images} images were given")
    return query


def expected_visual_tokens(model, image_size: tuple[int, int], settings=None) -> int:
    """The visual tokens the language model is expected to receive for an image of PIL size
    `image_size` (width, height), from the size and the budget alone, before any tower runs: the
    vanilla sequence (image tokens and newlines, as the accounting's `tokens_before`) where the
    budget keeps everything or the method prunes inside the language model (the prompt goes in
    whole), else the budget's image tokens (`Budget.image_tokens`: exact for exact-budget methods;
    newlines, which depend on the rows kept, left out). An estimate to group prompts by length.
    `settings`: default the model's (`compression_settings`)."""
    settings = settings or model.compression_settings()
    config = model.input_config(settings)
    tower = model.get_vision_tower()
    anyres = is_anyres(getattr(config, "image_aspect_ratio", None))
    grid = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tower.config.image_size) if anyres \
        else (0, 0)
    num_views = 1 + grid[0] * grid[1]
    # One view per image is sent as is, without the merge step (`encode_image_sequences`).
    merge_type = model.merge_type(settings) if anyres else "spatial"
    if merge_type == "flat":  # every view's patches, uncompressed
        return num_views * tower.num_patches_per_side ** 2
    geometry = model.image_geometry(num_views, image_size, merge_type, config)
    vanilla = model.vanilla_geometry(geometry, one_view_each=not anyres)
    budget = Budget.resolve(geometry, settings.retention_ratio, settings.visual_tokens, vanilla.vanilla_image_tokens)
    if budget.keeps_all or get_method(settings.method).stage == "in-llm":
        return vanilla.vanilla_image_tokens + vanilla.newline_count(vanilla.vanilla_arrangement)
    return budget.image_tokens


def expected_prompt_tokens(model, tokenizer, prompt: str, image_sizes: list[tuple[int, int]]) -> int:
    """The prompt's length after splicing as its image sizes and the budget predict it
    (`expected_visual_tokens`): the key prompts are grouped into batches by."""
    text_tokens = int((tokenizer_image_token(prompt, tokenizer, return_tensors="pt") != IMAGE_TOKEN_INDEX).sum())
    return text_tokens + sum(expected_visual_tokens(model, size) for size in image_sizes)


# With a batch size N > 1, prompts are taken this many batches at a time (the runners' pending
# questions, the lmms-eval plug-in's requests): their images are loaded, then they are sorted by
# expected prompt length and cut into batches. The window bounds the images held in memory;
# sorting within it removes most of the padding.
GROUPING_WINDOW_BATCHES = 16


def _left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows of different lengths as one left-padded `[B, L]` batch and its `[B, L]` mask
    (None when every row has the same length: nothing to mask, as for a single prompt)."""
    longest = max(row.shape[0] for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, longest - row.shape[0]:] = row
        attention_mask[index, longest - row.shape[0]:] = 1
    return input_ids, (attention_mask if len({row.shape[0] for row in rows}) > 1 else None)


def _generated_lengths(output_ids: torch.Tensor, eos_token_id) -> list[int]:
    """Each row's new tokens up to and including its first EOS (all `T` of `output_ids` `[B, T]`
    where it has none): a finished row is filled with padding while the others go on."""
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       dtype=output_ids.dtype, device=output_ids.device)
    is_eos = torch.isin(output_ids, eos)
    ended = is_eos.any(dim=1)
    first_eos = is_eos.int().argmax(dim=1)
    return torch.where(ended, first_eos + 1, output_ids.shape[1]).tolist()


@dataclasses.dataclass
class PreparedImages:
    """One prompt's images made into the tower's input on the CPU, before the model runs (the
    runners do it in DataLoader workers while the model answers earlier questions).

    `sizes[i]`: image i's PIL size (width, height); `pixel_values[i]`: its `[V, 3, S, S]` AnyRes
    views or its `[3, S, S]` single view (`process_images` of that image alone), in the model's dtype.
    """
    sizes: list[tuple[int, int]]
    pixel_values: list[torch.Tensor]

    def pin_memory(self) -> "PreparedImages":
        """Page-locked copies, for asynchronous copies to the GPU (`DataLoader(pin_memory=True)` calls this)."""
        return PreparedImages(self.sizes, [views.pin_memory() for views in self.pixel_values])


def prepare_images(images: list, image_processor, config, dtype: torch.dtype) -> PreparedImages:
    """The CPU front end of `answer_batch` for one prompt's PIL `images`, under the model's input
    config for its compression settings (`model.input_config(model.compression_settings())`):
    each image processed on its own, which gives what processing them together gives (every image
    is resized, cropped and normalised by itself)."""
    return PreparedImages([image.size for image in images],
                          [process_images([image], image_processor, config)[0].to(dtype) for image in images])


def _batched_pixel_values(pixel_values: list[torch.Tensor], device) -> torch.Tensor | list[torch.Tensor]:
    """Per-image pixel values on `device` as `process_images` batches them: one stacked tensor when
    every image has the same shape (`[N, V, 3, S, S]` or `[N, 3, S, S]`), else the list (AnyRes
    images with different numbers of views). Copied one by one before stacking, so pinned host
    tensors copy asynchronously."""
    on_device = [views.to(device, non_blocking=True) for views in pixel_values]
    if len(on_device) == 1:  # no copy (as process_images: stacking one image's views costs milliseconds)
        return on_device[0].unsqueeze(0)
    if all(views.shape == on_device[0].shape for views in on_device):
        return torch.stack(on_device)
    return on_device


@torch.inference_mode()
def answer_batch(model, tokenizer, image_processor, prompts: list[str], images: list[list],
                 temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1, max_new_tokens: int = 512,
                 instructions: list[list[str] | None] | None = None, reverse_crops: bool = False) -> list[Answer]:
    """Generate the replies to rendered `prompts` in one `generate` call, the prompts left-padded.

    `images[i]`: the PIL images of `prompts[i]` (one `<image>` each; may be empty). `instructions`:
    per prompt, one text per image for methods conditioned on it (`llava.eval.instructions`), or
    None. `reverse_crops`: feed each image's crops in reversed order (`reverse_crop_order`); each
    image's accounting then records `crops_reversed` (False where it has fewer than two crops).
    Each Answer has its own text, image sizes, grids, visual and prompt tokens (without padding),
    accounting (its images' records of `model.last_accounting`) and new tokens (up to its EOS);
    `time_to_first_token_s` (image preprocessing included) and `tokens_per_second` are the batch's
    (decoding steps per second, each step giving a token to every row still going). Greedy answers
    equal those of one prompt at a time up to floating-point reassociation over the padded length
    (equal on CPU in fp32, tested). `prepare_images` then `answer_prepared`.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    start = time.perf_counter()
    config = model.input_config(model.compression_settings())
    prepared = [prepare_images(own, image_processor, config, model.dtype) for own in images]
    return answer_prepared(model, tokenizer, prompts, prepared, temperature=temperature, top_p=top_p,
                           num_beams=num_beams, max_new_tokens=max_new_tokens, instructions=instructions,
                           reverse_crops=reverse_crops, started=start)


@torch.inference_mode()
def answer_prepared(model, tokenizer, prompts: list[str], prepared: list[PreparedImages],
                    temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1,
                    max_new_tokens: int = 512, instructions: list[list[str] | None] | None = None,
                    reverse_crops: bool = False, started: float | None = None) -> list[Answer]:
    """`answer_batch` after its CPU front end: `prepared[i]` is `prepare_images` of `prompts[i]`'s
    images. `started`: the `time.perf_counter()` the time to first token counts from (default: now)."""
    if len(prepared) != len(prompts) or (instructions is not None and len(instructions) != len(prompts)):
        raise ValueError(f"got {len(prompts)} prompts but {len(prepared)} image lists"
                         + (f" and {len(instructions)} instruction lists" if instructions is not None else ""))
    start = time.perf_counter() if started is None else started
    rows = [tokenizer_image_token(prompt, tokenizer, return_tensors="pt") for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, text_mask = _left_padded(rows, pad_id)
    input_ids = input_ids.to(model.device)
    text_mask = text_mask.to(model.device) if text_mask is not None else None
    image_sizes = [size for own in prepared for size in own.sizes]
    settings = model.compression_settings()
    if image_sizes:
        per_image = [views for own in prepared for views in own.pixel_values]

        def batched():
            pixel_values = _batched_pixel_values(per_image, model.device)
            return reverse_crop_order(pixel_values) if reverse_crops else pixel_values

        # Within `model.reusing_tower_outputs()`, the same prepared images (in the same crop order: the
        # flag is part of the key) give the same tensor, whose tower output the model then reuses.
        cache = getattr(model, "_tower_cache", None)
        pixel_values = batched() if cache is None else cache.pixel_values([*per_image, reverse_crops], batched)
        per_image_instructions = None if instructions is None or all(texts is None for texts in instructions) else [
            text for own, texts in zip(prepared, instructions)
            for text in (texts if texts is not None else [None] * len(own.sizes))]
        _, _, attention_mask, _, inputs_embeds, _ = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, text_mask, None, None, pixel_values, image_sizes, padding_side="left",
            instructions=per_image_instructions,
        )
        prompt_lengths = list(model.last_row_lengths)
    else:
        attention_mask, inputs_embeds = text_mask, model.get_model().embed_tokens(input_ids)
        prompt_lengths = [row.shape[0] for row in rows]
    timer = FirstTokenTimer()
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    output_ids = model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        use_cache=True,
        stopping_criteria=StoppingCriteriaList([timer]),
        pad_token_id=pad_id,
        **sampling,
    )
    end = time.perf_counter()
    eos_token_id = model.generation_config.eos_token_id
    new_tokens = _generated_lengths(output_ids, tokenizer.eos_token_id if eos_token_id is None else eos_token_id)
    texts = tokenizer.batch_decode([ids[:count] for ids, count in zip(output_ids, new_tokens)], skip_special_tokens=True)
    steps = int(output_ids.shape[1])
    first = timer.first_token_time or end
    config = model.config
    anyres = is_anyres(getattr(config, "image_aspect_ratio", None))
    patch = model.get_vision_tower().config.image_size if image_sizes else None
    grids = [get_anyres_image_grid_shape(size, config.image_grid_pinpoints, patch) if anyres else None
             for size in image_sizes]
    records = ([dict(record, crops_reversed=len(record["crop_valid"]) > 1) for record in model.last_accounting]
               if reverse_crops else list(model.last_accounting)) if image_sizes else []
    answers, offset = [], 0
    for row, own, text, length, count in zip(rows, prepared, texts, prompt_lengths, new_tokens):
        own_images = slice(offset, offset + len(own.sizes))
        offset += len(own.sizes)
        answers.append(Answer(
            text=text.strip(),
            image_sizes=image_sizes[own_images],
            grids=grids[own_images],
            visual_tokens=length - int((row != IMAGE_TOKEN_INDEX).sum()),
            accounting=records[own_images],
            compression=settings.record(),
            prompt_tokens=length,
            new_tokens=count,
            time_to_first_token_s=first - start,
            tokens_per_second=(steps - 1) / (end - first) if steps > 1 and end > first else None,
        ))
    return answers


def answer(model, tokenizer, image_processor, prompt: str, images: list, temperature: float = 0.0,
           top_p: float | None = None, num_beams: int = 1, max_new_tokens: int = 512,
           instructions: list[str] | None = None, reverse_crops: bool = False) -> Answer:
    """Generate the reply to a rendered `prompt` (with one `<image>` per PIL image in `images`):
    `answer_batch` with one prompt, whose arguments these are."""
    return answer_batch(model, tokenizer, image_processor, [prompt], [images], temperature=temperature, top_p=top_p,
                        num_beams=num_beams, max_new_tokens=max_new_tokens,
                        instructions=None if instructions is None else [instructions],
                        reverse_crops=reverse_crops)[0]


def _retention_ratio_argument(text: str) -> float:
    try:
        return check_retention_ratio(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] (1 = no compression), got {text!r}") from None


def _visual_tokens_argument(text: str) -> int:
    try:
        return check_visual_tokens(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (image tokens per image), got {text!r}") from None


def add_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The method, its arguments, the budget and the layout; left out, `llava_arch`'s constants apply."""
    parser.add_argument("--method", choices=method_choices(), default=None,
                        help="compression method, or <pre-LLM>+<in-LLM> (python -m llava.model.compression --list; "
                             f"default: llava_arch.compression_method, now {llava_arch.compression_method})")
    parser.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an argument of the method (repeatable), e.g. --method-arg alpha=0")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--retention-ratio", type=_retention_ratio_argument, default=None, metavar="R",
                        help="fraction of vanilla LLaVA-NeXT's image tokens to keep, in (0, 1]; 1 = vanilla "
                             f"(default: llava_arch.retention_ratio, now {llava_arch.retention_ratio})")
    budget.add_argument("--visual-tokens", type=_visual_tokens_argument, default=None, metavar="N",
                        help="image tokens to keep per image instead of a ratio (each method's docstring says how)")
    parser.add_argument("--token-layout", choices=LAYOUTS, default=None,
                        help="order of the kept tokens: 'official' = the method's official sequence (GlobalCom2: the "
                             "released code's), 'spatial' = raster order with one newline per image row "
                             f"(default: {llava_arch.token_layout})")
    parser.add_argument("--text-tower", default=None, metavar="PATH",
                        help="CLIP checkpoint (directory, or a hub id in the local cache) whose text tower and visual "
                             "projection text-conditioned methods (cdpruner) use; loaded only for them (default: the "
                             "CLIP the vision tower came from, mm_vision_tower)")
    parser.add_argument("--tower-numerics", choices=TOWER_NUMERICS, default="sdpa",
                        help="CLIP attention numerics: 'sdpa' (transformers' own) or 'released' (the released "
                             "GlobalCom2 code's: q scaled before q.k, softmax in the tower dtype; bit for bit in fp16, "
                             "slower) (default: %(default)s)")


def compression_arguments(args) -> dict:
    """The command line's compression settings as `set_compression` keywords, validated: a bad
    method argument is a ValueError in one line naming the valid ones (call it before loading)."""
    method = getattr(args, "method", None)
    pairs = getattr(args, "method_arg", None) or []
    method_args = parse_method_args(method or llava_arch.compression_method, pairs) if (method or pairs) else None
    return dict(retention_ratio=getattr(args, "retention_ratio", None), token_layout=getattr(args, "token_layout", None),
                method=method, method_args=method_args, visual_tokens=getattr(args, "visual_tokens", None))


def _pixel_limit_argument(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of pixels or 'none', got {text!r}")
    return limit


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-image-pixels` and `--allow-truncation`: what happens to inputs beyond the limits."""
    parser.add_argument("--max-image-pixels", type=_pixel_limit_argument, default=Image.MAX_IMAGE_PIXELS, metavar="N",
                        help="refuse images with more pixels than this, as PIL's decompression-bomb guard does "
                             "('none' = no limit; default: PIL's %(default)s)")
    parser.add_argument("--allow-truncation", action="store_true",
                        help="cut prompts longer than the model's maximum length, as upstream LLaVA does silently "
                             "(default: refuse them with an error)")


def configure_model(model, args) -> None:
    """Apply the command line's compression and input settings to a loaded model; a method that
    needs the CLIP text tower gets it loaded now, so a missing one stops the run before any answer."""
    model.set_compression(**compression_arguments(args))
    model.allow_truncation = getattr(args, "allow_truncation", False)
    model.set_tower_numerics(getattr(args, "tower_numerics", "sdpa"))
    if getattr(args, "text_tower", None) is not None:
        model.set_text_tower(args.text_tower)
    settings = model.compression_settings()
    if settings.needs_text_tower:
        model.get_text_tower(settings.method)
