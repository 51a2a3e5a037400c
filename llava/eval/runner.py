"""What every benchmark runner shares: arguments, chunking, resume, answers, several processes.

A runner module (`model_vqa_loader`, `model_vqa`, `model_vqa_science`, `model_vqa_mmbench`)
gives `run` a function that reads its question file into `Question`s (`build_questions` turns a
bad entry into one error line naming it, before the model loads). `run`:

- takes this run's share: upstream's `--num-chunks/--chunk-idx` split, then, under `torchrun` or
  `accelerate launch` (`WORLD_SIZE` > 1), one contiguous part per rank;
- locks the answers file for the run's lifetime: a second runner on the same file stops at once,
  naming the first one's process (the OS drops the lock when a process dies, however it dies);
- resumes: answers already in the answers file are kept and their questions skipped. Questions
  are matched by `(question_id, prompt)` counted with multiplicity, because some benchmarks
  repeat ids (TextVQA's id is the image's). Each answer records the run's settings (model and a
  hash of its config and weights index, template, generation and compression settings), and a
  rerun under other settings is refused, naming the setting; `--overwrite` starts afresh;
- writes and flushes each answer as soon as it exists, so a killed run loses at most the answer
  (the batch) in flight; a half-written last line is dropped on the next start. Whole-file rewrites (at the
  start and the final merge) are atomic, so at no instant does the file hold fewer answers;
- ends by rewriting the answers file in question order, one answer per question (rank 0 merges
  every rank's part);
- stops with an error naming the question and the file when an image is missing, corrupt or too
  large, or when the prompt exceeds the model's length, or with `--on-image-error record` writes
  an empty answer with the error in its metadata and goes on (positional scorers such as POPE need
  one line per question);
- stores GlobalCom2's token accounting in each answer's `metadata` and prints averages.

`--batch-size N` answers N questions per `generate` call (`generation.answer_batch`, left-padded):
the pending questions are taken `generation.GROUPING_WINDOW_BATCHES` batches at a time, their images loaded
first (so a bad image is its own question's error or stop, the questions before it answered),
sorted by expected prompt length (the text, plus the visual tokens each image's size and the
budget give: `generation.expected_visual_tokens`) and cut into batches. A prompt too long for the
model fails its batch's call, which is then answered one question at a time. The batch size is
not part of the resume fingerprint: greedy answers are the same at any size.

`--num-workers N` (default: up to 4 on a GPU, 0 on the CPU: `default_num_workers`) moves the front
end (each question's image loading and `process_images` under the model's input config,
`generation.prepare_images`) into N DataLoader worker processes that run ahead of the model by up to
a grouping window (pinned memory on CUDA); with 0 the same code runs on the main thread. The main
loop consumes the prepared questions in order, so answers, their order, errors, resume and metadata
do not depend on N. A worker returns a failed image's error instead of raising it, so it reaches the
user as the same one-line message; workers are forked, and each lets go of its copies of the
answers-file locks at once (flock locks belong to the open file, which fork shares), so a killed
runner's lock is free at once; workers write nothing.

A sweep (`--retention-ratios 1,0.5,0.25`, `--methods globalcom2,fastv`, either or both) answers every
setting of their product (methods outer, ratios inner) in one process, into one answers file per
setting: `{run}` in `--answers-file` (and `--save-selection`) becomes the setting's name, as the
scripts name a single run's file (`setting_name`). Each file is what the single run with that
setting writes (the same rows, order and metadata, its fingerprint included: a later single run
resumes it), with its own lock, resume, chunk and final rewrite; a complete one is skipped. The model
loads once; the questions any setting still needs are taken a window at a time, each question's
images loaded once and prepared once per distinct input config, then every setting answers its
questions of the window (batch-major: a kill loses at most the batch in flight of one setting), the
vision tower running once per batch of images for all of them (`model.reusing_tower_outputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import json
import math
import multiprocessing
import os
import re
import sys
import traceback
from collections import Counter, defaultdict
from typing import Callable, Iterable

import shortuuid
import torch
from tqdm import tqdm

from llava.conversation import conv_templates, first_turn_prompt
from llava.eval.answers import UserError
from llava.eval.jsonl import read_jsonl, write_jsonl
from llava.files import FileLocked, file_lock, make_parent_dir, remove_stale_temporaries
from llava.generation import (GROUPING_WINDOW_BATCHES, PreparedImages, add_compression_arguments,
                              add_input_arguments, answer_prepared, compression_arguments, compression_label,
                              configure_model, expected_prompt_tokens, prepare_images)
from llava.mm_utils import ImageLoadError, get_model_name_from_path, is_anyres, set_max_image_pixels
from llava.model import llava_arch
from llava.model.builder import (CheckpointError, checkpoint_digest, llava_classes, load_pretrained_model,
                                 read_llava_config, resolve_dtype, resolve_local_checkpoint)
from llava.model.compression.__main__ import run_name
from llava.model.compression.common import check_layout, check_retention_ratio
from llava.model.compression.registry import get_method, non_default_args, parse_method_args
from llava.model.llava_arch import PromptTooLongError
from llava.utils import quiet_transformers, user_errors
from llava.visualize import open_selection_file, selection_lines, write_lines


@dataclasses.dataclass
class Question:
    question_id: object
    prompt: str                             # the answers file's `prompt` field; scorers parse it
    query: str                              # the user turn, `<image>` where the image goes
    load_images: Callable[[], list] = list  # PIL images; raises ImageLoadError naming the file
    extra: dict = dataclasses.field(default_factory=dict)     # more answer fields (MMBench)
    metadata: dict = dataclasses.field(default_factory=dict)  # recorded in the answer's metadata
    instruction: str | None = None          # the text a text-conditioned method reads (llava.eval.instructions)

    @property
    def key(self) -> tuple[str, str]:
        return answer_key(self.question_id, self.prompt)


def answer_key(question_id, prompt) -> tuple[str, str]:
    return json.dumps(question_id), prompt


class FallbackConvMode(str):
    """A chat template to use only for a checkpoint whose family has no template of its own
    (`FAMILY_CONV_MODES`): the default of `--conv-mode`, or `--fallback-conv-mode`'s value. A
    marked string so that the parsed default still reads as the template upstream's runners use."""


# The templates a language-model family is always asked in, by its architecture name in config.json
# (`builder.FAMILIES`): LLaVA-VL's OneVision scripts use only qwen_1_5. LLaVA-NeXT's Llama (Vicuna)
# and Mistral checkpoints are asked in whichever template the caller chooses.
FAMILY_CONV_MODES = {"LlavaQwenForCausalLM": "qwen_1_5"}


def resolve_conv_mode(conv_mode: str, model_path: str) -> str:
    """The template a run asks in: `conv_mode` as given, or for a `FallbackConvMode` the checkpoint
    family's own template where it has one. A checkpoint that cannot be read keeps the fallback (its
    load then says what is wrong)."""
    if not isinstance(conv_mode, FallbackConvMode):
        return conv_mode
    try:
        config = read_llava_config(resolve_local_checkpoint(os.path.expanduser(model_path)))
        family = llava_classes(config)[1].__name__
    except CheckpointError:
        return str(conv_mode)
    return FAMILY_CONV_MODES.get(family, str(conv_mode))


def build_parser(description: str, max_new_tokens: int, temperature: float = 0.2, conv_mode: str = "llava_v1",
                 image_folder: bool = True) -> argparse.ArgumentParser:
    """Upstream's runner arguments (with upstream's defaults), plus compression and error handling."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", default="facebook/opt-350m")
    parser.add_argument("--model-base", default=None)
    if image_folder:
        parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", default="tables/question.jsonl")
    parser.add_argument("--answers-file", default="answer.jsonl")
    parser.add_argument("--conv-mode", default=FallbackConvMode(conv_mode),
                        help="chat template (default: the checkpoint family's own where it has one, qwen_1_5 for "
                             "LLaVA-OneVision's Qwen2; else %(default)s, upstream's)")
    parser.add_argument("--fallback-conv-mode", dest="conv_mode", type=FallbackConvMode, metavar="TEMPLATE",
                        help="instead of --conv-mode: the checkpoint family's own template where it has one, else "
                             "TEMPLATE (the benchmark scripts' vicuna_v1 for LLaVA-NeXT)")
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--on-image-error", choices=["stop", "record"], default="stop",
                        help="an image that is missing, corrupt or too large, or a prompt longer than the model "
                             "takes: stop with an error (default), or record an empty answer with the error in its "
                             "metadata and go on")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh: keep the existing answers file as <file>.bak and answer every question "
                             "again (needed to rerun under other settings)")
    parser.add_argument("--skip-bad-questions", action="store_true",
                        help="leave out question entries that are malformed or lack a field, with a warning "
                             "listing them (default: stop with an error before the model loads)")
    parser.add_argument("--save-selection", metavar="FILE", default=None,
                        help="append one JSON line per image to FILE as each answer is written: the question_id, the "
                             "settings, the kept patches in the order the language model receives them, and the token "
                             "counts (see llava.visualize). A resumed run appends only the new questions' records, and "
                             "--overwrite does not clear FILE; under torchrun each rank appends to FILE.rank<N>")
    parser.add_argument("--reverse-crops", action="store_true",
                        help="feed each image's AnyRes crops in reversed order, thumbnail still first (the "
                             "positional-bias study: tools/positional_bias.py); recorded per image as crops_reversed "
                             "(false with fewer than two crops); refused for a model without AnyRes crops")
    parser.add_argument("--batch-size", type=_batch_size_argument, default=1, metavar="N",
                        help="questions per generate call, left-padded; pending questions are grouped by expected "
                             "prompt length (text plus the visual tokens their image sizes and the budget give) to "
                             "pad little. Greedy answers equal batch 1's; not part of the resume fingerprint "
                             "(default: %(default)s)")
    parser.add_argument("--num-workers", type=_num_workers_argument, default=None, metavar="N",
                        help="DataLoader worker processes that load and preprocess the images while the model runs "
                             "(0: on the main thread); answers do not depend on it. Default: min(4, CPUs - 1) when "
                             "the model runs on a GPU, 0 on the CPU, where workers compete with the model's threads "
                             "(give the model fewer, e.g. OMP_NUM_THREADS, if you use them there)")
    add_compression_arguments(parser)
    parser.add_argument("--retention-ratios", metavar="R,R,...", default=None,
                        help="a sweep in one process: answer at each of these ratios (instead of --retention-ratio), "
                             "loading the model and each image once, into one answers file per setting; "
                             f"--answers-file must then hold {RUN_PLACEHOLDER}, replaced by the setting's name "
                             "([<method name>-]R<ratio as typed>[-<layout>], the part of the scripts' names after "
                             "the checkpoint). Each file is the one a single run with that setting writes")
    parser.add_argument("--methods", metavar="M,M,...", default=None,
                        help="a sweep over methods (instead of --method), the outer loop of the settings; every "
                             "--method-arg applies to each of them")
    add_input_arguments(parser)
    return parser


def default_num_workers(device: torch.device) -> int:
    """min(4, this process's CPUs - 1) for a model on a GPU, where fork exists; else 0.

    On a GPU the main process needs about one CPU to launch kernels, and the workers take the image
    front end off its path. On the CPU they compete with the model's intra-op threads: on a shared
    2-CPU machine (tiny checkpoint, MME questions) one worker made each question 5-48% slower beside the
    model's 2 threads, and with 1 thread came within 13% either way of 0 workers with 2. Fork: the workers inherit the
    questions, whose image loaders are closures that spawned processes could not unpickle."""
    if device.type == "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cpus - 1))


def _num_workers_argument(text: str) -> int:
    try:
        workers = int(text)
    except ValueError:
        workers = -1
    if workers < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    if workers and "fork" not in multiprocessing.get_all_start_methods():
        raise argparse.ArgumentTypeError("worker processes need the 'fork' start method, which this platform lacks; "
                                         "pass 0")
    return workers


def _batch_size_argument(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return size


def build_questions(entries: Iterable[tuple[str, object]], make: Callable[[object], list[Question]], source: str,
                    skip_bad: bool = False) -> list[Question]:
    """`make(entry)` for every `(where, entry)` of a question file, in order.

    `where` names the entry for messages ("line 7"). An entry `make` cannot read (it raises
    KeyError for a missing field, or ValueError/TypeError/IndexError for a malformed entry) is
    collected; then all of them are reported in one UserError, or with `skip_bad` in one warning,
    and the entry is left out.
    """
    questions, bad = [], []
    for where, entry in entries:
        try:
            questions += make(entry)
        except KeyError as error:
            bad.append(f"{where}: no {error.args[0]!r} field")
        except (ValueError, TypeError, IndexError) as error:
            bad.append(f"{where}: {error}")
    if bad:
        listed = "; ".join(bad[:10]) + ("; ..." if len(bad) > 10 else "")
        message = f"{source}: {len(bad)} bad question entr{'y' if len(bad) == 1 else 'ies'} ({listed})"
        if not skip_bad:
            raise UserError(f"{message}; fix them, or pass --skip-bad-questions to leave them out")
        print(f"warning: {message}; left out (--skip-bad-questions)", file=sys.stderr)
    return questions


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """Upstream's split: contiguous slices of `ceil(N / num_chunks)`; a chunk past the end is empty."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx must be in [0, {num_chunks}) and --num-chunks >= 1, got {chunk_idx} of {num_chunks}")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size:(chunk_idx + 1) * size]


def distributed_rank() -> tuple[int, int, int]:
    """`(rank, world_size, local_rank)` from the environment `torchrun`/`accelerate launch` set."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def order_answers(questions: list[Question], rows: list[dict]) -> list[dict]:
    """`rows` in question order, one per question: matched by key with multiplicity, the first
    answer of a key kept and any surplus answer to the same question dropped. Rows for questions
    outside `questions` come last, in their given order."""
    asked = Counter(question.key for question in questions)
    waiting = defaultdict(list)
    for row in rows:
        waiting[answer_key(row.get("question_id"), row.get("prompt"))].append(row)
    ordered = [waiting[question.key].pop(0) for question in questions if waiting.get(question.key)]
    return ordered + [row for key, pending in waiting.items() if key not in asked for row in pending]


def pending_questions(questions: list[Question], rows: list[dict]) -> list[Question]:
    """The questions not answered in `rows` (a repeated key needs as many answers as repeats)."""
    answered = Counter(answer_key(row.get("question_id"), row.get("prompt")) for row in rows)
    pending = []
    for question in questions:
        if answered[question.key]:
            answered[question.key] -= 1
        else:
            pending.append(question)
    return pending


# In --answers-file and --save-selection of a sweep: each setting's name (`sweep_settings`).
RUN_PLACEHOLDER = "{run}"


def sweep_settings(args) -> list[argparse.Namespace]:
    """The settings a run answers, each as the arguments of the single run with that setting: `[args]`,
    or with `--methods`/`--retention-ratios` their product, methods outer and ratios inner in the
    order given, with `{run}` in `--answers-file` and `--save-selection` replaced by the setting's
    name (`setting_name`). Refuses in one line (UserError), before anything loads: a bad ratio, method
    or method argument (naming the method), a list beside its single flag, several settings without
    `{run}`, two settings with one file."""
    methods = _listed(args, "methods", "--methods")
    ratios = _listed(args, "retention_ratios", "--retention-ratios")
    placeholder_in = [flag for flag, value in [("--answers-file", args.answers_file),
                                               ("--save-selection", args.save_selection)]
                      if value and RUN_PLACEHOLDER in value]
    if methods is None and ratios is None:
        if placeholder_in:
            raise UserError(f"{placeholder_in[0]} holds {RUN_PLACEHOLDER}, which only a sweep (--retention-ratios, "
                            "--methods) fills in")
        return [args]
    for listed, list_flag, single, flag in [(ratios, "--retention-ratios", "retention_ratio", "--retention-ratio"),
                                            (ratios, "--retention-ratios", "visual_tokens", "--visual-tokens"),
                                            (methods, "--methods", "method", "--method")]:
        if listed is not None and getattr(args, single, None) is not None:
            raise UserError(f"{list_flag} and {flag} were both given: pass one")
    for method in methods or []:
        try:
            parse_method_args(method, args.method_arg)
        except ValueError as error:
            raise UserError(f"--methods {method}: {error}") from None
    for text in ratios or []:
        try:
            check_retention_ratio(float(text))
        except ValueError:
            raise UserError(f"--retention-ratios: must be numbers in (0, 1] (1 = no compression), got {text!r}") \
                from None
    settings = []
    for method in methods or [args.method]:
        for text in ratios or [None]:
            setting = argparse.Namespace(**dict(vars(args), methods=None, retention_ratios=None, method=method))
            if text is not None:
                setting.retention_ratio = float(text)
            name = setting_name(setting, text)
            setting.answers_file = args.answers_file.replace(RUN_PLACEHOLDER, name)
            setting.save_selection = args.save_selection and args.save_selection.replace(RUN_PLACEHOLDER, name)
            settings.append(setting)
    if len(settings) > 1:
        for flag in ["--answers-file"] + (["--save-selection"] if args.save_selection else []):
            if flag not in placeholder_in:
                raise UserError(f"{len(settings)} settings need one file each: put {RUN_PLACEHOLDER} in {flag}, e.g. "
                                f"answers/model-{RUN_PLACEHOLDER}.jsonl (replaced by each setting's name)")
    files = Counter(setting.answers_file for setting in settings)
    twice = [path for path, count in files.items() if count > 1]
    if twice:
        raise UserError(f"two settings would write {twice[0]}: a method or ratio is listed twice")
    return settings


def setting_name(args, ratio_text: str | None = None) -> str:
    """What the scripts put after `<checkpoint>-` in an answers file's name (`scripts/v1_5/eval/common.sh`):
    `[<run_name>-]<budget>[-<layout>]`, the method's `run_name` (empty for GlobalCom2 with default
    arguments), the budget `R<ratio>` (`ratio_text` as typed; else the ratio as Python prints it) or
    `N<visual tokens>`, and the layout unless official."""
    method_name = run_name(args.method or llava_arch.compression_method, args.method_arg)
    if ratio_text is None and args.visual_tokens is not None:
        budget = f"N{args.visual_tokens}"
    else:
        budget = "R" + (ratio_text or str(llava_arch.retention_ratio if args.retention_ratio is None
                                          else args.retention_ratio))
    layout = args.token_layout or llava_arch.token_layout
    return (f"{method_name}-" if method_name else "") + budget + ("" if layout == "official" else f"-{layout}")


def _listed(args, name: str, flag: str) -> list[str] | None:
    """The comma-separated list `args.<name>` (None when not given); an empty item is a UserError."""
    text = getattr(args, name, None)
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UserError(f"{flag}: an empty item in {text!r} (comma-separated values, e.g. 1,0.5,0.25)")
    return items


def run_settings(args, prompt_settings: dict, local_rank: int = 0) -> dict:
    """Everything that decides an answer besides the question: the resume fingerprint.

    The model is identified by its directory name and a hash of its config and weights index
    (`checkpoint_digest`, None when the checkpoint is not there); its full path is recorded
    separately, so a moved checkpoint still resumes. The layout is None at R = 1, where it changes
    nothing; the method's arguments are the ones that differ from its defaults.
    """
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    compression = compression_arguments(args)
    method = compression["method"] or llava_arch.compression_method
    method_args = compression["method_args"]
    visual_tokens = compression["visual_tokens"]
    ratio = None if visual_tokens is not None else check_retention_ratio(
        llava_arch.retention_ratio if args.retention_ratio is None else args.retention_ratio)
    layout = check_layout(llava_arch.token_layout if args.token_layout is None else args.token_layout)
    model_path = os.path.expanduser(args.model_path)
    return dict(
        model=get_model_name_from_path(model_path),
        model_hash=checkpoint_digest(model_path) if os.path.isdir(model_path) else None,
        model_base=args.model_base,
        conv_mode=args.conv_mode,
        dtype=str(resolve_dtype(args.dtype, device)).removeprefix("torch."),
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        method=method,
        method_args=non_default_args(method_args) if method_args is not None else {},
        retention_ratio=ratio,
        visual_tokens=visual_tokens,
        token_layout=layout if ratio != 1 else None,
        allow_truncation=args.allow_truncation,
        # The CLIP text tower text-conditioned methods read (None: the vision tower's own CLIP).
        text_tower=getattr(args, "text_tower", None),
        reverse_crops=getattr(args, "reverse_crops", False),
        tower_numerics=getattr(args, "tower_numerics", "sdpa"),
        **prompt_settings,
    )


# What a setting was before answers recorded it: files from then resume under these values.
SETTINGS_BEFORE_THEY_WERE_RECORDED = {"method": "globalcom2", "method_args": {}, "visual_tokens": None,
                                      "text_tower": None, "reverse_crops": False, "tower_numerics": "sdpa"}


def check_settings(rows: list[dict], settings: dict, answers_file: str) -> None:
    """Refuse to add answers made under `settings` to `rows` made under others, naming the first
    setting that differs. An unknown model hash (checkpoint not on this machine) is not compared.
    Rows from before settings were recorded are accepted with a warning."""
    recorded = [row["metadata"]["settings"] for row in rows if "settings" in (row.get("metadata") or {})]
    if len(recorded) < len(rows):
        print(f"warning: {answers_file}: {len(rows) - len(recorded)} answer(s) record no settings (written by an "
              "older version); they are kept, assumed to match this run", file=sys.stderr)
    for old in recorded:
        for key in sorted(set(old) | set(settings)):
            before = old.get(key, SETTINGS_BEFORE_THEY_WERE_RECORDED.get(key, "(not recorded)"))
            now = settings.get(key, "(not recorded)")
            if before == now or (key == "model_hash" and None in (before, now)):
                continue
            raise UserError(f"{answers_file} holds answers made with {key} {before!r}, but this run has {key} {now!r}: "
                            f"resuming would mix them in one file. Pass --overwrite to start afresh (the old file is "
                            f"kept as {answers_file}.bak), or write to another --answers-file")


def _existing_rows(path: str) -> list[dict]:
    return read_jsonl(path) if os.path.exists(path) else []


def _part_files(answers_file: str) -> list[str]:
    """The rank part files of `answers_file` (`<file>.rank<N>`; not their locks or backups)."""
    candidates = glob.glob(glob.escape(answers_file) + ".rank*")
    return sorted(path for path in candidates if re.fullmatch(r"\.rank\d+", path[len(answers_file):]))


def _all_rows(answers_file: str) -> list[dict]:
    """Everything written for `answers_file`: the file itself, then every rank's part."""
    return _existing_rows(answers_file) + [row for part in _part_files(answers_file) for row in _existing_rows(part)]


def run(args, load_questions: Callable[[], list[Question]], prompt_settings: dict | None = None) -> int:
    """Answer this run's share of `load_questions()` into `args.answers_file`; returns an exit status.

    `prompt_settings`: the runner's own options that change what the model is asked (e.g.
    `--single-pred-prompt`), added to the resume fingerprint.
    """
    quiet_transformers()
    with user_errors():
        set_max_image_pixels(args.max_image_pixels)
        return _run(args, load_questions(), prompt_settings or {})


@dataclasses.dataclass
class _Output:
    """One setting's answers file: the setting's arguments (`sweep_settings`), where this process
    writes, the resume fingerprint, and the questions it still has to answer."""
    args: argparse.Namespace
    answers_file: str
    out_file: str            # the answers file, or this rank's part of it
    settings: dict           # `run_settings`
    todo: list[Question] = dataclasses.field(default_factory=list)


def _run(args, questions: list[Question], prompt_settings: dict) -> int:
    rank, world_size, local_rank = distributed_rank()
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    share = get_chunk(chunk, world_size, rank)
    args.conv_mode = resolve_conv_mode(args.conv_mode, args.model_path)  # before the settings record it
    asked_conv_mode(args.conv_mode, args.model_path)  # an unknown template stops here, before the model loads
    outputs = []
    for setting in sweep_settings(args):
        answers_file = os.path.expanduser(setting.answers_file)
        outputs.append(_Output(setting, answers_file, f"{answers_file}.rank{rank}" if world_size > 1 else answers_file,
                               run_settings(setting, prompt_settings, local_rank)))
    with contextlib.ExitStack() as locks:
        for output in outputs:
            make_parent_dir(output.answers_file)
            locks.enter_context(_answers_lock(output.answers_file, rank, world_size))
        for output in outputs:
            output.todo = _resume(output, share, rank, world_size)
        if any(output.todo for output in outputs):
            _answer_all(args, outputs, share, rank, world_size, local_rank,
                        [path for output in outputs for path in _lock_paths(output.answers_file, rank, world_size)])
        if world_size > 1:
            _wait_for_all_ranks()
            if rank != 0:
                return 0
        for output in outputs:
            _merge_in_question_order(output.answers_file, chunk)
    for output in outputs:
        _print_summary(output.answers_file, chunk)
    return 0


def _resume(output: _Output, share: list[Question], rank: int, world_size: int) -> list[Question]:
    """Ready `output`'s files for this run (under its lock): `--overwrite`, a killed run's leftovers,
    the settings check; returns the questions of `share` it has not answered."""
    if output.args.overwrite:
        _start_afresh(output.answers_file, rank, world_size)
    # Left by a run killed during a rewrite; each process cleans only the files it writes.
    for path in {output.out_file, output.answers_file} if rank == 0 else {output.out_file}:
        remove_stale_temporaries(path)
    done = _all_rows(output.answers_file)
    check_settings(done, output.settings, output.answers_file)
    todo = pending_questions(share, done)
    if todo and os.path.exists(output.out_file):
        write_jsonl(output.out_file, _existing_rows(output.out_file))  # drops a half-written last line before appending
    return todo


def _merge_in_question_order(answers_file: str, chunk: list[Question]) -> None:
    """Rewrite `answers_file` from itself and every rank's part, in `chunk`'s question order."""
    rows = _all_rows(answers_file)
    ordered = order_answers(chunk, rows)
    if len(ordered) < len(rows):
        print(f"{answers_file}: dropped {len(rows) - len(ordered)} surplus answer(s) to questions answered "
              "already (written twice by an older version, or merged twice)", file=sys.stderr)
    write_jsonl(answers_file, ordered)
    for part in _part_files(answers_file):
        os.remove(part)


@contextlib.contextmanager
def _answers_lock(answers_file: str, rank: int, world_size: int):
    """One run per answers file. A single process locks `<file>.lock` exclusively; the ranks of
    one distributed run share it and each locks its own part, so a second run of any kind stops."""
    with contextlib.ExitStack() as locks:
        for index, lock_path in enumerate(_lock_paths(answers_file, rank, world_size)):
            locks.enter_context(_refusing_lock(answers_file, lock_path, shared=world_size > 1 and index == 0))
        yield


def _lock_paths(answers_file: str, rank: int, world_size: int) -> list[str]:
    """The lock files a runner holds: the answers file's (shared by the ranks), then its rank's part's."""
    return [f"{answers_file}.lock"] + ([f"{answers_file}.rank{rank}.lock"] if world_size > 1 else [])


@contextlib.contextmanager
def _refusing_lock(answers_file: str, lock_path: str, shared: bool):
    try:
        with file_lock(lock_path, shared=shared):
            yield
    except FileLocked as locked:
        holders = ", ".join(map(str, locked.holders)) or "unknown"
        raise UserError(f"another runner (process {holders}) is writing {answers_file}; two runners on one file "
                        "would answer every question twice: wait for it to finish, or stop it") from None


def _start_afresh(answers_file: str, rank: int, world_size: int) -> None:
    """`--overwrite`: rank 0 moves the answers file and every part to `<name>.bak`, then all go on."""
    if rank == 0:
        for path in [answers_file, *_part_files(answers_file)]:
            if os.path.exists(path):
                os.replace(path, path + ".bak")
                print(f"--overwrite: kept the old answers as {path}.bak", file=sys.stderr)
    if world_size > 1:
        _wait_for_all_ranks()




def _answer_all(args, outputs: list[_Output], share: list[Question], rank: int, world_size: int, local_rank: int,
                lock_paths: list[str]) -> None:
    """Answer every output's `todo`, batch-major: the questions any output still needs are taken a
    window at a time, their images loaded once and prepared once per distinct input config; then each
    output (in order) answers its questions of the window in batches and writes each answer at once.
    With several outputs the vision tower runs once per batch of images for all of them
    (`reusing_tower_outputs`)."""
    working = [output for output in outputs if output.todo]
    tokenizer, model, image_processor = _load_model(working[0].args, local_rank)
    model_name = get_model_name_from_path(args.model_path)
    conv_mode = asked_conv_mode(args.conv_mode, args.model_path)
    batch_size = getattr(args, "batch_size", 1)
    window = batch_size * GROUPING_WINDOW_BATCHES if batch_size > 1 else 1
    # Each output's settings, and its input config's index in `configs`. Configs are told apart by the
    # method's input changes (config equality compares only the declared fields).
    compressions, changes, configs, config_of = [], [], [], []
    for output in working:
        configure_model(model, output.args)  # a missing text tower stops the run before any answer
        compressions.append(model.compression_settings())
        own = get_method(compressions[-1].method).input_changes(compressions[-1].method_args)
        if own not in changes:
            changes.append(own)
            configs.append(model.input_config(compressions[-1]))
        config_of.append(changes.index(own))
    waiting = [{id(question) for question in output.todo} for output in working]
    questions = [question for question in share if any(id(question) in own for own in waiting)]
    needs = [[any(id(question) in waiting[index] for index in range(len(working)) if config_of[index] == config)
              for config in range(len(configs))] for question in questions]
    num_workers = getattr(args, "num_workers", None)
    prepared_stream = _prepared_questions(_FrontEnd(questions, needs, image_processor, configs, model.dtype), model,
                                          default_num_workers(model.device) if num_workers is None else num_workers,
                                          window, lock_paths)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(_Writer(output, rank, world_size)) for output in working]
        stack.enter_context(contextlib.closing(prepared_stream))
        if len(working) > 1:
            stack.enter_context(model.reusing_tower_outputs(*compressions))
        progress = tqdm(desc=f"answers (rank {rank})" if world_size > 1 else "answers",
                        initial=len(share) * len(outputs) - sum(len(output.todo) for output in working),
                        total=len(share) * len(outputs), disable=None)
        for first in range(0, len(questions), window):
            # Per output: (question, its prepared images, its chat prompt); the error that stops the run
            loaded, stop = [[] for _ in working], None
            for question in questions[first:first + window]:
                prepared = next(prepared_stream)
                if isinstance(prepared, ImageLoadError) and args.on_image_error == "stop":
                    stop = UserError(str(prepared))  # raised once the questions before it are answered
                    break
                if isinstance(prepared, BaseException) and not isinstance(prepared, ImageLoadError):
                    raise prepared  # anything else the front end raised: as on the main thread
                prompt = first_turn_prompt(conv_mode, question.query)
                for index, (output, writer) in enumerate(zip(working, writers)):
                    if id(question) not in waiting[index]:
                        continue
                    if isinstance(prepared, ImageLoadError):
                        writer.write(question, _error_row(question, str(prepared), model_name, output.settings), [])
                        progress.update()
                    else:
                        loaded[index].append((question, prepared[config_of[index]], prompt))
            for output, writer, own in zip(working, writers, loaded):
                if not own:
                    continue
                if len(working) > 1:
                    configure_model(model, output.args)
                lengths = [expected_prompt_tokens(model, tokenizer, prompt, prepared.sizes) if batch_size > 1 else 0
                           for _, prepared, prompt in own]
                by_length = [own[index] for index in sorted(range(len(own)), key=lengths.__getitem__)]
                for start in range(0, len(by_length), batch_size):
                    for question, row, lines in _answered(output.args, by_length[start:start + batch_size], tokenizer,
                                                          model, model_name, output.settings, writer.with_selections):
                        writer.write(question, row, lines)
                        progress.update()
            if stop is not None:
                raise stop


class _Writer:
    """An output's open answers file (and selection file): each answer written and flushed at once."""

    def __init__(self, output: _Output, rank: int, world_size: int):
        self.output = output
        selection = output.args.save_selection
        self.selection_file = selection and selection + (f".rank{rank}" if world_size > 1 else "")
        self.with_selections = bool(self.selection_file)

    def __enter__(self) -> "_Writer":
        with contextlib.ExitStack() as stack:
            self.out = stack.enter_context(open(self.output.out_file, "a", encoding="utf-8"))
            self.selections = stack.enter_context(open_selection_file(self.selection_file)) \
                if self.selection_file else None
            self._files = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def write(self, question: Question, row: dict, lines: list[dict]) -> None:
        if self.selections:
            # Before the answer: a kill between the two repeats this question's records on resume
            # rather than losing them. An error row has no accounting, so no (stale) selection.
            write_lines(self.selections, [dict(question_id=question.question_id, **line) for line in lines])
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()


class _FrontEnd(torch.utils.data.Dataset):
    """Item i: question i's images loaded once and made into the tower's input (`PreparedImages`) under
    each input config of `configs` that `needs[i]` marks (None under the others), or the exception
    that raised: an `ImageLoadError` is that question's error (recorded, or the run's stop), anything
    else is raised by the main loop. Returned rather than raised, because the DataLoader would
    re-raise a worker's exception wrapped in the worker's traceback instead of its one line."""

    def __init__(self, questions: list[Question], needs: list[list[bool]], image_processor, configs: list,
                 dtype: torch.dtype):
        self.questions, self.needs, self.image_processor = questions, needs, image_processor
        self.configs, self.dtype = configs, dtype

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> list[PreparedImages | None] | Exception:
        try:
            images = self.questions[index].load_images()
            return [prepare_images(images, self.image_processor, config, self.dtype) if needed else None
                    for config, needed in zip(self.configs, self.needs[index])]
        except Exception as error:  # noqa: BLE001 - handed to the main loop, which decides
            if not isinstance(error, ImageLoadError):
                error.add_note("raised while preparing the images of question "
                               f"{self.questions[index].question_id!r}:\n" + traceback.format_exc())
            return error


def _prepared_questions(front_end: _FrontEnd, model, num_workers: int, window: int, lock_paths: list[str]):
    """`front_end`'s items, in order, made by `num_workers` forked DataLoader workers (0: on this
    thread). The workers run ahead by up to about a grouping window, so the next window is ready
    when the model has answered this one. Closing the generator stops the workers."""
    workers = dict(num_workers=num_workers, multiprocessing_context="fork",
                   prefetch_factor=max(2, -(-window // num_workers)),
                   worker_init_fn=functools.partial(_let_go_of_locks, lock_paths)) if num_workers else {}
    loader = torch.utils.data.DataLoader(front_end, batch_size=None, collate_fn=_as_is,
                                         pin_memory=model.device.type == "cuda", **workers)
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator  # its finaliser stops the workers now, not at the next garbage collection


def _as_is(item):
    """The DataLoader's collate function: an item goes to the main loop as the front end made it."""
    return item


def _let_go_of_locks(lock_paths: list[str], worker_id: int) -> None:
    """A forked worker's first act: point its inherited descriptors of the runner's lock files at
    /dev/null. flock locks belong to the open file, which fork shares; a worker keeping its copy would
    keep the answers file locked after the runner died (a worker notices its parent's death only
    within seconds), and a resume started at once would be refused."""
    locked = set()
    for path in lock_paths:
        with contextlib.suppress(OSError):
            status = os.stat(path)
            locked.add((status.st_dev, status.st_ino))
    null = os.open(os.devnull, os.O_RDONLY)
    for name in os.listdir("/dev/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            status = os.fstat(int(name))
            if (status.st_dev, status.st_ino) in locked:
                os.dup2(null, int(name))  # the number stays valid; the locked file is no longer referenced
    os.close(null)


def asked_conv_mode(conv_mode: str, model_path: str) -> str:
    """The template the questions are asked in: `conv_mode`, or its `_mmtag` variant for a checkpoint
    whose name says `plain` but not `finetune` (upstream's rule for pretraining-only checkpoints).
    Refused in one line (UserError) where that template does not exist, as only v0's and v1's do:
    upstream stops there with a KeyError after loading the model."""
    if conv_mode not in conv_templates:
        raise UserError(f"--conv-mode: unknown template {conv_mode!r}; valid: {', '.join(sorted(conv_templates))}")
    model_name = get_model_name_from_path(model_path)
    if "plain" not in model_name or "finetune" in model_name.lower() or "mmtag" in conv_mode:
        return conv_mode
    if conv_mode + "_mmtag" not in conv_templates:
        raise UserError(f"--conv-mode {conv_mode}: {model_name!r} says 'plain' (a pretraining-only checkpoint), so "
                        f"upstream's rule asks in {conv_mode}_mmtag, which does not exist; pass --conv-mode v1 or v0")
    return conv_mode + "_mmtag"


def _load_model(args, local_rank: int):
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                                 torch_dtype=args.dtype)
    configure_model(model, args)
    if getattr(args, "reverse_crops", False) and not is_anyres(getattr(model.config, "image_aspect_ratio", None)):
        raise UserError(f"--reverse-crops: {args.model_path} sends one view per image (image_aspect_ratio "
                        f"{getattr(model.config, 'image_aspect_ratio', None)!r}, not 'anyres'/'anyres_max_N'): there "
                        "are no crops to reverse")
    return tokenizer, model, image_processor


def _answered(args, batch: list[tuple], tokenizer, model, model_name: str, settings: dict, with_selections: bool):
    """`(question, answer row, selection lines)` for each `(question, prepared images, chat prompt)` of
    `batch`, answered in one generate call. A prompt longer than the model takes fails the whole
    call, so such a batch is answered again one question at a time: the error is that question's
    (a stop, or with `--on-image-error record` its error row), the others are answered."""
    try:
        results = answer_prepared(
            model, tokenizer, [prompt for _, _, prompt in batch], [prepared for _, prepared, _ in batch],
            temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens, reverse_crops=getattr(args, "reverse_crops", False),
            instructions=[None if question.instruction is None else [question.instruction] * len(prepared.sizes)
                          for question, prepared, _ in batch])
    except PromptTooLongError as error:
        if len(batch) > 1:
            for item in batch:
                yield from _answered(args, [item], tokenizer, model, model_name, settings, with_selections)
            return
        question = batch[0][0]
        message = f"question {question.question_id}: {error}"
        if args.on_image_error == "stop":
            raise UserError(message) from None
        yield question, _error_row(question, message, model_name, settings), []
        return
    # One selection line per image of the batch, in order (model.last_selections); each question
    # takes its own images' lines, numbered from 0 as a batch of one numbers them.
    lines = selection_lines(model, [record for result in results for record in result.accounting]) \
        if with_selections else []
    offset = 0
    for (question, _, _), result in zip(batch, results):
        own = lines[offset:offset + len(result.accounting)]
        offset += len(result.accounting)
        yield question, _answer_row(question, result, model_name, settings), [
            dict(line, image_index=index) for index, line in enumerate(own)]


def _error_row(question: Question, message: str, model_name: str, settings: dict) -> dict:
    """`--on-image-error record`: an empty answer with the error in its metadata."""
    tqdm.write(f"warning: {message}; recorded an empty answer", file=sys.stderr)
    return dict(question_id=question.question_id, prompt=question.prompt, text="", answer_id=shortuuid.uuid(),
                model_id=model_name, **question.extra, metadata=dict(question.metadata, error=message,
                                                                     settings=settings))


def _answer_row(question: Question, result, model_name: str, settings: dict) -> dict:
    """The answers-file row of `result` (a `generation.Answer`), with its accounting in `metadata`."""
    before = sum(record["tokens_before"] for record in result.accounting)
    compression = result.compression
    metadata = dict(question.metadata, method=compression["method"], method_args=compression["method_args"],
                    retention_ratio=compression["retention_ratio"], budget_visual_tokens=compression["visual_tokens"],
                    token_layout=compression["layout"], visual_tokens=result.visual_tokens,
                    visual_tokens_before=before, images=result.accounting, settings=settings)
    return dict(question_id=question.question_id, prompt=question.prompt, text=result.text,
                answer_id=shortuuid.uuid(), model_id=model_name, **question.extra, metadata=metadata)


def _wait_for_all_ranks() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")  # a CPU barrier is all that is needed
    dist.barrier()


def _print_summary(answers_file: str, chunk: list[Question]) -> None:
    """Counts and the average visual tokens before/after compression, on stderr."""
    rows = read_jsonl(answers_file)
    measured = [row["metadata"] for row in rows if "visual_tokens_before" in row.get("metadata", {})]
    errors = sum("error" in row.get("metadata", {}) for row in rows)
    line = f"{len(rows)} answers for {len(chunk)} questions in {answers_file}"
    if errors:
        line += f"; {errors} recorded with errors"
    if measured:
        after = sum(meta["visual_tokens"] for meta in measured) / len(measured)
        before = sum(meta["visual_tokens_before"] for meta in measured) / len(measured)
        last = measured[-1]
        label = compression_label(dict(method=last.get("method", "globalcom2"), layout=last["token_layout"],
                                       retention_ratio=last["retention_ratio"],
                                       visual_tokens=last.get("budget_visual_tokens")))
        line += f"; visual tokens per question: {after:.1f} of {before:.1f} ({100 * after / max(before, 1):.1f}%), {label}"
    print(line, file=sys.stderr)
