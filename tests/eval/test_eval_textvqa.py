"""TextVQA scoring: question recovery from every prompt shape, annotation matching, the CLI's printed lines."""

import json

import pytest

from llava.eval import eval_textvqa
from llava.eval.eval_textvqa import build_pred_list, index_annotations, question_from_prompt

SUFFIX = "Answer the question using a single word or phrase."


@pytest.mark.parametrize("prompt, question", [
    # the LLaVA question file: question, OCR line, suffix
    (f"What Brand is this?\nReference OCR token: COCA, cola\n{SUFFIX}", "what brand is this?"),
    # an OCR line with no tokens is still the three-line shape
    (f"What is it?\nReference OCR token: \n{SUFFIX}", "what is it?"),
    # OCR line first: the question is the second line
    (f"Reference OCR token: A, B\nWhat is It?\n{SUFFIX}", "what is it?"),
    # answers produced without the OCR line: question and suffix only
    (f"How MANY?\n{SUFFIX}", "how many?"),
    # the older shape, whose question may span lines
    ("OCR tokens: a b Question: Which Team? Short answer:", "which team?"),
    ("OCR tokens: a Question: first\nsecond Short answer: x", "first\nsecond"),
])
def test_question_from_every_prompt_shape(prompt, question):
    assert question_from_prompt(prompt) == question


@pytest.mark.parametrize("prompt", [
    "What is it?",  # one line
    f"What is it?\nsome hint\n{SUFFIX}",  # three lines but no OCR line
    f"What?\nReference OCR token: a\nhint\n{SUFFIX}",  # four lines
    "OCR tokens: a b no question here",
])
def test_unrecognised_prompt_is_a_value_error(prompt):
    with pytest.raises(ValueError):
        question_from_prompt(prompt)


def _annotation(image_id, question, answers):
    return {"image_id": image_id, "question": question, "answers": answers}


def test_annotations_are_keyed_by_image_and_lower_cased_question_later_duplicates_win():
    index = index_annotations([_annotation("img", "What?", ["a"] * 10), _annotation("img", "WHAT?", ["b"] * 10),
                               _annotation("img", "Who?", ["c"] * 10)])
    assert sorted(index) == [("img", "what?"), ("img", "who?")]
    assert index[("img", "what?")]["answers"] == ["b"] * 10


def test_pred_list_errors_name_the_question_id():
    annotations = index_annotations([_annotation("img1", "What?", ["x"] * 10)])
    assert build_pred_list(annotations, [{"question_id": "img1", "prompt": f"What?\n{SUFFIX}", "text": "x"}]) == [
        {"pred_answer": "x", "gt_answers": ["x"] * 10}]
    with pytest.raises(ValueError, match="question_id 'img7'.*unrecognised prompt"):
        build_pred_list(annotations, [{"question_id": "img7", "prompt": "What?", "text": "x"}])
    with pytest.raises(ValueError, match="question_id 'img2'.*no annotation"):
        build_pred_list(annotations, [{"question_id": "img2", "prompt": f"What?\n{SUFFIX}", "text": "x"}])


def _write_annotations(path):
    # Two questions share an image: question_id is the image id, so the question text tells them apart.
    data = [
        _annotation("img1", "What color is the car?", ["red"] * 3 + ["blue"] * 7),
        _annotation("img1", "What brand is it?", ["coca cola"] * 10),
        _annotation("img2", "How many dogs?", ["2"] * 2 + ["3"] * 8),
        _annotation("img2", "Is it day?", ["yes"] * 10),
    ]
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}))


def _answer(image_id, question, text, ocr=True):
    prompt = f"{question}\nReference OCR token: A, B\n{SUFFIX}" if ocr else f"{question}\n{SUFFIX}"
    return json.dumps({"question_id": image_id, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
                       "metadata": {}})


ANSWERS = [
    _answer("img1", "What color is the car?", "Red."),  # 3 of 10 said red: 0.9
    _answer("img1", "What brand is it?", "Coca-Cola", ocr=False),  # -> "coca cola": 1.0
    _answer("img2", "How many dogs?", "two"),  # -> "2", said by 2: 0.6
    _answer("img2", "Is it day?", "no", ocr=False),  # 0.0
]


def test_cli_prints_upstream_lines(tmp_path, capsys):
    _write_annotations(tmp_path / "TextVQA_0.5.1_val.json")
    (tmp_path / "llava-next.jsonl").write_text("\n".join(ANSWERS) + "\n")
    code = eval_textvqa.main(["--annotation-file", str(tmp_path / "TextVQA_0.5.1_val.json"),
                              "--result-file", str(tmp_path / "llava-next.jsonl")])
    # (0.9 + 1.0 + 0.6 + 0.0) / 4 = 62.5 %
    assert (code, capsys.readouterr().out) == (0, "llava-next\nSamples: 4\nAccuracy: 62.50%\n\n")


def test_cli_refuses_an_answer_written_twice_and_names_it(tmp_path, capsys):
    # img1 is asked two questions (accepted above); its first question answered twice is not
    _write_annotations(tmp_path / "val.json")
    (tmp_path / "answers.jsonl").write_text("\n".join(ANSWERS + ANSWERS[:1]) + "\n")
    code = eval_textvqa.main(["--annotation-file", str(tmp_path / "val.json"),
                              "--result-file", str(tmp_path / "answers.jsonl")])
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "answers\n")
    assert captured.err.startswith(f"error: {tmp_path / 'answers.jsonl'}: 1 question(s) are answered more than once "
                                   "(question_id 'img1' x2)")


def test_cli_result_dir_scores_every_jsonl_and_skips_the_rest(tmp_path, capsys):
    _write_annotations(tmp_path / "val.json")
    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / "b.jsonl").write_text(ANSWERS[1] + "\n")
    (tmp_path / "answers" / "a.jsonl").write_text(ANSWERS[2] + "\n")
    (tmp_path / "answers" / "notes.txt").write_text("")
    code = eval_textvqa.main(["--annotation-file", str(tmp_path / "val.json"),
                              "--result-dir", str(tmp_path / "answers")])
    assert (code, capsys.readouterr().out) == (
        0, "a\nSamples: 1\nAccuracy: 60.00%\n\nb\nSamples: 1\nAccuracy: 100.00%\n\nSkipping notes.txt\n")


def test_cli_reports_malformed_lines_and_scores_the_rest(tmp_path, capsys):
    _write_annotations(tmp_path / "val.json")
    (tmp_path / "answers.jsonl").write_text(ANSWERS[0] + "\n{not json\n" + ANSWERS[1] + "\n")
    code = eval_textvqa.main(["--annotation-file", str(tmp_path / "val.json"),
                              "--result-file", str(tmp_path / "answers.jsonl")])
    captured = capsys.readouterr()
    assert (code, captured.out) == (0, "answers\nSamples: 2\nAccuracy: 95.00%\n\n")
    assert "skipped 1 malformed line(s) (line 2)" in captured.err


def test_cli_unrecognised_prompt_is_a_clear_error(tmp_path, capsys):
    _write_annotations(tmp_path / "val.json")
    (tmp_path / "answers.jsonl").write_text(json.dumps({"question_id": "img9", "prompt": "What?", "text": "x"}) + "\n")
    code = eval_textvqa.main(["--annotation-file", str(tmp_path / "val.json"),
                              "--result-file", str(tmp_path / "answers.jsonl")])
    assert code == 2
    assert "error: question_id 'img9': unrecognised prompt shape" in capsys.readouterr().err


def test_cli_needs_a_result_file_or_dir(tmp_path):
    with pytest.raises(SystemExit):
        eval_textvqa.main(["--annotation-file", str(tmp_path / "val.json")])
