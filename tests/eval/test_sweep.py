"""Sweeps in one process (`--retention-ratios`, `--methods`): one answers file per setting, each the
file its single run writes, named as the scripts name it; the model, the images and the vision tower
shared between the settings; resume per setting; bad flags refused before the model loads."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llava.eval import model_vqa_loader, runner
from llava.eval.jsonl import read_jsonl
from llava.model.compression.__main__ import run_name
from llava.model.llava_arch import TowerOutputCache
from llava.model.multimodal_encoder.clip_encoder import VisionTowerOutput

SUFFIX = "\nAnswer the question using a single word or phrase."
METHODS, RATIOS = ["globalcom2", "fastv"], ["1", "0.25"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for index, size in enumerate([(80, 50), (50, 90), (64, 64), (300, 40)]):
        Image.new("RGB", size, (60 * index, 100, 50)).save(root / f"img{index}.jpg")
    lines = [{"question_id": index, "image": f"img{index}.jpg", "text": f"Is there a cat {index}?{SUFFIX}"}
             for index in range(4)]
    with open(root / "questions.jsonl", "w") as file:
        file.writelines(json.dumps(line) + "\n" for line in lines)
    return root, lines


def _arguments(checkpoint, root, answers, *extra):
    return ["--model-path", checkpoint, "--question-file", str(root / "questions.jsonl"), "--image-folder", str(root),
            "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "3", "--device", "cpu", *extra]


def _name(method: str, ratio: str, layout: str = "official") -> str:
    """The scripts' name part after `$CKPT-` for one setting (common.sh: METHOD_NAME, BUDGET, layout)."""
    method_name = run_name(method, [])
    return (f"{method_name}-" if method_name else "") + f"R{ratio}" + ("" if layout == "official" else f"-{layout}")


def _without_answer_ids(rows):
    return [{key: value for key, value in row.items() if key != "answer_id"} for row in rows]


@pytest.fixture
def counted(monkeypatch):
    """Counts of vision tower runs and of image loads in this process, from now on."""
    counts = {"tower": 0, "loads": 0}
    load_model, load_image = runner._load_model, model_vqa_loader.load_image

    def counting_load_model(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded[1].get_vision_tower().register_forward_hook(lambda *_: counts.__setitem__("tower", counts["tower"] + 1))
        return loaded

    def counting_load_image(*args, **kwargs):
        counts["loads"] += 1
        return load_image(*args, **kwargs)

    monkeypatch.setattr(runner, "_load_model", counting_load_model)
    monkeypatch.setattr(model_vqa_loader, "load_image", counting_load_image)
    return counts


@pytest.fixture(scope="module")
def single_runs(tiny_checkpoint, data, tmp_path_factory):
    """The four single runs' answers and selection files, by (method, ratio)."""
    root, _ = data
    out = tmp_path_factory.mktemp("single")
    files = {}
    for method in METHODS:
        for ratio in RATIOS:
            answers, selections = out / f"{method}-{ratio}.jsonl", out / f"{method}-{ratio}.selection.jsonl"
            assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, answers, "--method", method,
                                                    "--retention-ratio", ratio, "--save-selection",
                                                    str(selections))) == 0
            files[method, ratio] = answers, selections
    return files


def _sweep(checkpoint, root, folder, *extra):
    return model_vqa_loader.main(_arguments(checkpoint, root, folder / "m-{run}.jsonl", "--methods", ",".join(METHODS),
                                            "--retention-ratios", ",".join(RATIOS), *extra))


def test_a_sweep_writes_the_files_of_the_single_runs_sharing_images_and_tower(tiny_checkpoint, data, single_runs,
                                                                             tmp_path, counted):
    root, lines = data
    assert _sweep(tiny_checkpoint, root, tmp_path, "--save-selection", str(tmp_path / "s-{run}.jsonl")) == 0
    expected = {f"m-{_name(method, ratio)}.jsonl" for method in METHODS for ratio in RATIOS}
    assert {path for path in os.listdir(tmp_path) if path.startswith("m-")} == expected
    for (method, ratio), (answers, selections) in single_runs.items():
        swept = read_jsonl(tmp_path / f"m-{_name(method, ratio)}.jsonl")
        assert _without_answer_ids(swept) == _without_answer_ids(read_jsonl(answers)), (method, ratio)
        assert read_jsonl(tmp_path / f"s-{_name(method, ratio)}.jsonl") == read_jsonl(selections)
    # The settings differ (else the comparison proves little): R 0.25 compresses, fastv prunes in the LLM.
    metadata = [read_jsonl(single_runs[setting][0])[0]["metadata"] for setting in single_runs]
    assert len({(meta["method"], meta["retention_ratio"], meta["visual_tokens"]) for meta in metadata}) == 4
    # One image per question, one input config: each image loaded once and through the tower once.
    assert counted == {"tower": len(lines), "loads": len(lines)}


def test_a_single_run_counts_one_tower_run_per_image(tiny_checkpoint, data, tmp_path, counted):
    # What the sweep's counts are compared with: the hooks see every run.
    root, lines = data
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, tmp_path / "a.jsonl",
                                            "--retention-ratio", "0.25")) == 0
    assert counted == {"tower": len(lines), "loads": len(lines)}


def test_methods_with_other_input_configs_load_once_and_prepare_per_config(tiny_checkpoint, data, tmp_path, counted):
    # FasterVLM's official input differs from GlobalCom2's (input_changes): the tower runs once per config.
    root, lines = data
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, tmp_path / "m-{run}.jsonl", "--methods",
                                            "globalcom2,fastervlm", "--retention-ratios", "0.25")) == 0
    assert counted == {"tower": 2 * len(lines), "loads": len(lines)}
    for method in ("globalcom2", "fastervlm"):
        assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, tmp_path / f"{method}.jsonl", "--method",
                                                method, "--retention-ratio", "0.25")) == 0
        assert _without_answer_ids(read_jsonl(tmp_path / f"m-{_name(method, '0.25')}.jsonl")) == \
            _without_answer_ids(read_jsonl(tmp_path / f"{method}.jsonl"))


def test_a_chunk_of_a_sweep_is_that_chunk_of_each_single_run(tiny_checkpoint, data, single_runs, tmp_path):
    root, lines = data
    assert _sweep(tiny_checkpoint, root, tmp_path, "--num-chunks", "2", "--chunk-idx", "1") == 0
    for (method, ratio), (answers, _) in single_runs.items():
        assert _without_answer_ids(read_jsonl(tmp_path / f"m-{_name(method, ratio)}.jsonl")) == \
            _without_answer_ids(read_jsonl(answers)[2:])  # ceil(4 / 2) questions per chunk


KILLED_MID_SWEEP = """
import os, signal, sys
from llava.eval import model_vqa_loader, runner
real_answer_prepared, calls = runner.answer_prepared, []

def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 6:  # batch-major: question 0 in all four files, question 1 in the first, then killed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_answer_prepared(*args, **kwargs)

runner.answer_prepared = dying
model_vqa_loader.main(sys.argv[1:])
"""


def test_a_sweep_killed_midway_resumes_each_setting_without_redoing_or_losing_answers(
        tiny_checkpoint, data, single_runs, tmp_path, monkeypatch):
    root, lines = data
    arguments = _arguments(tiny_checkpoint, root, tmp_path / "m-{run}.jsonl", "--methods", ",".join(METHODS),
                           "--retention-ratios", ",".join(RATIOS))
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SWEEP, *arguments], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    files = [tmp_path / f"m-{_name(method, ratio)}.jsonl" for method in METHODS for ratio in RATIOS]
    before = [read_jsonl(path) for path in files]
    assert [len(rows) for rows in before] == [2, 1, 1, 1]
    assert model_vqa_loader.main(arguments) == 0
    for path, kept, (answers, _) in zip(files, before, single_runs.values()):
        resumed = read_jsonl(path)
        assert _without_answer_ids(resumed) == _without_answer_ids(read_jsonl(answers))  # none lost, none twice
        assert [row["answer_id"] for row in resumed[:len(kept)]] == [row["answer_id"] for row in kept]  # not redone
    # Complete now: a rerun of the sweep, or a single run on one setting's file, has nothing to do.
    contents = [path.read_text() for path in files]
    monkeypatch.setattr(runner, "load_pretrained_model", _refuse_model_load)
    assert model_vqa_loader.main(arguments) == 0
    assert model_vqa_loader.main(_arguments(tiny_checkpoint, root, files[3], "--method", "fastv",
                                            "--retention-ratio", "0.25")) == 0
    assert [path.read_text() for path in files] == contents


def _refuse_model_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize("extra, named", [
    (["--retention-ratios", "1,1.5"], "'1.5'"),
    (["--retention-ratios", "1,,0.5"], "empty item"),
    (["--methods", "globalcom2,nope"], "'nope'"),
    (["--methods", "globalcom2,fastv", "--method-arg", "k=1"], "--methods globalcom2"),
    (["--methods", "fastv", "--method", "fastv"], "--method"),
    (["--retention-ratios", "0.5", "--retention-ratio", "0.5"], "--retention-ratio"),
    (["--retention-ratios", "0.5", "--visual-tokens", "8"], "--visual-tokens"),
    (["--retention-ratios", "0.5,0.5"], "listed twice"),
    (["--retention-ratios", "1,0.5", "--answers-file", "plain.jsonl"], "{run}"),
    (["--retention-ratios", "1,0.5", "--save-selection", "s.jsonl"], "--save-selection"),
    (["--retention-ratio", "0.5", "--answers-file", "a-{run}.jsonl"], "only a sweep"),
])
def test_bad_sweep_flags_are_refused_in_one_line_before_the_model_loads(tiny_checkpoint, data, tmp_path, capsys,
                                                                        monkeypatch, extra, named):
    root, _ = data
    monkeypatch.setattr(runner, "load_pretrained_model", _refuse_model_load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        model_vqa_loader.main(_arguments(tiny_checkpoint, root, "m-{run}.jsonl", *extra))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert os.listdir(tmp_path) == []


COMMON_SH_NAME = """
set -e
source scripts/v1_5/eval/common.sh
echo "$NAME"
"""


@pytest.mark.parametrize("method, method_args, ratio, layout", [
    ("globalcom2", [], "0.25", "official"),
    ("fastv", ["k=1"], "0.50", "official"),
    ("globalcom2", ["alpha=0.5"], "1", "spatial"),
])
def test_setting_names_are_the_part_of_common_sh_names_after_the_checkpoint(tmp_path, method, method_args, ratio,
                                                                            layout):
    parser = model_vqa_loader.build_loader_parser("", 8)
    args = parser.parse_args(["--answers-file", str(tmp_path / "x-{run}.jsonl"), "--methods", method,
                              "--retention-ratios", ratio, "--token-layout", layout,
                              *[flag for pair in method_args for flag in ("--method-arg", pair)]])
    [setting] = runner.sweep_settings(args)
    environment = dict(os.environ, MODEL_PATH=str(tmp_path / "ckpt"), CKPT="ckpt", METHOD=method,
                       METHOD_ARGS=" ".join(method_args), RETENTION_RATIO=ratio, TOKEN_LAYOUT=layout, SAMPLE="0",
                       PYTHON=sys.executable)
    script = subprocess.run(["bash", "-c", COMMON_SH_NAME], capture_output=True, text=True, env=environment,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            timeout=120)
    assert script.returncode == 0, script.stderr
    assert setting.answers_file == str(tmp_path / f"x-{script.stdout.strip().removeprefix('ckpt-')}.jsonl")
    assert setting.method == method and setting.retention_ratio == float(ratio) and setting.methods is None


def test_the_tower_cache_keeps_one_batch_by_identity_and_computes_the_signals_announced():
    runs = []

    def run(names):
        runs.append(sorted(names))
        return VisionTowerOutput(torch.zeros(1, 2, 3), {name: torch.full((1, 2), len(runs)) for name in names})

    cache = TowerOutputCache(signals={"b"})
    first, second = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)  # equal values, different objects
    assert set(cache.output(first, set(), run).signals) == set()
    assert cache.output(first, {"b"}, run).signals["b"].tolist() == [[1, 1]]  # announced: computed by the first run
    assert cache.output(first, {"a"}, run).signals["a"].tolist() == [[2, 2]]  # not announced: a second run
    assert cache.output(first, {"a", "b"}, run).signals["b"].tolist() == [[2, 2]]
    cache.output(second, {"b"}, run)  # another batch replaces it
    assert runs == [["b"], ["a", "b"], ["b"]]
    output = cache.output(second, {"b"}, run)
    output.signals["c"] = None  # a caller adding its own signals does not change what is kept
    assert "c" not in cache.output(second, {"b"}, run).signals and len(runs) == 3
    built = []
    sources = [torch.ones(2), torch.ones(2)]
    make = lambda: built.append(1) or torch.stack(sources)  # noqa: E731
    assert cache.pixel_values(sources, make) is cache.pixel_values(list(sources), make) and len(built) == 1
    cache.pixel_values([sources[0], torch.ones(2)], make)
    assert len(built) == 2
