"""What the runner guarantees about a researcher's answers file: no kill empties it, no rerun under
other settings mixes into it, no second runner duplicates it, and every bad input (question line,
image, over-long prompt) is one error line naming it, or a recorded answer with `record`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from llava.eval import model_vqa_loader, model_vqa_science, runner
from llava.eval.jsonl import read_jsonl
from llava.files import file_lock

SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("questions")
    for index, size in enumerate([(80, 50), (50, 90), (64, 64)]):
        Image.new("RGB", size, (60 * index, 100, 50)).save(root / f"img{index}.jpg")
    lines = [{"question_id": index, "image": f"img{index}.jpg", "text": f"Is there a cat {index}?{SUFFIX}"} for index in range(3)]
    _write_lines(root / "questions.jsonl", lines)
    return root, lines


def _write_lines(path, lines):
    with open(path, "w") as file:
        file.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def _arguments(checkpoint, root, answers, *extra, questions="questions.jsonl"):
    return ["--model-path", checkpoint, "--question-file", str(root / questions), "--image-folder", str(root),
            "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "1", "--device", "cpu", *extra]


def _exit_status(function, capsys):
    """(exit status, stderr) of a CLI main that may raise SystemExit."""
    try:
        status = function()
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def _refuse_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the runner gets as far as loading the model."""
    monkeypatch.setattr(runner, "load_pretrained_model", _refuse_model_load)


# --- kills during a rewrite ------------------------------------------------------------------

# Runs the loader with every atomic rewrite of an answers file killing the process (SIGKILL) right
# after its first write to the temporary file: the moment a plain rewrite has emptied the target.
KILLED_DURING_REWRITE = """
import contextlib, os, signal, sys
import llava.eval.jsonl as jsonl
real_atomic_write = jsonl.atomic_write

@contextlib.contextmanager
def dying(path, *args, **kwargs):
    with real_atomic_write(path, *args, **kwargs) as out:
        class KillAfterFirstWrite:
            def write(self, text):
                out.write(text)
                out.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        yield KillAfterFirstWrite()

jsonl.atomic_write = dying
from llava.eval import model_vqa_loader
model_vqa_loader.main(sys.argv[1:])
"""


def _killed_run(arguments):
    result = subprocess.run([sys.executable, "-c", KILLED_DURING_REWRITE, *arguments], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def test_kill_during_the_start_up_rewrite_keeps_every_answer(tiny_checkpoint, data, tmp_path):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)) == 0
    complete = read_jsonl(answers)
    answers.write_text("".join(json.dumps(row) + "\n" for row in complete[:2]) + json.dumps(complete[2])[:30])
    before = answers.read_text()
    _killed_run(_arguments(tiny_checkpoint, root, answers))  # killed while dropping the half line
    assert answers.read_text() == before
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)) == 0  # and it resumes
    assert [row["answer_id"] for row in read_jsonl(answers)][:2] == [row["answer_id"] for row in complete[:2]]
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]  # the killed run's temporary is cleaned up


def test_kill_during_the_final_merge_keeps_every_answer(tiny_checkpoint, data, tmp_path):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    _killed_run(_arguments(tiny_checkpoint, root, answers))  # answers appended, then killed while reordering
    assert sorted(row["prompt"] for row in read_jsonl(answers)) == sorted(line["text"] for line in lines)


# --- settings fingerprint --------------------------------------------------------------------

def test_resume_under_other_settings_is_refused_naming_the_setting(tiny_checkpoint, data, tmp_path, capsys,
                                                                   monkeypatch):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--retention-ratio", "0.25")) == 0
    settings = read_jsonl(answers)[0]["metadata"]["settings"]
    assert settings["retention_ratio"] == 0.25 and settings["token_layout"] == "official"
    assert settings["model"] == "llava-next-tiny" and len(settings["model_hash"]) == 16 and settings["dtype"] == "float32"
    answers.write_text(answers.read_text().splitlines(keepends=True)[0])  # a run killed after one answer
    before = answers.read_text()
    capsys.readouterr()
    monkeypatch.setattr(runner, "load_pretrained_model", _refuse_model_load)
    for extra, setting in [(["--retention-ratio", "0.1"], "retention_ratio 0.25"),
                           (["--retention-ratio", "0.25", "--token-layout", "spatial"], "token_layout 'official'"),
                           (["--retention-ratio", "0.25", "--conv-mode", "vicuna_v1"], "conv_mode 'llava_v1'"),
                           (["--retention-ratio", "0.25", "--max_new_tokens", "7"], "max_new_tokens 1"),
                           (["--retention-ratio", "0.25", "--temperature", "0.2"], "temperature 0.0"),
                           (["--retention-ratio", "0.25", "--drop-ocr-tokens"], "drop_ocr_tokens False")]:
        status, err = _exit_status(lambda: model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, *extra)), capsys)
        assert status == 2 and f"holds answers made with {setting}" in err and "--overwrite" in err, err
        assert len(err.strip().splitlines()) == 1 and answers.read_text() == before
    monkeypatch.undo()

    # Another checkpoint (a copy under another name) is another model.
    other = tmp_path / "other-model"
    shutil.copytree(tiny_checkpoint, other)
    status, err = _exit_status(lambda: model_vqa_loader.main(
        _arguments(str(other), root, answers, "--retention-ratio", "0.25")), capsys)
    assert status == 2 and "made with model 'llava-next-tiny'" in err

    # --overwrite starts afresh and keeps the old file.
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--retention-ratio", "0.1", "--overwrite")) == 0
    assert (tmp_path / "a.jsonl.bak").read_text() == before
    rows = read_jsonl(answers)
    assert len(rows) == 3 and {row["metadata"]["settings"]["retention_ratio"] for row in rows} == {0.1}


def test_same_settings_resume_and_old_files_are_accepted(tiny_checkpoint, data, tmp_path, capsys):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--retention-ratio", "1")) == 0
    rows = read_jsonl(answers)
    # At R = 1 the layout changes nothing, so it is not part of the fingerprint.
    assert rows[0]["metadata"]["settings"]["token_layout"] is None
    for row in rows[:1]:
        del row["metadata"]["settings"]  # written by an older version
    answers.write_text(json.dumps(rows[0]) + "\n")
    capsys.readouterr()
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--retention-ratio", "1",
                                            "--token-layout", "spatial")) == 0
    assert "1 answer(s) record no settings" in capsys.readouterr().err
    assert len(read_jsonl(answers)) == 3


def test_science_runner_fingerprints_its_prompt_option(tiny_checkpoint, tmp_path, capsys):
    items = [{"id": "t1", "conversations": [{"from": "human", "value": "Which is hotter?\nA. sun\nB. ice"}]}]
    (tmp_path / "q.json").write_text(json.dumps(items))
    arguments = ["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "q.json"), "--answers-file",
                 str(tmp_path / "a.jsonl"), "--max_new_tokens", "1", "--device", "cpu"]
    assert model_vqa_science.main(arguments) == 0
    assert read_jsonl(tmp_path / "a.jsonl")[0]["metadata"]["settings"]["single_pred_prompt"] is False
    status, err = _exit_status(lambda: model_vqa_science.main(arguments + ["--single-pred-prompt"]), capsys)
    assert status == 2 and "single_pred_prompt False" in err


# --- one runner per answers file -------------------------------------------------------------

def test_second_runner_on_a_locked_file_stops_naming_the_first(tiny_checkpoint, data, tmp_path, capsys, no_model_load):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from llava.files import file_lock\n"
                               "with file_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
                               f"{answers}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.perf_counter()
        status, err = _exit_status(lambda: model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)), capsys)
        assert status == 2 and f"another runner (process {holder.pid}) is writing {answers}" in err
        assert time.perf_counter() - started < 10 and not answers.exists()
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    lock_is_free = file_lock(f"{answers}.lock")
    with lock_is_free:
        pass


def test_lock_held_in_this_process_also_refuses(tiny_checkpoint, data, tmp_path, capsys, no_model_load):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    with file_lock(f"{answers}.lock"):
        status, err = _exit_status(lambda: model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)), capsys)
    assert status == 2 and f"process {os.getpid()}" in err


def test_duplicated_answers_are_reduced_to_one_per_question(tiny_checkpoint, data, tmp_path):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)) == 0
    rows = read_jsonl(answers)
    answers.write_text("".join(json.dumps(row) + "\n" for row in [rows[0], rows[1], rows[1], rows[2], rows[0]]))
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers)) == 0
    assert [row["answer_id"] for row in read_jsonl(answers)] == [row["answer_id"] for row in rows]


# --- bad question files ----------------------------------------------------------------------

@pytest.mark.parametrize("bad_line, reason", [
    ({"question_id": 9, "text": "no image"}, "line 2: no 'image' field"),
    ({"question_id": 9, "image": "img0.jpg"}, "line 2: no 'text' field"),
    ('{"question_id": 9, "image": "img0.jpg", "te', "line 2: not valid JSON"),
    ("[1, 2]", "line 2: not a JSON object"),
])
def test_bad_question_line_is_one_error_before_the_model_loads(tiny_checkpoint, data, tmp_path, capsys, no_model_load,
                                                               bad_line, reason):
    root, lines = data
    _write_lines(tmp_path / "q.jsonl", [lines[0], bad_line, lines[1]])
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "a.jsonl")
    arguments[arguments.index("--question-file") + 1] = str(tmp_path / "q.jsonl")
    status, err = _exit_status(lambda: model_vqa_loader.main(arguments), capsys)
    assert status == 2 and reason in err and "--skip-bad-questions" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("conv_mode, model_path, asked", [
    ("llava_v1", "checkpoints/llava-next-tiny", "llava_v1"),
    ("v1", "checkpoints/llava-v1.5-7b-plain", "v1_mmtag"),        # upstream's rule for pretraining-only ones
    ("v0", "checkpoints/llava-plain", "v0_mmtag"),
    ("v1", "checkpoints/llava-v1.5-7b-plain-finetune", "v1"),     # not when the name says finetune
    ("v1_mmtag", "checkpoints/llava-v1.5-7b-plain", "v1_mmtag"),  # nor twice
])
def test_the_template_asked_in(conv_mode, model_path, asked):
    assert runner.asked_conv_mode(conv_mode, model_path) == asked


@pytest.mark.parametrize("conv_mode, model_name, reason", [
    ("nope", "llava-next-tiny", "--conv-mode: unknown template 'nope'; valid: chatml_direct"),
    ("vicuna_v1", "llava-v1.5-7b-plain", "upstream's rule asks in vicuna_v1_mmtag, which does not exist; pass "
                                         "--conv-mode v1 or v0"),
])
def test_a_template_that_does_not_exist_is_one_error_before_the_model_loads(data, tmp_path, capsys, no_model_load,
                                                                            conv_mode, model_name, reason):
    """Upstream stops with a KeyError after loading the model; here the runner stops before it."""
    root, _ = data
    arguments = _arguments(str(tmp_path / model_name), root, tmp_path / "a.jsonl", "--conv-mode", conv_mode)
    status, err = _exit_status(lambda: model_vqa_loader.main(arguments), capsys)
    assert status == 2 and reason in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_skip_bad_questions_warns_and_answers_the_rest(tiny_checkpoint, data, tmp_path, capsys):
    root, lines = data
    _write_lines(tmp_path / "q.jsonl", [lines[0], {"question_id": 9, "text": "x"}, "oops", lines[1]])
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "a.jsonl", "--skip-bad-questions")
    arguments[arguments.index("--question-file") + 1] = str(tmp_path / "q.jsonl")
    assert model_vqa_loader.main(arguments) == 0
    err = capsys.readouterr().err
    assert "2 bad question entries (line 2: no 'image' field; line 3: not valid JSON" in err and "left out" in err
    assert [row["question_id"] for row in read_jsonl(tmp_path / "a.jsonl")] == [0, 1]


# --- bad images and over-long prompts --------------------------------------------------------

def test_decompression_bomb_stops_or_is_recorded_and_the_run_finishes(tiny_checkpoint, data, bomb, tmp_path, capsys):
    root, lines = data
    shutil.copy(bomb, root / "huge.png")
    _write_lines(tmp_path / "q.jsonl", [lines[0], dict(lines[1], image="huge.png"), lines[2]])
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "a.jsonl")
    arguments[arguments.index("--question-file") + 1] = str(tmp_path / "q.jsonl")
    status, err = _exit_status(lambda: model_vqa_loader.main(arguments), capsys)
    assert status == 2 and "huge.png (question 1) is too large" in err and "--max-image-pixels" in err
    assert "Traceback" not in err and len(read_jsonl(tmp_path / "a.jsonl")) == 1
    for _ in range(2):  # and a rerun with record goes past it, every time
        assert model_vqa_loader.main(arguments + ["--on-image-error", "record"]) == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert len(rows) == 3 and rows[1]["text"] == "" and "too large" in rows[1]["metadata"]["error"]


def test_max_image_pixels_lowers_the_limit(tiny_checkpoint, data, tmp_path, capsys, monkeypatch):
    root, lines = data
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "a.jsonl", "--max-image-pixels", "1000")
    status, err = _exit_status(lambda: model_vqa_loader.main(arguments), capsys)  # 80x50 = 4000 > 2 x 1000
    assert status == 2 and "img0.jpg (question 0) is too large" in err
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_over_long_prompt_stops_or_is_recorded(tiny_checkpoint, data, tmp_path, capsys):
    root, lines = data
    long_text = "word " * 2100 + SUFFIX  # with 2046 visual tokens, past the tiny model's 4096
    _write_lines(tmp_path / "q.jsonl", [lines[0], {"question_id": 1, "image": "big.png", "text": long_text}])
    Image.new("RGB", (800, 500), (1, 2, 3)).save(root / "big.png")
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "a.jsonl", "--retention-ratio", "1")
    arguments[arguments.index("--question-file") + 1] = str(tmp_path / "q.jsonl")
    status, err = _exit_status(lambda: model_vqa_loader.main(arguments), capsys)
    assert status == 2 and "question 1: the prompt is" in err and "2046 visual tokens" in err and "at most 4096" in err
    assert model_vqa_loader.main(arguments + ["--on-image-error", "record"]) == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert rows[1]["text"] == "" and "at most 4096" in rows[1]["metadata"]["error"]
    assert model_vqa_loader.main(arguments + ["--overwrite", "--allow-truncation"]) == 0
    assert "cut to 4096 tokens" in capsys.readouterr().err


# --- output paths ----------------------------------------------------------------------------

def test_answers_file_under_a_file_is_one_clear_error(tiny_checkpoint, data, tmp_path, capsys, no_model_load):
    root, lines = data
    (tmp_path / "results").write_text("not a directory")
    status, err = _exit_status(lambda: model_vqa_loader.main(
        _arguments(tiny_checkpoint, root, tmp_path / "results" / "a.jsonl")), capsys)
    assert status == 2 and f"{tmp_path / 'results'} is a file, not a directory" in err


# --- selection records -----------------------------------------------------------------------

def test_save_selection_appends_with_each_answer_and_a_resume_adds_only_the_new_questions(tiny_checkpoint, data,
                                                                                          tmp_path, capsys):
    root, lines = data
    answers, selections = tmp_path / "a.jsonl", tmp_path / "selection.jsonl"
    arguments = _arguments(tiny_checkpoint, root, answers, "--method", "random", "--save-selection", str(selections))
    assert model_vqa_loader.main(arguments) == 0
    complete, records = read_jsonl(answers), read_jsonl(selections)
    assert [record["question_id"] for record in records] == [0, 1, 2]
    for row, record in zip(complete, records):
        assert record["compression"]["method"] == "random" and record["image_index"] == 0
        counted = record["selection"]["image_tokens"] + record["selection"]["newline_tokens"]
        assert counted == row["metadata"]["visual_tokens"] == record["accounting"]["tokens_after"]
    assert "save_selection" not in complete[0]["metadata"]["settings"]  # not part of the fingerprint

    # Killed after the first answer, halfway through the second record: the resume answers questions
    # 1 and 2 and appends their records after the first, the half line cut.
    answers.write_text(json.dumps(complete[0]) + "\n")
    first, second = selections.read_text().splitlines(keepends=True)[:2]
    selections.write_text(first + second[:50])
    assert model_vqa_loader.main(arguments) == 0
    assert read_jsonl(selections, report=sys.stderr) == records
    assert "malformed" not in capsys.readouterr().err

    # Another selection file does not change the settings: nothing is left to answer, nothing written.
    assert model_vqa_loader.main([*arguments[:-1], str(tmp_path / "other.jsonl")]) == 0
    assert not (tmp_path / "other.jsonl").exists()


# --- --reverse-crops -------------------------------------------------------------------------

def test_reverse_crop_order_reverses_the_crops_and_keeps_the_thumbnail_first():
    import torch

    from llava.generation import reverse_crop_order

    views = torch.arange(2 * 5).float().view(2, 5, 1, 1, 1).expand(2, 5, 3, 2, 2)  # view v of image i holds 5 i + v
    assert reverse_crop_order(views)[:, :, 0, 0, 0].tolist() == [[0, 4, 3, 2, 1], [5, 9, 8, 7, 6]]
    ragged = [views[0, :3], views[1, :2], views[1, :1]]  # two crops, one crop, no crop
    assert [image[:, 0, 0, 0].tolist() for image in reverse_crop_order(ragged)] == [[0, 2, 1], [5, 6], [5]]
    with pytest.raises(ValueError, match="no crops to reverse"):
        reverse_crop_order(views[:, 0])  # one view per image: [N, 3, S, S]


def test_reversed_crops_reach_the_language_model_in_reversed_order(tiny):
    """A 672x672 image fills the 2x2 grid exactly (no unpadding loss): the canvas is 48 rows of 48
    tokens and a newline after the 576 thumbnail tokens. Reversed, crop slot (0, 0) holds the last
    crop (vanilla's block (1, 1)), slot (0, 1) the third (vanilla's (1, 0)), and so on."""
    import torch
    from PIL import Image

    from llava.generation import reverse_crop_order
    from llava.mm_utils import process_images

    _, model, processor = tiny
    image = Image.effect_noise((672, 672), 80).convert("RGB")
    pixel_values = process_images([image], processor, model.config)
    model.set_compression(retention_ratio=1.0)
    try:
        with torch.no_grad():
            vanilla = model.encode_image_sequences(pixel_values, [image.size])[0]
            reversed_sequence = model.encode_image_sequences(reverse_crop_order(pixel_values), [image.size])[0]
    finally:
        model.set_compression()
    assert vanilla.shape == reversed_sequence.shape == (576 + 48 * 49, vanilla.shape[-1])
    assert torch.allclose(reversed_sequence[:576], vanilla[:576], atol=1e-5)  # the thumbnail stays first

    def block(sequence, crop):  # the crop's 24x24 tokens in the canvas (row-major crops, newline dropped)
        canvas = sequence[576:].view(48, 49, -1)[:, :48]
        row, column = divmod(crop, 2)
        return canvas[24 * row:24 * (row + 1), 24 * column:24 * (column + 1)]

    for slot in range(4):
        assert torch.allclose(block(reversed_sequence, slot), block(vanilla, 3 - slot), atol=1e-5)
    assert not torch.allclose(block(vanilla, 0), block(vanilla, 3), atol=1e-3)  # the crops differ: the test can fail


def test_reverse_crops_is_recorded_per_image_and_in_the_fingerprint(tiny_checkpoint, data, tmp_path, capsys):
    root, lines = data
    answers = tmp_path / "a.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--retention-ratio", "0.25",
                                            "--reverse-crops")) == 0
    rows = read_jsonl(answers)
    assert all(row["metadata"]["settings"]["reverse_crops"] is True for row in rows)
    for row in rows:
        (image,) = row["metadata"]["images"]
        assert image["crops_reversed"] is (len(image["crop_valid"]) > 1)
    assert any(row["metadata"]["images"][0]["crops_reversed"] for row in rows)
    answers.write_text(answers.read_text().splitlines(keepends=True)[0])
    status, err = _exit_status(lambda: model_vqa_loader.main(
        _arguments(tiny_checkpoint, root, answers, "--retention-ratio", "0.25")), capsys)
    assert status == 2 and "holds answers made with reverse_crops True" in err

    # Without the option nothing is recorded per image (answers as before), and old files resume.
    plain = tmp_path / "plain.jsonl"
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, plain, "--retention-ratio", "0.25")) == 0
    assert all("crops_reversed" not in row["metadata"]["images"][0] for row in read_jsonl(plain))


def test_reverse_crops_is_refused_for_a_model_without_crops(tiny_checkpoint, data, tmp_path, capsys):
    root, lines = data
    single_view = tmp_path / "llava-tiny-pad"
    shutil.copytree(tiny_checkpoint, single_view)
    config = json.loads((single_view / "config.json").read_text())
    (single_view / "config.json").write_text(json.dumps(dict(config, image_aspect_ratio="pad")))
    status, err = _exit_status(lambda: model_vqa_loader.main(
        _arguments(str(single_view), root, tmp_path / "a.jsonl", "--reverse-crops")), capsys)
    assert status == 2 and "--reverse-crops" in err and "no crops to reverse" in err
    assert not (tmp_path / "a.jsonl").exists()  # refused before any answer
