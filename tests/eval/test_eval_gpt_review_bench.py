"""The LLaVA-Bench judge without a network: the score-line parser (spec §2.10), the judge prompt,
the input checks, the missing-key / missing-package errors, and resuming with a stand-in client."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from llava.eval import eval_gpt_review_bench as bench


@pytest.mark.parametrize("review, scores", [
    ("8 9", [8.0, 9.0]),
    ("8,9", [8.0, 9.0]),  # a comma counts as a space
    ("7.5 10\nAssistant 1 gave ...", [7.5, 10.0]),  # only the first line counts
    ("8, 9", [-1, -1]),  # comma and space: three fields
    (" 8 9", [-1, -1]),  # split on single spaces, so a leading space is a field
    ("8 9 ", [-1, -1]),
    ("8  9", [-1, -1]),
    ("8\t9", [-1, -1]),
    ("Scores: 8 9", [-1, -1]),
    ("8", [-1, -1]),
    ("eight nine", [-1, -1]),
    ("", [-1, -1]),
    ("\n8 9", [-1, -1]),
])
def test_parse_score(review, scores):
    assert bench.parse_score(review) == scores


def test_review_prompt_layout():
    rule = {"role": "Assistant", "prompt": "Rate them."}
    assert bench.review_prompt("a cat\non a mat", "What is it?", "A cat.", "A dog.", rule) == (
        "[Context]\na cat\non a mat\n\n"
        "[Question]\nWhat is it?\n\n"
        "[Assistant 1]\nA cat.\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nA dog.\n\n[End of Assistant 2]\n\n"
        "[System]\nRate them.\n\n")


def test_caption_list_is_one_per_line_and_a_string_stays_whole():
    assert bench.caption_text(["a cat", "on a mat"]) == "a cat\non a mat"
    assert bench.caption_text("a cat") == "a cat"


def write_inputs(tmp_path, model_question_id: int = 1) -> list[str]:
    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    rules = tmp_path / "rule.json"
    rules.write_text(json.dumps({"llava_bench_conv": {"role": "Assistant", "prompt": "Rate them."},
                                 "llava_bench_detail": {"role": "Assistant", "prompt": "Rate the detail."}}))
    return [
        "-q", jsonl("questions.jsonl", [{"question_id": 0, "image": "001.jpg", "text": "What?", "category": "conv"},
                                        {"question_id": 1, "image": "001.jpg", "text": "Why?", "category": "detail"}]),
        "-c", jsonl("context.jsonl", [{"id": "001", "image": "001.jpg", "caption": ["a cat", "on a mat"]}]),
        "-a", jsonl("answers_gpt4.jsonl", [{"question_id": 0, "answer_id": "g0", "text": "A cat."},
                                           {"question_id": 1, "answer_id": "g1", "text": "Because."}]),
        jsonl("answers.jsonl", [{"question_id": 0, "answer_id": "m0", "text": "A dog."},
                                {"question_id": model_question_id, "answer_id": "m1", "text": "No idea."}]),
        "-r", str(rules),
        "-o", str(tmp_path / "reviews" / "model.jsonl"),
    ]


def test_missing_api_key_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(write_inputs(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: OPENAI_API_KEY is not set: the GPT-4 judge needs an OpenAI API key\n"
    assert not (tmp_path / "reviews" / "model.jsonl").exists()


def test_missing_openai_package_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail
    with pytest.raises(bench.UserError, match="needs the openai package"):
        bench.openai_client()


def test_answers_to_other_questions_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(write_inputs(tmp_path, model_question_id=7))
    assert capsys.readouterr().err == "error: line 2: question_id 1, but the answers are to 1 and 7\n"


def test_model_answers_written_twice_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(write_inputs(tmp_path, model_question_id=0))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'answers.jsonl'}: 1 question(s) are answered more "
                                              "than once (question_id 0 x2)")


class StandInClient:
    """Answers every judge request with the next canned reply and records the prompts."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.prompts = []
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, temperature, max_tokens):
        assert (model, temperature, max_tokens) == ("gpt-4-0314", 0.2, 1024)
        self.prompts.append(messages[1]["content"])
        message = SimpleNamespace(content=self.replies.pop(0))
        return SimpleNamespace(choices=[SimpleNamespace(message=message)])


def test_reviews_are_appended_and_a_rerun_resumes(tmp_path, monkeypatch):
    args = write_inputs(tmp_path)
    output = tmp_path / "reviews" / "model.jsonl"
    output.parent.mkdir()
    output.write_text(json.dumps({"id": 1, "question_id": 0, "tuple": [8.0, 6.0]}) + "\n")
    client = StandInClient(["9 4\nAssistant 2 missed it."])
    monkeypatch.setattr(bench, "openai_client", lambda: client)

    assert bench.main(args) == 0
    assert client.prompts == ["[Context]\na cat\non a mat\n\n[Question]\nWhy?\n\n"
                              "[Assistant 1]\nBecause.\n\n[End of Assistant 1]\n\n"
                              "[Assistant 2]\nNo idea.\n\n[End of Assistant 2]\n\n[System]\nRate the detail.\n\n"]
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows[1] == {"id": 2, "question_id": 1, "answer1_id": "g1", "answer2_id": "m1", "category": "llava_bench_detail",
                       "content": "9 4\nAssistant 2 missed it.", "tuple": [9.0, 4.0]}

    # Everything reviewed: a rerun needs no client (and so no key).
    monkeypatch.setattr(bench, "openai_client", lambda: pytest.fail("no review was pending"))
    assert bench.main(args) == 0
    assert len(output.read_text().splitlines()) == 2
