"""What every benchmark runner shares: arguments, chunking, resume, answers, several processes.

A runner module (`model_vqa_loader`, `model_vqa`, `model_vqa_science`, `model_vqa_mmbench`)
turns its question file into `Question`s and calls `run`. `run`:

- takes this run's share: upstream's `--num-chunks/--chunk-idx` split, then, under `torchrun` or
  `accelerate launch` (`WORLD_SIZE` > 1), one contiguous part per rank;
- resumes: answers already in the answers file are kept and their questions skipped. Questions
  are matched by `(question_id, prompt)` counted with multiplicity, because some benchmarks
  repeat ids (TextVQA's id is the image's);
- writes and flushes each answer as soon as it exists, so a killed run loses at most the answer
  in flight; a half-written last line is dropped on the next start;
- ends by rewriting the answers file in question order (rank 0 merges every rank's part);
- stops with an error naming the question and the file when an image is missing or corrupt, or
  with `--on-image-error record` writes an empty answer with the error in its metadata and goes on
  (positional scorers such as POPE need one line per question);
- stores GlobalCom2's token accounting in each answer's `metadata` and prints averages.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from collections import Counter, defaultdict
from typing import Callable

import shortuuid
import torch
from tqdm import tqdm

from llava.conversation import get_conv_template
from llava.eval.jsonl import read_jsonl, write_jsonl
from llava.generation import add_compression_arguments, answer, apply_compression_arguments
from llava.mm_utils import ImageLoadError, get_model_name_from_path
from llava.model.builder import load_pretrained_model
from llava.utils import quiet_transformers, user_errors


@dataclasses.dataclass
class Question:
    question_id: object
    prompt: str                             # the answers file's `prompt` field; scorers parse it
    query: str                              # the user turn, `<image>` where the image goes
    load_images: Callable[[], list] = list  # PIL images; raises ImageLoadError naming the file
    extra: dict = dataclasses.field(default_factory=dict)     # more answer fields (MMBench)
    metadata: dict = dataclasses.field(default_factory=dict)  # recorded in the answer's metadata

    @property
    def key(self) -> tuple[str, str]:
        return answer_key(self.question_id, self.prompt)


def answer_key(question_id, prompt) -> tuple[str, str]:
    return json.dumps(question_id), prompt


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
    parser.add_argument("--conv-mode", default=conv_mode)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=temperature)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--device", default=None, help="default: cuda (this rank's GPU) if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--on-image-error", choices=["stop", "record"], default="stop",
                        help="missing or corrupt image: stop with an error (default), or record an empty answer "
                             "with the error in its metadata and go on")
    add_compression_arguments(parser)
    return parser


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
    """`rows` in question order: one per question at most, matched by key with multiplicity.
    Rows for questions outside `questions` come last, in their given order."""
    waiting = defaultdict(list)
    for row in rows:
        waiting[answer_key(row.get("question_id"), row.get("prompt"))].append(row)
    ordered = [waiting[question.key].pop(0) for question in questions if waiting.get(question.key)]
    return ordered + [row for pending in waiting.values() for row in pending]


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


def _existing_rows(path: str) -> list[dict]:
    return read_jsonl(path) if os.path.exists(path) else []


def _part_files(answers_file: str) -> list[str]:
    return sorted(glob.glob(glob.escape(answers_file) + ".rank*"))


def run(args, questions: list[Question]) -> int:
    """Answer this run's share of `questions` into `args.answers_file`; returns an exit status."""
    quiet_transformers()
    with user_errors():
        return _run(args, questions)


def _run(args, questions: list[Question]) -> int:
    rank, world_size, local_rank = distributed_rank()
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    share = get_chunk(chunk, world_size, rank)
    answers_file = os.path.expanduser(args.answers_file)
    os.makedirs(os.path.dirname(answers_file) or ".", exist_ok=True)
    out_file = f"{answers_file}.rank{rank}" if world_size > 1 else answers_file

    # Resume: everything already written for this answers file, by any earlier run or rank.
    done = _existing_rows(answers_file) + [row for part in _part_files(answers_file) for row in _existing_rows(part)]
    todo = pending_questions(share, done)
    mine = _existing_rows(out_file)
    write_jsonl(out_file, mine)  # drops a half-written last line before appending

    if todo:
        tokenizer, model, image_processor = _load_model(args, local_rank)
        model_name = get_model_name_from_path(args.model_path)
        with open(out_file, "a", encoding="utf-8") as out:
            progress = tqdm(todo, desc=f"answers (rank {rank})" if world_size > 1 else "answers",
                            initial=len(share) - len(todo), total=len(share), disable=None)
            for question in progress:
                row = _answer_row(args, question, tokenizer, model, image_processor, model_name)
                out.write(json.dumps(row) + "\n")
                out.flush()
    if world_size > 1:
        _wait_for_all_ranks()
        if rank != 0:
            return 0
    rows = _existing_rows(answers_file) + [row for part in _part_files(answers_file) for row in _existing_rows(part)]
    write_jsonl(answers_file, order_answers(chunk, rows))
    for part in _part_files(answers_file):
        os.remove(part)
    _print_summary(answers_file, chunk)
    return 0


def _load_model(args, local_rank: int):
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, args.model_base, device=device,
                                                                 torch_dtype=args.dtype)
    apply_compression_arguments(model, args)
    return tokenizer, model, image_processor


def _answer_row(args, question: Question, tokenizer, model, image_processor, model_name: str) -> dict:
    conv_mode = args.conv_mode
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
        conv_mode += "_mmtag"  # upstream's rule for pretraining-only checkpoints
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], question.query)
    conv.append_message(conv.roles[1], None)
    row = dict(question_id=question.question_id, prompt=question.prompt)
    try:
        images = question.load_images()
    except ImageLoadError as error:
        if args.on_image_error == "stop":
            raise
        tqdm.write(f"warning: {error}; recorded an empty answer", file=sys.stderr)
        return dict(row, text="", answer_id=shortuuid.uuid(), model_id=model_name, **question.extra,
                    metadata=dict(question.metadata, error=str(error)))
    result = answer(model, tokenizer, image_processor, conv.get_prompt(), images, temperature=args.temperature,
                    top_p=args.top_p, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    before = sum(record["tokens_before"] for record in result.accounting)
    metadata = dict(question.metadata, retention_ratio=result.retention_ratio, token_layout=result.token_layout,
                    visual_tokens=result.visual_tokens, visual_tokens_before=before, images=result.accounting)
    return dict(row, text=result.text, answer_id=shortuuid.uuid(), model_id=model_name, **question.extra,
                metadata=metadata)


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
        line += f"; {errors} with image errors"
    if measured:
        after = sum(meta["visual_tokens"] for meta in measured) / len(measured)
        before = sum(meta["visual_tokens_before"] for meta in measured) / len(measured)
        line += (f"; visual tokens per question: {after:.1f} of {before:.1f} ({100 * after / max(before, 1):.1f}%) "
                 f"at R {measured[-1]['retention_ratio']:g} {measured[-1]['token_layout']}")
    print(line, file=sys.stderr)
