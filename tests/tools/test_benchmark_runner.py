"""The runner benchmark times the real runner without changing what it writes (no timing is asserted:
the target is for the benchmark's own output)."""

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from llava.eval import runner
from llava.eval.jsonl import read_jsonl, write_jsonl
from llava.eval.sample_suite import ensure_sample_suite

REPO = pathlib.Path(__file__).resolve().parents[2]
PARTS = ["front_end", "tower", "compression", "prefill", "decode", "overhead"]


@pytest.fixture(scope="module")
def benchmark_runner():
    spec = importlib.util.spec_from_file_location("benchmark_runner", REPO / "tools" / "benchmark_runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def three_questions(tmp_path):
    """The first three sample MME questions: (question file, image folder)."""
    suite = pathlib.Path(ensure_sample_suite(str(tmp_path / "suite")))
    question_file = tmp_path / "questions.jsonl"
    write_jsonl(str(question_file), read_jsonl(str(suite / "MME" / "llava_mme.jsonl"))[:3])
    return question_file, suite / "MME" / "MME_Benchmark_release_version"


def _comparable(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "answer_id"}  # a fresh uuid per answer


def test_parts_add_up_and_the_answers_are_the_plain_runners(tiny_checkpoint, three_questions, tmp_path):
    question_file, images = three_questions
    out = tmp_path / "bench"
    common = ["--model-path", tiny_checkpoint, "--question-file", str(question_file), "--image-folder", str(images),
              "--max-new-tokens", "3", "--device", "cpu"]
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_runner.py"), *common,
                             "--ratios", "1", "0.1", "--workers", "0", "1", "--batch-sizes", "1", "2",
                             "--warmup-questions", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "runner.json").read_text())
    rows = report["rows"]
    assert [(row["ratio"], row["workers"], row["batch_size"]) for row in rows] == [
        (ratio, workers, batch) for workers in (0, 1) for batch in (1, 2) for ratio in (1, 0.1)]
    for row in rows:
        parts = [row[f"{part}_ms"] for part in PARTS]
        assert min(parts) >= 0 and row["tower_ms"] > 0 and row["prefill_ms"] > 0 and row["decode_ms"] > 0
        assert sum(parts) == pytest.approx(row["wall_ms"], rel=1e-9)
        assert row["model_ms"] == pytest.approx(row["tower_ms"] + row["compression_ms"] + row["prefill_ms"]
                                                + row["decode_ms"], rel=1e-9)
        # 3 questions in ceil(3 / batch) generate calls, each one prefill and 2 cached steps (3 new tokens: the
        # tiny model's random weights give no end token that early); per call the tower's two timed functions
        # and one encode_image_sequences, plus one image_sequence per image
        calls = -(-3 // row["batch_size"])
        assert row["calls"] == dict(front_end=3, tower=2 * calls, compression=calls + 3, prefill=calls,
                                    decode=2 * calls)
    assert len(report["checks"]) == 4 and all(check["ratio"] == 0.1 for check in report["checks"])
    for check in report["checks"]:
        assert check["holds"] == (check["model_only_speedup"] / check["end_to_end_speedup"] <= 1.3)
    table = (out / "runner.md").read_text()
    assert table.count("(target <= 1.3)") == 4 and "| front_end_ms |" in table
    assert (out / "runner.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for ratio in ("1", "0.1"):
        plain = tmp_path / f"plain{ratio}.jsonl"
        result = subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_loader", *common, "--temperature", "0",
                                 "--conv-mode", "vicuna_v1", "--retention-ratio", ratio, "--answers-file", str(plain)],
                                capture_output=True, text=True, timeout=300, cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        expected = [_comparable(row) for row in read_jsonl(str(plain))]
        assert len(expected) == 3
        for workers in (0, 1):
            for batch in (1, 2):
                written = read_jsonl(str(out / "answers" / f"R{ratio}_w{workers}_b{batch}.jsonl"))
                assert [_comparable(row) for row in written] == expected, (ratio, workers, batch)


def test_nested_calls_are_counted_once(benchmark_runner, monkeypatch):
    ticks = iter([0.0, 1.0, 4.0, 10.0])  # outer starts, inner starts, inner ends, outer ends (s)
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    timer = benchmark_runner.PartTimer(torch.device("cpu"))
    with timer.timing("prefill"):
        with timer.timing("tower"):
            pass
    assert timer.ms["tower"] == 3000 and timer.ms["prefill"] == 7000
    assert timer.calls == dict(front_end=0, tower=1, compression=0, prefill=1, decode=0)


def test_the_wrappers_are_removed_afterwards(benchmark_runner, tiny):
    model = tiny[1]
    prepared_questions, load_model = runner._prepared_questions, runner._load_model
    timer = benchmark_runner.PartTimer(model.device)
    with benchmark_runner.timed_runner(timer, model, lambda args, rank: tiny):
        assert "forward" in vars(model) and runner._load_model is not load_model
    timed = {"encode_images", "signals_from_instructions", "encode_image_sequences", "image_sequence", "forward"}
    assert not timed & set(vars(model))
    assert (runner._prepared_questions, runner._load_model) == (prepared_questions, load_model)
