"""Helpers shared by the scorers, the submission converters and the LLaVA-Bench review tools:
answers files read (refused when a question is answered twice, which would be counted twice or
shift answers paired by position), and the messages for user mistakes (`llava.utils.user_errors`
reports them in one line instead of a traceback).

Standard library only (no torch), like `llava.eval.jsonl`.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from llava.eval.jsonl import read_jsonl
from llava.files import make_parent_dir  # noqa: F401  (the converters import it from here)

DUPLICATES_SHOWN = 10


class UserError(ValueError):
    """Something the user must fix (an input file, an option, the environment)."""


def field(row: dict, key: str, path: str | os.PathLike):
    """`row[key]`, or a UserError naming the file when a line lacks it."""
    try:
        return row[key]
    except KeyError:
        raise UserError(f"{path}: a line has no {key!r}: {str(row)[:200]}") from None


def refuse_duplicate_answers(rows: list[dict], path: str | os.PathLike) -> None:
    """A UserError naming the questions answered more than once: rows with the same question_id
    and the same `prompt` (None when a row has none). The pair, not the id alone, because TextVQA
    asks several questions about one image id and MMBench's `--all-rounds` asks one question with
    its options rotated. Rows without a question_id are left to the caller to report."""
    counts = Counter()
    question_ids = {}
    for row in rows:
        if "question_id" in row:
            # JSON text as the key: an id may be unhashable (a list), and 1 and True stay apart
            key = json.dumps([row["question_id"], row.get("prompt")], sort_keys=True)
            counts[key] += 1
            question_ids[key] = row["question_id"]
    repeated = [(question_ids[key], count) for key, count in counts.items() if count > 1]
    if repeated:
        listed = ", ".join(f"question_id {question_id!r} x{count}" for question_id, count in repeated[:DUPLICATES_SHOWN])
        more = ", ..." if len(repeated) > DUPLICATES_SHOWN else ""
        raise UserError(f"{path}: {len(repeated)} question(s) are answered more than once ({listed}{more}): the file "
                        "was written by two runs at once or merged twice; rerun the runner (it keeps one answer per "
                        "question) or remove the duplicates")


def read_answers(path: str | os.PathLike) -> list[dict]:
    """The rows of an answers file, refused when a question is answered twice; malformed lines are
    skipped and reported on stderr by `read_jsonl`."""
    # stderr looked up now, not at import, so that a redirected stderr gets the report
    rows = read_jsonl(path, report=sys.stderr)
    refuse_duplicate_answers(rows, path)
    return rows


def answer_texts(path: str | os.PathLike) -> dict:
    """question_id -> answer text of an answers file (one `{"question_id", "text", ...}` per line).
    A question answered twice (same question_id and prompt) is refused; a question_id asked with
    several prompts keeps its later answer but its first position, as upstream's dict building
    does."""
    return {field(row, "question_id", path): field(row, "text", path) for row in read_answers(path)}


def missing_answers_message(question_ids: list, answers_path: str | os.PathLike, shown: int = 10) -> str:
    listed = ", ".join(map(repr, question_ids[:shown])) + (", ..." if len(question_ids) > shown else "")
    return f"{len(question_ids)} question(s) have no answer in {answers_path}: question_id {listed}"
