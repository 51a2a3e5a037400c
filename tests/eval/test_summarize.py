"""The results table: headline numbers from scorer outputs, relative scores against R = 1."""

import csv
import json

import pytest

from llava.eval import summarize

MME_LOG = """=========== Perception ===========
total score: 1493.5 

\t existence  score: 190.0
=========== Cognition ===========
total score: 310.0 
"""


@pytest.mark.parametrize("bench, log, expected", [
    ("gqa", "Binary: 80.00%\nOpen: 45.00%\nAccuracy: 61.50%\n", 61.5),
    ("textvqa", "llava-next-7b\nSamples: 5000\nAccuracy: 60.90%\n", 60.9),
    ("sqa", "Total: 4241, Correct: 3000, Accuracy: 70.74%, IMG-Accuracy: 68.10%\n", 68.1),
    ("pope", "F1 score: 0.88\nAverage F1 over 3 categories: 87.60\n", 87.6),
    ("mme", MME_LOG, 1493.5),
    ("seed", "all accuracy: 60.00%\nimage accuracy: 70.20%\nvideo accuracy: 40.00%\n", 70.2),
    ("llavabench", "llava-next-7b\nall 81.6 75.2 61.4\nconv 80.0 70.0 56.0\n", 81.6),
])
def test_headline_numbers(bench, log, expected):
    assert summarize.parse_headline(bench, log)["score"] == expected


def test_mme_keeps_cognition_and_missing_scores_are_errors():
    assert summarize.parse_headline("mme", MME_LOG) == {"score": 1493.5, "cognition": 310.0}
    with pytest.raises(ValueError, match="no gqa score"):
        summarize.parse_headline("gqa", "nothing here")
    with pytest.raises(ValueError, match="--score"):
        summarize.parse_headline("vqav2", "")


def _record(results, benchmark, ratio, score, layout="official", model="llava-next-7b"):
    out = results / benchmark / f"{model}-R{ratio}-{layout}.json"
    assert summarize.main(["record", "--benchmark", benchmark, "--model", model, "--retention-ratio", str(ratio),
                           "--token-layout", layout, "--score", str(score), "--out", str(out)]) == 0


def test_table_with_relative_average(tmp_path, capsys):
    results = tmp_path / "results"
    for benchmark, vanilla, compressed in [("gqa", 64.0, 48.0), ("mme", 1500.0, 1500.0), ("pope", 80.0, 88.0)]:
        _record(results, benchmark, 1, vanilla)
        _record(results, benchmark, 0.25, compressed)
    _record(results, "gqa", 0.1, 32.0, layout="spatial")
    log = tmp_path / "gqa.txt"
    log.write_text("Accuracy: 16.00%\n")
    assert summarize.main(["record", "--benchmark", "gqa", "--model", "other", "--retention-ratio", "0.5",
                           "--log", str(log), "--out", str(results / "gqa" / "other.json")]) == 0
    capsys.readouterr()
    assert summarize.main(["--results-dir", str(results), "--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[0] == ["model", "layout", "R", "method", "GQA", "POPE", "MME", "Average (n)"]
    # GQA 48/64 = 75%, POPE 88/80 = 110%, MME 100%: the average is 95.0%, over 3 benchmarks.
    assert rows[1:] == [["llava-next-7b", "-", "1", "-", "64", "80", "1500", "100.0% (3)"],
                        ["llava-next-7b", "official", "0.25", "globalcom2", "48", "88", "1500", "95.0% (3)"],
                        ["llava-next-7b", "spatial", "0.1", "globalcom2", "32", "", "", "50.0% (1)"],
                        ["other", "official", "0.5", "globalcom2", "16", "", "", ""]]
    output = capsys.readouterr()
    assert (tmp_path / "t.md").read_text() == output.out
    # "other" has no R = 1 run: its missing Average is explained.
    assert "other official R 0.5 globalcom2: no R = 1 score of other for gqa; its Average covers 0 of its 1" in output.err
    assert json.load(open(results / "gqa" / "other.json"))["score"] == 16.0


def test_empty_results_dir_is_a_clear_error(tmp_path, capsys):
    assert summarize.main(["--results-dir", str(tmp_path)]) == 2
    assert "no results under" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", ["7", "0", "-0.5", "nan", "half"])
def test_record_refuses_a_ratio_outside_zero_one(tmp_path, capsys, ratio):
    with pytest.raises(SystemExit) as exit_info:
        summarize.main(["record", "--benchmark", "gqa", "--model", "m", "--retention-ratio", ratio, "--score", "1",
                        "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and "must be a number in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_default_results_dir_finds_the_sample_suite(tmp_path, capsys, monkeypatch):
    """After `SAMPLE=1` runs only the sample suite has results: the table finds them unasked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVAL_DIR", raising=False)
    sample = tmp_path / "playground" / "sample" / "eval" / "results"
    _record(sample, "gqa", 1, 50.0)
    assert summarize.main([]) == 0
    output = capsys.readouterr()
    assert "results from ./playground/sample/eval/results" in output.err and "| 50 |" in output.out
    # Real results, once there, come first; EVAL_DIR wins over both.
    _record(tmp_path / "playground" / "data" / "eval" / "results", "gqa", 1, 60.0)
    assert summarize.main([]) == 0 and "| 60 |" in capsys.readouterr().out
    monkeypatch.setenv("EVAL_DIR", str(tmp_path / "elsewhere"))
    assert summarize.main([]) == 2 and "elsewhere/results" in capsys.readouterr().err


def _record_run(results, benchmark, score, model="m", method=None, method_args=(), budget=("--retention-ratio", "1")):
    """One record as the scripts make it; the file named like the scripts' answers, one per run."""
    name = "-".join([model, method or "default", *method_args, *budget]).replace(" ", "_")
    out = results / benchmark / f"{name}.json"
    argv = ["record", "--benchmark", benchmark, "--model", model, *budget, "--score", str(score), "--out", str(out)]
    argv += ["--method", method] if method else []
    argv += ["--method-args", *method_args] if method_args else []
    assert summarize.main(argv) == 0
    return out


def test_paper_table_groups_methods_by_budget_under_the_vanilla_row(tmp_path, capsys):
    results = tmp_path / "results"
    # Vanilla: R = 1 whatever the method, so the random run's SQA joins GlobalCom2's row.
    for benchmark, score in [("gqa", 60), ("pope", 80), ("mme", 1500)]:
        _record_run(results, benchmark, score)
    _record_run(results, "sqa", 70, method="random")
    half, quarter = ("--retention-ratio", "0.5"), ("--retention-ratio", "0.25")
    # gqa, sqa, pope, mme against 60, 70, 80, 1500:
    # R 0.5 GlobalCom2: 95%, 100%, 95%, 90% -> 95.0% over 4.
    for benchmark, score in [("gqa", 57), ("sqa", 70), ("pope", 76), ("mme", 1350)]:
        _record_run(results, benchmark, score, budget=half)
    # R 0.5 random: 90%, 90%, 90%, 80% -> 87.5% over 4.
    for benchmark, score in [("gqa", 54), ("sqa", 63), ("pope", 72), ("mme", 1200)]:
        _record_run(results, benchmark, score, method="random", budget=half)
    # R 0.25 GlobalCom2 allocation=uniform alpha=0 (keys sorted), however spelt (the last alpha wins):
    # 80%, 90%, 85%, 85% -> 85.0% over 4.
    for benchmark, score, args in [("gqa", 48, ["alpha=0 allocation=uniform"]),
                                   ("sqa", 63, ["allocation=uniform", "alpha=0.0"]),
                                   ("pope", 68, ["alpha=1 allocation=uniform alpha=0"]),
                                   ("mme", 1275, ["alpha=0e0 allocation=uniform"])]:
        _record_run(results, benchmark, score, method="globalcom2", method_args=args, budget=quarter)
    # R 0.25 random, no MME: 75%, 80%, 80% -> 78.3% over 3 (and a warning).
    for benchmark, score in [("gqa", 45), ("sqa", 56), ("pope", 64)]:
        _record_run(results, benchmark, score, method="random", budget=quarter)
    # 300 tokens per image, after every ratio: GQA 50% -> 50.0% over 1.
    _record_run(results, "gqa", 30, method="pooling", budget=("--visual-tokens", "300"))
    # A second model without a vanilla run: its own block, no Average.
    _record_run(results, "gqa", 30, model="other", budget=half)
    capsys.readouterr()
    assert summarize.main(["--results-dir", str(results), "--table", "paper",
                           "--markdown", str(tmp_path / "t.md"), "--csv", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows == [["model", "budget", "method", "GQA", "SQA-IMG", "POPE", "MME", "Average (n)"],
                    ["m", "Upper bound", "vanilla", "60", "70", "80", "1500", "100.0% (4)"],
                    ["m", "50%", "globalcom2", "57", "70", "76", "1350", "95.0% (4)"],
                    ["m", "50%", "random", "54", "63", "72", "1200", "87.5% (4)"],
                    ["m", "25%", "globalcom2 allocation=uniform alpha=0", "48", "63", "68", "1275", "85.0% (4)"],
                    ["m", "25%", "random", "45", "56", "64", "", "78.3% (3)"],
                    ["m", "300 tokens", "pooling", "30", "", "", "", "50.0% (1)"],
                    ["other", "50%", "globalcom2", "30", "", "", "", ""]]
    output = capsys.readouterr()
    assert (tmp_path / "t.md").read_text() == output.out
    assert output.out.startswith("**m**\n\n| budget | method | GQA |") and "\n**other**\n\n| budget |" in output.out
    assert "| Upper bound | vanilla | 60 | 70 | 80 | 1500 | 100.0% (4) |" in output.out
    assert output.err.splitlines() == [
        "warning: m 25% random: no mme score, which the vanilla row has; "
        "its Average covers 3 of the vanilla row's 4 benchmarks",
        "warning: m 300 tokens pooling: no sqa, pope, mme score, which the vanilla row has; "
        "its Average covers 1 of the vanilla row's 4 benchmarks",
        "warning: other has no R = 1 (vanilla) run: its rows have no Average"]


def test_records_carry_the_method_in_one_form(tmp_path):
    spelt_one_way = _record_run(tmp_path, "gqa", 50, method="globalcom2", method_args=["alpha=0.0 allocation=uniform"])
    spelt_another = _record_run(tmp_path, "gqa", 50, method="globalcom2", method_args=["allocation=uniform", "alpha=0"])
    assert json.load(open(spelt_one_way)) == json.load(open(spelt_another)) == {
        "benchmark": "gqa", "model": "m", "method": "globalcom2",
        "method_args": {"alpha": "0", "allocation": "uniform"},
        "retention_ratio": 1.0, "token_layout": "official", "score": 50.0}
    tokens = json.load(open(_record_run(tmp_path, "gqa", 40, method="pooling", budget=("--visual-tokens", "300"))))
    assert tokens["visual_tokens"] == 300 and "retention_ratio" not in tokens and tokens["method_args"] == {}


def test_old_records_without_a_method_read_as_default_globalcom2(tmp_path, capsys):
    (tmp_path / "gqa").mkdir()
    for ratio, score in [(1.0, 60.0), (0.25, 45.0)]:
        old = dict(benchmark="gqa", model="m", retention_ratio=ratio, token_layout="official", score=score)
        (tmp_path / "gqa" / f"m-R{ratio}.json").write_text(json.dumps(old))
    # Older still: no layout either.
    oldest = dict(benchmark="gqa", model="m", retention_ratio=0.5, score=30.0)
    (tmp_path / "gqa" / "m-R0.5.json").write_text(json.dumps(oldest))
    entries = summarize.collect(str(tmp_path))
    assert [(entry["method"], entry["method_args"], entry["token_layout"]) for entry in entries] == [
        ("globalcom2", {}, "official")] * 3
    assert summarize.main(["--results-dir", str(tmp_path), "--table", "paper"]) == 0
    assert capsys.readouterr().out.splitlines()[4:] == ["| Upper bound | vanilla | 60 | 100.0% (1) |",
                                                        "| 50% | globalcom2 | 30 | 50.0% (1) |",
                                                        "| 25% | globalcom2 | 45 | 75.0% (1) |"]


@pytest.mark.parametrize("budget, message", [
    (["--retention-ratio", "0.25", "--visual-tokens", "300"], "not allowed with argument"),
    ([], "one of the arguments --retention-ratio --visual-tokens is required"),
    (["--visual-tokens", "0"], "must be a whole number of tokens, at least 1"),
])
def test_record_takes_exactly_one_budget(tmp_path, capsys, budget, message):
    with pytest.raises(SystemExit) as exit_info:
        summarize.main(["record", "--benchmark", "gqa", "--model", "m", *budget, "--score", "1",
                        "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_record_refuses_method_args_that_are_not_pairs(tmp_path, capsys):
    assert summarize.main(["record", "--benchmark", "gqa", "--model", "m", "--retention-ratio", "1", "--score", "1",
                           "--method-args", "alpha", "--out", str(tmp_path / "r.json")]) == 2
    assert "key=value pairs, got 'alpha'" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def _answers(path, per_question):
    """An answers file whose rows carry the runner's per-image accounting (`metadata.images`)."""
    path.write_text("".join(json.dumps({"question_id": index, "text": "yes", "metadata": {"images": images}}) + "\n"
                            for index, images in enumerate(per_question)))
    return path


def test_paper_table_shows_equivalent_tokens_from_the_answers(tmp_path, capsys):
    results = tmp_path / "results"
    # vanilla: 2 questions of one image each sending 100 and 60 tokens -> 80 per question
    vanilla = _answers(tmp_path / "vanilla.jsonl", [[{"tokens_after": 100}], [{"tokens_after": 60}]])
    # FastV-like in 2 layers: 100 tokens at layer 0, 20 after -> equivalent 60, post-pruning 20; the second
    # question 60 then 12 -> 36 and 12; means 48 and 16
    fastv = _answers(tmp_path / "fastv.jsonl", [
        [{"tokens_after": 100, "layer_image_tokens": [100, 20], "equivalent_image_tokens": 60.0,
          "post_pruning_image_tokens": 20}],
        [{"tokens_after": 60, "layer_image_tokens": [60, 12], "equivalent_image_tokens": 36.0,
          "post_pruning_image_tokens": 12}]])
    # a composition: two images in one question (30 sent before the LLM + 50 -> 10 inside) -> 30 + 30 = 60
    composed = _answers(tmp_path / "composed.jsonl", [[
        {"tokens_after": 30}, {"tokens_after": 50, "equivalent_image_tokens": 30.0, "post_pruning_image_tokens": 10}]])
    quarter = ("--retention-ratio", "0.25")
    for benchmark, score in [("gqa", 60), ("pope", 80)]:
        _record_run(results, benchmark, score, method_args=[], budget=("--retention-ratio", "1"))
        out = _record_run(results, benchmark, score - 10, method="fastv", budget=quarter)
        _add_tokens(out, benchmark, fastv)
    _add_tokens(results / "gqa" / "m-default---retention-ratio-1.json", "gqa", vanilla)
    _record_run(results, "gqa", 55, method="globalcom2+fastv", method_args=["split=0.5 fastv.k=1"], budget=quarter)
    _add_tokens(results / "gqa" / "m-globalcom2+fastv-split=0.5_fastv.k=1---retention-ratio-0.25.json", "gqa",
                composed, method="globalcom2+fastv", method_args="split=0.5 fastv.k=1")
    record = json.load(open(results / "gqa" / "m-fastv---retention-ratio-0.25.json"))
    assert record["equivalent_tokens"] == 48.0 and record["post_pruning_tokens"] == 16.0
    capsys.readouterr()
    assert summarize.main(["--results-dir", str(results), "--table", "paper", "--csv", str(tmp_path / "t.csv")]) == 0
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows == [["model", "budget", "method", "Eq. tokens", "GQA", "POPE", "Average (n)"],
                    ["m", "Upper bound", "vanilla", "80", "60", "80", "100.0% (2)"],  # POPE's record has no tokens
                    ["m", "25%", "fastv", "48", "50", "70", "85.4% (2)"],
                    ["m", "25%", "globalcom2+fastv fastv.k=1 split=0.5", "60", "55", "", "91.7% (1)"]]


def _add_tokens(out, benchmark, answers, method=None, method_args=None):
    """Re-record `out` as the scripts' score() does, with the run's answers file."""
    entry = json.load(open(out))
    argv = ["record", "--benchmark", benchmark, "--model", entry["model"], "--retention-ratio",
            str(entry["retention_ratio"]), "--score", str(entry["score"]), "--method", method or entry["method"],
            "--answers", str(answers), "--out", str(out)]
    argv += ["--method-args", method_args] if method_args else []
    assert summarize.main(argv) == 0


def test_answers_with_errors_or_without_images_record_no_tokens(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "metadata": {"error": "image missing", "images": []}}) + "\n")
    assert summarize.answers_tokens(str(answers)) == {}
