"""Positional bias: how a method's kept tokens spread over the views (thumbnail, crop 1..n), averaged
over a benchmark, one group of bars per method (the GlobalCom2 paper's FastV analysis: an LLM-attention
method gives the last crop the most tokens whatever its content).

    python tools/positional_bias.py fastv.selection.jsonl globalcom2.selection.jsonl [--figure out.png]
        [--measure share|retention] [--crops 4] [--layer L] [--by position|content] [--label NAME ...]

Each input is a selection file (`--save-selection` of a runner or `run_llava`) or an answers file
whose answers carry the accounting (`metadata.images`); one input is one method (`--label`, one per
input, names it; default the method and its budget, inputs with the same label are pooled). Per image:

- `share`: the view's kept image tokens over the image's kept image tokens (newlines and tokens that
  are no patch left out), so the views of an image sum to 100%;
- `retention`: the view's kept image tokens over its image tokens (the paper's figure: FasterVLM
  keeps R of every view; FastV at 10% gives {6, 7, 5, 8, 26}%).

Each view's value is averaged over the images that have that view (`--crops N`: only images with N
crops, e.g. 4 for the 2x2 grid); images of one view (no crops) are skipped and counted. Pre-LLM
methods: the accounting's `thumbnail_kept` and `crop_kept` over `crop_valid`. In-LLM methods (fastv,
...): the counts the glue records after each stage (`in_llm.views_kept`, each naming its layer); by
default the last stage (the tokens the deep layers see), or with `--layer L` the last stage at or
before layer L. Crops are in the order the model received them (`--by position`, default); for runs
with `--reverse-crops` (recorded per image as `crops_reversed`), `--by content` maps them back to the
crop they show. Prints the table (markdown) and writes the bar chart (PNG; default
`visualizations/positional_bias.png`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

from llava.eval.jsonl import read_jsonl
from llava.files import atomic_write, make_parent_dir

MEASURES = ("share", "retention")
THUMBNAIL_TOKENS = 576  # CLIP-336's 24x24 patches: the thumbnail's tokens where a record does not give its side


class RecordError(ValueError):
    """An input line that has no per-view counts to read (named in the message)."""


def image_records(rows: list[dict]) -> list[tuple[dict, int | None]]:
    """`(accounting, side)` per image of a selection file's lines or an answers file's rows (`side`:
    the view's patches per side where the line records it, else None)."""
    images = []
    for row in rows:
        if "accounting" in row:  # a selection-file line
            selection = row.get("selection") or {}
            images.append((dict(row["accounting"], **row.get("compression", {})), selection.get("side")))
        else:
            images += [(record, None) for record in (row.get("metadata") or {}).get("images", [])]
    return images


def view_counts(record: dict, side: int | None, layer: int | None = None,
                by: str = "position") -> tuple[list[int], list[int]] | None:
    """`(kept [V], tokens [V])` of one image, thumbnail first; None for an image without crops.
    In-LLM records: the last stage at or before `layer` (None: the last stage; before any stage,
    everything). `by="content"` undoes `--reverse-crops` (crops back in the image's order)."""
    if not record.get("crop_valid"):
        return None
    in_llm = record.get("in_llm")
    if in_llm is not None:
        if "view_tokens" not in in_llm:
            raise RecordError("an in-LLM record without per-view counts (in_llm.view_tokens): written before they "
                              "were recorded; rerun it")
        tokens = list(in_llm["view_tokens"])
        stages = [stage for stage in in_llm["views_kept"] if layer is None or stage["layer"] <= layer]
        kept = list(stages[-1]["kept"]) if stages else list(tokens)
    else:
        thumbnail = side**2 if side else THUMBNAIL_TOKENS
        kept = [record["thumbnail_kept"], *record["crop_kept"]]
        tokens = [thumbnail, *record["crop_valid"]]
    if by == "content" and record.get("crops_reversed"):
        kept, tokens = kept[:1] + kept[:0:-1], tokens[:1] + tokens[:0:-1]
    return kept, tokens


def label_of(record: dict) -> str:
    """`fastv R 0.1` (`N 300` for a token budget; `reversed` added for a `--reverse-crops` run)."""
    budget = (f"N {record['visual_tokens']}" if record.get("visual_tokens") is not None
              else f"R {record.get('retention_ratio', 1):g}")
    return f"{record.get('method', '?')} {budget}" + (" reversed" if record.get("crops_reversed") else "")


def summarize(groups: dict[str, list[tuple[dict, int | None]]], crops: int | None = None, layer: int | None = None,
              by: str = "position") -> list[dict]:
    """Per label: `images` counted, `skipped` (one view, or another crop count than `crops`), and per
    measure the mean over images of each view's value (`[V_max]`, NaN where no image has the view)."""
    summaries = []
    for label, images in groups.items():
        values = {measure: defaultdict(list) for measure in MEASURES}
        counted = skipped = 0
        for record, side in images:
            counts = view_counts(record, side, layer, by)
            if counts is None or (crops is not None and len(counts[0]) - 1 != crops):
                skipped += 1
                continue
            counted += 1
            kept, tokens = counts
            total = sum(kept)
            for view, (view_kept, view_tokens) in enumerate(zip(kept, tokens)):
                if total:
                    values["share"][view].append(view_kept / total)
                if view_tokens:
                    values["retention"][view].append(view_kept / view_tokens)
        views = 1 + max((view for measure in MEASURES for view in values[measure]), default=-1)
        summary = dict(label=label, images=counted, skipped=skipped)
        for measure in MEASURES:
            summary[measure] = [sum(values[measure][view]) / len(values[measure][view]) if values[measure][view]
                                else math.nan for view in range(views)]
        summaries.append(summary)
    return summaries


def view_names(count: int) -> list[str]:
    return ["thumbnail", *(f"crop {index}" for index in range(1, count))]


def markdown(summaries: list[dict], measure: str) -> str:
    """One row per method: its images and each view's mean `measure` in percent."""
    width = max((len(summary[measure]) for summary in summaries), default=0)
    lines = [f"{measure} of kept tokens per view (%)", "",
             "| method | images | " + " | ".join(view_names(width)) + " |", "|" + "---|" * (width + 2)]
    for summary in summaries:
        cells = [f"{100 * value:.1f}" if not math.isnan(value) else "-" for value in summary[measure]]
        cells += ["-"] * (width - len(cells))
        lines.append(f"| {summary['label']} | {summary['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], measure: str, title: str, path: str) -> None:
    """Bars per view, one colour per method, to the PNG `path` (headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max((len(summary[measure]) for summary in summaries), default=0)
    figure, axes = plt.subplots(figsize=(max(5.0, 1.4 * width + 2), 3.8))
    bar = 0.8 / max(len(summaries), 1)
    for index, summary in enumerate(summaries):
        values = [100 * value if not math.isnan(value) else 0.0 for value in summary[measure]]
        positions = [view + (index - (len(summaries) - 1) / 2) * bar for view in range(len(values))]
        axes.bar(positions, values, bar, label=f"{summary['label']} ({summary['images']} images)")
    axes.set_xticks(range(width), view_names(width))
    axes.set(ylabel=f"{measure} of kept tokens (%)", title=title)
    axes.legend(fontsize="small")
    figure.tight_layout()
    make_parent_dir(path)
    with atomic_write(path, "wb") as out:
        figure.savefig(out, format="png", dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="selection files or answers files, one per method")
    parser.add_argument("--label", action="append", default=[], help="the method's name in the table and legend, "
                        "one per input in order (default: the method and budget its records give)")
    parser.add_argument("--measure", choices=MEASURES, default="share",
                        help="what the bars show: each view's share of the image's kept tokens (default), or the "
                             "fraction of the view's own tokens kept (the paper's figure); the table prints both")
    parser.add_argument("--crops", type=int, default=None, metavar="N", help="only images with N crops (4: 2x2 grid)")
    parser.add_argument("--layer", type=int, default=None, metavar="L",
                        help="in-LLM methods: the tokens left after the last stage at or before layer L "
                             "(default: after the last stage)")
    parser.add_argument("--by", choices=("position", "content"), default="position",
                        help="crops in the order the model received them (default), or, for --reverse-crops runs, "
                             "in the image's own order")
    parser.add_argument("--figure", default=os.path.join("visualizations", "positional_bias.png"), metavar="PNG")
    parser.add_argument("--json", action="store_true", help="also print the summaries as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.label and len(args.label) != len(args.inputs):
        print(f"error: {len(args.label)} --label for {len(args.inputs)} inputs (give one per input, or none)",
              file=sys.stderr)
        return 2
    groups = defaultdict(list)
    for index, path in enumerate(args.inputs):
        images = image_records(read_jsonl(path, report=sys.stderr))
        if not images:
            print(f"error: {path}: no image records (a selection file or an answers file with accounting)",
                  file=sys.stderr)
            return 2
        label = args.label[index] if args.label else label_of(images[0][0])
        groups[label] += images
    try:
        summaries = summarize(groups, args.crops, args.layer, args.by)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for measure in (args.measure, *(other for other in MEASURES if other != args.measure)):
        print(markdown(summaries, measure))
    for summary in summaries:
        if summary["skipped"]:
            print(f"{summary['label']}: {summary['skipped']} image(s) skipped (one view, or another number of crops "
                  "than --crops)", file=sys.stderr)
    crops = f", images with {args.crops} crops" if args.crops is not None else ""
    layer = f", in-LLM after layer <= {args.layer}" if args.layer is not None else ""
    plot(summaries, args.measure, f"{args.measure} of kept tokens per view (by {args.by}{crops}{layer})", args.figure)
    print(f"wrote {args.figure}", file=sys.stderr)
    if args.json:
        print(json.dumps([{key: [None if math.isnan(value) else value for value in values] if key in MEASURES
                           else values for key, values in summary.items()} for summary in summaries]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
