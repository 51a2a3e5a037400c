"""The FLOPs tool reproduces the paper's TFLOPs columns and counts what it says it counts."""

import importlib.util
import json
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "flops.py"
_SPEC = importlib.util.spec_from_file_location("flops", _PATH)
flops = importlib.util.module_from_spec(_SPEC)
sys.modules["flops"] = flops  # dataclasses look their module up while the file runs
_SPEC.loader.exec_module(flops)

RATIOS = [1, 0.75, 0.5, 0.25, 0.1]


def _tflops(argv, capsys):
    assert flops.main([*argv, "--json"]) == 0
    return [round(row["prefill_tflops"], 1) for row in json.loads(capsys.readouterr().out)]


def test_paper_7b_column(capsys):
    # v2's two-decimal table: 41.65 / 30.42 / 19.74 / 9.60 / 3.77 (linear layers + attention matmuls).
    assert _tflops(["--model", "llava-next-7b", "--ratios", *map(str, RATIOS)], capsys) == [41.7, 30.4, 19.7, 9.6, 3.8]


def test_paper_13b_column_counts_the_elementwise_ops_too(capsys):
    # Without them 13B gives 79.9 / 58.6 / 38.2; the paper's 13B table includes softmax and friends.
    assert _tflops(["--model", "llava-next-13b", "--elementwise"], capsys) == [80.0, 58.7, 38.3, 18.7, 7.4]
    assert _tflops(["--model", "llava-next-13b"], capsys)[:3] == [79.9, 58.6, 38.2]


def test_counts_by_hand():
    # h = 4, I = 8, one layer, 2 heads, vocab 10, 3 tokens:
    # linear 2 * 3 * (4 * 4*4 + 3 * 4*8) = 2 * 3 * 160 = 960; attention 2 * 2 * 9 * 2 * 2 = 144.
    tiny = flops.LanguageModel(hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=2, vocab_size=10)
    assert flops.prefill_flops(tiny, 3) == 960 + 144
    # decode with 3 cached tokens: 320 linear + 2 * 2 * 4 keys * 4 + lm_head 2 * 4 * 10
    assert flops.decode_flops_per_token(tiny, 3) == 320 + 64 + 80
    # softmax 5 * 9 * 2 + norms 2 * 4 * 3 * 4 + SiLU/gate 5 * 3 * 8 + residuals 2 * 3 * 4
    assert flops.prefill_flops(tiny, 3, elementwise=True) == 1104 + 90 + 96 + 120 + 24
    assert flops.kv_cache_bytes(tiny, 3) == 2 * 1 * 3 * 4 * 2
    # grouped-query attention shrinks k, v and the cache
    grouped = flops.LanguageModel(4, 8, 1, 2, 1, 10)
    assert flops.prefill_flops(grouped, 1) == 2 * (4 * (8 + 4) + 3 * 32) + 2 * 2 * 1 * 2 * 2
    assert flops.kv_cache_bytes(grouped, 3) == 2 * 3 * 2 * 2


def test_config_file_and_answers_file(tmp_path, capsys):
    config = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _tflops(["--config", str(tmp_path / "config.json"), "--ratios", "1"], capsys) == [41.7]
    answers = [{"question_id": 1, "metadata": {"visual_tokens": 720, "visual_tokens_before": 2880}},
               {"question_id": 2, "metadata": {"error": "image missing"}}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))
    assert flops.main(["--answers", str(tmp_path / "answers.jsonl"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["question_id"] for row in rows] == [1]
    assert rows[0]["prefill_tflops"] == pytest.approx(9.597, abs=1e-3) and rows[0]["vanilla_prefill_tflops"] == pytest.approx(41.65, abs=1e-2)


def test_table_output(capsys):
    assert flops.main(["--ratios", "1", "0.1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| ratio | visual_tokens |") and lines[2].startswith("| 1 | 2880 |") and len(lines) == 4


TINY = flops.LanguageModel(hidden_size=4, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=2, vocab_size=10)


def test_per_layer_schedule_by_hand():
    # layer 0 on 3 tokens: linear 2 * 3 * 160 = 960, attention 2 * 2 * 3^2 * 2 * 2 = 144 -> 1104;
    # layer 1 on 1 token (pruned after layer 0): linear 2 * 1 * 160 = 320, attention 2 * 2 * 1 * 2 * 2 = 16 -> 336
    assert flops.schedule_prefill_flops(TINY, [3, 1]) == 1104 + 336
    assert flops.schedule_prefill_flops(TINY, [3, 3]) == flops.prefill_flops(TINY, 3) == 2 * 1104  # nothing pruned
    row = flops.schedule_row(TINY, [3, 1])
    # equivalent tokens: the layer average (3 + 1) / 2 (in-llm-pruning.md 6); post-pruning: the last layer's 1
    assert (row["layer_0_tokens"], row["post_pruning_tokens"], row["equivalent_tokens"]) == (3, 1, 2.0)
    assert row["prefill_vs_unpruned"] == pytest.approx(1440 / 2208)
    # the element-wise ops per layer too: layer 1 on 1 token adds 5*1*2 + 2*4*1*4 + 5*1*8 + 2*1*4 = 90
    assert flops.schedule_prefill_flops(TINY, [3, 1], elementwise=True) == 1104 + 330 + 336 + 90
    with pytest.raises(ValueError, match="a schedule of 3 layers for a model of 2"):
        flops.schedule_prefill_flops(TINY, [3, 2, 1])


def test_layer_tokens_argument(capsys):
    assert flops.parse_layer_tokens(["2880x2", "288x30"]) == [2880] * 2 + [288] * 30
    assert flops.parse_layer_tokens(["5", "4x2"]) == [5, 4, 4]
    # FastV K = 2 at 10% post-pruning on the 7B preset: equivalent (2 * 2880 + 30 * 288) / 32 = 450
    assert flops.main(["--layer-tokens", "2880x2", "288x30", "--json"]) == 0
    row, = json.loads(capsys.readouterr().out)
    seven_b = flops.PRESETS["llava-next-7b"]
    one_layer = flops.LanguageModel(4096, 11008, 1, 32, 32, 32000)
    assert row["equivalent_tokens"] == 450 and row["post_pruning_tokens"] == 288
    assert row["prefill_tflops"] * 1e12 == pytest.approx(2 * flops.prefill_flops(one_layer, 2880)
                                                         + 30 * flops.prefill_flops(one_layer, 288))
    assert row["prefill_vs_unpruned"] < 450 / 2880 * 1.01 and seven_b.num_layers == 32
    assert flops.main(["--layer-tokens", "2880y2"]) == 2 and "COUNTxLAYERS" in capsys.readouterr().err


def test_answers_with_per_layer_counts(tmp_path, capsys):
    config = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
              "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    # one image pruned in-LLM (3 then 1 tokens), one pre-LLM image of 2 tokens at both layers: [5, 3]
    images = [{"tokens_after": 3, "layer_image_tokens": [3, 1]}, {"tokens_after": 2}]
    answers = [{"question_id": 1, "metadata": {"visual_tokens": 5, "visual_tokens_before": 8, "images": images}},
               {"question_id": 2, "metadata": {"visual_tokens": 3, "visual_tokens_before": 8,
                                               "images": [{"tokens_after": 3}]}}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))
    assert flops.main(["--config", str(tmp_path / "config.json"), "--answers", str(tmp_path / "answers.jsonl"),
                       "--json"]) == 0
    pruned, plain = json.loads(capsys.readouterr().out)
    two_layers = flops.LanguageModel(4, 8, 2, 2, 2, 10)
    assert pruned["prefill_tflops"] * 1e12 == pytest.approx(flops.schedule_prefill_flops(two_layers, [5, 3]))
    assert pruned["visual_tokens"] == 3 and pruned["equivalent_tokens"] == 4.0
    assert plain["prefill_tflops"] * 1e12 == pytest.approx(flops.prefill_flops(two_layers, 3))
    assert "equivalent_tokens" not in plain
    # recorded on the 2-layer model, read with the 32-layer preset: refused in one line
    assert flops.main(["--answers", str(tmp_path / "answers.jsonl")]) == 2
    assert "recorded on a model with 2 layers" in capsys.readouterr().err


def test_onevision_presets_by_hand(capsys):
    # Qwen2-0.5B: h = 896, I = 4864, 24 layers, 14 heads of 64, 2 KV heads (k, v 128 wide); one token:
    # linear 2 * (896 * (2 * 896 + 2 * 128) + 3 * 896 * 4864), attention 2 * 2 * 1 * 64 * 14
    small = flops.PRESETS["llava-onevision-0.5b"]
    assert flops.prefill_flops(small, 1) == 24 * (2 * (896 * 2048 + 3 * 896 * 4864) + 4 * 64 * 14)
    # Qwen2-7B: h = 3584, 28 heads of 128, 4 KV heads (k, v 512 wide), I = 18944, 28 layers, vocab 152064
    large = flops.PRESETS["llava-onevision-7b"]
    assert flops.linear_flops_per_token(large) == 2 * (3584 * (2 * 3584 + 2 * 512) + 3 * 3584 * 18944)
    assert flops.decode_flops_per_token(large, 0) - 28 * flops.linear_flops_per_token(large) \
        == 28 * 4 * 128 * 28 + 2 * 3584 * 152064
    # the ratio rows count int(7290 R) tokens: a thumbnail and 9 crops of 27 x 27
    assert flops.main(["--model", "llava-onevision-0.5b", "--ratios", "1", "0.75", "0.5", "0.25", "0.15", "0.1",
                       "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["visual_tokens"] for row in rows] == [7290, 5467, 3645, 1822, 1093, 729]
    assert rows[-1]["prefill_tflops"] == pytest.approx(flops.prefill_flops(small, 729) / 1e12)
    assert flops.main(["--model", "llava-onevision-7b", "--vanilla-tokens", "1000", "--ratios", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["visual_tokens"] == 500
