"""Shared by the method tests: the tiny model with its compression reset after each test, and one run of
the loader runner on the tiny checkpoint."""

import json

import pytest
from PIL import Image

from llava.eval import model_vqa_loader
from llava.eval.jsonl import read_jsonl


@pytest.fixture
def model(tiny):
    """The session's tiny model; whatever compression a test sets is undone after it."""
    model = tiny[1]
    yield model
    model.set_compression()


@pytest.fixture
def loader_answers(tiny_checkpoint, tmp_path):
    """`loader_answers(sizes, *runner_args, text=..., colour_step=60, max_new_tokens=2)`: the answer rows
    of `python -m llava.eval.model_vqa_loader` (greedy) on one plain image per size in `sizes` (image `i`
    coloured `(colour_step * i, 100, 50)`), question `i` asking `text` about image `i`; `runner_args` are
    the method's flags (`--method`, `--method-arg`, the budget)."""

    def run(sizes, *runner_args, text="Is there a cat?", colour_step=60, max_new_tokens=2):
        questions = []
        for index, size in enumerate(sizes):
            Image.new("RGB", size, (colour_step * index, 100, 50)).save(tmp_path / f"img{index}.jpg")
            questions.append({"question_id": index, "image": f"img{index}.jpg", "text": text})
        (tmp_path / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in questions))
        answers = tmp_path / "answers.jsonl"
        assert model_vqa_loader.main(["--model-path", tiny_checkpoint, "--question-file",
                                      str(tmp_path / "questions.jsonl"), "--image-folder", str(tmp_path),
                                      "--answers-file", str(answers), "--temperature", "0",
                                      "--max_new_tokens", str(max_new_tokens), *runner_args]) == 0
        return read_jsonl(answers)

    return run
