"""`llava.files.atomic_write`: the target holds its old content or the whole new one, never less."""

import json
import os
import stat
import subprocess
import sys

import pytest

from llava.files import atomic_write, write_text


def test_content_is_replaced(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    with atomic_write(path) as out:
        out.write("new\n")
    assert path.read_text() == "new\n"
    write_text(path, "newer\r\n", newline="")
    assert path.read_bytes() == b"newer\r\n"
    assert os.listdir(tmp_path) == ["result.json"]


def test_an_exception_in_the_block_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="scorer failed"):
        with atomic_write(path) as out:
            out.write("half of the new")
            raise RuntimeError("scorer failed")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["result.json"]


def test_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600


def test_binary_mode(tmp_path):
    path = tmp_path / "figure.png"
    with atomic_write(path, "wb") as out:
        out.write(b"\x89PNG\r\n")
    assert path.read_bytes() == b"\x89PNG\r\n"


@pytest.mark.parametrize("mode", ["a", "r", "w+", "ab"])
def test_a_mode_other_than_a_whole_write_is_refused(tmp_path, mode):
    with pytest.raises(ValueError, match="mode 'w' or 'wb'"):
        with atomic_write(tmp_path / "result.json", mode):
            pass
    assert os.listdir(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from llava.eval.jsonl import write_jsonl

def rows():
    for number in range(200_000):
        if number == 50_000:  # well past the first buffer flushes: the temporary is on disk
            os.kill(os.getpid(), signal.SIGKILL)
        yield {"question_id": number, "text": "x" * 40}

write_jsonl(sys.argv[1], rows())
"""


def test_a_kill_in_the_middle_of_write_jsonl_leaves_the_old_rows(tmp_path):
    path = tmp_path / "answers.jsonl"
    old = [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "no"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in old))
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr
    assert [json.loads(line) for line in path.read_text().splitlines()] == old
    # the kill came mid-write: a partial temporary is left beside it (the runners remove those)
    (temporary,) = [other for other in tmp_path.iterdir() if other != path]
    assert temporary.name.startswith(".answers.jsonl.") and temporary.stat().st_size > 0
