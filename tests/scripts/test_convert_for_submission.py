"""The submission converters (VQAv2, VizWiz, MMBench, SEED-Bench, MM-Vet) on small hand-made files
whose expected outputs are worked out by hand (spec §2.2, §2.3, §2.8, §2.9, §2.11).

EvalAI normalisation of the answers used here (spec §3.1): "Two dogs." -> "2 dogs",
"The Yes" -> "yes", "A red Bottle." -> "red bottle", "Unanswerable" -> "unanswerable".
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import openpyxl
import pandas as pd
import pytest

from llava.eval.answers import UserError, answer_texts, missing_answers_message

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vqav2 = load_script("convert_vqav2_for_submission")
vizwiz = load_script("convert_vizwiz_for_submission")
mmbench = load_script("convert_mmbench_for_submission")
seed = load_script("convert_seed_for_submission")
mmvet = load_script("convert_mmvet_for_eval")


def write_lines(path: pathlib.Path, lines: list) -> pathlib.Path:
    """Rows as JSON lines; a str is written as it is (to make malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *args], capture_output=True, text=True)


# ---------------------------------------------------------------- shared answers loading


def test_answer_texts_keeps_the_later_prompt_of_an_id_at_the_first_position(tmp_path, capsys):
    # MMBench's --all-rounds asks one question_id again with its options rotated
    path = write_lines(tmp_path / "answers.jsonl", [
        {"question_id": 2, "prompt": "round 1", "text": "first"},
        "{broken",
        {"question_id": 1, "prompt": "round 1", "text": "one"},
        {"question_id": 2, "prompt": "round 2", "text": "second"},
    ])
    assert list(answer_texts(path).items()) == [(2, "second"), (1, "one")]
    assert "skipped 1 malformed line(s) (line 2)" in capsys.readouterr().err


def test_answer_texts_refuses_a_question_answered_twice(tmp_path):
    path = write_lines(tmp_path / "answers.jsonl", [{"question_id": 2, "text": "first"}, {"question_id": 2, "text": "again"}])
    with pytest.raises(UserError, match=r"answers.jsonl: 1 question\(s\) are answered more than once \(question_id 2 x2\)"):
        answer_texts(path)


def test_answer_texts_names_a_line_without_text(tmp_path):
    path = write_lines(tmp_path / "answers.jsonl", [{"question_id": 1, "answer": "A"}])
    with pytest.raises(UserError, match="has no 'text'"):
        answer_texts(path)


def test_missing_answers_message_lists_at_most_ten_ids():
    message = missing_answers_message(list(range(12)), "a.jsonl")
    assert message == "12 question(s) have no answer in a.jsonl: question_id 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ..."
    assert missing_answers_message(["7"], "a.jsonl") == "1 question(s) have no answer in a.jsonl: question_id '7'"


# ---------------------------------------------------------------- VQAv2


def vqav2_tree(tmp_path) -> pathlib.Path:
    """Test list in the order 3, 1, 4, 2; answers to 1 and 4, one malformed line and one answer
    to a question outside the list."""
    root = tmp_path / "vqav2"
    write_lines(root / "llava_vqav2_mscoco_test2015.jsonl",
                [{"question_id": qid, "image": f"COCO_test2015_{qid:012d}.jpg", "text": "q"} for qid in (3, 1, 4, 2)])
    write_lines(root / "answers" / "test-dev" / "ckpt" / "merge.jsonl", [
        {"question_id": 1, "text": "Two dogs."},
        "not json",
        {"question_id": 4, "text": "The Yes"},
        {"question_id": 99, "text": "cat"},
    ])
    return root


VQAV2_UPLOAD = ('[{"question_id": 3, "answer": ""}, {"question_id": 1, "answer": "2 dogs"}, '
                '{"question_id": 4, "answer": "yes"}, {"question_id": 2, "answer": ""}]')


def test_vqav2_upload_rows_follow_the_test_list_and_leave_unanswered_empty():
    rows = vqav2.upload_rows([3, 1, 2], {1: "a", 2: "b", 7: "c"}, str.upper)
    assert rows == [{"question_id": 3, "answer": ""}, {"question_id": 1, "answer": "A"}, {"question_id": 2, "answer": "B"}]


def test_vqav2_main_writes_the_upload(tmp_path, capsys):
    root = vqav2_tree(tmp_path)
    assert vqav2.main(["--dir", str(root), "--ckpt", "ckpt", "--split", "test-dev"]) == 0
    out, err = capsys.readouterr()
    assert out == "total results: 3, total split: 4\n"
    assert "skipped 1 malformed line(s) (line 2)" in err
    assert "1 answer(s)" in err and "match no question" in err
    # Byte for byte what upstream's json.dump writes.
    assert (root / "answers_upload" / "test-dev" / "ckpt.json").read_text() == VQAV2_UPLOAD


def test_vqav2_script_end_to_end(tmp_path):
    root = vqav2_tree(tmp_path)
    result = run_script("convert_vqav2_for_submission", "--dir", str(root), "--ckpt", "ckpt", "--split", "test-dev")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "total results: 3, total split: 4\n"
    assert (root / "answers_upload" / "test-dev" / "ckpt.json").read_text() == VQAV2_UPLOAD


def test_vqav2_missing_answers_file_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vqav2.main(["--dir", str(tmp_path), "--ckpt", "ckpt", "--split", "test-dev"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "merge.jsonl" in err and "\n" == err[-1] and err.count("\n") == 1


# ---------------------------------------------------------------- VizWiz


def vizwiz_files(tmp_path, answers: list) -> list[str]:
    questions = write_lines(tmp_path / "llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": "What is this?"},
        {"question_id": 1, "image": "VizWiz_test_00000001.jpg", "text": "What color?"},
    ])
    result = write_lines(tmp_path / "answers.jsonl", answers)
    return ["--annotation-file", str(questions), "--result-file", str(result),
            "--result-upload-file", str(tmp_path / "upload" / "vizwiz.json")]


def test_vizwiz_upload_has_image_and_normalised_answer_in_question_order(tmp_path, capsys):
    args = vizwiz_files(tmp_path, [
        {"question_id": 1, "text": "Unanswerable"},
        "{",
        {"question_id": 0, "text": "A red Bottle."},
    ])
    assert vizwiz.main(args) == 0
    assert capsys.readouterr().out == "total results: 2, total split: 2\n"
    assert (tmp_path / "upload" / "vizwiz.json").read_text() == (
        '[{"image": "VizWiz_test_00000000.jpg", "answer": "red bottle"}, '
        '{"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"}]')


def test_vizwiz_unanswered_question_is_named_and_nothing_is_written(tmp_path, capsys):
    args = vizwiz_files(tmp_path, [{"question_id": 0, "text": "yes"}])
    with pytest.raises(SystemExit) as exit_info:
        vizwiz.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: 1 question(s) have no answer in {tmp_path / 'answers.jsonl'}: question_id 1\n"
    assert not (tmp_path / "upload" / "vizwiz.json").exists()


# ---------------------------------------------------------------- MMBench

MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]


def mmbench_tsv(tmp_path) -> pathlib.Path:
    rows = [
        [0, "What is it?", "nan", "cat", "dog", "bird", "fish", "A", "c1", "aW1n", "s", "l2", "nan", "dev"],
        [1, "Which color?", "A hint", "red", "blue", "", "", "B", "c2", "aW1n", "s", "l2", "nan", "dev"],
        [1000000, "What is it?", "nan", "dog", "bird", "fish", "cat", "D", "c1", "aW1n", "s", "l2", "nan", "dev"],
    ]
    path = tmp_path / "mmbench_dev.tsv"
    path.write_text("\n".join("\t".join(map(str, row)) for row in [MMBENCH_COLUMNS, *rows]) + "\n")
    return path


def test_mmbench_spreadsheet_columns_and_raw_predictions(tmp_path, capsys):
    tsv = mmbench_tsv(tmp_path)
    write_lines(tmp_path / "answers" / "exp.jsonl", [
        {"question_id": 0, "prompt": "round 1", "text": "B"},
        {"question_id": 1000000, "prompt": "round 1", "text": " D."},
        {"question_id": 0, "prompt": "round 2", "text": "A"},  # --all-rounds: options rotated
        {"question_id": 5, "prompt": "round 1", "text": "C"},
    ])
    args = ["--annotation-file", str(tsv), "--result-dir", str(tmp_path / "answers"),
            "--upload-dir", str(tmp_path / "upload" / "dev"), "--experiment", "exp"]
    assert mmbench.main(args) == 0
    err = capsys.readouterr().err
    assert "1 answer(s)" in err and "match no index" in err
    assert "1 question(s) have no answer" in err

    sheet = openpyxl.load_workbook(tmp_path / "upload" / "dev" / "exp.xlsx").active
    assert [list(row) for row in sheet.iter_rows(values_only=True)] == [
        ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
        [0, "What is it?", "cat", "dog", "bird", "fish", "A", "A", "dev"],  # the later round wins
        [1, "Which color?", "red", "blue", None, None, None, "B", "dev"],  # empty options, no answer
        [1000000, "What is it?", "dog", "bird", "fish", "cat", " D.", "D", "dev"],  # raw text, not normalised
    ]


def test_mmbench_predictions_with_control_characters_are_written_without_them(tmp_path, capsys):
    """A model can emit characters an .xlsx cell cannot hold (openpyxl then refuses the whole file)."""
    write_lines(tmp_path / "answers" / "exp.jsonl", [{"question_id": 0, "prompt": "p", "text": "B\x04\x04 ok"},
                                                      {"question_id": 1, "prompt": "p", "text": "C"}])
    args = ["--annotation-file", str(mmbench_tsv(tmp_path)), "--result-dir", str(tmp_path / "answers"),
            "--upload-dir", str(tmp_path / "upload"), "--experiment", "exp"]
    assert mmbench.main(args) == 0
    assert "1 prediction(s) held control characters" in capsys.readouterr().err
    sheet = openpyxl.load_workbook(tmp_path / "upload" / "exp.xlsx").active
    assert [row[6] for row in sheet.iter_rows(min_row=2, values_only=True)] == ["B ok", "C", None]


def test_mmbench_table_without_an_mmbench_column_is_a_user_error():
    with pytest.raises(UserError, match="lacks the column"):
        mmbench.submission_table(pd.DataFrame({"index": [0], "question": ["q"]}), {})


# ---------------------------------------------------------------- SEED-Bench

SEED_ANNOTATION = {
    "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10},
    "questions": [
        {"question_id": "101", "question_type_id": 1, "data_type": "image", "answer": "A"},
        {"question_id": "102", "question_type_id": 1, "data_type": "image", "answer": "B"},
        {"question_id": "103", "question_type_id": 2, "data_type": "image", "answer": "C"},
        {"question_id": "104", "question_type_id": 2, "data_type": "image", "answer": "D"},
        {"question_id": "v105", "question_type_id": 10, "data_type": "video", "answer": "A"},
        {"question_id": "106", "question_type_id": 10, "data_type": "video", "answer": "B"},
        {"question_id": "107", "question_type_id": 2, "data_type": "image", "answer": "A"},
    ],
}
# The runner's ids are ints; "v105" cannot be one. Right: 101, 103, v105, 107. Wrong: "B." (102),
# " D" (104), "b" (106): exact string equality only.
SEED_ANSWERS = [
    {"question_id": 101, "text": "A"},
    {"question_id": 102, "text": "B."},
    {"question_id": 103, "text": "C"},
    {"question_id": 104, "text": " D"},
    {"question_id": "v105", "text": "A"},
    {"question_id": 106, "text": "b"},
    {"question_id": 107, "text": "A"},
]
# Types in id order 1, 2, 10 (not "10" before "2"): 1/2, 2/3, 1/2; all 4/7; image 3/5; video 1/2.
SEED_OUTPUT = """\
Scene Understanding: 50.00%
Instance Identity: 66.67%
Action Recognition: 50.00%
Total accuracy: 57.14%
image accuracy: 60.00%
video accuracy: 50.00%
"""


def seed_args(tmp_path, answers: list) -> list[str]:
    annotation = tmp_path / "SEED-Bench.json"
    annotation.write_text(json.dumps(SEED_ANNOTATION))
    result = write_lines(tmp_path / "merge.jsonl", answers)
    return ["--annotation-file", str(annotation), "--result-file", str(result),
            "--result-upload-file", str(tmp_path / "upload" / "seed.jsonl")]


def test_seed_prints_upstream_accuracies_and_writes_the_upload(tmp_path, capsys):
    assert seed.main(seed_args(tmp_path, SEED_ANSWERS)) == 0
    assert capsys.readouterr().out == SEED_OUTPUT
    upload = [json.loads(line) for line in (tmp_path / "upload" / "seed.jsonl").read_text().splitlines()]
    assert upload == [
        {"question_id": "101", "prediction": "A"},
        {"question_id": "102", "prediction": "B."},
        {"question_id": "103", "prediction": "C"},
        {"question_id": "104", "prediction": " D"},
        {"question_id": "v105", "prediction": "A"},
        {"question_id": "106", "prediction": "b"},
        {"question_id": "107", "prediction": "A"},
    ]


def test_seed_script_end_to_end(tmp_path):
    result = run_script("convert_seed_for_submission", *seed_args(tmp_path, SEED_ANSWERS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == SEED_OUTPUT


def test_seed_missing_answer_counts_as_wrong_then_blocks_the_upload(tmp_path, capsys):
    # Without 107: Instance Identity 1/3, all 3/7, image 2/5.
    with pytest.raises(SystemExit) as exit_info:
        seed.main(seed_args(tmp_path, SEED_ANSWERS[:-1]))
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ("Scene Understanding: 50.00%\nInstance Identity: 33.33%\nAction Recognition: 50.00%\n"
                   "Total accuracy: 42.86%\nimage accuracy: 40.00%\nvideo accuracy: 50.00%\n")
    assert err == (f"error: 1 question(s) have no answer in {tmp_path / 'merge.jsonl'}: question_id '107'; "
                   "the upload needs every question\n")
    assert not (tmp_path / "upload" / "seed.jsonl").exists()


def test_seed_scoring_casts_the_id_but_the_upload_tries_it_as_is_first():
    question = {"question_id": "101", "question_type_id": 1, "data_type": "image", "answer": "A"}
    texts = {"101": "A"}  # a string id in the answers: upstream's scoring misses it, its upload finds it
    assert seed.type_tallies([question], texts) == {1: [0, 1]}
    assert seed.upload_key(texts, "101") == "101"
    assert seed.upload_key({101: "A"}, "101") == 101
    assert seed.upload_key({}, "101") is None
    assert seed.scoring_key("v105") == "v105"


def test_seed_annotation_without_videos_says_so():
    questions = [{"question_id": "1", "question_type_id": 1, "data_type": "image", "answer": "A"}]
    assert seed.accuracy_lines(questions, {1: "A"}, {1: "Scene Understanding"}) == [
        "Scene Understanding: 100.00%", "Total accuracy: 100.00%", "image accuracy: 100.00%",
        "video accuracy: no questions"]


# ---------------------------------------------------------------- MM-Vet


def test_mmvet_results_are_keyed_v1_and_indented(tmp_path):
    src = write_lines(tmp_path / "answers.jsonl", [
        {"question_id": 1, "text": "café"},
        {"question_id": 0, "text": "a cat"},
    ])
    dst = tmp_path / "results" / "ckpt.json"
    assert mmvet.main(["--src", str(src), "--dst", str(dst)]) == 0
    # json.dump's defaults, as upstream: ASCII escapes, indent 2, keys in answers-file order.
    assert dst.read_text() == '{\n  "v1_1": "caf\\u00e9",\n  "v1_0": "a cat"\n}'


# ---------------------------------------------------------------- answers written twice

DOUBLED = [{"question_id": 0, "prompt": "q", "text": "A"}, {"question_id": 1, "prompt": "q", "text": "B"},
           {"question_id": 0, "prompt": "q", "text": "A"}]


def doubled_vqav2(tmp_path):
    answers = write_lines(tmp_path / "answers" / "test-dev" / "ckpt" / "merge.jsonl", DOUBLED)
    return vqav2, ["--dir", str(tmp_path), "--ckpt", "ckpt", "--split", "test-dev"], answers


def doubled_vizwiz(tmp_path):
    return vizwiz, vizwiz_files(tmp_path, DOUBLED), tmp_path / "answers.jsonl"


def doubled_mmbench(tmp_path):
    answers = write_lines(tmp_path / "answers" / "exp.jsonl", DOUBLED)
    return mmbench, ["--annotation-file", str(mmbench_tsv(tmp_path)), "--result-dir", str(tmp_path / "answers"),
                     "--upload-dir", str(tmp_path / "upload"), "--experiment", "exp"], answers


def doubled_seed(tmp_path):
    return seed, seed_args(tmp_path, DOUBLED), tmp_path / "merge.jsonl"


def doubled_mmvet(tmp_path):
    answers = write_lines(tmp_path / "answers.jsonl", DOUBLED)
    return mmvet, ["--src", str(answers), "--dst", str(tmp_path / "upload" / "ckpt.json")], answers


@pytest.mark.parametrize("converter", [doubled_vqav2, doubled_vizwiz, doubled_mmbench, doubled_seed, doubled_mmvet])
def test_converter_refuses_a_question_answered_twice_and_writes_nothing(tmp_path, capsys, converter):
    module, args, answers = converter(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        module.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {answers}: 1 question(s) are answered more than once (question_id 0 x2): ")
    assert err.count("\n") == 1
    assert not list(tmp_path.rglob("upload*/*")) and not (tmp_path / "answers_upload").exists()
