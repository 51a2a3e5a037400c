"""The visualisations show exactly what was kept: pixels are checked against the selection, with
[CLS] scores set by the test."""

import dataclasses
import json
import pathlib
import re
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llava import visualize
from llava.eval import run_llava
from llava.eval.jsonl import read_jsonl
from llava.mm_utils import process_images
from llava.model.compression.common import Selection, arrange_tokens, selection_from_record, selection_record
from llava.model.multimodal_encoder.clip_encoder import VisionTowerOutput
from llava.visualize import (
    DIM,
    PADDING_STRIPES,
    canvas_patch_states,
    crops_mask,
    figure_stems,
    global_score_canvas,
    heatmap,
    inspect_compression,
    save_visualizations,
    score_heatmaps,
    selection_view,
    thumbnail_mask,
)

GREY, WHITE = 100, 240
REPO = pathlib.Path(__file__).resolve().parents[1]


def _image_with_bright_corner(size=(800, 500)):
    """Grey, with a white rectangle over the top-left 6x6 thumbnail patches."""
    pixels = np.full((size[1], size[0], 3), GREY, dtype=np.uint8)
    pixels[: size[1] * 6 // 24, : size[0] * 6 // 24] = WHITE
    return Image.fromarray(pixels)


@pytest.fixture
def scored_model(tiny, monkeypatch):
    """The tiny model with a tower whose [CLS] scores the test sets: the thumbnail favours its
    top-left 6x6 patches (then lower indices); crops their right halves."""
    _, model, processor = tiny
    tower = model.get_model().vision_tower

    def forward(images, signals=frozenset()):
        views = images.shape[0]
        grid = torch.arange(576).view(24, 24)
        thumbnail = -grid.float() * 1e-3 + 10.0 * ((grid // 24 < 6) & (grid % 24 < 6)).float()
        crop = (grid % 24 >= 12).float() + grid.float() * 1e-4
        scores = torch.stack([thumbnail] + [crop] * (views - 1)).view(views, 576)
        return VisionTowerOutput(torch.zeros(views, 576, tower.hidden_size),
                                 {"cls_logits_last": scores} if "cls_logits_last" in signals else {})

    monkeypatch.setattr(tower, "forward", forward)
    return model, processor


def _patch_centres(size, side=24):
    """Pixel (x, y) at the centre of each thumbnail patch's rectangle of the image."""
    width, height = size
    for index in range(side * side):
        row, col = divmod(index, side)
        yield index, int((col + 0.5) * width / side), int((row + 0.5) * height / side)


def test_thumbnail_mask_dims_exactly_the_dropped_patches(scored_model):
    model, processor = scored_model
    image = _image_with_bright_corner()
    view = inspect_compression(model, processor, image, retention_ratio=0.25)
    kept = set(view.selection.thumbnail_indices.tolist())
    assert len(kept) == 144 and {row * 24 + col for row in range(6) for col in range(6)} <= kept
    mask = np.asarray(thumbnail_mask(view))
    original = np.asarray(image)
    for index, x, y in _patch_centres(image.size):
        expected = original[y, x] if index in kept else np.round(original[y, x] * DIM)
        assert (mask[y, x] == expected).all(), index
    assert (mask[10, 10] == WHITE).all()  # the bright corner is kept


def test_crops_mask_dims_dropped_patches_and_stripes_padding(scored_model):
    model, processor = scored_model
    image = _image_with_bright_corner((800, 500))  # 2x2 on 672x672: rows of padding above and below
    view = inspect_compression(model, processor, image, retention_ratio=0.25)
    mask, canvas = np.asarray(crops_mask(view)), np.asarray(view.canvas)
    assert mask.shape == (672, 672, 3)
    states = canvas_patch_states(view)
    top, bottom, _, _ = view.selection.geometry.bounds
    assert (states[:top] == -1).all() and (states[bottom:] == -1).all() and (states[top:bottom] >= 0).all()
    keep = view.selection.crop_keep_mask.view(2, 2, 24, 24).permute(0, 2, 1, 3).reshape(48, 48).numpy()
    assert ((states == 1) == keep).all()
    for row in range(48):
        for col in range(48):
            y, x = row * 14 + 7, col * 14 + 7
            if states[row, col] == -1:
                assert mask[y, x, 0] in PADDING_STRIPES
            elif states[row, col] == 0:
                assert (mask[y, x] == np.round(canvas[y, x] * DIM)).all()
            else:
                assert (mask[y, x] == canvas[y, x]).all()


def test_heatmap_brightest_cell_is_the_highest_score():
    values = np.random.RandomState(0).randn(6, 5)
    image = np.asarray(heatmap(values, cell=4), dtype=np.float64)
    luminance = (image @ [0.2126, 0.7152, 0.0722])[::4, ::4]  # one sample per cell
    assert np.unravel_index(luminance.argmax(), luminance.shape) == np.unravel_index(values.argmax(), values.shape)
    assert np.unravel_index(luminance.argmin(), luminance.shape) == np.unravel_index(values.argmin(), values.shape)
    masked = np.asarray(heatmap(values, cell=1, mask=values < values.max()))
    assert (masked[np.unravel_index(values.argmax(), values.shape)] == 0).all()


def test_heatmaps_follow_the_scores_and_the_image_area(scored_model):
    model, processor = scored_model
    view = inspect_compression(model, processor, _image_with_bright_corner(), retention_ratio=0.5)
    (_, thumbnail), (_, crops), (_, resized) = score_heatmaps(view, cell=8)
    cells = np.asarray(thumbnail, dtype=np.float64)[::8, ::8] @ [0.2126, 0.7152, 0.0722]
    assert np.unravel_index(cells.argmax(), cells.shape) == (0, 0)  # 10.0 at patch 0, the highest score
    global_scores = global_score_canvas(view)
    top, bottom, _, _ = view.selection.geometry.bounds
    assert np.isnan(global_scores[:top]).all() and not np.isnan(global_scores[top:bottom]).any()
    assert crops.size == resized.size == (48 * 4, 48 * 4)


@pytest.mark.parametrize("size", [(800, 500), (500, 900), (600, 600), (20, 2000)])
def test_all_figures_for_several_shapes(tiny, tmp_path, size):
    _, model, processor = tiny
    view = inspect_compression(model, processor, _image_with_bright_corner(size), retention_ratio=0.25, layout="spatial")
    paths = save_visualizations(view, str(tmp_path), "img")
    assert [path.rsplit("_", 1)[-1] for path in paths] == ["mask.png", "mask.png", "heatmaps.png", "ratios.png", "summary.png"]
    assert all(open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for path in paths)
    states = canvas_patch_states(view)
    assert (states >= 0).sum() == sum(view.selection.geometry.valid_counts)


def test_run_llava_visualize_flag(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "photo.png"
    _image_with_bright_corner().save(path)
    assert run_llava.main(["--model-path", tiny_checkpoint, "--image-file", str(path), "--query", "Q",
                           "--max-new-tokens", "1", "--visualize", str(tmp_path / "out")]) == 0
    written = [line.split(" ", 1)[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[visualize]")]
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == sorted(
        f"1_photo_{name}.png" for name in ["thumbnail_mask", "crops_mask", "heatmaps", "ratios", "summary"])


@pytest.mark.parametrize("paths, stems", [
    (["a/cat.png", "b/cat.png", "c/dog.jpg"], ["a_cat", "b_cat", "dog"]),
    (["cat.png", "dog.png"], ["cat", "dog"]),
    (["x/a/cat.png", "y/a/cat.png"], ["1_cat", "2_cat"]),  # same folder name
    (["a/cat.png", "a/cat.png"], ["1_cat", "2_cat"]),  # one image given twice
    (["a/cat.png", "b/cat.png", "a_cat.png"], ["1_cat", "2_cat", "3_a_cat"]),  # "a_cat" would repeat
])
def test_figure_stems_are_distinct(paths, stems):
    assert figure_stems(paths) == stems


@pytest.mark.parametrize("tool, figures", [
    ("attn_visualization", ["heatmaps"]),
    ("mask_visualization", ["thumbnail_mask", "crops_mask", "ratios", "summary"]),
])
def test_tools_keep_the_figures_of_two_images_with_one_name(tiny_checkpoint, tmp_path, monkeypatch, capsys, tool, figures):
    for folder, size in (("a", (800, 500)), ("b", (500, 900))):
        (tmp_path / folder).mkdir()
        _image_with_bright_corner(size).save(tmp_path / folder / "cat.png")
    monkeypatch.setattr(sys, "argv", [tool, "--model-path", tiny_checkpoint, "--out-dir", str(tmp_path / "out"),
                                      "--image-file", str(tmp_path / "a" / "cat.png"), str(tmp_path / "b" / "cat.png")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / f"{tool}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    expected = sorted(f"{folder}_cat_{figure}.png" for folder in "ab" for figure in figures)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == expected
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / f"{folder}_cat_{figure}.png")
                                               for folder in "ab" for figure in figures]


def test_a_decompression_bomb_stops_before_the_model_loads(bomb, tmp_path, capsys, monkeypatch):
    import llava.model.builder
    from llava import visualize

    monkeypatch.setattr(llava.model.builder, "load_pretrained_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as stop:
        visualize.main(["--image-file", str(bomb), "--out-dir", str(tmp_path)], ("masks",), "test")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "huge.png is too large" in err and "Traceback" not in err


# --- selection files -------------------------------------------------------------------------

@pytest.fixture
def method_model(tiny):
    """The tiny model under a method the test names; its own settings again afterwards."""
    _, model, processor = tiny

    def use(method):
        model.set_compression(method=method)
        return model, processor

    yield use
    model.set_compression()


def _named_cells(selection, layout) -> list[int]:
    """The cells (`view * P + patch`, -1 a newline) in the order the selection sends them."""
    views, patches = 1 + selection.geometry.num_crops, selection.geometry.side**2
    positions = Selection(**{field.name: getattr(selection, field.name) for field in dataclasses.fields(Selection)})
    named = torch.arange(views * patches).view(views, patches, 1)
    return arrange_tokens(named, positions, torch.tensor([-1]), layout)[:, 0].tolist()


@pytest.mark.parametrize("method", ["globalcom2", "random", "fastervlm"])
def test_a_selection_file_draws_the_masks_of_the_live_run(tiny_checkpoint, method_model, tmp_path, capsys, method):
    paths = [str(tmp_path / "wide.png"), str(tmp_path / "tall.png")]
    for path, size in zip(paths, [(800, 500), (500, 900)]):
        _image_with_bright_corner(size).save(path)
    selections = str(tmp_path / "selection.jsonl")
    assert run_llava.main(["--model-path", tiny_checkpoint, "--image-file", *paths, "--query", "Q", "--max-new-tokens",
                           "1", "--method", method, "--save-selection", selections]) == 0
    visual_tokens = int(re.search(r"visual tokens (\d+)", capsys.readouterr().out).group(1))
    lines = read_jsonl(selections)
    assert [(line["image"], line["image_index"], line["compression"]["method"]) for line in lines] == [
        (paths[0], 0, method), (paths[1], 1, method)]
    records = [line["selection"] for line in lines]
    assert sum(record["image_tokens"] + record["newline_tokens"] for record in records) == visual_tokens
    assert all(record["image_tokens"] == line["accounting"]["image_tokens"] for record, line in zip(records, lines))

    model, processor = method_model(method)

    def vanilla_length(image):
        model.set_compression(1.0)
        try:
            sequence, = model.encode_image_sequences(process_images([image], processor, model.config), [image.size])
        finally:
            model.set_compression(method=method)
        return sequence.shape[0]

    for line, path in zip(lines, paths):
        image = Image.open(path)
        live, drawn = inspect_compression(model, processor, image), selection_view(line, image)
        assert line["selection"] == selection_record(live.selection, live.layout)
        # Counted against the model's own vanilla sequence, also for FasterVLM's official input.
        assert drawn.title() == live.title() and f"of {line['accounting']['tokens_before']} visual" in live.title()
        assert line["accounting"]["tokens_before"] == vanilla_length(image)
        for draw in (thumbnail_mask, crops_mask):
            assert np.array_equal(np.asarray(draw(drawn)), np.asarray(draw(live))), draw.__name__

    # The file's order is the sequence the model received: per view, and whole from the record alone.
    record = records[1]
    views = process_images([image], processor, model.config)[0]
    sequence, = model.encode_image_sequences([views], [image.size])
    cells = _named_cells(model.last_selections[0], record["layout"])
    patches = record["side"] ** 2
    assert record["kept"] == [[cell % patches for cell in cells if cell >= 0 and cell // patches == view]
                              for view in range(len(record["kept"]))]
    rebuilt = arrange_tokens(model.encode_images(views).features, selection_from_record(record),
                             model.get_model().image_newline, record["layout"])
    assert torch.equal(rebuilt, sequence)

    # The tool draws the same from the file, images matched by path whatever their order.
    out = tmp_path / "out"
    assert visualize.main(["--selection-file", selections, "--out-dir", str(out), "--image-file", *paths[::-1]],
                          ("masks", "ratios", "summary"), "test") == 0
    ratios = ["ratios"] if method == "globalcom2" else []
    assert sorted(path.name for path in out.iterdir()) == sorted(
        f"{stem}_{figure}.png" for stem in ("tall", "wide") for figure in ["thumbnail_mask", "crops_mask", *ratios])
    err = capsys.readouterr().err
    assert f"note: tall: no summary figure for method {method}" in err and "GlobalCom2's scores" in err


def test_selection_file_lines_pair_with_images_in_order_or_refuse(tmp_path, capsys):
    line = dict(compression=dict(method="random", method_args={}, retention_ratio=0.25, visual_tokens=None,
                                 layout="official"),
                canvas_size=[672, 672], patch_pixels=14, accounting={},
                selection=dict(image_size=[800, 500], grid=[2, 2], side=24, unpad=True, layout="official",
                               arrangement="raster", send_crops=True, kept=[[0, 1]] + [[]] * 4,
                               image_tokens=2, newline_tokens=30))
    selections = tmp_path / "selection.jsonl"
    selections.write_text("".join(f"{json.dumps(dict(question_id=number, **line))}\n" for number in range(2)))
    images = [tmp_path / "one.png", tmp_path / "two.png"]
    for path, size in zip(images, [(800, 500), (500, 800)]):
        _image_with_bright_corner(size).save(path)
    arguments = ["--selection-file", str(selections), "--out-dir", str(tmp_path / "out"), "--image-file"]
    with pytest.raises(SystemExit) as stop:
        visualize.main([*arguments, str(images[0])], ("masks",), "test")
    assert stop.value.code == 2 and "2 line(s) but 1 image(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        visualize.main([*arguments, *map(str, images)], ("masks",), "test")
    assert stop.value.code == 2 and "of size 800x500, but the image given is 500x800" in capsys.readouterr().err
    kept = np.asarray(thumbnail_mask(selection_view(line, Image.open(images[0]))))
    assert (kept[0, 0] == WHITE).all() and (kept[499, 799] == np.round(GREY * DIM)).all()


def test_a_text_conditioned_method_is_drawn_with_the_question(method_model):
    model, processor = method_model("cdpruner")
    image = _image_with_bright_corner((800, 500))
    view = inspect_compression(model, processor, image, instruction="Where is the bright corner?")
    assert view.accounting["method"] == "cdpruner" and np.asarray(crops_mask(view)).shape[:2] == view.canvas.size[::-1]
    with pytest.raises(ValueError, match="cdpruner conditions on the instruction text"):
        inspect_compression(model, processor, image)


# --- OneVision (SigLIP, no [CLS]) -------------------------------------------------------------

@pytest.fixture(scope="module")
def onevision(tiny_onevision_checkpoint):
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(tiny_onevision_checkpoint, device="cpu", torch_dtype="float32")
    model.set_compression(method="globalcom2", method_args=["score=neg_cos_mean"])
    yield model, processor
    model.set_compression()


@pytest.mark.parametrize("size", [(800, 500), (2304, 2304)])  # 2304x2304: a downsampled canvas
def test_onevision_heatmaps_draw_the_chosen_score(onevision, tmp_path, size):
    model, processor = onevision
    image = _image_with_bright_corner(size)
    view = inspect_compression(model, processor, image, retention_ratio=0.25)
    views = process_images([image], processor, model.input_config())[0]
    assert torch.equal(view.scores, model.encode_images(views, {"neg_cos_mean"}).signals["neg_cos_mean"])
    (thumbnail_title, thumbnail), (crops_title, _), _ = score_heatmaps(view, cell=2)
    assert "neg_cos_mean" in thumbnail_title and "neg_cos_mean" in crops_title and thumbnail.size == (54, 54)
    assert view.retention_ratio == 0.25 and view.accounting["thumbnail_kept"] == 182
    # SigLIP-384's 27 patches of 14 px cover 378 of a crop's 384 px: the last 6 are drawn as the last patch.
    mask, canvas = np.asarray(crops_mask(view)), np.asarray(view.canvas)
    states = canvas_patch_states(view)
    grid_w, grid_h = view.grid
    assert mask.shape == (384 * grid_h, 384 * grid_w, 3) and states.shape == (27 * grid_h, 27 * grid_w)
    for row, y in ((0, 7), (26, 380), (27, 384 + 7)):
        for col, x in ((0, 7), (26, 383)):
            if states[row, col] == 0:
                assert (mask[y, x] == np.round(canvas[y, x] * DIM)).all()
            elif states[row, col] == 1:
                assert (mask[y, x] == canvas[y, x]).all()
    assert (states == 1).sum() == sum(view.accounting["crop_kept"])
    paths = save_visualizations(view, str(tmp_path), "ov")
    assert [path.rsplit("_", 1)[-1] for path in paths] == ["mask.png", "mask.png", "heatmaps.png", "ratios.png",
                                                           "summary.png"]


def test_onevision_default_score_is_refused_in_one_line(onevision):
    model, processor = onevision
    model.set_compression(retention_ratio=1.0, method="globalcom2")  # R = 1 needs no score
    try:
        with pytest.raises(ValueError, match="--method-arg score=neg_cos_mean"):
            inspect_compression(model, processor, _image_with_bright_corner(), retention_ratio=0.25)
    finally:
        model.set_compression(method="globalcom2", method_args=["score=neg_cos_mean"])
