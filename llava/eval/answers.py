"""Helpers shared by the submission converters and the LLaVA-Bench review tools: answers files
read into one dict per file, and the messages for user mistakes (`llava.utils.user_errors`
reports them in one line instead of a traceback).

Standard library only (no torch), like `llava.eval.jsonl`.
"""

from __future__ import annotations

import os
import sys

from llava.eval.jsonl import iter_jsonl


class UserError(ValueError):
    """Something the user must fix (an input file, an option, the environment)."""


def field(row: dict, key: str, path: str | os.PathLike):
    """`row[key]`, or a UserError naming the file when a line lacks it."""
    try:
        return row[key]
    except KeyError:
        raise UserError(f"{path}: a line has no {key!r}: {str(row)[:200]}") from None


def answer_texts(path: str | os.PathLike) -> dict:
    """question_id -> answer text of an answers file (one `{"question_id", "text", ...}` per line).
    A question answered twice keeps its later answer but its first position, as upstream's dict
    building does; malformed lines are skipped and reported by `iter_jsonl`."""
    # stderr looked up now, not at import, so that a redirected stderr gets the report
    rows = iter_jsonl(path, report=sys.stderr)
    return {field(row, "question_id", path): field(row, "text", path) for row in rows}


def missing_answers_message(question_ids: list, answers_path: str | os.PathLike, shown: int = 10) -> str:
    listed = ", ".join(map(repr, question_ids[:shown])) + (", ..." if len(question_ids) > shown else "")
    return f"{len(question_ids)} question(s) have no answer in {answers_path}: question_id {listed}"


def make_parent_dir(path: str | os.PathLike) -> None:
    """Create the directory an output file goes into (upstream's shell scripts forget some)."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
