"""The results table: every scored run, per model and ratio, with the paper's "Average".

The benchmark scripts keep each scorer's output and the run's settings as
`<results-dir>/<benchmark>/<name>.{txt,json}` (`record`). `table` collects them:

    python -m llava.eval.summarize [table] [--results-dir ./playground/data/eval/results]
                                   [--markdown results.md] [--csv results.csv]

Rows are (model, layout, ratio); each benchmark's headline number (the one the papers report:
GQA accuracy, SQA-IMG accuracy, TextVQA accuracy, POPE mean F1, MME perception, SEED-IMG...),
then the relative score against the same model's R = 1 run, averaged over the benchmarks both
runs have, as the paper's "Average" column (mean of score / vanilla x 100), with the number of
benchmarks it covers in brackets; a row with scores that have no R = 1 counterpart is named in a
warning.

Without `--results-dir`, the table reads `$EVAL_DIR/results` when EVAL_DIR is set, else
`./playground/data/eval/results`, or the sample suite's `./playground/sample/eval/results`
(`SAMPLE=1` runs) when the former holds nothing. Server-scored
benchmarks (VQAv2, VizWiz, MMBench, MM-Vet) are recorded by hand:

    python -m llava.eval.summarize record --benchmark vqav2 --model llava-next-7b \
        --retention-ratio 0.25 --token-layout official --score 80.1 --out <results-dir>/vqav2/<name>.json
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys

from llava.files import write_text

# Headline number of each locally scored benchmark, found in its scorer's output.
HEADLINE_PATTERNS = {
    "gqa": r"^Accuracy: ([\d.]+)%",
    "sqa": r"IMG-Accuracy: ([\d.]+)%",
    "textvqa": r"^Accuracy: ([\d.]+)%",
    "pope": r"^Average F1 over \d+ categories: ([\d.]+)",
    "mme": r"=+ Perception =+\s*\ntotal score: ([\d.]+)",
    "seed": r"^image accuracy: ([\d.]+)%",
    "llavabench": r"^all ([\d.]+)",
}
EXTRA_PATTERNS = {"mme": {"cognition": r"=+ Cognition =+\s*\ntotal score: ([\d.]+)"}}
DATA_RESULTS = "./playground/data/eval/results"
SAMPLE_RESULTS = "./playground/sample/eval/results"
BENCHMARK_ORDER = ["gqa", "vqav2", "vizwiz", "sqa", "textvqa", "pope", "mme", "mmbench", "mmbench_cn", "seed",
                   "mmvet", "llavabench"]
COLUMN_TITLES = {"gqa": "GQA", "vqav2": "VQAv2", "vizwiz": "VizWiz", "sqa": "SQA-IMG", "textvqa": "TextVQA",
                 "pope": "POPE", "mme": "MME", "mmbench": "MMB", "mmbench_cn": "MMB-CN", "seed": "SEED-IMG",
                 "mmvet": "MM-Vet", "llavabench": "LLaVA-W"}


def parse_headline(benchmark: str, log: str) -> dict:
    """`{"score": x, ...extras}` from a scorer's output; raises ValueError if it is not there."""
    pattern = HEADLINE_PATTERNS.get(benchmark)
    if pattern is None:
        raise ValueError(f"{benchmark} is scored outside this project: pass --score")
    found = re.search(pattern, log, re.MULTILINE)
    if not found:
        raise ValueError(f"no {benchmark} score in the scorer's output (looked for {pattern!r})")
    values = {"score": float(found.group(1))}
    for name, extra in EXTRA_PATTERNS.get(benchmark, {}).items():
        match = re.search(extra, log, re.MULTILINE)
        if match:
            values[name] = float(match.group(1))
    return values


def record(args) -> int:
    if args.score is None and args.log is None:
        raise ValueError("give --log (a scorer's output) or --score")
    values = {"score": args.score} if args.score is not None else parse_headline(args.benchmark, open(args.log).read())
    entry = dict(benchmark=args.benchmark, model=args.model, retention_ratio=float(args.retention_ratio),
                 token_layout=args.token_layout, **values)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text(args.out, json.dumps(entry, indent=2))
    print(f"recorded {args.benchmark} {entry['score']:g} for {args.model} at R {args.retention_ratio} -> {args.out}")
    return 0


def collect(results_dir: str) -> list[dict]:
    entries = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as file:
            entry = json.load(file)
        if {"benchmark", "model", "retention_ratio", "score"} <= set(entry):
            entries.append(entry)
        else:
            print(f"warning: {path} is not a results record; skipped", file=sys.stderr)
    return entries


def build_table(entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, layout, R, one column per benchmark, Average (% of R = 1)."""
    benchmarks = [name for name in BENCHMARK_ORDER if any(entry["benchmark"] == name for entry in entries)]
    benchmarks += sorted({entry["benchmark"] for entry in entries} - set(benchmarks))
    runs: dict[tuple, dict] = {}
    for entry in entries:
        # R = 1 is vanilla LLaVA-NeXT whatever the layout: one baseline per model.
        layout = "-" if entry["retention_ratio"] == 1 else entry.get("token_layout", "official")
        runs.setdefault((entry["model"], layout, entry["retention_ratio"]), {})[entry["benchmark"]] = entry["score"]
    header = ["model", "layout", "R", *(COLUMN_TITLES.get(name, name) for name in benchmarks), "Average (n)"]
    rows = []
    for (model, layout, ratio), scores in sorted(runs.items(), key=lambda item: (item[0][0], item[0][1] != "-", -item[0][2], item[0][1])):
        vanilla = runs.get((model, "-", 1.0), {})
        shared = [name for name in scores if vanilla.get(name)]
        average = (f"{sum(100 * scores[name] / vanilla[name] for name in shared) / len(shared):.1f}% ({len(shared)})"
                   if shared else "")
        unmatched = sorted(set(scores) - set(shared))
        if unmatched and layout != "-":
            print(f"warning: {model} {layout} R {ratio:g}: no R = 1 score of {model} for {', '.join(unmatched)}; "
                  f"its Average covers {len(shared)} of its {len(scores)} benchmarks", file=sys.stderr)
        cells = [f"{scores[name]:g}" if name in scores else "" for name in benchmarks]
        rows.append([model, layout, f"{ratio:g}", *cells, average])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def default_results_dir() -> str:
    """Where the benchmark scripts keep results: `$EVAL_DIR/results`, else the real data's
    directory, or the sample suite's when only it holds results."""
    if os.environ.get("EVAL_DIR"):
        return os.path.join(os.environ["EVAL_DIR"], "results")
    for directory in (DATA_RESULTS, SAMPLE_RESULTS):
        if glob.glob(os.path.join(directory, "*", "*.json")):
            return directory
    return DATA_RESULTS


def table(args) -> int:
    results_dir = args.results_dir
    if results_dir is None:
        results_dir = default_results_dir()
        print(f"results from {results_dir}", file=sys.stderr)
    entries = collect(results_dir)
    if not entries:
        raise ValueError(f"no results under {results_dir}: run a benchmark script first, or pass --results-dir")
    header, rows = build_table(entries)
    text = markdown(header, rows)
    print(text, end="")
    if args.markdown:
        write_text(args.markdown, text)
    if args.csv:
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        write_text(args.csv, buffer.getvalue(), newline="")
    return 0


def _ratio(text: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        ratio = math.nan
    if not 0 < ratio <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1] (1 = vanilla), got {text!r}")
    return ratio


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Results table of the benchmark runs.")
    commands = parser.add_subparsers(dest="command")
    table_parser = commands.add_parser("table", help="print (and write) the table (default)")
    for target in (parser, table_parser):
        target.add_argument("--results-dir", default=None,
                            help=f"default: $EVAL_DIR/results, else {DATA_RESULTS}, or {SAMPLE_RESULTS} "
                                 "when only the sample suite has results")
        target.add_argument("--markdown", default=None, help="also write the table here")
        target.add_argument("--csv", default=None, help="also write it as CSV here")
    record_parser = commands.add_parser("record", help="store one run's score")
    record_parser.add_argument("--benchmark", required=True)
    record_parser.add_argument("--model", required=True)
    record_parser.add_argument("--retention-ratio", required=True, type=_ratio, help="in (0, 1]; 1 = vanilla")
    record_parser.add_argument("--token-layout", default="official")
    record_parser.add_argument("--log", default=None, help="the scorer's output to take the score from")
    record_parser.add_argument("--score", type=float, default=None, help="the score itself (server-scored benchmarks)")
    record_parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return record(args) if args.command == "record" else table(args)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
