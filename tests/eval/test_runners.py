"""The benchmark runners on the tiny checkpoint: answers in question order with accounting,
resume after an interruption, chunks, several ranks, image errors, and each runner's prompt rules."""

import base64
import io
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

from llava.eval import model_vqa, model_vqa_loader, model_vqa_mmbench, model_vqa_science, runner
from llava.eval.jsonl import read_jsonl
from llava.eval.runner import Question, get_chunk, order_answers, pending_questions
from llava.generation import _batched_pixel_values, prepare_images
from llava.mm_utils import process_images

SUFFIX = "\nAnswer the question using a single word or phrase."


# --- pure parts ------------------------------------------------------------------------------

def test_chunks_follow_upstream_split():
    items = list(range(10))
    assert [get_chunk(items, 8, index) for index in range(8)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [], [], []]
    assert get_chunk(items, 3, 2) == [8, 9] and get_chunk(items, 1, 0) == items
    with pytest.raises(ValueError, match="chunk-idx"):
        get_chunk(items, 2, 2)


def test_repeated_ids_are_matched_with_multiplicity():
    # TextVQA: the id is the image's, so two questions can share id and even prompt.
    questions = [Question("img", "q1", ""), Question("img", "q2", ""), Question("img", "q1", ""), Question(7, "q", "")]
    rows = [{"question_id": "img", "prompt": "q1", "text": "b"}, {"question_id": 7, "prompt": "q", "text": "d"},
            {"question_id": "img", "prompt": "q1", "text": "a"}]
    assert [question.prompt for question in pending_questions(questions, rows)] == ["q2"]
    assert [row["text"] for row in order_answers(questions, rows)] == ["b", "a", "d"]
    assert [question.prompt for question in pending_questions(questions, rows[:1])] == ["q2", "q1", "q"]


# --- the loader runner end to end ------------------------------------------------------------

@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    sizes = [(80, 50), (50, 90), (64, 64), (300, 40)]
    for index, size in enumerate(sizes):
        Image.new("RGB", size, (60 * index, 100, 50)).save(root / f"img{index}.jpg")
    lines = [{"question_id": index, "image": f"img{index}.jpg", "text": f"Is there a cat {index}?{SUFFIX}"} for index in range(4)]
    lines.append({"question_id": 0, "image": "img0.jpg", "text": f"What is written?\nReference OCR token: a, b{SUFFIX}"})
    with open(root / "questions.jsonl", "w") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)
    return root, lines


def _loader(checkpoint, root, answers, *extra):
    return model_vqa_loader.main(["--model-path", checkpoint, "--question-file", str(root / "questions.jsonl"),
                                  "--image-folder", str(root), "--answers-file", str(answers),
                                  "--temperature", "0", "--max_new_tokens", "2", *extra])


def test_answers_in_question_order_with_accounting(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    assert _loader(tiny_checkpoint, root, tmp_path / "a.jsonl", "--retention-ratio", "0.25") == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [(row["question_id"], row["prompt"]) for row in rows] == [(line["question_id"], line["text"]) for line in lines]
    meta = rows[0]["metadata"]
    assert meta["retention_ratio"] == 0.25 and meta["token_layout"] == "official"
    assert meta["visual_tokens"] == meta["images"][0]["tokens_after"] < meta["visual_tokens_before"]
    assert rows[-1]["metadata"]["ocr_tokens_shown"] is True and "ocr_tokens_shown" not in meta
    assert all(set(row) >= {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} for row in rows)


def test_resume_after_an_interruption(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    answers = tmp_path / "a.jsonl"
    _loader(tiny_checkpoint, root, answers)
    complete = read_jsonl(answers)
    # A killed run: two answers (out of order), then half a line.
    with open(answers, "w") as file:
        file.write(json.dumps(complete[3]) + "\n" + json.dumps(complete[1]) + "\n" + json.dumps(complete[2])[:40])
    _loader(tiny_checkpoint, root, answers)
    resumed = read_jsonl(answers)
    assert [row["prompt"] for row in resumed] == [line["text"] for line in lines]
    kept = {row["answer_id"] for row in resumed}
    assert complete[3]["answer_id"] in kept and complete[1]["answer_id"] in kept and complete[2]["answer_id"] not in kept
    assert [row["text"] for row in resumed] == [row["text"] for row in complete]  # greedy: same answers
    # A complete file: nothing to redo, nothing changes.
    before = answers.read_text()
    _loader(tiny_checkpoint, root, answers)
    assert answers.read_text() == before


def test_chunks_concatenate_to_the_whole(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    for index in range(2):
        _loader(tiny_checkpoint, root, tmp_path / f"2_{index}.jsonl", "--num-chunks", "2", "--chunk-idx", str(index))
    merged = read_jsonl(tmp_path / "2_0.jsonl") + read_jsonl(tmp_path / "2_1.jsonl")
    assert [row["prompt"] for row in merged] == [line["text"] for line in lines]
    assert len(read_jsonl(tmp_path / "2_0.jsonl")) == 3  # ceil(5 / 2)


def test_missing_image_stops_naming_question_and_file(tiny_checkpoint, vqa_data, tmp_path, capsys):
    root, lines = vqa_data
    broken = tmp_path / "questions.jsonl"
    with open(broken, "w") as file:
        for line in lines[:2] + [dict(lines[2], image="gone.jpg")] + lines[3:]:
            file.write(json.dumps(line) + "\n")
    args = ["--model-path", tiny_checkpoint, "--question-file", str(broken), "--image-folder", str(root),
            "--answers-file", str(tmp_path / "a.jsonl"), "--max_new_tokens", "1"]
    with pytest.raises(SystemExit) as stop:
        model_vqa_loader.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "question 2" in err and "gone.jpg" in err and "Traceback" not in err
    assert len(read_jsonl(tmp_path / "a.jsonl")) == 2  # the answers before it are kept
    assert model_vqa_loader.main(args + ["--on-image-error", "record"]) == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert len(rows) == 5 and rows[2]["text"] == "" and "gone.jpg" in rows[2]["metadata"]["error"]


def test_ocr_tokens_can_be_hidden_from_the_model():
    text = f"What is written?\nReference OCR token: a, b{SUFFIX}"
    assert model_vqa_loader.image_query(text) == "<image>\n" + text
    assert model_vqa_loader.image_query(text, drop_ocr_tokens=True) == f"<image>\nWhat is written?{SUFFIX}"


def test_two_ranks_under_torchrun(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    answers = tmp_path / "a.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "llava.eval.model_vqa_loader", "--model-path", tiny_checkpoint,
               "--question-file", str(root / "questions.jsonl"), "--image-folder", str(root),
               "--answers-file", str(answers), "--max_new_tokens", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [row["prompt"] for row in read_jsonl(answers)] == [line["text"] for line in lines]
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]  # the ranks' parts are merged and removed


def test_model_vqa_allows_long_answers():
    args = model_vqa.build_parser("x", max_new_tokens=1024).parse_args([])
    assert args.max_new_tokens == 1024 and args.temperature == 0.2 and args.conv_mode == "llava_v1"


# --- ScienceQA -------------------------------------------------------------------------------

def test_science_prompts_and_image_modes(tiny_checkpoint, tmp_path):
    os.makedirs(tmp_path / "images" / "1")
    checker = Image.new("P", (60, 40))
    checker.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    checker.save(tmp_path / "images" / "1" / "image.png")
    items = [
        {"id": "1", "image": "1/image.png", "conversations": [{"from": "human", "value": "<image>\nContext: c\nWhich?\nA. x\nB. y"}]},
        {"id": "2", "conversations": [{"from": "human", "value": " Which one?\nA. x\nB. y "}]},
    ]
    question = model_vqa_science.science_question(items[0], str(tmp_path / "images"), single_pred_prompt=True)
    assert question.prompt == question.query == "<image>\nContext: c\nWhich?\nA. x\nB. y\n" + model_vqa_science.LETTER_PROMPT
    assert question.load_images()[0].mode == "P"  # not converted, as upstream
    text_only = model_vqa_science.science_question(items[1], "", single_pred_prompt=False)
    assert text_only.prompt == "Which one?\nA. x\nB. y" and text_only.load_images() == []
    (tmp_path / "q.json").write_text(json.dumps(items))
    assert model_vqa_science.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "q.json"),
                                   "--image-folder", str(tmp_path / "images"), "--answers-file", str(tmp_path / "a.jsonl"),
                                   "--single-pred-prompt", "--max_new_tokens", "2"]) == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [row["question_id"] for row in rows] == ["1", "2"] and "<image>" in rows[0]["prompt"]
    assert rows[0]["metadata"]["visual_tokens"] > 0 and rows[1]["metadata"]["visual_tokens"] == 0


# --- MMBench ---------------------------------------------------------------------------------

def _png_base64(mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (40, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mmbench_options_hint_and_rounds(tiny_checkpoint, tmp_path):
    table = pd.DataFrame([
        {"index": 5, "question": "Q1?", "hint": "H", "A": "a1", "B": "b1", "C": "c1", "D": None, "answer": "A", "image": _png_base64()},
        {"index": 9, "question": "Q2?", "hint": None, "A": "a2", "B": None, "C": "c2", "D": "d2", "answer": "A", "image": _png_base64("RGBA")},
    ])
    table.to_csv(tmp_path / "mmb.tsv", sep="\t", index=False)
    rows = list(pd.read_table(tmp_path / "mmb.tsv").iterrows())
    first = model_vqa_mmbench.mmbench_questions(rows[0][1], all_rounds=True, single_pred_prompt=True, lang="en")
    assert [question.prompt for question in first] == ["H\nQ1?\nA. a1\nB. b1\nC. c1", "H\nQ1?\nA. b1\nB. c1\nC. a1",
                                                       "H\nQ1?\nA. c1\nB. a1\nC. b1"]
    assert first[1].extra == {"round_id": 1, "options": ["b1", "c1", "a1"], "option_char": ["B", "C", "A"]}
    assert first[0].query == "<image>\n" + first[0].prompt + "\nAnswer with the option's letter from the given choices directly."
    second = model_vqa_mmbench.mmbench_questions(rows[1][1], all_rounds=False, single_pred_prompt=True, lang="cn")
    assert second[0].prompt == "Q2?\nA. a2" and second[0].query.endswith("\n请直接回答选项字母。")  # B empty: stop at A
    assert second[0].question_id == 9 and second[0].load_images()[0].mode == "RGBA"
    assert model_vqa_mmbench.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "mmb.tsv"),
                                   "--answers-file", str(tmp_path / "a.jsonl"), "--single-pred-prompt",
                                   "--max_new_tokens", "1", "--all-rounds"]) == 0
    answers = read_jsonl(tmp_path / "a.jsonl")
    assert [(row["question_id"], row["round_id"]) for row in answers] == [(5, 0), (5, 1), (5, 2), (9, 0)]


@pytest.mark.parametrize("value, empty", [(None, True), (float("nan"), True), ("nan", True), ("None", True),
                                          ("NONE", True), ("", False), ("0", False), ("nothing", False)])
def test_mmbench_none_like_cells(value, empty):
    assert model_vqa_mmbench.is_none(value) is empty


# --- --batch-size ----------------------------------------------------------------------------

def _without_answer_ids(rows):
    return [{key: value for key, value in row.items() if key != "answer_id"} for row in rows]


def _by_question(records):
    return sorted(records, key=lambda record: (json.dumps(record["question_id"]), record["image_index"]))


def test_batches_give_the_answers_file_of_batch_one(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    files = {}
    for size in ("1", "3"):
        files[size] = (tmp_path / f"b{size}.jsonl", tmp_path / f"s{size}.jsonl")
        assert _loader(tiny_checkpoint, root, files[size][0], "--retention-ratio", "0.25", "--max_new_tokens", "4",
                       "--save-selection", str(files[size][1]), "--batch-size", size) == 0
    one, three = (read_jsonl(files[size][0]) for size in ("1", "3"))
    assert [row["prompt"] for row in three] == [line["text"] for line in lines]
    assert _without_answer_ids(three) == _without_answer_ids(one)  # texts, ids, order, metadata
    assert len({row["metadata"]["visual_tokens"] for row in one}) > 2  # the batches were ragged
    # The selection records are appended batch by batch, not in question order; each question's are its own.
    assert _by_question(read_jsonl(files["3"][1])) == _by_question(read_jsonl(files["1"][1]))


KILLED_AFTER_ONE_BATCH = """
import os, signal, sys
from llava.eval import model_vqa_loader, runner
real_answer_prepared, calls = runner.answer_prepared, []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the first batch's answers are written: killed during the second
        os.kill(os.getpid(), signal.SIGKILL)
    return real_answer_prepared(*args, **kwargs)

runner.answer_prepared = dying
model_vqa_loader.main(sys.argv[1:])
"""


def test_a_batched_run_killed_mid_run_resumes_without_redoing_or_losing_answers(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    answers = tmp_path / "a.jsonl"
    arguments = ["--model-path", tiny_checkpoint, "--question-file", str(root / "questions.jsonl"),
                 "--image-folder", str(root), "--answers-file", str(answers), "--temperature", "0",
                 "--max_new_tokens", "2", "--device", "cpu", "--batch-size", "3"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ONE_BATCH, *arguments], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    first_batch = read_jsonl(answers)
    assert len(first_batch) == 3  # written as its batch finished, in the batch's order
    assert model_vqa_loader.main(arguments) == 0
    resumed = read_jsonl(answers)
    assert [row["prompt"] for row in resumed] == [line["text"] for line in lines]
    assert {row["answer_id"] for row in first_batch} < {row["answer_id"] for row in resumed}  # kept, not redone
    assert model_vqa_loader.main(arguments[:-2] + ["--answers-file", str(tmp_path / "b1.jsonl")]) == 0
    assert [row["text"] for row in resumed] == [row["text"] for row in read_jsonl(tmp_path / "b1.jsonl")]


def test_a_bad_image_in_a_batch_is_that_questions_error_only(tiny_checkpoint, vqa_data, tmp_path, capsys):
    root, lines = vqa_data
    broken = tmp_path / "questions.jsonl"
    with open(broken, "w") as file:
        for line in [lines[0], dict(lines[1], image="gone.jpg"), lines[2]]:
            file.write(json.dumps(line) + "\n")
    common = ["--model-path", tiny_checkpoint, "--question-file", str(broken), "--image-folder", str(root),
              "--temperature", "0", "--max_new_tokens", "2", "--batch-size", "3"]
    with pytest.raises(SystemExit):  # stop: the question before it is answered first
        model_vqa_loader.main(common + ["--answers-file", str(tmp_path / "stop.jsonl")])
    assert "gone.jpg" in capsys.readouterr().err and len(read_jsonl(tmp_path / "stop.jsonl")) == 1
    assert model_vqa_loader.main(common + ["--answers-file", str(tmp_path / "a.jsonl"), "--on-image-error",
                                           "record"]) == 0
    rows = read_jsonl(tmp_path / "a.jsonl")
    assert [row["question_id"] for row in rows] == [0, 1, 2] and rows[1]["text"] == ""
    assert ["error" in row["metadata"] for row in rows] == [False, True, False]
    assert "gone.jpg" in rows[1]["metadata"]["error"]
    single = tmp_path / "one.jsonl"
    assert model_vqa_loader.main(common[:-2] + ["--answers-file", str(single), "--on-image-error", "record"]) == 0
    assert [row["text"] for row in rows] == [row["text"] for row in read_jsonl(single)]


def test_an_over_long_prompt_in_a_batch_is_that_questions_error_only(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    long_text = "word " * 2100 + SUFFIX  # past the tiny model's 4096 tokens with any image
    with open(tmp_path / "q.jsonl", "w") as file:
        for line in [lines[0], dict(lines[1], text=long_text), lines[2]]:
            file.write(json.dumps(line) + "\n")
    common = ["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "q.jsonl"), "--image-folder",
              str(root), "--temperature", "0", "--max_new_tokens", "2", "--on-image-error", "record"]
    assert model_vqa_loader.main(common + ["--answers-file", str(tmp_path / "b3.jsonl"), "--batch-size", "3"]) == 0
    assert model_vqa_loader.main(common + ["--answers-file", str(tmp_path / "b1.jsonl")]) == 0
    three, one = read_jsonl(tmp_path / "b3.jsonl"), read_jsonl(tmp_path / "b1.jsonl")
    assert ["error" in row["metadata"] for row in three] == [False, True, False]
    assert _without_answer_ids(three) == _without_answer_ids(one)


def test_science_batches_mix_questions_with_and_without_an_image(tiny_checkpoint, tmp_path):
    Image.new("P", (60, 40)).save(tmp_path / "image.png")
    items = [{"id": str(index), "conversations": [{"from": "human", "value": "Which?" + " x" * index}],
              **({"image": "image.png"} if index % 2 else {})} for index in range(4)]
    (tmp_path / "q.json").write_text(json.dumps(items))
    files = []
    for size in ("1", "4"):
        files.append(tmp_path / f"b{size}.jsonl")
        assert model_vqa_science.main(["--model-path", tiny_checkpoint, "--question-file", str(tmp_path / "q.json"),
                                       "--image-folder", str(tmp_path), "--answers-file", str(files[-1]),
                                       "--temperature", "0", "--max_new_tokens", "3", "--batch-size", size]) == 0
    one, four = (read_jsonl(path) for path in files)
    assert [row["metadata"]["visual_tokens"] > 0 for row in four] == [False, True, False, True]
    assert _without_answer_ids(four) == _without_answer_ids(one)


def test_batch_size_must_be_a_whole_number_of_at_least_one():
    parser = model_vqa.build_parser("x", max_new_tokens=8)
    assert parser.parse_args([]).batch_size == 1 and parser.parse_args(["--batch-size", "4"]).batch_size == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--batch-size", bad])


# --- --num-workers ---------------------------------------------------------------------------

def test_workers_give_the_answers_file_of_no_workers(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    for size in ("1", "3"):
        files = {}
        for workers in ("0", "2"):
            files[workers] = (tmp_path / f"b{size}w{workers}.jsonl", tmp_path / f"s{size}w{workers}.jsonl")
            assert _loader(tiny_checkpoint, root, files[workers][0], "--retention-ratio", "0.25", "--max_new_tokens",
                           "4", "--save-selection", str(files[workers][1]), "--batch-size", size,
                           "--num-workers", workers) == 0
        none, two = (read_jsonl(files[workers][0]) for workers in ("0", "2"))
        assert [row["prompt"] for row in two] == [line["text"] for line in lines]
        assert _without_answer_ids(two) == _without_answer_ids(none)
        assert read_jsonl(files["2"][1]) == read_jsonl(files["0"][1])  # the same batches, in the same order


def test_a_bad_image_with_workers_is_that_questions_error_only(tiny_checkpoint, vqa_data, tmp_path, capsys):
    root, lines = vqa_data
    broken = tmp_path / "questions.jsonl"
    with open(broken, "w") as file:
        for line in lines[:2] + [dict(lines[2], image="gone.jpg")] + lines[3:]:
            file.write(json.dumps(line) + "\n")
    common = ["--model-path", tiny_checkpoint, "--question-file", str(broken), "--image-folder", str(root),
              "--temperature", "0", "--max_new_tokens", "2"]
    for workers in ("0", "2"):
        with pytest.raises(SystemExit) as stop:
            model_vqa_loader.main(common + ["--answers-file", str(tmp_path / f"stop{workers}.jsonl"),
                                            "--num-workers", workers])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "Traceback" not in err and "DataLoader" not in err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            f"error: image file not found: {root / 'gone.jpg'} (question 2)"]
        assert len(read_jsonl(tmp_path / f"stop{workers}.jsonl")) == 2  # the answers before it are kept
        assert model_vqa_loader.main(common + ["--answers-file", str(tmp_path / f"rec{workers}.jsonl"),
                                               "--num-workers", workers, "--on-image-error", "record"]) == 0
    recorded = read_jsonl(tmp_path / "rec2.jsonl")
    assert ["error" in row["metadata"] for row in recorded] == [False, False, True, False, False]
    assert _without_answer_ids(recorded) == _without_answer_ids(read_jsonl(tmp_path / "rec0.jsonl"))


def test_another_front_end_error_reaches_the_user_as_its_own_line(tiny_checkpoint, tmp_path, capsys):
    def unreadable():
        raise OSError("disk gone")

    questions = [Question(0, "q", "<image>\nq", load_images=unreadable)]
    args = runner.build_parser("x", max_new_tokens=1).parse_args(
        ["--model-path", tiny_checkpoint, "--answers-file", str(tmp_path / "a.jsonl"), "--num-workers", "1"])
    with pytest.raises(SystemExit) as stop:
        runner.run(args, lambda: questions)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.strip().splitlines()[-1] == "error: disk gone" and "Traceback" not in err


KILLED_WITH_WORKERS = KILLED_AFTER_ONE_BATCH.replace("len(calls) == 2", "len(calls) == 3")


def test_a_run_with_workers_killed_mid_run_resumes_at_once(tiny_checkpoint, vqa_data, tmp_path):
    root, lines = vqa_data
    answers = tmp_path / "a.jsonl"
    arguments = ["--model-path", tiny_checkpoint, "--question-file", str(root / "questions.jsonl"),
                 "--image-folder", str(root), "--answers-file", str(answers), "--temperature", "0",
                 "--max_new_tokens", "2", "--device", "cpu", "--num-workers", "2"]
    # Output to a file, not a pipe: run() would wait for every holder of a pipe, the workers included, to exit.
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.run([sys.executable, "-c", KILLED_WITH_WORKERS, *arguments], stdout=log, stderr=log,
                                timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -9, (tmp_path / "killed.log").read_text()[-2000:]
    first_two = read_jsonl(answers)
    assert len(first_two) == 2
    # At once: the killed runner's workers may live on for seconds, but they hold no lock.
    assert model_vqa_loader.main(arguments) == 0
    resumed = read_jsonl(answers)
    assert [row["prompt"] for row in resumed] == [line["text"] for line in lines]
    assert {row["answer_id"] for row in first_two} < {row["answer_id"] for row in resumed}
    assert model_vqa_loader.main(arguments[:-1] + ["0", "--answers-file", str(tmp_path / "w0.jsonl")]) == 0
    assert [row["text"] for row in resumed] == [row["text"] for row in read_jsonl(tmp_path / "w0.jsonl")]


def test_prepared_images_batch_as_process_images_does(tiny):
    _, model, processor = tiny
    config = model.input_config(model.compression_settings())
    for sizes in ([(80, 50), (50, 90)], [(64, 64), (70, 70)], [(300, 40)]):  # different, equal, one view count
        images = [Image.new("RGB", size, (10 * index, 200, 30)) for index, size in enumerate(sizes)]
        together = process_images(images, processor, config)
        prepared = prepare_images(images, processor, config, torch.float32)
        batched = _batched_pixel_values(prepared.pixel_values, "cpu")
        assert prepared.sizes == sizes and type(batched) is type(together)
        for mine, theirs in zip(batched, together):
            assert torch.equal(mine, theirs)


def test_num_workers_must_be_a_whole_number_of_at_least_zero():
    parser = model_vqa.build_parser("x", max_new_tokens=8)
    assert parser.parse_args([]).num_workers is None  # the default follows the device
    assert runner.default_num_workers(torch.device("cpu")) == 0
    assert 0 <= runner.default_num_workers(torch.device("cuda")) <= 4
    assert parser.parse_args(["--num-workers", "0"]).num_workers == 0
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--num-workers", bad])
