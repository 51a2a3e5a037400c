"""The main job end to end on the tiny checkpoint: answer, summary line, user mistakes."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from llava.eval import run_llava


def _image(tmp_path, name, size, mode="RGB"):
    pixels = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path = tmp_path / name
    image.save(path)
    return str(path)


def _run(capsys, *args):
    code = run_llava.main(list(args))
    out = capsys.readouterr().out.strip().splitlines()
    return code, out


def _summary(lines):
    match = re.fullmatch(r"\[summary\] image (\S+) \| grid (\S+) \| visual tokens (\d+) of (\d+) \([\d.]+%\) \| "
                         r"globalcom2 R ([\d.]+) (official|spatial|\(off\)) \| prompt tokens (\d+) \| "
                         r"new tokens (\d+) \| TTFT (\d+) ms \| ([\d.]+|-) tokens/s", lines[-1])
    assert match, lines[-1]
    return match.groups()


def test_answer_and_summary(tiny_checkpoint, tmp_path, capsys):
    """Default R = 0.25, official layout: the summary and the compression line agree."""
    image = _image(tmp_path, "a.png", (800, 500))
    code, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "What is it?", "--max-new-tokens", "5")
    size, grid, visual, before, ratio, layout, prompt, new, _, _ = _summary(lines)
    assert (code, size, grid, before, ratio, layout, new) == (0, "800x500", "2x2", "2046", "0.25", "official", "5")
    crops = re.search(r"^\[compression\] image 1: (\d+)/2046 tokens \| thumbnail 144 \| crops kept/valid@ratio (.*)$", lines[-2])
    assert crops, lines[-2]
    kept = [int(item.split("/")[0]) for item in crops.group(2).split()]
    # 800x500 on 2x2: 30 of 48 canvas rows hold image, 360 per crop; the official layout ends every canvas row.
    assert all(item.split("/")[1].startswith("360@") for item in crops.group(2).split())
    assert int(visual) == int(crops.group(1)) == 144 + sum(kept) + 48
    assert len(lines) >= 3  # the answer comes first


def test_ratio_one_is_vanilla(tiny_checkpoint, tmp_path, capsys):
    image = _image(tmp_path, "a.png", (800, 500))
    _, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1",
                    "--retention-ratio", "1")
    size, grid, visual, before, ratio, layout, *_ = _summary(lines)
    assert (visual, before, ratio, layout) == ("2046", "2046", "1", "(off)")
    assert not any(line.startswith("[compression]") for line in lines)


def test_flag_wins_over_the_module_constant_read_at_call_time(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from llava.model import llava_arch

    image = _image(tmp_path, "a.png", (800, 500))
    monkeypatch.setattr(llava_arch, "retention_ratio", 0.5)
    _, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1")
    at_half = _summary(lines)
    _, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1",
                    "--retention-ratio", "0.1", "--token-layout", "spatial")
    at_tenth = _summary(lines)
    assert (at_half[4], at_half[5]) == ("0.5", "official") and (at_tenth[4], at_tenth[5]) == ("0.1", "spatial")
    assert int(at_tenth[2]) < int(at_half[2]) < 2046


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.01", "nan", "half"])
def test_invalid_ratio_is_refused_by_the_parser(tiny_checkpoint, tmp_path, capsys, ratio):
    image = _image(tmp_path, "a.png", (10, 10))
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--retention-ratio", ratio])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "(0, 1]" in err and repr(ratio) in err and "Traceback" not in err


def test_several_images(tiny_checkpoint, tmp_path, capsys):
    first, second = _image(tmp_path, "a.png", (800, 500)), _image(tmp_path, "b.png", (500, 900))
    _, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", f"{first},{second}", "--query", "Compare.", "--max-new-tokens", "2")
    size, grid, visual, before, *_ = _summary(lines)
    assert (size, grid, before) == ("800x500+500x900", "2x2+2x2", str(2046 + 1872))
    totals = [int(re.match(r"\[compression\] image \d: (\d+)/", line).group(1)) for line in lines[-3:-1]]
    assert lines[-3].startswith("[compression] image 1") and lines[-2].startswith("[compression] image 2")
    assert int(visual) == sum(totals)


@pytest.mark.parametrize(
    "size, mode, visual",
    [((1, 1), "RGB", 576 + 24 * 25), ((20, 2000), "RGB", 576 + 72), ((64, 48), "L", None), ((64, 48), "P", None),
     ((64, 48), "RGBA", None), ((64, 48), "CMYK", None), ((64, 48), "I;16", None)],
)
def test_odd_images_run(tiny_checkpoint, tmp_path, capsys, size, mode, visual):
    suffix = "tiff" if mode in ("CMYK", "I;16") else "png"
    image = _image(tmp_path, f"odd.{suffix}", size, mode if mode != "I;16" else "I")
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 21).astype(np.uint16)).save(image)
    code, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1",
                       "--retention-ratio", "1")
    assert code == 0
    if visual is not None:
        assert _summary(lines)[2] == str(visual)


def test_missing_image_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", str(tmp_path / "gone.jpg"), "--query", "Q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "gone.jpg" in err and "Traceback" not in err


def test_decompression_bomb_is_one_clear_line(tiny_checkpoint, bomb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", str(bomb), "--query", "Q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "huge.png is too large" in err and "--max-image-pixels" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_three_images_past_the_model_length_are_refused_unless_truncation_is_allowed(tiny_checkpoint, tmp_path, capsys):
    images = ",".join(_image(tmp_path, f"{index}.png", (800, 500)) for index in range(3))
    arguments = ["--model-path", tiny_checkpoint, "--image-file", images, "--query", "Which differs?",
                 "--retention-ratio", "1", "--max-new-tokens", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(arguments)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "(3 image(s), 6138 visual tokens) but the model takes at most 4096" in err
    assert "a retention ratio of about 0.66 or lower fits" in err and "Traceback" not in err
    assert run_llava.main(arguments + ["--allow-truncation"]) == 0
    assert "warning: the prompt is" in capsys.readouterr().err


def test_ratio_that_keeps_no_thumbnail_token_warns_in_one_line(tiny_checkpoint, tmp_path, capsys):
    image = _image(tmp_path, "a.png", (800, 500))
    assert run_llava.main(["--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q",
                           "--retention-ratio", "1e-9", "--max-new-tokens", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "retention ratio" in line]
    assert warnings == [warnings[0]] and warnings[0].startswith("warning: retention ratio 1e-09 is below 1/576")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_on_a_cpu_only_machine_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    image = _image(tmp_path, "a.png", (10, 10))
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--device", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device cuda:" in err and "use --device cpu" in err
    assert err.count("\n") == 1


def test_unknown_template_is_refused_by_the_parser(tmp_path, capsys):
    image = _image(tmp_path, "a.png", (10, 10))
    with pytest.raises(SystemExit) as exit_info:  # before the (missing) checkpoint is even looked at
        run_llava.main(["--model-path", str(tmp_path), "--image-file", image, "--query", "Q", "--conv-mode", "vicuna"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--conv-mode: invalid choice: 'vicuna'" in err and "'vicuna_v1'" in err


def test_not_a_checkpoint_is_one_clear_line(tmp_path, capsys):
    image = _image(tmp_path, "a.png", (10, 10))
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", str(tmp_path), "--image-file", image, "--query", "Q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no config.json" in err and "Traceback" not in err


def test_query_with_wrong_number_of_image_tokens(tiny_checkpoint, tmp_path, capsys):
    image = _image(tmp_path, "a.png", (10, 10))
    with pytest.raises(SystemExit):
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", image, "--query", "<image> <image> two?"])
    assert "places 2 <image> tokens but 1 images" in capsys.readouterr().err


def test_save_selection_appends_one_line_per_image(tiny_checkpoint, tmp_path, capsys):
    """Pooling merges, so its lines also name each kept token's source patches; a half-written
    last line (a killed run) is cut before the next line is appended."""
    image = _image(tmp_path, "a.png", (800, 500))
    selections = tmp_path / "runs" / "selection.jsonl"
    arguments = ["--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1",
                 "--method", "pooling", "--visual-tokens", "300", "--save-selection", str(selections)]
    _, lines = _run(capsys, *arguments)
    first = selections.read_text()
    selections.write_text(first + first[:40])
    _, lines = _run(capsys, *arguments)
    written = [json.loads(line) for line in selections.read_text().splitlines()]
    assert len(written) == 2 and written[0] == written[1] == json.loads(first)
    line = written[0]
    assert set(line) == {"image", "image_index", "compression", "canvas_size", "patch_pixels", "selection", "accounting"}
    assert (line["image"], line["image_index"], line["canvas_size"], line["patch_pixels"]) == (image, 0, [672, 672], 14)
    assert line["compression"] == dict(method="pooling", method_args={}, retention_ratio=1.0, visual_tokens=300,
                                       layout="official")
    record, accounting = line["selection"], line["accounting"]
    visual = int(re.search(r"visual tokens (\d+)", lines[-1]).group(1))
    assert record["image_tokens"] + record["newline_tokens"] == accounting["tokens_after"] == visual
    assert [len(kept) for kept in record["kept"]] == [accounting["thumbnail_kept"], *accounting["crop_kept"]]
    assert [len(sources) for sources in record["sources"]] == [len(kept) for kept in record["kept"]]
    assert sum(len(cells) for view in record["sources"] for cells in view) == accounting["vanilla_image_tokens"]


def test_an_in_llm_method_prints_its_schedule_and_parameters(tiny_checkpoint, tmp_path, capsys):
    """PDrop at R 0.75 on the 2-layer tiny LLM: one stage at layer 1 keeping int(2046 lam^3) of the span,
    lam solved from (1 + lam^3) / 2 = 0.75, all three boundaries clamped into layer 1."""
    image = _image(tmp_path, "a.png", (800, 500))
    code, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "What is it?",
                       "--max-new-tokens", "2", "--method", "pdrop", "--retention-ratio", "0.75")
    line = next(line for line in lines if line.startswith("[in-llm] image 1:"))
    assert code == 0 and line.startswith("[in-llm] image 1: 2046 tokens in (newlines included) | kept from layer 1: 1023")
    assert line.endswith("| equivalent 1534.5 (average over 2 layers) | lam 0.7937 | layers [1, 1, 1]")
