"""The results table: every scored run, per model, method and budget, with the paper's "Average".

The benchmark scripts keep each scorer's output and the run's settings as
`<results-dir>/<benchmark>/<name>.{txt,json}` (`record`). `table` collects them:

    python -m llava.eval.summarize [table] [--table runs|paper] [--results-dir ./playground/data/eval/results]
                                   [--markdown results.md] [--csv results.csv]

`--table runs` (the default) has one row per (model, layout, budget, method with its arguments);
each benchmark's headline number (the one the papers report: GQA accuracy, SQA-IMG accuracy,
TextVQA accuracy, POPE mean F1, MME perception, SEED-IMG...), then the relative score against the
same model's R = 1 run, averaged over the benchmarks both runs have, as the paper's "Average"
column (mean of score / vanilla x 100), with the number of benchmarks it covers in brackets; a row
with scores that have no R = 1 counterpart is named in a warning.

`--table paper` is laid out like the paper's Table 1, one block per model: the vanilla row
("Upper bound": R = 1, whatever the method) first, then one group per budget, largest first
(ratios, then token counts), with one row per method and its arguments. Its Average is against
the vanilla row, and each row that lacks some of the vanilla row's benchmarks is named in a warning.
Where records hold token counts (`record --answers`, which the benchmark scripts pass), an
"Eq. tokens" column follows the method: the visual tokens per question averaged over the
language model's layers ("equivalent tokens", spec `baselines/in-llm-pruning.md` 6, the
convention of the SparseVLM and PDrop papers; image newlines included), which for a method
that prunes before the LLM is simply the tokens it sends, and for one that prunes inside it
(FastV, compositions such as `globalcom2+fastv`) more than the tokens left after its last
prune. The cell is the mean over the row's benchmarks (each record also keeps the post-pruning
count).

Without `--results-dir`, the table reads `$EVAL_DIR/results` when EVAL_DIR is set, else
`./playground/data/eval/results`, or the sample suite's `./playground/sample/eval/results`
(`SAMPLE=1` runs) when the former holds nothing. Server-scored
benchmarks (VQAv2, VizWiz, MMBench, MM-Vet) are recorded by hand:

    python -m llava.eval.summarize record --benchmark vqav2 --model llava-next-7b --method globalcom2 \
        --method-args alpha=0 --retention-ratio 0.25 --token-layout official --score 80.1 \
        --out <results-dir>/vqav2/<name>.json

(`--visual-tokens N` instead of `--retention-ratio` for a run with a token budget; `--answers
FILE` also records the run's mean equivalent and post-pruning tokens from the answers' accounting.)
Records made before methods were recorded read as GlobalCom2 with default arguments.
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
# Every run recorded before records named their method was GlobalCom2 with its default arguments.
DEFAULT_METHOD = "globalcom2"
DEFAULT_LAYOUT = "official"
# A budget is ("R", retention ratio) or ("N", image tokens kept per image); R = 1 is vanilla.
VANILLA = ("R", 1.0)
TABLES = ("runs", "paper")


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


def canonical_value(text: str) -> str:
    """One spelling per number ("0", "0.0" and "0e0" are "0"; "0.50" is "0.5"), since the runner
    reads them alike; any other text as it is."""
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def normalise_method_args(words: list[str]) -> dict[str, str]:
    """`{key: value}` from `key=value` words (a word may hold several, space-separated, as
    $METHOD_ARGS does), sorted by key, a repeated key's last value winning as in the runner, and
    numbers spelt one way: however a run's arguments are written, its record is the same."""
    pairs = {}
    for pair in " ".join(words).split():
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--method-args takes key=value pairs, got {pair!r}")
        pairs[key] = canonical_value(value)
    return dict(sorted(pairs.items()))


def with_defaults(entry: dict) -> dict:
    """The record with its method, arguments and layout, filled in for older records, and its
    arguments in their normal form (records edited by hand may hold numbers)."""
    filled = {"method": DEFAULT_METHOD, "method_args": {}, "token_layout": DEFAULT_LAYOUT, **entry}
    filled["method_args"] = {key: canonical_value(str(value)) for key, value in sorted(filled["method_args"].items())}
    return filled


def budget_of(entry: dict) -> tuple[str, float]:
    if entry.get("visual_tokens") is not None:
        return "N", entry["visual_tokens"]
    return "R", float(entry["retention_ratio"])


def budget_order(budget: tuple[str, float]) -> tuple[bool, float]:
    """Largest first; ratios before token counts, which are not comparable without the model's
    vanilla token count."""
    kind, value = budget
    return kind != "R", -value


def ratio_cell(budget: tuple[str, float]) -> str:
    """The runs table's R column: "0.25", or "N300" for a token budget."""
    kind, value = budget
    return f"{value:g}" if kind == "R" else f"N{value:g}"


def budget_title(budget: tuple[str, float]) -> str:
    """The paper table's budget column: "Upper bound", "25%", "300 tokens"."""
    kind, value = budget
    if budget == VANILLA:
        return "Upper bound"
    return f"{100 * value:g}%" if kind == "R" else f"{value:g} tokens"


def method_title(entry: dict) -> str:
    """The method and its arguments, compactly: "globalcom2 allocation=uniform alpha=0"."""
    return " ".join([entry["method"], *(f"{key}={value}" for key, value in entry["method_args"].items())])


def answers_tokens(answers_file: str) -> dict:
    """`{"equivalent_tokens", "post_pruning_tokens"}`: per question, its images' layer-averaged and
    post-pruning visual tokens from the runner's accounting (`metadata.images`; an image that was
    not pruned inside the language model counts `tokens_after` for both), averaged over the
    questions answered without error; {} when none records images."""
    from llava.eval.jsonl import read_jsonl

    per_question = []
    for answer in read_jsonl(answers_file):
        images = answer.get("metadata", {}).get("images")
        if images and "error" not in answer["metadata"]:
            per_question.append([sum(image.get(name, image["tokens_after"]) for image in images)
                                 for name in ("equivalent_image_tokens", "post_pruning_image_tokens")])
    if not per_question:
        return {}
    equivalent, post = zip(*per_question)
    return dict(equivalent_tokens=sum(equivalent) / len(equivalent), post_pruning_tokens=sum(post) / len(post))


def record(args) -> int:
    if args.score is None and args.log is None:
        raise ValueError("give --log (a scorer's output) or --score")
    method_args = normalise_method_args(args.method_args)
    values = {"score": args.score} if args.score is not None else parse_headline(args.benchmark, open(args.log).read())
    budget = ({"visual_tokens": args.visual_tokens} if args.visual_tokens is not None
              else {"retention_ratio": float(args.retention_ratio)})
    entry = dict(benchmark=args.benchmark, model=args.model, method=args.method, method_args=method_args,
                 **budget, token_layout=args.token_layout, **values,
                 **(answers_tokens(args.answers) if args.answers else {}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text(args.out, json.dumps(entry, indent=2))
    print(f"recorded {args.benchmark} {entry['score']:g} for {args.model} ({method_title(entry)}, "
          f"{ratio_cell(budget_of(entry))}) -> {args.out}")
    return 0


def collect(results_dir: str) -> list[dict]:
    entries = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as file:
            entry = json.load(file)
        if {"benchmark", "model", "score"} <= set(entry) and ({"retention_ratio", "visual_tokens"} & set(entry)):
            entries.append(with_defaults(entry))
        else:
            print(f"warning: {path} is not a results record; skipped", file=sys.stderr)
    return entries


def benchmark_columns(entries: list[dict]) -> list[str]:
    """The benchmarks present, in the paper's order, then any others by name."""
    benchmarks = [name for name in BENCHMARK_ORDER if any(entry["benchmark"] == name for entry in entries)]
    return benchmarks + sorted({entry["benchmark"] for entry in entries} - set(benchmarks))


def relative_average(scores: dict, vanilla: dict) -> tuple[str, list[str]]:
    """The paper's Average, mean of score / vanilla x 100 over the benchmarks both have, as
    "95.0% (3)" ("" when none), and those benchmarks."""
    shared = [name for name in scores if vanilla.get(name)]
    if not shared:
        return "", shared
    return f"{sum(100 * scores[name] / vanilla[name] for name in shared) / len(shared):.1f}% ({len(shared)})", shared


def score_cells(scores: dict, benchmarks: list[str]) -> list[str]:
    return [f"{scores[name]:g}" if name in scores else "" for name in benchmarks]


def run_order(model: str, layout: str, budget: tuple[str, float], method: str) -> tuple:
    """Each model's R = 1 row first, then its budgets largest first."""
    return model, layout != "-", budget_order(budget), layout, method


def build_table(entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: model, layout, R, method, one column per benchmark, Average (% of R = 1)."""
    benchmarks = benchmark_columns(entries)
    runs: dict[tuple, dict] = {}
    for entry in entries:
        # R = 1 is vanilla LLaVA-NeXT whatever the layout or method: one baseline per model.
        if budget_of(entry) == VANILLA:
            key = (entry["model"], "-", VANILLA, "-")
        else:
            key = (entry["model"], entry["token_layout"], budget_of(entry), method_title(entry))
        runs.setdefault(key, {})[entry["benchmark"]] = entry["score"]
    header = ["model", "layout", "R", "method", *(COLUMN_TITLES.get(name, name) for name in benchmarks), "Average (n)"]
    rows = []
    for (model, layout, budget, method), scores in sorted(runs.items(), key=lambda item: run_order(*item[0])):
        vanilla = runs.get((model, "-", VANILLA, "-"), {})
        average, shared = relative_average(scores, vanilla)
        unmatched = sorted(set(scores) - set(shared))
        if unmatched and layout != "-":
            kind, value = budget
            print(f"warning: {model} {layout} {kind} {value:g} {method}: no R = 1 score of {model} for "
                  f"{', '.join(unmatched)}; its Average covers {len(shared)} of its {len(scores)} benchmarks",
                  file=sys.stderr)
        rows.append([model, layout, ratio_cell(budget), method, *score_cells(scores, benchmarks), average])
    return header, rows


def paper_runs(entries: list[dict]) -> dict[tuple, dict]:
    """`{(budget, method title): {benchmark: score}}` of one model; every R = 1 run is the one
    vanilla row, whatever its method or layout."""
    return {key: {benchmark: entry["score"] for benchmark, entry in row.items()}
            for key, row in paper_row_entries(entries).items()}


def paper_row_entries(entries: list[dict]) -> dict[tuple, dict]:
    """`{(budget, method title): {benchmark: record}}` of one model (`paper_runs`' rows)."""
    runs: dict[tuple, dict] = {}
    for entry in entries:
        if budget_of(entry) == VANILLA:
            key = (VANILLA, "vanilla")
        else:
            layout = entry["token_layout"]
            key = (budget_of(entry), method_title(entry) + ("" if layout == DEFAULT_LAYOUT else f" ({layout})"))
        runs.setdefault(key, {})[entry["benchmark"]] = entry
    return runs


def equivalent_cell(records: list[dict]) -> str:
    """The mean equivalent tokens of a row's records that hold them ("" if none)."""
    values = [entry["equivalent_tokens"] for entry in records if entry.get("equivalent_tokens") is not None]
    return f"{sum(values) / len(values):.0f}" if values else ""


def build_paper_table(entries: list[dict]) -> tuple[list[str], list[tuple[str, list[list[str]]]]]:
    """Header (budget, method, one column per benchmark, Average) and one block of rows per
    model: its vanilla row, then its budgets largest first, methods by name within each."""
    benchmarks = benchmark_columns(entries)
    with_tokens = any(entry.get("equivalent_tokens") is not None for entry in entries)
    header = ["budget", "method", *(["Eq. tokens"] if with_tokens else []),
              *(COLUMN_TITLES.get(name, name) for name in benchmarks), "Average (n)"]
    blocks = []
    for model in sorted({entry["model"] for entry in entries}):
        model_entries = [entry for entry in entries if entry["model"] == model]
        runs = paper_runs(model_entries)
        row_entries = paper_row_entries(model_entries)
        vanilla = runs.get((VANILLA, "vanilla"), {})
        if not vanilla:
            print(f"warning: {model} has no R = 1 (vanilla) run: its rows have no Average", file=sys.stderr)
        rows = []
        for (budget, method), scores in sorted(runs.items(), key=lambda item: (budget_order(item[0][0]), item[0][1])):
            average, shared = relative_average(scores, vanilla)
            lacking = [name for name in benchmarks if name in vanilla and name not in scores]
            if lacking:
                print(f"warning: {model} {budget_title(budget)} {method}: no {', '.join(lacking)} score, which the "
                      f"vanilla row has; its Average covers {len(shared)} of the vanilla row's {len(vanilla)} "
                      f"benchmarks", file=sys.stderr)
            tokens = [equivalent_cell(list(row_entries[(budget, method)].values()))] if with_tokens else []
            rows.append([budget_title(budget), method, *tokens, *score_cells(scores, benchmarks), average])
        blocks.append((model, rows))
    return header, blocks


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def render(kind: str, entries: list[dict]) -> tuple[str, list[list[str]]]:
    """The table as Markdown text and as CSV rows (the paper table's blocks as a model column)."""
    if kind == "paper":
        header, blocks = build_paper_table(entries)
        text = "\n".join(f"**{model}**\n\n{markdown(header, rows)}" for model, rows in blocks)
        return text, [["model", *header], *([model, *row] for model, rows in blocks for row in rows)]
    header, rows = build_table(entries)
    return markdown(header, rows), [header, *rows]


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
    text, csv_rows = render(args.table, entries)
    print(text, end="")
    if args.markdown:
        write_text(args.markdown, text)
    if args.csv:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(csv_rows)
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


def _token_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, at least 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Results table of the benchmark runs.")
    commands = parser.add_subparsers(dest="command")
    table_parser = commands.add_parser("table", help="print (and write) the table (default)")
    for target in (parser, table_parser):
        target.add_argument("--results-dir", default=None,
                            help=f"default: $EVAL_DIR/results, else {DATA_RESULTS}, or {SAMPLE_RESULTS} "
                                 "when only the sample suite has results")
        target.add_argument("--table", choices=TABLES, default="runs",
                            help="runs: one row per run (default); paper: the paper's Table 1 layout, "
                                 "methods grouped by budget under the vanilla row")
        target.add_argument("--markdown", default=None, help="also write the table here")
        target.add_argument("--csv", default=None, help="also write it as CSV here")
    record_parser = commands.add_parser("record", help="store one run's score")
    record_parser.add_argument("--benchmark", required=True)
    record_parser.add_argument("--model", required=True)
    record_parser.add_argument("--method", default=DEFAULT_METHOD,
                               help=f"compression method (default {DEFAULT_METHOD})")
    record_parser.add_argument("--method-args", nargs="*", default=[], metavar="KEY=VALUE",
                               help="its arguments, as words or one space-separated string ($METHOD_ARGS)")
    budget = record_parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--retention-ratio", type=_ratio, help="in (0, 1]; 1 = vanilla")
    budget.add_argument("--visual-tokens", type=_token_count, help="image tokens kept per image, instead of a ratio")
    record_parser.add_argument("--token-layout", default=DEFAULT_LAYOUT)
    record_parser.add_argument("--log", default=None, help="the scorer's output to take the score from")
    record_parser.add_argument("--score", type=float, default=None, help="the score itself (server-scored benchmarks)")
    record_parser.add_argument("--answers", default=None,
                               help="the run's answers file: also record its mean equivalent and post-pruning tokens")
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
