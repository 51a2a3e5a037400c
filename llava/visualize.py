"""What a compression method keeps of an image, drawn over the image itself, from a real run or
from a selection file.

`inspect_compression` runs one image through the real preprocessing, vision tower and the model's
method (`model.compression_settings()`) as a run does, and returns a `CompressionView`;
`selection_view` makes one from a line of a selection file, without a model. The drawing
functions turn it into pictures:

- `thumbnail_mask(view)`: the original image, patches the thumbnail dropped dimmed (the thumbnail
  is the whole image squashed to a square, so each of its patches covers a rectangle of the image);
- `crops_mask(view)`: the padded AnyRes canvas the crops are cut from, dropped crop patches dimmed,
  letterbox padding striped grey (neither kept nor dropped: it never reaches the model);
- GlobalCom2 only: `score_heatmaps(view)`: the thumbnail's scores (the tower signal the run's
  `score` chose: [CLS] logits, or on OneVision's SigLIP `neg_cos_mean`/`neg_attn`), each crop's own scores on
  the canvas, and the thumbnail's scores resized onto the image area as each crop received them
  (a live run: a selection file holds no scores); `ratio_chart(view)`: per-crop ratios and counts
  (from the `crop_ratios` the method records); `summary_figure(view)`: one page with all.

The masks and heatmaps are plain RGB images (numpy/PIL; tests check their pixels); the figures
are matplotlib, with titles. From a notebook:

    view = inspect_compression(model, image_processor, load_image("images/shapes-800x500.png"), 0.25)
    summary_figure(view)            # or thumbnail_mask(view), crops_mask(view), ...

Selection files (`--save-selection FILE` of `run_llava` and the benchmark runners) hold one JSON
line per image, appended as each answer is written (`selection_lines`):

    {"image": "a.png" (run_llava) or "question_id": 7 (runners), "image_index": 0,
     "compression": {"method", "method_args", "retention_ratio", "visual_tokens", "layout"},
     "canvas_size": [w, h], "patch_pixels": 14,
     "selection": common.selection_record(...), "accounting": {"tokens_before", ...}}

`canvas_size` is the AnyRes resolution the crops are cut from and `patch_pixels` a patch's side
in it: with the image, all `selection_view` needs to draw the masks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter

import numpy as np
import torch
from PIL import Image

from llava.eval.jsonl import read_jsonl
from llava.files import atomic_write, make_parent_dir
from llava.generation import (add_compression_arguments, add_input_arguments, compression_arguments, compression_label,
                              configure_model)
from llava.mm_utils import is_anyres, process_images, resize_and_pad_image, select_best_resolution
from llava.model.compression import common, globalcom2

DIM = 0.25                  # brightness left to a dropped patch
PADDING_STRIPES = (70, 130)  # grey levels of the padding's stripes


@dataclasses.dataclass
class CompressionView:
    image: Image.Image             # the original image, RGB
    canvas: Image.Image            # the image resized and padded to the AnyRes resolution (the crops' source)
    patch_pixels: int              # pixels per patch side in the canvas (14 for CLIP-336 and SigLIP-384)
    selection: common.Selection
    compression: dict              # the settings record: method, method_args, retention_ratio, visual_tokens, layout
    accounting: dict               # the run's accounting of this image (Selection.accounting, against vanilla)
    scores: torch.Tensor | None = None  # [1 + C, P] float32, CPU: GlobalCom2's scores (its `score`), live runs only

    @property
    def side(self) -> int:
        return self.selection.geometry.side

    @property
    def grid(self) -> tuple[int, int]:
        return self.selection.geometry.grid

    @property
    def layout(self) -> str:
        return self.compression["layout"]

    @property
    def retention_ratio(self) -> float:
        """This image's budget R of the tokens vanilla sends (from `--visual-tokens N`: N over them)."""
        return common.Budget.resolve(self.selection.geometry, self.compression["retention_ratio"],
                                     self.compression["visual_tokens"]).vanilla_ratio

    @property
    def score_name(self) -> str:
        """What the heatmaps show: GlobalCom2's `score` (`cls`: the [CLS] logits)."""
        score = self.compression["method_args"].get("score", "cls")
        return "[CLS]" if score == "cls" else score

    def title(self) -> str:
        record = self.accounting
        return (f"{compression_label(self.compression)}: {record['tokens_after']} of {record['tokens_before']} "
                f"visual tokens; thumbnail keeps {record['thumbnail_kept']} of {self.side ** 2}")


@torch.inference_mode()
def inspect_compression(model, image_processor, image: Image.Image, retention_ratio: float | None = None,
                        layout: str | None = None, instruction: str | None = None) -> CompressionView:
    """One AnyRes image through the model's preprocessing, tower and compression method, as a run
    sends it: the selection `encode_image_sequences` made (`model.last_selections[0]`).

    `retention_ratio`/`layout` replace the model's settings (`model.compression_settings()`) for
    this image. `instruction`: the question, for methods conditioned on it (CDPruner). For
    GlobalCom2 the tower also gives the scores its `score` chose (`GlobalCom2Args.signal`), for the heatmaps.
    """
    settings = model.compression_settings()
    if retention_ratio is not None:
        settings = dataclasses.replace(settings, retention_ratio=common.check_retention_ratio(retention_ratio),
                                       visual_tokens=None)
    if layout is not None:
        settings = dataclasses.replace(settings, token_layout=common.check_layout(layout))
    model.check_tower_signals(settings)  # a ratio given here may need a signal the model's settings did not
    if not is_anyres(getattr(model.config, "image_aspect_ratio", None)):
        raise ValueError("visualisation needs an AnyRes model (image_aspect_ratio 'anyres' or 'anyres_max_N')")
    image = image.convert("RGB")
    views = process_images([image], image_processor, model.input_config(settings))[0].to(model.device, model.dtype)
    model.encode_image_sequences([views], [image.size], settings, None if instruction is None else [instruction])
    scores = None
    if settings.method == "globalcom2":
        signal = settings.method_args.signal
        scores = model.encode_images(views, {signal}).signals[signal].float().cpu()
    canvas = resize_and_pad_image(image, select_best_resolution(image.size, model.input_config(settings).image_grid_pinpoints))
    return CompressionView(image, canvas, model.get_vision_tower().config.patch_size, model.last_selections[0],
                           settings.record(), model.last_accounting[0], scores)


# ----------------------------------------------------------------------------------------------
# Selection files
# ----------------------------------------------------------------------------------------------

def selection_lines(model, accounting: list[dict]) -> list[dict]:
    """The selection-file lines (see the module's docstring) of the images of the model's last
    call, whose `accounting` (`Answer.accounting`: empty when the call had no images) pairs them
    with `model.last_selections`. The caller adds `image` or `question_id`."""
    settings_keys = model.compression_settings().record().keys()
    patch_pixels = model.get_vision_tower().config.patch_size
    lines = []
    for index, (record, selection) in enumerate(zip(accounting, model.last_selections)):
        compression = {key: record[key] for key in settings_keys}
        anyres = selection is not None and selection.geometry.crop_boxes
        canvas_size = (list(select_best_resolution(selection.geometry.image_size,
                                                   model.input_config().image_grid_pinpoints))
                       if anyres else None)
        lines.append(dict(
            image_index=index, compression=compression, canvas_size=canvas_size, patch_pixels=patch_pixels,
            selection=common.selection_record(selection, compression["layout"]) if selection is not None else None,
            accounting={key: value for key, value in record.items() if key not in compression}))
    return lines


def open_selection_file(path: str):
    """`path` opened for appending lines (its folder made), after cutting a half-written last line
    that a killed run left, which the next line would otherwise join."""
    make_parent_dir(path)
    with open(path, "a+b") as file:
        end = file.seek(0, os.SEEK_END)
        start = end
        while start > 0:  # back to the last newline, a block at a time
            block = min(start, 1 << 16)
            file.seek(start - block)
            newline = file.read(block).rfind(b"\n")
            if newline >= 0:
                start = start - block + newline + 1
                break
            start -= block
        if start < end:
            file.truncate(start)
    return open(path, "a", encoding="utf-8")


def write_lines(out, lines: list[dict]) -> None:
    """Append JSON lines to an open file and flush, so a killed run loses at most the line in flight."""
    out.writelines(json.dumps(line) + "\n" for line in lines)
    out.flush()


def selection_view(line: dict, image: Image.Image) -> CompressionView:
    """A `CompressionView` from one selection-file line and its image, without a model (no scores:
    masks, and the ratio chart for methods that record `crop_ratios`)."""
    record = line["selection"]
    if record is None or record["grid"] is None:
        raise ValueError(f"selection line of image {line.get('image', line.get('question_id'))!r} holds no AnyRes "
                         "selection to draw (a single view, or merge type 'flat')")
    image = image.convert("RGB")
    if list(image.size) != record["image_size"]:
        recorded = "x".join(map(str, record["image_size"]))
        raise ValueError(f"the selection line is of an image of size {recorded}, but the image given is "
                         f"{image.size[0]}x{image.size[1]}: give the images in the file's order, or the paths "
                         "run_llava recorded")
    canvas = resize_and_pad_image(image, tuple(line["canvas_size"]))
    return CompressionView(image, canvas, line["patch_pixels"], common.selection_from_record(record),
                           line["compression"], line["accounting"])


def match_selection_lines(lines: list[dict], image_files: list[str]) -> list[dict]:
    """The line of each image file: by path when every file is one the lines record (`run_llava`'s;
    a path recorded by several runs takes its last line), else the lines in order, one per image."""
    recorded = {os.path.abspath(line["image"]): line for line in lines if line.get("image")}
    if recorded and all(os.path.abspath(path) in recorded for path in image_files):
        return [recorded[os.path.abspath(path)] for path in image_files]
    if len(lines) != len(image_files):
        raise ValueError(f"the selection file has {len(lines)} line(s) but {len(image_files)} image(s) were given: "
                         "give one image per line, in the file's order, or the image paths run_llava recorded")
    return lines


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------

def thumbnail_keep_grid(view: CompressionView) -> np.ndarray:
    """`[side, side]` bool: the thumbnail patches kept."""
    keep = np.zeros(view.side * view.side, dtype=bool)
    keep[view.selection.thumbnail_indices.cpu().numpy()] = True
    return keep.reshape(view.side, view.side)


def thumbnail_mask(view: CompressionView, dim: float = DIM) -> Image.Image:
    """The original image with the pixels under dropped thumbnail patches dimmed."""
    width, height = view.image.size
    rows = np.arange(height) * view.side // height  # thumbnail patch row of each image row
    cols = np.arange(width) * view.side // width
    kept = thumbnail_keep_grid(view)[rows][:, cols]
    pixels = np.asarray(view.image, dtype=np.float32)
    pixels = np.where(kept[..., None], pixels, pixels * dim)
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def canvas_patch_states(view: CompressionView) -> np.ndarray:
    """`[grid_h*side, grid_w*side]` per canvas patch: 1 kept, 0 dropped, -1 padding."""
    geometry = view.selection.geometry
    image_area, _ = common.crop_cells(geometry, "cpu")
    keep = view.selection.crop_keep_mask.cpu()
    states = torch.where(keep, 1, torch.where(image_area, 0, -1))  # [C, P]
    return common.crop_canvas(states, geometry.grid).numpy()


def canvas_patch_of_pixels(pixels: int, crops: int, side: int, patch_pixels: int) -> np.ndarray:
    """`[pixels]`: the canvas patch row (or column) under each pixel row (column) of a canvas of
    `crops` views of `pixels // crops` px each. A view's last `view px - side * patch_pixels`
    pixels (SigLIP-384: 6 of 384) lie past its last whole patch, which the tower's stride skips:
    they are drawn as that last patch."""
    view_pixels = pixels // crops
    position = np.arange(pixels)
    return position // view_pixels * side + np.minimum(position % view_pixels // patch_pixels, side - 1)


def crops_mask(view: CompressionView, dim: float = DIM) -> Image.Image:
    """The padded canvas the crops are cut from: dropped patches dimmed, padding striped grey."""
    pixels = np.asarray(view.canvas, dtype=np.float32)
    height, width = pixels.shape[:2]
    (grid_w, grid_h), side = view.grid, view.side
    states = canvas_patch_states(view)
    states = states[canvas_patch_of_pixels(height, grid_h, side, view.patch_pixels)][
        :, canvas_patch_of_pixels(width, grid_w, side, view.patch_pixels)]
    stripes = np.where((np.add.outer(np.arange(height), np.arange(width)) // 6) % 2 == 0, *PADDING_STRIPES)
    pixels = np.where((states == 0)[..., None], pixels * dim, pixels)
    pixels = np.where((states == -1)[..., None], stripes[..., None].astype(np.float32), pixels)
    return Image.fromarray(np.round(pixels).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# Heatmaps
# ----------------------------------------------------------------------------------------------

def heatmap(values: np.ndarray, cell: int = 8, mask: np.ndarray | None = None) -> Image.Image:
    """A 2-D array as a viridis image (brighter = higher, min-max scaled), `cell` px per value.

    Cells where `mask` is False are drawn black (no value there, e.g. padding).
    """
    from matplotlib import colormaps

    values = np.asarray(values, dtype=np.float64)
    shown = values[mask] if mask is not None else values
    low, high = (shown.min(), shown.max()) if shown.size else (0.0, 1.0)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    colours = colormaps["viridis"](np.clip(scaled, 0, 1))[..., :3]
    if mask is not None:
        colours[~mask] = 0.0
    pixels = np.round(colours * 255).astype(np.uint8)
    return Image.fromarray(pixels.repeat(cell, axis=0).repeat(cell, axis=1))


def global_score_canvas(view: CompressionView) -> np.ndarray:
    """`[grid_h*side, grid_w*side]`: each crop's share of the resized thumbnail scores, placed in
    its image area as the selection used it (NaN where there is none)."""
    geometry = view.selection.geometry
    top, bottom, left, right = geometry.bounds
    pieces = globalcom2.interpolate_and_split_cls_attn_scores(
        view.scores[0], right - left, bottom - top, *geometry.grid, geometry.crop_dimensions)
    side, (grid_w, _) = geometry.side, geometry.grid
    canvas = np.full((geometry.grid[1] * side, grid_w * side), np.nan)
    for crop, ((box_top, box_left, height, width), piece) in enumerate(zip(geometry.crop_boxes, pieces)):
        if height * width:
            row, col = divmod(crop, grid_w)
            canvas[row * side + box_top:row * side + box_top + height,
                   col * side + box_left:col * side + box_left + width] = piece.view(height, width).numpy()
    return canvas


def crop_score_canvas(view: CompressionView) -> np.ndarray:
    """`[grid_h*side, grid_w*side]`: each crop's own scores at their place in the canvas."""
    return common.crop_canvas(view.scores[1:], view.grid).numpy()


def score_heatmaps(view: CompressionView, cell: int = 8) -> list[tuple[str, Image.Image]]:
    """(title, heatmap) for the thumbnail's scores, the crops' own scores and the global scores."""
    states = canvas_patch_states(view)
    global_scores = global_score_canvas(view)
    return [
        (f"thumbnail {view.score_name} scores", heatmap(view.scores[0].view(view.side, view.side).numpy(), cell)),
        (f"each crop's own {view.score_name} scores", heatmap(crop_score_canvas(view), cell // 2 or 1,
                                                             mask=states >= 0)),
        ("thumbnail scores resized onto the crops", heatmap(np.nan_to_num(global_scores), cell // 2 or 1,
                                                            mask=~np.isnan(global_scores))),
    ]


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _crop_labels(view: CompressionView) -> list[str]:
    grid_w = view.grid[0]
    return [f"({index // grid_w},{index % grid_w})" for index in range(view.selection.geometry.num_crops)]


def _crops_caption(view: CompressionView) -> str:
    """Each crop's label, ratio (where the method records one) and kept/valid tokens."""
    record = view.accounting
    ratios = [f" {ratio:.3f}" for ratio in record.get("crop_ratios", [])] or [""] * len(record["crop_kept"])
    return ", ".join(f"{label}{ratio} ({kept}/{valid})" for label, ratio, kept, valid in
                     zip(_crop_labels(view), ratios, record["crop_kept"], record["crop_valid"]))


def ratio_chart(view: CompressionView, axes=None):
    """Bar chart of the ratio each crop got, with kept/valid tokens over each bar; returns the figure."""
    import matplotlib.pyplot as plt

    figure = None
    if axes is None:
        figure, axes = plt.subplots(figsize=(5, 3.2))
    ratios = view.accounting["crop_ratios"]
    bars = axes.bar(_crop_labels(view), ratios, color="#3b7dd8")
    axes.axhline(view.retention_ratio, color="grey", linestyle="--", label=f"R = {view.retention_ratio:g}")
    for bar, kept, valid in zip(bars, view.accounting["crop_kept"], view.accounting["crop_valid"]):
        axes.annotate(f"{kept}/{valid}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    top = min(1.15, max(ratios) * 1.3 + 0.05)
    axes.set(xlabel="crop (row, column)", ylabel="retention ratio", ylim=(0, top),
             title="per-crop ratio (kept/valid tokens)")
    axes.legend(loc="upper right", fontsize=8)
    return figure or axes.figure


def _image_figure(image: Image.Image, title: str):
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 6 * image.height / image.width + 0.6))
    axes.imshow(image)
    axes.set_title(title, fontsize=9)
    axes.axis("off")
    figure.tight_layout()
    return figure


def summary_figure(view: CompressionView):
    """One page: thumbnail mask, crops mask, the three heatmaps and the ratio chart."""
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(15, 8.5))
    layout = figure.add_gridspec(2, 6)
    panels = [(figure.add_subplot(layout[0, 0:3]), thumbnail_mask(view), "thumbnail: kept patches (dropped dimmed)"),
              (figure.add_subplot(layout[0, 3:6]), crops_mask(view), "crops: kept patches (dropped dimmed, padding striped)")]
    for column, (title, image) in enumerate(score_heatmaps(view)):
        panels.append((figure.add_subplot(layout[1, column]), image, title))
    for axes, image, title in panels:
        axes.imshow(image)
        axes.set_title(title, fontsize=9)
        axes.axis("off")
    ratio_chart(view, figure.add_subplot(layout[1, 3:6]))
    figure.suptitle(view.title())
    figure.tight_layout()
    return figure


def missing_figures(view: CompressionView, kinds) -> dict[str, str]:
    """Of the figure `kinds`, those this view has no data for, each with what it needs: the
    heatmaps GlobalCom2's scores (a live GlobalCom2 run), the ratio chart the per-crop ratios
    a method records (GlobalCom2's `crop_ratios`), the summary both."""
    lacking = {"heatmaps": [], "ratios": [], "summary": []}
    if view.scores is None:
        for kind in ("heatmaps", "summary"):
            lacking[kind].append("GlobalCom2's scores (a live globalcom2 run; selection files hold none)")
    if "crop_ratios" not in view.accounting:
        for kind in ("ratios", "summary"):
            lacking[kind].append("per-crop ratios (crop_ratios, recorded by globalcom2)")
    return {kind: " and ".join(lacking[kind]) for kind in kinds if lacking.get(kind)}


def save_visualizations(view: CompressionView, out_dir: str, stem: str, kinds=("masks", "heatmaps", "ratios", "summary")) -> list[str]:
    """Write the chosen figures as `<out_dir>/<stem>_<name>.png`; returns the paths. A figure the
    view has no data for (`missing_figures`) is left out with a note on stderr."""
    import matplotlib.pyplot as plt

    missing = missing_figures(view, kinds)
    for kind, need in missing.items():
        print(f"note: {stem}: no {kind} figure for method {view.compression['method']}: it needs {need}",
              file=sys.stderr)
    kinds = [kind for kind in kinds if kind not in missing]
    os.makedirs(out_dir, exist_ok=True)
    figures = {}
    if "masks" in kinds:
        figures["thumbnail_mask"] = _image_figure(thumbnail_mask(view), view.title())
        figures["crops_mask"] = _image_figure(crops_mask(view), f"{view.title()}\ncrops: {_crops_caption(view)}")
    if "heatmaps" in kinds:
        maps = score_heatmaps(view)
        figure, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 5))
        for ax, (title, image) in zip(axes, maps):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        figure.tight_layout()
        figures["heatmaps"] = figure
    if "ratios" in kinds:
        figures["ratios"] = ratio_chart(view)
    if "summary" in kinds:
        figures["summary"] = summary_figure(view)
    paths = []
    for name, figure in figures.items():
        paths.append(os.path.join(out_dir, f"{stem}_{name}.png"))
        with atomic_write(paths[-1], "wb") as out:
            figure.savefig(out, format="png", dpi=100)
        plt.close(figure)
    return paths


def figure_stems(paths: list[str]) -> list[str]:
    """One distinct file-name stem per image path, for its figures: the file's stem when no other
    path has it; else its parent directory's name and the stem ("a/cat.png", "b/cat.png" ->
    "a_cat", "b_cat"); when even that repeats (a path given twice, "x/a/cat.png" and "y/a/cat.png"),
    every stem gets its 1-based position in front ("1_cat", "2_cat"), unique whatever the names."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    repeated = {stem for stem, count in Counter(stems).items() if count > 1}
    # abspath: a bare "cat.png" is in the current directory, which has a name
    names = [f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}_{stem}" if stem in repeated else stem
             for path, stem in zip(paths, stems)]
    if len(set(names)) == len(names):
        return names
    return [f"{number}_{stem}" for number, stem in enumerate(stems, 1)]


def build_parser(description: str):
    """The arguments of `tools/mask_visualization.py` and `tools/attn_visualization.py`."""
    import argparse

    from llava.tiny import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", default=None, help=f"checkpoint (default: the tiny one, {DEFAULT_OUT}, built if missing)")
    parser.add_argument("--image-file", nargs="+", required=True,
                        help="the images; with --selection-file, the paths its lines record, or one per line in order")
    parser.add_argument("--selection-file", default=None, metavar="FILE",
                        help="draw the masks from this file (written by --save-selection of run_llava or a runner) "
                             "instead of running a model; the model and compression arguments are then unused")
    parser.add_argument("--instruction", default=None, metavar="TEXT",
                        help="the question asked of the image, for methods conditioned on it (cdpruner)")
    parser.add_argument("--out-dir", default="visualizations")
    parser.add_argument("--device", default=None)
    add_compression_arguments(parser)
    add_input_arguments(parser)
    return parser


def main(argv: list[str] | None, kinds: tuple[str, ...], description: str) -> int:
    """The command line shared by `tools/mask_visualization.py` and `tools/attn_visualization.py`."""
    from llava.mm_utils import load_image, set_max_image_pixels
    from llava.model.builder import load_pretrained_model
    from llava.tiny import DEFAULT_OUT, ensure_tiny_checkpoint
    from llava.utils import quiet_transformers, user_errors

    args = build_parser(description).parse_args(argv)
    quiet_transformers()
    with user_errors():
        set_max_image_pixels(args.max_image_pixels)
        images = [load_image(path) for path in args.image_file]  # a bad image stops before the model loads
        if args.selection_file:
            lines = match_selection_lines(read_jsonl(args.selection_file, report=sys.stderr), args.image_file)
            views = [selection_view(line, image) for line, image in zip(lines, images)]
        else:
            compression_arguments(args)  # a bad method argument stops here too
            model_path = args.model_path or ensure_tiny_checkpoint(DEFAULT_OUT)
            _, model, image_processor, _ = load_pretrained_model(model_path, device=args.device)
            configure_model(model, args)
            views = (inspect_compression(model, image_processor, image, instruction=args.instruction)
                     for image in images)
        for view, stem in zip(views, figure_stems(args.image_file)):
            for written in save_visualizations(view, args.out_dir, stem, kinds):
                print(written)
    return 0
