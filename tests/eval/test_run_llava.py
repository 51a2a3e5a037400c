"""The main job end to end on the tiny checkpoint: answer, summary line, user mistakes."""

import re

import numpy as np
import pytest
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
    match = re.fullmatch(r"\[summary\] image (\S+) \| grid (\S+) \| visual tokens (\d+) \| prompt tokens (\d+) \| "
                         r"new tokens (\d+) \| TTFT (\d+) ms \| ([\d.]+|-) tokens/s", lines[-1])
    assert match, lines[-1]
    return match.groups()


def test_answer_and_summary(tiny_checkpoint, tmp_path, capsys):
    image = _image(tmp_path, "a.png", (800, 500))
    code, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "What is it?", "--max-new-tokens", "5")
    size, grid, visual, prompt, new, _, _ = _summary(lines)
    assert (code, size, grid, visual, new) == (0, "800x500", "2x2", "2046", "5")
    assert len(lines) >= 2  # the answer comes before the summary


def test_several_images(tiny_checkpoint, tmp_path, capsys):
    first, second = _image(tmp_path, "a.png", (800, 500)), _image(tmp_path, "b.png", (500, 900))
    _, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", f"{first},{second}", "--query", "Compare.", "--max-new-tokens", "2")
    size, grid, visual, *_ = _summary(lines)
    assert (size, grid, visual) == ("800x500+500x900", "2x2+2x2", str(2046 + 1872))


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
    code, lines = _run(capsys, "--model-path", tiny_checkpoint, "--image-file", image, "--query", "Q", "--max-new-tokens", "1")
    assert code == 0
    if visual is not None:
        assert _summary(lines)[2] == str(visual)


def test_missing_image_is_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_llava.main(["--model-path", tiny_checkpoint, "--image-file", str(tmp_path / "gone.jpg"), "--query", "Q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "gone.jpg" in err and "Traceback" not in err


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
