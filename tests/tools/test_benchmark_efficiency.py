"""The efficiency benchmark runs on the tiny checkpoint and reports consistent quantities (no timing
is asserted: targets are for the benchmark's own output)."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_benchmark_writes_json_markdown_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "eff"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_efficiency.py"), "--model-path", tiny_checkpoint,
                             "--ratios", "1", "0.25", "--repeats", "1", "--warmup", "0", "--new-tokens", "2",
                             "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.load(open(out / "efficiency.json"))["rows"]
    full, compressed = rows
    assert full["visual_tokens"] == 576 + 48 * 49 and compressed["visual_tokens"] < full["visual_tokens"] / 3
    # tiny LLM: 2 layers, 64 wide, fp32 -> 2 (k, v) * 2 layers * 64 * 4 bytes per prompt token
    for row in rows:
        assert row["kv_cache_mb"] * 2**20 == 2 * 2 * 64 * 4 * row["prompt_tokens"]
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0 and row["peak_memory_mb"] > 0
    assert full["prefill_ms_vs_r1"] == 1 and 0 < compressed["prefill_tflops_vs_r1"] < 0.4
    assert "target within 1.5x" in (out / "efficiency.md").read_text()
    assert (out / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(path.name for path in out.iterdir()) == ["efficiency.json", "efficiency.md", "efficiency.png"]


def test_an_in_llm_method_reports_its_schedule_and_overheads(tiny_checkpoint, tmp_path):
    out = tmp_path / "eff"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_efficiency.py"), "--model-path", tiny_checkpoint,
                             "--method", "fastv", "--method-arg", "k=1", "--ratios", "1", "0.25", "--repeats", "1",
                             "--warmup", "0",
                             "--new-tokens", "1", "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    full, pruned = json.load(open(out / "efficiency.json"))["rows"]
    assert full["equivalent_tokens"] == full["visual_tokens"] and full["scoring_share"] == 0
    # FastV keeps every image token in layer 0 (K = 1 of the tiny 2): the layer average exceeds what is left
    assert pruned["visual_tokens"] < pruned["equivalent_tokens"] < full["visual_tokens"]
    assert 0 < pruned["scoring_share"] < 1 and 0 < pruned["pruning_share"] < 1
    assert "scoring_share" in (out / "efficiency.md").read_text()


def test_onevision_preset_runs_globalcom2_on_siglip(tmp_path):
    # run in tmp_path: the preset builds the tiny OneVision checkpoint there for its SigLIP tower
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_efficiency.py"), "--preset", "cpu-onevision",
                             "--image-size", "384", "384", "--ratios", "1", "0.25", "--repeats", "1", "--warmup", "0",
                             "--new-tokens", "1", "--out", "eff", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "eff" / "efficiency.json"))
    # SigLIP offers no [CLS]: GlobalCom2 runs with the paper's score without it unless told otherwise
    assert "globalcom2 score=neg_cos_mean" in report["setup"]
    full, compressed = report["rows"]
    # a 384 x 384 image is one 384 crop: thumbnail 27 x 27, the crop's 27 rows of 27 and a newline each
    assert full["visual_tokens"] == 729 + 27 * 28 and compressed["visual_tokens"] < full["visual_tokens"] / 3
    # Qwen2 preset: 4 layers, 2 KV heads of 768 / 12 = 64, fp32 -> 2 (k, v) * 4 * 2 * 64 * 4 bytes per prompt token
    for row in report["rows"]:
        assert row["kv_cache_mb"] * 2**20 == 2 * 4 * 2 * 64 * 4 * row["prompt_tokens"]


def test_an_explicit_method_argument_replaces_the_siglip_default(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_efficiency.py"), "--preset", "cpu-onevision",
                             "--method-arg", "score=cls", "--ratios", "0.5", "--out", "eff", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    error = result.stderr.strip().splitlines()[-1]  # after transformers' warnings, one line and no traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error.startswith("error: method globalcom2 needs cls") and "--method-arg score=neg_cos_mean" in error
