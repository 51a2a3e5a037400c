"""The instruction text each runner gives a text-conditioned method (spec cdpruner.md (b)4)."""

import json

import pandas as pd

from llava.eval import model_vqa_loader, model_vqa_mmbench, model_vqa_science
from llava.eval.instructions import mmbench_instruction, query_instruction, science_instruction, vqa_instruction

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def test_vqa_drops_only_the_answer_format_line():
    assert vqa_instruction("What is the man holding?" + SHORT) == "What is the man holding?"
    # TextVQA keeps its OCR line, MME its yes/no request, VizWiz its 'Unanswerable' line.
    textvqa = "What is written?\nReference OCR token: stop, sign" + SHORT
    assert vqa_instruction(textvqa) == "What is written?\nReference OCR token: stop, sign"
    assert vqa_instruction("Is there a cat? Please answer yes or no.") == "Is there a cat? Please answer yes or no."
    vizwiz = "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    assert vqa_instruction(vizwiz) == vizwiz[:-len(SHORT)]
    assert vqa_instruction("Q" + SHORT + SHORT) == "Q"  # every occurrence, as the released str.replace


def test_mmbench_is_hint_question_and_options_without_the_letter_prompt():
    row = pd.Series(dict(index=3, hint="A hint.", question="Which color?", A="red", B="blue", C=float("nan"),
                         D=float("nan"), image=""))
    question, = model_vqa_mmbench.mmbench_questions(row, all_rounds=False, single_pred_prompt=True, lang="en")
    assert question.instruction == mmbench_instruction(question.prompt) == "A hint.\nWhich color?\nA. red\nB. blue"
    assert question.query.endswith(LETTER) and not question.instruction.endswith(LETTER)
    rotated = model_vqa_mmbench.mmbench_questions(row, all_rounds=True, single_pred_prompt=False, lang="cn")
    assert [item.instruction for item in rotated] == ["A hint.\nWhich color?\nA. red\nB. blue",
                                                      "A hint.\nWhich color?\nA. blue\nB. red"]


def test_science_is_the_question_with_context_and_options_without_image_and_letter_prompt():
    value = "<image>\nContext: c\nWhich is a mammal?\nOptions: (A) cat (B) fish" + LETTER
    assert science_instruction(value) == "Context: c\nWhich is a mammal?\nOptions: (A) cat (B) fish"
    item = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": value}]}
    question = model_vqa_science.science_question(item, "images", single_pred_prompt=True)
    # The user turn holds the letter prompt twice (the file's and --single-pred-prompt's): both go.
    assert question.query.count(LETTER) == 2
    assert question.instruction == "Context: c\nWhich is a mammal?\nOptions: (A) cat (B) fish"
    text_only = {"id": "2", "conversations": [{"from": "human", "value": " Which one?\nA. x "}]}
    assert model_vqa_science.science_question(text_only, "", False).instruction == "Which one?\nA. x"


def test_the_loader_gives_the_text_the_model_sees(tmp_path):
    question = "What is written?\nReference OCR token: a, b" + SHORT
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": question}) + "\n")
    shown, = model_vqa_loader.questions_from_jsonl(str(tmp_path / "q.jsonl"), str(tmp_path))
    assert shown.instruction == "What is written?\nReference OCR token: a, b"
    hidden, = model_vqa_loader.questions_from_jsonl(str(tmp_path / "q.jsonl"), str(tmp_path), drop_ocr_tokens=True)
    assert hidden.instruction == "What is written?"  # --drop-ocr-tokens hides it from the method too


def test_a_free_query_loses_its_image_placeholders():
    assert query_instruction("What is shown?") == "What is shown?"
    assert query_instruction("<image>\n<image>\nCompare the two.") == "Compare the two."
    assert query_instruction("Left <image> right") == "Left  right"
