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
    assert rows[0] == ["model", "layout", "R", "GQA", "POPE", "MME", "Average (n)"]
    # GQA 48/64 = 75%, POPE 88/80 = 110%, MME 100%: the average is 95.0%, over 3 benchmarks.
    assert rows[1:] == [["llava-next-7b", "-", "1", "64", "80", "1500", "100.0% (3)"],
                        ["llava-next-7b", "official", "0.25", "48", "88", "1500", "95.0% (3)"],
                        ["llava-next-7b", "spatial", "0.1", "32", "", "", "50.0% (1)"],
                        ["other", "official", "0.5", "16", "", "", ""]]
    output = capsys.readouterr()
    assert (tmp_path / "t.md").read_text() == output.out
    # "other" has no R = 1 run: its missing Average is explained.
    assert "other official R 0.5: no R = 1 score of other for gqa; its Average covers 0 of its 1" in output.err
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
