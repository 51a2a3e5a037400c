"""What GlobalCom2 keeps of an image, drawn over the image itself, from a real run.

`inspect_compression` runs the real preprocessing, vision tower and selection for one image and
returns a `CompressionView`. The drawing functions turn it into pictures:

- `thumbnail_mask(view)`: the original image, patches the thumbnail dropped dimmed (the thumbnail
  is the whole image squashed to a square, so each of its patches covers a rectangle of the image);
- `crops_mask(view)`: the padded AnyRes canvas the crops are cut from, dropped crop patches dimmed,
  letterbox padding striped grey (neither kept nor dropped: it never reaches the model);
- `score_heatmaps(view)`: the thumbnail's [CLS] scores, each crop's own scores on the canvas, and
  the thumbnail's scores resized onto the image area as each crop received them;
- `ratio_chart(view)`, `summary_figure(view)`: per-crop ratios and counts; one page with all.

The masks and heatmaps are plain RGB images (numpy/PIL; tests check their pixels); the figures
are matplotlib, with titles. From a notebook:

    view = inspect_compression(model, image_processor, load_image("images/shapes-800x500.png"), 0.25)
    summary_figure(view)            # or thumbnail_mask(view), crops_mask(view), ...
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter

import numpy as np
import torch
from PIL import Image

from llava.files import atomic_write
from llava.mm_utils import get_anyres_image_grid_shape, process_images, resize_and_pad_image, select_best_resolution
from llava.model.compression import common, globalcom2

DIM = 0.25                  # brightness left to a dropped patch
PADDING_STRIPES = (70, 130)  # grey levels of the padding's stripes


@dataclasses.dataclass
class CompressionView:
    image: Image.Image             # the original image, RGB
    canvas: Image.Image            # the image resized and padded to the AnyRes resolution (the crops' source)
    patch_pixels: int              # pixels per patch side in the canvas (14 for CLIP-336)
    cls_scores: torch.Tensor       # [1 + C, P] float32, CPU
    selection: common.Selection
    retention_ratio: float
    layout: str

    @property
    def side(self) -> int:
        return self.selection.geometry.side

    @property
    def grid(self) -> tuple[int, int]:
        return self.selection.geometry.grid

    def title(self) -> str:
        record = self.selection.accounting(self.layout)
        return (f"R {self.retention_ratio:g} ({self.layout}): {record['tokens_after']} of {record['tokens_before']} "
                f"visual tokens; thumbnail keeps {record['thumbnail_kept']} of {self.side ** 2}")


@torch.inference_mode()
def inspect_compression(model, image_processor, image: Image.Image, retention_ratio: float | None = None,
                        layout: str | None = None) -> CompressionView:
    """One AnyRes image through the model's preprocessing, tower and GlobalCom2 selection.

    `retention_ratio`/`layout` default to the model's settings (`model.compression_settings()`).
    """
    settings = model.compression_settings()
    ratio = common.check_retention_ratio(settings.retention_ratio if retention_ratio is None else retention_ratio)
    layout = common.check_layout(settings.token_layout if layout is None else layout)
    if getattr(model.config, "image_aspect_ratio", None) != "anyres":
        raise ValueError("visualisation needs an AnyRes model (image_aspect_ratio 'anyres')")
    image = image.convert("RGB")
    views = process_images([image], image_processor, model.config)[0].to(model.device, model.dtype)
    scores = model.encode_images(views, {"cls_logits_last"}).signals["cls_logits_last"].float().cpu()
    tower = model.get_vision_tower()
    grid = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    unpad = "unpad" in getattr(model.config, "mm_patch_merge_type", "")
    geometry = common.crop_geometry(image.size, grid, tower.num_patches_per_side, unpad)
    selection = globalcom2.select_tokens(scores, geometry, common.Budget.resolve(geometry, ratio))
    canvas = resize_and_pad_image(image, select_best_resolution(image.size, model.config.image_grid_pinpoints))
    return CompressionView(image, canvas, tower.config.patch_size, scores, selection, ratio, layout)


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


def crops_mask(view: CompressionView, dim: float = DIM) -> Image.Image:
    """The padded canvas the crops are cut from: dropped patches dimmed, padding striped grey."""
    pixels = np.asarray(view.canvas, dtype=np.float32)
    height, width = pixels.shape[:2]
    states = canvas_patch_states(view)
    states = states[np.arange(height) // view.patch_pixels][:, np.arange(width) // view.patch_pixels]
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
        view.cls_scores[0], right - left, bottom - top, *geometry.grid, geometry.crop_dimensions)
    side, (grid_w, _) = geometry.side, geometry.grid
    canvas = np.full((geometry.grid[1] * side, grid_w * side), np.nan)
    for crop, ((box_top, box_left, height, width), piece) in enumerate(zip(geometry.crop_boxes, pieces)):
        if height * width:
            row, col = divmod(crop, grid_w)
            canvas[row * side + box_top:row * side + box_top + height,
                   col * side + box_left:col * side + box_left + width] = piece.view(height, width).numpy()
    return canvas


def crop_score_canvas(view: CompressionView) -> np.ndarray:
    """`[grid_h*side, grid_w*side]`: each crop's own [CLS] scores at their place in the canvas."""
    return common.crop_canvas(view.cls_scores[1:], view.grid).numpy()


def score_heatmaps(view: CompressionView, cell: int = 8) -> list[tuple[str, Image.Image]]:
    """(title, heatmap) for the thumbnail's scores, the crops' own scores and the global scores."""
    states = canvas_patch_states(view)
    global_scores = global_score_canvas(view)
    return [
        ("thumbnail [CLS] scores", heatmap(view.cls_scores[0].view(view.side, view.side).numpy(), cell)),
        ("each crop's own [CLS] scores", heatmap(crop_score_canvas(view), cell // 2 or 1, mask=states >= 0)),
        ("thumbnail scores resized onto the crops", heatmap(np.nan_to_num(global_scores), cell // 2 or 1,
                                                            mask=~np.isnan(global_scores))),
    ]


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _crop_labels(view: CompressionView) -> list[str]:
    grid_w = view.grid[0]
    return [f"({index // grid_w},{index % grid_w})" for index in range(len(view.selection.extra["crop_ratios"]))]


def ratio_chart(view: CompressionView, axes=None):
    """Bar chart of the ratio each crop got, with kept/valid tokens over each bar; returns the figure."""
    import matplotlib.pyplot as plt

    figure = None
    if axes is None:
        figure, axes = plt.subplots(figsize=(5, 3.2))
    selection = view.selection
    bars = axes.bar(_crop_labels(view), selection.extra["crop_ratios"], color="#3b7dd8")
    axes.axhline(view.retention_ratio, color="grey", linestyle="--", label=f"R = {view.retention_ratio:g}")
    for bar, kept, valid in zip(bars, selection.crop_kept_counts, selection.geometry.valid_counts):
        axes.annotate(f"{kept}/{valid}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    top = min(1.15, max(selection.extra["crop_ratios"]) * 1.3 + 0.05)
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


def save_visualizations(view: CompressionView, out_dir: str, stem: str, kinds=("masks", "heatmaps", "ratios", "summary")) -> list[str]:
    """Write the chosen figures as `<out_dir>/<stem>_<name>.png`; returns the paths."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    record = view.selection.accounting(view.layout)
    crops = ", ".join(f"{label} {ratio:.3f} ({kept}/{valid})" for label, ratio, kept, valid in
                      zip(_crop_labels(view), record["crop_ratios"], record["crop_kept"], record["crop_valid"]))
    figures = {}
    if "masks" in kinds:
        figures["thumbnail_mask"] = _image_figure(thumbnail_mask(view), view.title())
        figures["crops_mask"] = _image_figure(crops_mask(view), f"{view.title()}\ncrops: {crops}")
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

    from llava.generation import add_compression_arguments, add_input_arguments
    from llava.tiny import DEFAULT_OUT

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-path", default=None, help=f"checkpoint (default: the tiny one, {DEFAULT_OUT}, built if missing)")
    parser.add_argument("--image-file", nargs="+", required=True)
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
        model_path = args.model_path or ensure_tiny_checkpoint(DEFAULT_OUT)
        _, model, image_processor, _ = load_pretrained_model(model_path, device=args.device)
        for image, stem in zip(images, figure_stems(args.image_file)):
            view = inspect_compression(model, image_processor, image, args.retention_ratio, args.token_layout)
            for written in save_visualizations(view, args.out_dir, stem, kinds):
                print(written)
    return 0
