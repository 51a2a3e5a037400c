"""LLaVA-Bench (in the wild) judge: GPT-4 scores a reference answer and a model answer to each
question, given a text description of the image.

The question file, the two answers files (reference first: `answers_gpt4.jsonl`, then the model's)
are paired line by line; every line must be about the same question_id. For each question the
judge gets the image's caption from the context file, the question, both answers and the
category's instructions from the rule file, and replies with a first line of two scores. Each
review is appended to the output as `{"id", "question_id", "answer1_id", "answer2_id", "category",
"content", "tuple"}`, where `tuple` is the parsed [reference score, model score] ([-1, -1] when the
first line is not exactly two numbers). Rerunning skips the reviews the output already holds, so an
interrupted run resumes. `summarize_gpt_review.py` turns the output into the reported scores.

The rule file is not shipped here: use `llava/eval/table/rule.json` from LLaVA's repository
(https://github.com/haotian-liu/LLaVA); its `llava_bench_conv`, `llava_bench_detail` and
`llava_bench_complex` entries (each a `role` and a `prompt`) are the ones read. The judge needs
the `openai` package (1.x) and OPENAI_API_KEY in the environment.

    python llava/eval/eval_gpt_review_bench.py \
        --question playground/data/eval/llava-bench-in-the-wild/questions.jsonl \
        --context playground/data/eval/llava-bench-in-the-wild/context.jsonl \
        --rule path/to/LLaVA/llava/eval/table/rule.json \
        --answer-list playground/data/eval/llava-bench-in-the-wild/answers_gpt4.jsonl \
                      playground/data/eval/llava-bench-in-the-wild/answers/llava-v1.6-vicuna-7b.jsonl \
        --output playground/data/eval/llava-bench-in-the-wild/reviews/llava-v1.6-vicuna-7b.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from llava.eval.answers import UserError, field, make_parent_dir, read_answers
from llava.eval.jsonl import read_jsonl
from llava.utils import user_errors

JUDGE_MODEL = "gpt-4-0314"
JUDGE_TEMPERATURE = 0.2
SYSTEM_MESSAGE = "You are a helpful and precise assistant for checking the quality of the answer."
# The client retries rate limits and transient server errors itself, with backoff.
API_RETRIES = 10
UNPARSED = [-1, -1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="GPT-4 review of LLaVA-Bench answers.")
    parser.add_argument("-q", "--question", required=True, help="questions.jsonl")
    parser.add_argument("-c", "--context", required=True, help="context.jsonl (image captions)")
    parser.add_argument("-a", "--answer-list", nargs=2, required=True, metavar=("REFERENCE", "MODEL"),
                        help="reference answers (answers_gpt4.jsonl), then the model's answers")
    parser.add_argument("-r", "--rule", required=True, help="rule.json from LLaVA's repository (llava/eval/table/rule.json)")
    parser.add_argument("-o", "--output", required=True, help="reviews file (JSON lines, appended to)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="maximum number of tokens the judge may reply with")
    parser.add_argument("--judge-model", default=JUDGE_MODEL, help="OpenAI model (default: %(default)s, as upstream)")
    return parser


def parse_score(review: str) -> list[float]:
    """The two scores on the review's first line: commas count as spaces, and the line split on
    single spaces must give exactly two numbers (so "8, 9" fails), else [-1, -1]."""
    parts = review.split("\n")[0].replace(",", " ").split(" ")
    if len(parts) == 2:
        try:
            return [float(parts[0]), float(parts[1])]
        except ValueError:
            pass
    return list(UNPARSED)


def caption_text(caption) -> str:
    """A list of captions is one per line, as upstream joins it; a single string is kept whole
    (joining a string would put every character on its own line)."""
    return caption if isinstance(caption, str) else "\n".join(caption)


def review_prompt(caption: str, question: str, reference_answer: str, model_answer: str, rule: dict) -> str:
    """The judge's user message, laid out as upstream's."""
    role = rule["role"]
    sections = [f"[Context]\n{caption}", f"[Question]\n{question}"]
    for number, answer in ((1, reference_answer), (2, model_answer)):
        sections += [f"[{role} {number}]\n{answer}", f"[End of {role} {number}]"]
    sections.append(f"[System]\n{rule['prompt']}")
    return "\n\n".join(sections) + "\n\n"


def review_tasks(questions: list[dict], reference_answers: list[dict], model_answers: list[dict],
                 captions: dict, rules: dict) -> list[tuple[dict, str]]:
    """(review row without its result, judge prompt) per question, in file order."""
    if not len(questions) == len(reference_answers) == len(model_answers):
        raise UserError(f"{len(questions)} questions but {len(reference_answers)} reference and "
                        f"{len(model_answers)} model answers: the three files must pair line by line")
    tasks = []
    for number, (question, reference, model) in enumerate(zip(questions, reference_answers, model_answers), 1):
        if not question["question_id"] == reference["question_id"] == model["question_id"]:
            raise UserError(f"line {number}: question_id {question['question_id']!r}, but the answers are to "
                            f"{reference['question_id']!r} and {model['question_id']!r}")
        category = f"llava_bench_{question['category']}"
        if category not in rules:
            raise UserError(f"the rule file has no {category!r} entry (question_id {question['question_id']!r})")
        if question["image"] not in captions:
            raise UserError(f"the context file has no caption for image {question['image']!r}")
        row = {
            "id": number,
            "question_id": question["question_id"],
            "answer1_id": reference.get("answer_id", reference["question_id"]),
            "answer2_id": model.get("answer_id", model["question_id"]),
            "category": category,
        }
        prompt = review_prompt(caption_text(captions[question["image"]]), question["text"],
                               reference["text"], model["text"], rules[category])
        tasks.append((row, prompt))
    return tasks


def openai_client():
    """An OpenAI client, or a UserError saying what is missing."""
    if not os.environ.get("OPENAI_API_KEY"):
        raise UserError("OPENAI_API_KEY is not set: the GPT-4 judge needs an OpenAI API key")
    try:
        from openai import OpenAI
    except ImportError:
        raise UserError("the GPT-4 judge needs the openai package (1.x): pip install openai") from None
    return OpenAI(max_retries=API_RETRIES)


def ask_judge(client, prompt: str, max_tokens: int, model: str) -> str:
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}],
        temperature=JUDGE_TEMPERATURE,
        max_tokens=max_tokens,
    )
    return response.choices[0].message.content


def load_inputs(args) -> list[tuple[dict, str]]:
    with open(args.rule, encoding="utf-8") as file:
        rules = json.load(file)
    captions = {field(row, "image", args.context): field(row, "caption", args.context) for row in read_jsonl(args.context)}
    reference_path, model_path = args.answer_list
    return review_tasks(read_jsonl(args.question), read_answers(reference_path), read_answers(model_path), captions, rules)


def run_reviews(args) -> None:
    tasks = load_inputs(args)
    done = len(read_jsonl(args.output)) if os.path.isfile(args.output) else 0
    if done:
        print(f"{done} review(s) already in {args.output}: skipping them")
    pending = tasks[done:]
    if not pending:
        return
    client = openai_client()
    make_parent_dir(args.output)
    with open(args.output, "a", encoding="utf-8") as out:
        for row, prompt in pending:
            review = ask_judge(client, prompt, args.max_tokens, args.judge_model)
            scores = parse_score(review)
            if scores == UNPARSED:
                print(f"warning: review {row['id']}: no score pair on the first line: {review[:200]!r}", file=sys.stderr)
            out.write(json.dumps({**row, "content": review, "tuple": scores}) + "\n")
            out.flush()  # a crash loses at most the review in flight; the rerun resumes after it
            print(f"review {row['id']}/{len(tasks)}: {scores}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        run_reviews(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
