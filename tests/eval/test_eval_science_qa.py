"""ScienceQA scoring: the letter parser (with its regex quirk), the choice index, the CLI's line and files."""

import json

import pytest

from llava.eval import eval_science_qa
from llava.eval.eval_science_qa import answer_index, build_parser, parse_science_answer

OPTIONS = list("ABCDE")


@pytest.mark.parametrize("text, letter", [
    ("A", "A"),
    ("E", "E"),
    ("B. cat", "B"),
    ("The answer is C.", "C"),
    ("Because of heat. The answer is D, clearly", "D"),
    # the regex allows any capital letter; answer_index rejects it later
    ("The answer is Z.", "Z"),
    # the character after the letter is required and may not be a newline
    ("The answer is A", "FAILED"),
    ("The answer is A\nmore", "FAILED"),
    # more than one "The answer is X." fails
    ("The answer is A. The answer is B.", "FAILED"),
    ("(A)", "FAILED"),
    ("a", "FAILED"),
    ("A.", "FAILED"),
    (" A", "FAILED"),
    ("A\n", "FAILED"),
    ("B.cat", "FAILED"),
    ("F", "FAILED"),
    ("", "FAILED"),
])
def test_parse_science_answer(text, letter):
    assert parse_science_answer(text, OPTIONS) == letter


@pytest.mark.parametrize("letter, choices, index", [
    ("A", 2, 0), ("C", 3, 2), ("D", 3, -1), ("E", 5, 4), ("Z", 5, -1), ("FAILED", 4, -1),
])
def test_answer_index_only_within_the_problems_choices(letter, choices, index):
    assert answer_index(letter, choices, OPTIONS) == index


def test_options_argument_splits_a_string_into_letters_like_upstream():
    args = build_parser().parse_args(["--base-dir", "d", "--result-file", "r", "--output-file", "o",
                                      "--output-result", "s", "--options", "AB"])
    assert args.options == ["A", "B"] and args.split == "test"


def _problem(num_choices, answer):
    return {"question": "q", "choices": [f"choice {i}" for i in range(num_choices)], "answer": answer}


def _benchmark(tmp_path, answers):
    """Six test problems (plus one val problem that must be ignored); returns the CLI arguments."""
    problems = {"1": _problem(2, 0), "2": _problem(3, 1), "3": _problem(2, 0), "4": _problem(4, 1),
                "5": _problem(3, 2), "6": _problem(2, 1), "9": _problem(2, 0)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4", "5", "6"], "val": ["9"]}))
    (tmp_path / "answers.jsonl").write_text("".join(
        json.dumps({"question_id": pid, "prompt": prompt, "text": text}) + "\n" for pid, prompt, text in answers))
    return ["--base-dir", str(tmp_path), "--result-file", str(tmp_path / "answers.jsonl"),
            "--output-file", str(tmp_path / "output.json"), "--output-result", str(tmp_path / "result.json")]


IMAGE_PROMPT = "<image>\nWhich is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
TEXT_PROMPT = "Which is it?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
ANSWERS = [
    ("1", IMAGE_PROMPT, "A"),  # correct, image
    ("2", IMAGE_PROMPT, "The answer is B."),  # correct, image
    ("3", TEXT_PROMPT, "C"),  # only 2 choices: index -1, wrong
    ("4", TEXT_PROMPT, "B. dog"),  # correct
    # "5" has no answer: FAILED, wrong, prompt "Unknown" (not an image problem)
    ("6", IMAGE_PROMPT, "A"),  # wrong, image
    ("9", IMAGE_PROMPT, "A"),  # val split: ignored
]


def test_cli_prints_upstream_line_and_writes_both_files(tmp_path, capsys):
    code = eval_science_qa.main(_benchmark(tmp_path, ANSWERS))
    captured = capsys.readouterr()
    # 3 of 6 correct; image prompts: 1, 2, 6 with 2 correct
    assert (code, captured.out) == (0, "Total: 6, Correct: 3, Accuracy: 50.00%, IMG-Accuracy: 66.67%\n")
    assert captured.err == "warning: 1 of 6 test problems have no answer (scored as FAILED)\n"

    analysis = json.loads((tmp_path / "output.json").read_text())
    assert [entry["question_id"] for entry in analysis["correct"]] == ["1", "2", "4"]
    assert [entry["question_id"] for entry in analysis["incorrect"]] == ["3", "5", "6"]
    assert analysis["incorrect"][1] == {"question_id": "5", "parsed_ans": "FAILED", "ground_truth": "C",
                                        "question": "Unknown", "pred": "FAILED", "is_multimodal": False}
    assert list(analysis["correct"][0]) == ["question_id", "parsed_ans", "ground_truth", "question", "pred",
                                            "is_multimodal"]

    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result) == ["acc", "correct", "count", "results", "outputs"]
    assert (result["acc"], result["correct"], result["count"]) == (50.0, 3, 6)
    assert result["results"] == {"1": 0, "2": 1, "3": -1, "4": 1, "5": -1, "6": 0}
    assert result["outputs"]["2"] == "The answer is B." and result["outputs"]["5"] == "FAILED"
    assert (tmp_path / "result.json").read_text().startswith('{\n  "acc": 50.0,')


def test_cli_later_answer_to_another_prompt_wins(tmp_path, capsys):
    code = eval_science_qa.main(_benchmark(tmp_path, ANSWERS + [("6", "<image>\n" + TEXT_PROMPT + "\n", "B")]))
    assert (code, capsys.readouterr().out) == (0, "Total: 6, Correct: 4, Accuracy: 66.67%, IMG-Accuracy: 100.00%\n")


def test_cli_refuses_a_question_answered_twice_and_names_it(tmp_path, capsys):
    code = eval_science_qa.main(_benchmark(tmp_path, ANSWERS + [("6", IMAGE_PROMPT, "B")]))
    captured = capsys.readouterr()
    assert (code, captured.out) == (2, "")
    assert captured.err.startswith(f"error: {tmp_path / 'answers.jsonl'}: 1 question(s) are answered more than once "
                                   "(question_id '6' x2)")
    assert not (tmp_path / "output.json").exists()


def test_cli_without_image_prompts_is_a_clear_error(tmp_path, capsys):
    answers = [(pid, TEXT_PROMPT, text) for pid, _, text in ANSWERS]
    assert eval_science_qa.main(_benchmark(tmp_path, answers)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("error: IMG-Accuracy is undefined: no answer's prompt contains <image>\n")
    assert not (tmp_path / "output.json").exists()
