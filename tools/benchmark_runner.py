"""Per-question wall time of the real runner, split into its parts, at several settings in one run.

The short-answer runner (`llava.eval.model_vqa_loader`, `llava.eval.runner.run`) answers a question
set in this process once per setting: every retention ratio of `--ratios` with every front-end worker
count of `--workers` and batch size of `--batch-sizes`. The model is loaded once. Each run's wall
time (the runner's `main`, answers file written) is split into:

- front_end: the time the main loop waits for its next prepared question (`runner._prepared_questions`):
  image loading and AnyRes preprocessing with 0 workers, the wait for the workers otherwise;
- tower: `model.encode_images` (vision tower and projector, with the text tower's image signals) and
  `model.signals_from_instructions` (the text tower, where a method reads the question);
- compression: `model.encode_image_sequences` and `model.image_sequence` without the tower inside
  them (the method's selection, the layout, the accounting);
- prefill / decode: the language model's forward (`model.forward`) over the whole prompt (more than
  one position) / over one position per cached step;
- overhead: the rest (prompt building, tokenisation, splicing, the generate loop between forwards,
  length grouping, writing the answers, the runner's start and final rewrite).

Each part is exclusive (a timed call nested in another is counted once, in its own part), so the six
add up to the wall time. The timers wrap the model instance's methods and the runner module's
functions from outside and are removed afterwards; on CUDA each synchronises before and after, so a
part holds its kernels (the decode's per-step synchronisation costs a little time on a GPU).
Per (workers, batch size) the run at the smallest ratio is compared with R = 1: the end-to-end
speed-up (wall time), the model-only speed-up (tower + compression + prefill + decode) and their
ratio, against the target "end-to-end speed-up within 1.3x of the model-only speed-up".

Questions: the sample suite's MME questions (`llava.eval.sample_suite`, drawn images whose sizes
cover every AnyRes grid), or `--question-file/--image-folder`, each repeated `--repeat-questions`
times. A random-weight model never emits its end token, so every answer is `--max-new-tokens` long:
the default (4) is about an MME answer (a word and the end token).

    python tools/benchmark_runner.py                       # tiny checkpoint, CPU
    python tools/benchmark_runner.py --preset llava-next-7b --ratios 1 0.25 0.1 --workers 0 4 --batch-sizes 1 8

`--preset llava-next-7b`: LLaVA-NeXT-7B at full size with random weights on CUDA in fp16
(`benchmark_efficiency.build_random_model`), on the sample MME questions repeated to MME's 2374
questions unless `--repeat-questions` says otherwise.

Writes `--out` (default `efficiency/runner/`): `runner.json`, `runner.md`, `runner.png` (stacked bars
of the parts per setting) and `answers/<setting>.jsonl`, the answers of each run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_efficiency import Clock, build_random_model  # noqa: E402  (a sibling tool)

from llava.eval import model_vqa_loader, runner  # noqa: E402
from llava.eval.jsonl import read_jsonl, write_jsonl  # noqa: E402
from llava.eval.sample_suite import ensure_sample_suite  # noqa: E402
from llava.files import atomic_write, write_text  # noqa: E402
from llava.generation import configure_model  # noqa: E402
from llava.model import llava_arch  # noqa: E402
from llava.model.compression.registry import method_choices  # noqa: E402
from llava.tiny import ensure_tiny_checkpoint  # noqa: E402
from llava.utils import quiet_transformers  # noqa: E402

PARTS = ("front_end", "tower", "compression", "prefill", "decode", "overhead")
MODEL_PARTS = ("tower", "compression", "prefill", "decode")
TARGET_FACTOR = 1.3  # the model-only speed-up may be at most this many times the end-to-end one
MME_QUESTIONS = 2374  # the MME benchmark's question count (llava_mme.jsonl)
SAMPLE_MME = ("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version")  # within the sample suite


class PartTimer:
    """Exclusive wall time (ms) and call counts per part, over calls that may nest.

    A call's time goes to its own part less the time of the timed calls inside it, which go to
    theirs, so the parts never count a moment twice. `device`: on CUDA every timed call
    synchronises before and after (`benchmark_efficiency.Clock`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.ms = dict.fromkeys(PARTS[:-1], 0.0)
        self.calls = dict.fromkeys(PARTS[:-1], 0)
        self._inner_ms = []  # per open timed call: the time of the timed calls nested in it so far

    @contextlib.contextmanager
    def timing(self, part: str):
        self._inner_ms.append(0.0)
        try:
            with Clock(self.device) as clock:
                yield
        finally:
            inner = self._inner_ms.pop()
            self.ms[part] += clock.ms - inner
            self.calls[part] += 1
            if self._inner_ms:
                self._inner_ms[-1] += clock.ms

    def wrap(self, function, part):
        """`function` timed as `part`, a name or `part(args, kwargs) -> name`."""
        @functools.wraps(function)  # transformers reads the forward's signature through __wrapped__
        def timed(*args, **kwargs):
            with self.timing(part(args, kwargs) if callable(part) else part):
                return function(*args, **kwargs)
        return timed

    def timed_items(self, items, part: str):
        """`items` (an iterator) passed through, the wait for each item timed as `part`; closing the
        returned generator closes `items` (the runner closes its prepared-question stream)."""
        try:
            while True:
                with self.timing(part):
                    item = next(items, StopIteration)
                if item is StopIteration:
                    return
                yield item
        finally:
            items.close()


def forward_part(args: tuple, kwargs: dict) -> str:
    """'prefill' for a language-model forward over more than one position, else 'decode' (a cached step)."""
    tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
    return "prefill" if tokens.shape[1] > 1 else "decode"


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """`owner.name` set to `value` for the block, then what it was: an instance's own attribute
    removed again, so the class's method shows through."""
    own = vars(owner)
    had_own, previous = name in own, own.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, previous)
        else:
            delattr(owner, name)


@contextlib.contextmanager
def timed_runner(timer: PartTimer, model, load_model):
    """The runner in this process, timed by `timer`, answering with `model` (`load_model(args, rank)`
    gives it, configured by each run's arguments) instead of loading a checkpoint per run."""
    with contextlib.ExitStack() as stack:
        for name, part in [("encode_images", "tower"), ("signals_from_instructions", "tower"),
                           ("encode_image_sequences", "compression"), ("image_sequence", "compression"),
                           ("forward", forward_part)]:
            stack.enter_context(replaced(model, name, timer.wrap(getattr(model, name), part)))
        prepared_questions = runner._prepared_questions
        stack.enter_context(replaced(runner, "_prepared_questions", lambda *args, **kwargs: timer.timed_items(
            prepared_questions(*args, **kwargs), "front_end")))
        stack.enter_context(replaced(runner, "_load_model", load_model))
        yield


def question_set(args) -> tuple[str, str]:
    """(question file, image folder) of this benchmark: the given or the sample MME's, each question
    repeated (the whole list, `repeat` times) into `<out>/questions.jsonl`."""
    if args.question_file:
        source, image_folder = args.question_file, args.image_folder
    else:
        suite = ensure_sample_suite(args.suite)
        source, image_folder = (os.path.join(suite, part) for part in SAMPLE_MME)
    lines = read_jsonl(source)
    repeat = args.repeat_questions or (math.ceil(MME_QUESTIONS / len(lines)) if args.preset else 1)
    question_file = os.path.join(args.out, "questions.jsonl")
    write_jsonl(question_file, lines * repeat)
    return question_file, image_folder


def runner_arguments(args, model_path: str, question_file: str, image_folder: str, answers_file: str,
                     ratio: float, workers: int, batch_size: int) -> list[str]:
    """The runner's command line for one setting (greedy, as the evaluation scripts run it)."""
    argv = ["--model-path", model_path, "--question-file", question_file, "--image-folder", image_folder,
            "--answers-file", answers_file, "--temperature", "0",
            *(["--conv-mode", args.conv_mode] if args.conv_mode else ["--fallback-conv-mode", "vicuna_v1"]),
            "--max-new-tokens", str(args.max_new_tokens), "--retention-ratio", f"{ratio:g}",
            "--num-workers", str(workers), "--batch-size", str(batch_size)]
    for flag, value in [("--method", args.method), ("--token-layout", args.token_layout), ("--device", args.device),
                        ("--dtype", args.dtype)]:
        argv += [flag, value] if value is not None else []
    return argv + [item for pair in args.method_arg for item in ("--method-arg", pair)]


def run_setting(timer: PartTimer, argv: list[str], answers_file: str, device: torch.device) -> dict:
    """One runner run: its wall time and parts in ms per question, call counts, mean visual tokens."""
    if os.path.exists(answers_file):
        os.remove(answers_file)  # a fresh run, not a resume
    timer.reset()
    with Clock(device) as wall:
        status = model_vqa_loader.main(argv)
    if status:
        raise SystemExit(f"the runner stopped with status {status} ({' '.join(argv)})")
    rows = read_jsonl(answers_file)
    count = len(rows)
    parts = dict(timer.ms, overhead=wall.ms - sum(timer.ms.values()))
    return dict(questions=count, wall_ms=wall.ms / count, **{f"{part}_ms": ms / count for part, ms in parts.items()},
                model_ms=sum(parts[part] for part in MODEL_PARTS) / count,
                calls={part: timer.calls[part] for part in PARTS[:-1]},
                visual_tokens=sum(row["metadata"]["visual_tokens"] for row in rows) / count)


def speedups(rows: list[dict]) -> list[dict]:
    """Per (workers, batch size): the smallest ratio against R = 1, end to end and model only."""
    checks = []
    for workers, batch_size in dict.fromkeys((row["workers"], row["batch_size"]) for row in rows):
        same = [row for row in rows if (row["workers"], row["batch_size"]) == (workers, batch_size)]
        full = next((row for row in same if row["ratio"] == 1), None)
        smallest = min(same, key=lambda row: row["ratio"])
        if full is None or smallest is full:
            continue
        end_to_end = full["wall_ms"] / smallest["wall_ms"]
        model_only = full["model_ms"] / smallest["model_ms"]
        checks.append(dict(workers=workers, batch_size=batch_size, ratio=smallest["ratio"],
                           end_to_end_speedup=end_to_end, model_only_speedup=model_only,
                           model_over_end_to_end=model_only / end_to_end,
                           holds=model_only / end_to_end <= TARGET_FACTOR))
    return checks


def check_line(check: dict) -> str:
    return (f"workers {check['workers']}, batch {check['batch_size']}, R {check['ratio']:g} vs 1: end-to-end "
            f"{check['end_to_end_speedup']:.2f}x, model-only {check['model_only_speedup']:.2f}x, ratio "
            f"{check['model_over_end_to_end']:.2f} (target <= {TARGET_FACTOR:g}): "
            f"{'holds' if check['holds'] else 'does not hold'}")


def markdown(rows: list[dict], checks: list[dict], header: str) -> str:
    columns = ["ratio", "workers", "batch_size", "questions", "visual_tokens", "wall_ms",
               *(f"{part}_ms" for part in PARTS), "model_ms"]
    lines = [header, "", "ms per question.", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[name]:.1f}" if isinstance(row[name], float) else f"{row[name]:g}"
                                       for name in columns) + " |")
    return "\n".join(lines + [""] + [check_line(check) for check in checks]) + "\n"


def setting_label(row: dict) -> str:
    return f"R{row['ratio']:g}_w{row['workers']}_b{row['batch_size']}"


def plot(rows: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    positions = range(len(rows))
    bottoms = [0.0] * len(rows)
    for part in PARTS:
        heights = [row[f"{part}_ms"] for row in rows]
        axes.bar(positions, heights, bottom=bottoms, label=part.replace("_", " "))
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights)]
    axes.set_xticks(list(positions), [f"R {row['ratio']:g}\n{row['workers']} workers\nbatch {row['batch_size']}"
                                      for row in rows], fontsize=8)
    axes.set(ylabel="ms per question", title=title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_write(path, "wb") as out:
        figure.savefig(out, format="png", dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model-path", default=None, help="a checkpoint (default: the tiny one, checkpoints/"
                                                          "llava-next-tiny, built if missing)")
    model.add_argument("--preset", choices=["llava-next-7b"], default=None,
                       help="random weights at full size instead of a checkpoint (CUDA, fp16 by default)")
    parser.add_argument("--question-file", default=None, help="default: the sample suite's MME questions")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--suite", default="playground/sample/eval", help="sample suite folder (built if missing)")
    parser.add_argument("--repeat-questions", type=int, default=None, metavar="K",
                        help="answer the question list K times over (default 1; with --preset, MME's size)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 0.1])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--method", choices=method_choices(), default=None, help="compression method")
    parser.add_argument("--method-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an argument of the method (repeatable)")
    parser.add_argument("--token-layout", choices=["official", "spatial"], default=None)
    parser.add_argument("--conv-mode", default=None,
                        help="chat template (default as the evaluation scripts: the checkpoint family's, else "
                             "vicuna_v1)")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: the runner's (float16 on CUDA, float32 on CPU)")
    parser.add_argument("--warmup-questions", type=int, default=4,
                        help="answered once, untimed, before the measured runs (first-call costs)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every setting this many times, round-robin, and report each one's run of median "
                             "wall time (steadier on a shared machine)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join("efficiency", "runner"),
                        help="folder for runner.{json,md,png} and answers/")
    return parser


def load_once(args, device: torch.device, question_file: str, image_folder: str):
    """(model path the runs name, (tokenizer, model, image processor)): the preset's random weights, or
    the checkpoint loaded as the runner loads it."""
    if args.preset:
        args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
        model_path = f"{args.preset}-random"  # recorded as the answers' model; no such folder is read
        return model_path, build_random_model(args.preset, str(device), getattr(torch, args.dtype))
    model_path = args.model_path or ensure_tiny_checkpoint()
    first = model_vqa_loader.build_loader_parser("", 128).parse_args(runner_arguments(
        args, model_path, question_file, image_folder, "", args.ratios[0], 0, 1))
    return model_path, runner._load_model(first, 0)


def measure(args, device: torch.device, model_path: str, loaded: tuple, question_file: str,
            image_folder: str) -> list[dict]:
    """One row per (ratio, workers, batch size): the run of median wall time over `args.rounds`,
    after an untimed warm-up run on the first `args.warmup_questions` questions."""
    model = loaded[1]

    def load_model(run_args, _local_rank):
        configure_model(model, run_args)
        return loaded

    def answer(row: dict, questions: str, answers_file: str) -> dict:
        return run_setting(timer, runner_arguments(args, model_path, questions, image_folder, answers_file,
                                                   row["ratio"], row["workers"], row["batch_size"]),
                           answers_file, device)

    timer = PartTimer(device)
    settings = [dict(ratio=ratio, workers=workers, batch_size=batch_size) for workers in args.workers
                for batch_size in args.batch_sizes for ratio in args.ratios]
    runs = [[] for _ in settings]
    answers = os.path.join(args.out, "answers")
    with timed_runner(timer, model, load_model):
        if args.warmup_questions:
            warmup = [os.path.join(answers, "warmup.questions.jsonl"), os.path.join(answers, "warmup.jsonl")]
            write_jsonl(warmup[0], read_jsonl(question_file)[:args.warmup_questions])
            answer(settings[0], *warmup)
            for path in warmup:
                os.remove(path)
        for round_number in range(args.rounds):  # round-robin, so a busy spell of a shared machine hits every setting
            for setting, own in zip(settings, runs):
                row = dict(setting, **answer(setting, question_file,
                                             os.path.join(answers, setting_label(setting) + ".jsonl")))
                own.append(row)
                print(f"round {round_number + 1}, {setting_label(row)}: {row['wall_ms']:.1f} ms per question ("
                      + ", ".join(f"{part} {row[f'{part}_ms']:.1f}" for part in PARTS) + ")", file=sys.stderr)
    # Each setting's run of median wall time, whole, so that its parts still add up to its wall time.
    return [sorted(own, key=lambda row: row["wall_ms"])[(len(own) - 1) // 2] for own in runs]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()  # before the model loads, as the runner does before it would
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(os.path.join(args.out, "answers"), exist_ok=True)
    question_file, image_folder = question_set(args)
    model_path, loaded = load_once(args, device, question_file, image_folder)
    rows = measure(args, device, model_path, loaded, question_file, image_folder)
    checks = speedups(rows)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    name = f"{args.preset} (random weights)" if args.preset else os.path.basename(os.path.normpath(model_path))
    header = (f"{name}, {str(loaded[1].dtype).removeprefix('torch.')}, {machine}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {rows[0]['questions']} questions "
              f"({os.path.basename(args.question_file) if args.question_file else 'sample MME'}), "
              f"{' '.join([args.method or llava_arch.compression_method, *args.method_arg])}, "
              f"{args.max_new_tokens} new tokens at most; median wall time of {args.rounds} round(s)")
    table = markdown(rows, checks, header)
    print(table, end="")
    write_text(os.path.join(args.out, "runner.md"), table)
    write_text(os.path.join(args.out, "runner.json"),
               json.dumps({"setup": header, "rows": rows, "checks": checks}, indent=2))
    plot(rows, header.split(";")[0], os.path.join(args.out, "runner.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
