"""The instruction text each runner gives a text-conditioned method (CDPruner), in one place.

It is not the chat prompt: the released CDPruner loaders (`Theia-4869/CDPruner@9541616`,
`llava/eval/model_vqa_loader.py:108-120`, `model_vqa_mmbench.py:88-126`,
`model_vqa_science.py:50-90`; spec `baselines/cdpruner.md` (b)4) give the question without the
answer-format line the benchmark appends:

- `vqa_instruction` (GQA, VQAv2, VizWiz, TextVQA, POPE, MME, SEED; and MM-Vet / LLaVA-Bench): the
  question text with `"\\nAnswer the question using a single word or phrase."` removed wherever
  it occurs. TextVQA keeps its `Reference OCR token:` line, MME its "Please answer yes or no."
  (the released MM-Vet runner passes the raw text, which holds no such line).
- `mmbench_instruction`: the hint, the question and the `A. ...` option lines, without the
  letter prompt.
- `science_instruction`: the question with its context and options, `<image>` removed, without
  the letter prompt.
- `query_instruction` (`run_llava`, the chat CLI; the released code gives them none): the
  user's query without `<image>` placeholders.
"""

from __future__ import annotations

from llava.constants import DEFAULT_IMAGE_TOKEN

SHORT_ANSWER_LINE = "\nAnswer the question using a single word or phrase."
LETTER_LINE = "\nAnswer with the option's letter from the given choices directly."


def vqa_instruction(question: str) -> str:
    """A short-answer question without its answer-format line."""
    return question.replace(SHORT_ANSWER_LINE, "")


def mmbench_instruction(hint_question_options: str) -> str:
    """MMBench: the runner's `prompt` (hint, question, option lines) as it is; the letter prompt
    is added to the user turn only, never to it."""
    return hint_question_options


def science_instruction(question: str) -> str:
    """ScienceQA: the conversation's first turn without `<image>` (stripped) and without the
    letter prompt, wherever it occurs."""
    return question.replace(DEFAULT_IMAGE_TOKEN, "").strip().replace(LETTER_LINE, "")


def query_instruction(query: str) -> str:
    """A free query without its `<image>` placeholders (and the line break after each)."""
    return query.replace(DEFAULT_IMAGE_TOKEN + "\n", "").replace(DEFAULT_IMAGE_TOKEN, "").strip()
