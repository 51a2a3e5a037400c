"""The positional-bias tool: per-view shares and retentions worked out by hand on a hand-made selection
file (pre-LLM counts, in-LLM stages by layer, reversed crops mapped back), the table and the PNG,
and one run end to end: the loader with fastv and --reverse-crops saving a selection file, then the tool."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest
from PIL import Image

from llava.eval import model_vqa_loader
from llava.eval.jsonl import read_jsonl

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "positional_bias.py"
_SPEC = importlib.util.spec_from_file_location("positional_bias", _PATH)
positional_bias = importlib.util.module_from_spec(_SPEC)
sys.modules["positional_bias"] = positional_bias
_SPEC.loader.exec_module(positional_bias)

COMPRESSION = {"method": "random", "method_args": {}, "retention_ratio": 0.5, "visual_tokens": None,
               "layout": "official"}


def _line(question_id, thumbnail_kept, crop_kept, crop_valid, side=4):
    """A selection-file line of a pre-LLM method (side 4: the thumbnail has 16 tokens)."""
    return {"question_id": question_id, "image_index": 0, "compression": COMPRESSION,
            "selection": {"side": side, "grid": [len(crop_valid), 1] if crop_valid else None},
            "accounting": {"thumbnail_kept": thumbnail_kept, "crop_kept": crop_kept, "crop_valid": crop_valid}}


def _in_llm_line(question_id, reversed_crops=False):
    """A fastv line: 16 + 12 + 12 image tokens and 6 newlines in the span; layer 2 keeps 2/3/9 and one
    newline, layer 5 keeps 1/1/6."""
    accounting = {"thumbnail_kept": 16, "crop_kept": [12, 12], "crop_valid": [12, 12], "crops_reversed": reversed_crops,
                  "in_llm": {"stages": [[2, 15], [5, 8]], "span_tokens": 46, "view_tokens": [16, 12, 12],
                             "view_newlines": 6, "views_kept": [{"layer": 2, "kept": [2, 3, 9], "newlines": 1},
                                                                {"layer": 5, "kept": [1, 1, 6], "newlines": 0}]}}
    return {"question_id": question_id, "image_index": 0, "selection": {"side": 4},
            "compression": dict(COMPRESSION, method="fastv", retention_ratio=0.2), "accounting": accounting}


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _summary(path, **options):
    images = positional_bias.image_records(read_jsonl(path))
    return positional_bias.summarize({"m": images}, **options)[0]


def test_pre_llm_shares_and_retentions_by_hand(tmp_path):
    path = _write(tmp_path / "s.jsonl", [
        _line(0, 4, [3, 8], [12, 16]),   # kept 15: shares 4/15 3/15 8/15; retentions 4/16 3/12 8/16
        _line(1, 8, [6, 4], [12, 16]),   # kept 18: shares 8/18 6/18 4/18; retentions 8/16 6/12 4/16
        _line(2, 5, [], []),             # one view: skipped
        _line(3, 16, [0, 0, 0, 16], [16, 16, 16, 16]),  # 4 crops: kept 32, shares 1/2 0 0 0 1/2
    ])
    two_crops = _summary(path, crops=2)
    assert two_crops["images"] == 2 and two_crops["skipped"] == 2
    assert two_crops["share"] == pytest.approx([(4 / 15 + 8 / 18) / 2, (3 / 15 + 6 / 18) / 2, (8 / 15 + 4 / 18) / 2])
    assert two_crops["retention"] == pytest.approx([(4 / 16 + 8 / 16) / 2, (3 / 12 + 6 / 12) / 2, (8 / 16 + 4 / 16) / 2])

    every = _summary(path)  # a view is averaged over the images that have it: crops 3 and 4 only image 3
    assert every["images"] == 3 and every["skipped"] == 1
    assert every["share"] == pytest.approx([(4 / 15 + 8 / 18 + 1 / 2) / 3, (3 / 15 + 6 / 18) / 3,
                                            (8 / 15 + 4 / 18) / 3, 0, 1 / 2])
    assert sum(_summary(_write(tmp_path / "one.jsonl", [_line(0, 4, [3, 8], [12, 16])]))["share"]) == pytest.approx(1)


def test_in_llm_counts_by_layer_and_reversed_crops_by_content(tmp_path):
    path = _write(tmp_path / "s.jsonl", [_in_llm_line(0, reversed_crops=True)])
    assert _summary(path)["share"] == pytest.approx([1 / 8, 1 / 8, 6 / 8])  # after the last stage (layer 5)
    assert _summary(path)["retention"] == pytest.approx([1 / 16, 1 / 12, 6 / 12])
    assert _summary(path, layer=4)["share"] == pytest.approx([2 / 14, 3 / 14, 9 / 14])  # after layer 2's stage
    assert _summary(path, layer=1)["share"] == pytest.approx([16 / 40, 12 / 40, 12 / 40])  # before any stage
    # Reversed crops: the second crop sent shows the image's first crop.
    assert _summary(path, by="content")["share"] == pytest.approx([1 / 8, 6 / 8, 1 / 8])
    unreversed = _write(tmp_path / "u.jsonl", [_in_llm_line(0)])
    assert _summary(unreversed, by="content")["share"] == pytest.approx([1 / 8, 1 / 8, 6 / 8])


def test_an_in_llm_record_without_view_counts_is_one_error(tmp_path, capsys):
    line = _in_llm_line(0)
    del line["accounting"]["in_llm"]["view_tokens"]
    path = _write(tmp_path / "old.jsonl", [line])
    assert positional_bias.main([str(path), "--figure", str(tmp_path / "f.png")]) == 2
    assert "per-view counts" in capsys.readouterr().err


def test_table_and_figure_from_an_answers_file_and_a_selection_file(tmp_path, capsys):
    selections = _write(tmp_path / "s.jsonl", [_line(0, 4, [3, 8], [12, 16]), _line(1, 8, [6, 4], [12, 16])])
    # An answers file: the accounting in metadata.images (no side recorded: the thumbnail counts 576).
    answers = _write(tmp_path / "a.jsonl", [{"question_id": 0, "metadata": {"images": [
        dict(_in_llm_line(0)["accounting"], **_in_llm_line(0)["compression"])]}}])
    figure = tmp_path / "plots" / "bias.png"
    assert positional_bias.main([str(selections), str(answers), "--figure", str(figure), "--json"]) == 0
    out = capsys.readouterr().out
    assert "| random R 0.5 | 2 | 35.6 | 26.7 | 37.8 |" in out  # (4/15 + 8/18) / 2 = 35.6%, ...
    assert "| fastv R 0.2 | 1 | 12.5 | 12.5 | 75.0 |" in out
    assert "retention of kept tokens per view" in out
    summaries = json.loads(out.strip().splitlines()[-1])
    assert [summary["label"] for summary in summaries] == ["random R 0.5", "fastv R 0.2"]
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert positional_bias.main([str(selections), "--label", "a", "--label", "b", "--figure", str(figure)]) == 2


def test_loader_with_fastv_and_reversed_crops_then_the_tool(tiny_checkpoint, tmp_path, capsys):
    for index, size in enumerate([(800, 500), (672, 672)]):
        Image.effect_noise(size, 60 + 20 * index).convert("RGB").save(tmp_path / f"img{index}.png")
    (tmp_path / "questions.jsonl").write_text("".join(
        json.dumps({"question_id": index, "image": f"img{index}.png", "text": "Is there a cat?"}) + "\n"
        for index in range(2)))
    answers, selections = tmp_path / "answers.jsonl", tmp_path / "selection.jsonl"
    assert model_vqa_loader.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "questions.jsonl"),
                                  "--image-folder", str(tmp_path), "--answers-file", str(answers), "--temperature", "0",
                                  "--max_new_tokens", "1", "--method", "fastv", "--method-arg", "k=1",
                                  "--retention-ratio", "0.1", "--reverse-crops", "--save-selection",
                                  str(selections)]) == 0
    records = read_jsonl(selections)
    for record in records:
        accounting = record["accounting"]
        in_llm = accounting["in_llm"]
        assert accounting["crops_reversed"] is True
        assert sum(in_llm["view_tokens"]) + in_llm["view_newlines"] == in_llm["span_tokens"]
        assert in_llm["view_tokens"] == [record["selection"]["side"] ** 2, *accounting["crop_valid"]]
        (stage,) = in_llm["views_kept"]
        assert stage["layer"] == 1  # the selection records name the layer
        assert sum(stage["kept"]) + stage["newlines"] == accounting["post_pruning_image_tokens"]
    capsys.readouterr()
    figure = tmp_path / "bias.png"
    assert positional_bias.main([str(selections), "--figure", str(figure), "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["label"] == "fastv R 0.1 reversed" and summary["images"] == 2
    assert len(summary["share"]) == 5 and math.isclose(sum(summary["share"]), 1.0)  # both 2x2: shares sum to 1
    assert figure.exists()
