"""Reading answers and question files line by line, never silently: malformed lines are counted
and reported on stderr, so a damaged file cannot produce a quietly wrong score.

Scorers import only this and the standard library (no torch), so they run anywhere.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Iterator

from llava.files import atomic_write


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """`("line N", text)` for every line of a text file that is not blank (N counts from 1)."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield f"line {number}", line


def iter_jsonl(path: str | os.PathLike, report=None) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file, in order. Blank lines are skipped; lines that are
    not a JSON object are skipped and counted, and the count (with the first bad lines) is printed
    to `report` (default: the current `sys.stderr`) at the end."""
    bad_lines = []
    for where, line in numbered_lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            yield row
        else:
            bad_lines.append(where.removeprefix("line "))
    if bad_lines:
        shown = ", ".join(bad_lines[:10]) + (", ..." if len(bad_lines) > 10 else "")
        print(f"warning: {path}: skipped {len(bad_lines)} malformed line(s) (line {shown})", file=report or sys.stderr)


def read_jsonl(path: str | os.PathLike, report=None) -> list[dict]:
    return list(iter_jsonl(path, report))


def write_jsonl(path: str | os.PathLike, rows) -> None:
    """Replace `path` with `rows`, one JSON object a line, atomically (`llava.files.atomic_write`):
    a kill at any moment leaves either the old file or the whole new one."""
    with atomic_write(path) as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
