"""The compression benchmark says what it is timing while it runs (a full run takes minutes), and
times every registered method."""

import json
import pathlib
import subprocess
import sys

from llava.model.compression import method_names

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_progress_lines_on_stderr_and_the_json(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_compression.py"), "--ratios", "0.5",
                             "--repeats", "1", "--released-repeats", "1", "--skip-tower",
                             "--json", str(tmp_path / "out.json")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.splitlines() == ["[benchmark] R 0.5: ours official (1 repeats)...",
                                          "[benchmark] R 0.5: ours spatial (1 repeats)...",
                                          "[benchmark] R 0.5: released code (1 repeats)...",
                                          *(f"[benchmark] R 0.5: method {name} (1 repeats)..." for name in method_names("pre-llm"))]
    assert "[benchmark]" not in result.stdout  # the tables stay clean
    rows = json.loads((tmp_path / "out.json").read_text())["compression"]
    assert [row["ratio"] for row in rows] == [0.5] and rows[0]["official_equals_released"] is True
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.json"]  # no temporary left
    methods = json.loads((tmp_path / "out.json").read_text())["methods"]
    assert [row["method"] for row in methods] == method_names("pre-llm") and all(row["ms"] > 0 for row in methods)
    official = next(row for row in methods if row["method"] == "globalcom2")
    assert official["tokens"] == rows[0]["official_tokens"]  # the registry path equals the direct call
