"""Every benchmark script end to end on the built-in sample suite and the tiny checkpoint
(`SAMPLE=1`): runner, merge, converter or scorer, and the results table. Scores are noise (random
weights); what is checked is that the real pipeline runs and writes what it should."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from PIL import Image

from llava.eval.jsonl import read_jsonl
from llava.eval.sample_suite import ensure_sample_suite
from llava.mm_utils import onevision_visual_token_count

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "v1_5" / "eval"
LOCAL_SCORES = {"gqa", "sqa", "textvqa", "pope", "mme", "seed"}

# (script, answers file relative to EVAL_DIR, question file relative to EVAL_DIR)
RUNS = [
    ("gqa", "gqa/answers/llava_gqa_testdev_balanced/{name}/merge.jsonl", "gqa/llava_gqa_testdev_balanced.jsonl"),
    ("vqav2", "vqav2/answers/llava_vqav2_mscoco_test-dev2015/{name}/merge.jsonl", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"),
    ("vizwiz", "vizwiz/answers/{name}.jsonl", "vizwiz/llava_test.jsonl"),
    ("sqa", "scienceqa/answers/{name}.jsonl", None),
    ("textvqa", "textvqa/answers/{name}.jsonl", "textvqa/llava_textvqa_val_v051_ocr.jsonl"),
    ("pope", "pope/answers/{name}.jsonl", "pope/llava_pope_test.jsonl"),
    ("mme", "MME/answers/{name}.jsonl", "MME/llava_mme.jsonl"),
    ("mmbench", "mmbench/answers/mmbench_dev_20230712/{name}.jsonl", None),
    ("mmbench_cn", "mmbench_cn/answers/mmbench_dev_cn_20231003/{name}.jsonl", None),
    ("seed", "seed_bench/answers/{name}/merge.jsonl", "seed_bench/llava-seed-bench.jsonl"),
    ("mmvet", "mm-vet/answers/{name}.jsonl", "mm-vet/llava-mm-vet.jsonl"),
    ("llavabench", "llava-bench-in-the-wild/answers/{name}.jsonl", "llava-bench-in-the-wild/questions.jsonl"),
]


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    return ensure_sample_suite(str(tmp_path_factory.mktemp("suite") / "eval"))


def _script(name, eval_dir, checkpoint, **env):
    environment = dict(os.environ, SAMPLE="1", EVAL_DIR=eval_dir, MODEL_PATH=checkpoint, CKPT="tiny",
                       RUNNER_ARGS="--max_new_tokens 3", OMP_NUM_THREADS="1")
    environment.pop("CUDA_VISIBLE_DEVICES", None)  # one chunk unless the test lists devices
    environment.update(env)
    return subprocess.run(["bash", str(SCRIPTS / f"{name}.sh")], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script, answers, questions", RUNS, ids=[run[0] for run in RUNS])
def test_script_runs_on_the_sample_suite(eval_dir, tiny_checkpoint, script, answers, questions):
    result = _script(script, eval_dir, tiny_checkpoint, RETENTION_RATIO="0.25", TOKEN_LAYOUT="official")
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    rows = read_jsonl(os.path.join(eval_dir, answers.format(name="tiny-R0.25")))
    if questions is not None:
        expected = [line["question_id"] for line in read_jsonl(os.path.join(eval_dir, questions))]
        assert [row["question_id"] for row in rows] == expected
    assert rows and all(row["metadata"]["retention_ratio"] == 0.25 for row in rows if "visual_tokens" in row["metadata"])
    # LLaVA-NeXT keeps the scripts' Vicuna template (CONV_MODE unset: the runner's fallback, the family has none)
    assert {row["metadata"]["settings"]["conv_mode"] for row in rows} == {"vicuna_v1"}
    if script in LOCAL_SCORES:
        record = json.load(open(os.path.join(eval_dir, "results", script, "tiny-R0.25.json")))
        assert record["model"] == "tiny" and record["retention_ratio"] == 0.25 and record["score"] >= 0


def test_chunks_over_two_devices_and_the_results_table(eval_dir, tiny_checkpoint):
    """Two 'GPUs' (CPU here): two chunk files merged in question order; then vanilla for the table."""
    result = _script("pope", eval_dir, tiny_checkpoint, CUDA_VISIBLE_DEVICES="0,1", TOKEN_LAYOUT="spatial",
                     RETENTION_RATIO="0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    chunks = sorted(os.listdir(os.path.join(eval_dir, "pope", "answers", "tiny-R0.5-spatial")))
    assert chunks == ["2_0.jsonl", "2_1.jsonl"]
    merged = read_jsonl(os.path.join(eval_dir, "pope", "answers", "tiny-R0.5-spatial.jsonl"))
    questions = read_jsonl(os.path.join(eval_dir, "pope", "llava_pope_test.jsonl"))
    assert [row["question_id"] for row in merged] == [line["question_id"] for line in questions]
    assert _script("pope", eval_dir, tiny_checkpoint, RETENTION_RATIO="1").returncode == 0
    table = subprocess.run([sys.executable, "-m", "llava.eval.summarize", "--results-dir", os.path.join(eval_dir, "results")],
                           cwd=REPO, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| model | layout | R |") and "POPE" in lines[0]
    assert any(line.startswith("| tiny | - | 1 |") and line.endswith("| 100.0% (1) |") for line in lines)
    assert any(line.startswith("| tiny | spatial | 0.5 |") for line in lines)


def test_missing_data_names_the_file_to_download(tmp_path, tiny_checkpoint):
    result = subprocess.run(["bash", str(SCRIPTS / "pope.sh")], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, EVAL_DIR=str(tmp_path), MODEL_PATH=tiny_checkpoint,
                                     RETENTION_RATIO="0.25", TOKEN_LAYOUT="official"))
    assert result.returncode == 1
    assert f"missing {tmp_path}/pope/llava_pope_test.jsonl" in result.stderr and "eval.zip" in result.stderr


@pytest.mark.parametrize("env, name, method, method_args, recorded_args", [
    (dict(METHOD="random", RETENTION_RATIO="0.25"), "tiny-random-R0.25", "random", {}, {}),
    (dict(METHOD="globalcom2", METHOD_ARGS="alpha=0 allocation=uniform", RETENTION_RATIO="0.25"),
     "tiny-globalcom2-{digest}-R0.25", "globalcom2", {"alpha": 0.0, "allocation": "uniform"},
     {"alpha": "0", "allocation": "uniform"}),
    (dict(METHOD="globalcom2", METHOD_ARGS="alpha=0.5", RETENTION_RATIO="0.25"), "tiny-R0.25", "globalcom2", {}, {}),
    (dict(METHOD="pooling", VISUAL_TOKENS="300"), "tiny-pooling-N300", "pooling", {}, {}),
    # A method with an input mode records it even at its default: the table must show it.
    (dict(METHOD="fastervlm", RETENTION_RATIO="0.25"), "tiny-fastervlm-R0.25", "fastervlm", {}, {"mode": "faithful"}),
])
def test_method_and_arguments_name_the_answers(eval_dir, tiny_checkpoint, env, name, method, method_args,
                                               recorded_args):
    from llava.model.compression.__main__ import run_name

    name = name.format(digest=run_name("globalcom2", ["alpha=0", "allocation=uniform"]).split("-")[-1])
    result = _script("pope", eval_dir, tiny_checkpoint, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(os.path.join(eval_dir, "pope", "answers", f"{name}.jsonl"))
    metadata = rows[0]["metadata"]
    assert metadata["method"] == method and metadata["settings"]["method_args"] == method_args
    assert metadata["budget_visual_tokens"] == (int(env["VISUAL_TOKENS"]) if "VISUAL_TOKENS" in env else None)
    with open(os.path.join(eval_dir, "results", "pope", f"{name}.json")) as file:
        assert json.load(file)["method_args"] == recorded_args


def test_a_bad_method_argument_is_one_line_before_the_model_loads(eval_dir, tiny_checkpoint):
    result = _script("pope", eval_dir, tiny_checkpoint, METHOD="globalcom2", METHOD_ARGS="alhpa=0")
    assert result.returncode != 0 and "method globalcom2 has no argument 'alhpa'" in result.stderr
    assert "alpha=0.5" in result.stderr and "Traceback" not in result.stderr


def test_paper_table_puts_methods_at_one_ratio_in_one_group(eval_dir, tiny_checkpoint):
    """Random (with an argument) and default GlobalCom2 at R 0.75, and vanilla: the paper table has
    the vanilla row first, then both methods under 75%."""
    for env in (dict(METHOD="random", METHOD_ARGS="seed=1", RETENTION_RATIO="0.75"), dict(RETENTION_RATIO="0.75"),
                dict(RETENTION_RATIO="1")):
        result = _script("pope", eval_dir, tiny_checkpoint, **env)
        assert result.returncode == 0, result.stderr[-3000:]
    table = subprocess.run([sys.executable, "-m", "llava.eval.summarize", "--table", "paper",
                            "--results-dir", os.path.join(eval_dir, "results")], cwd=REPO, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    block = lines[lines.index("**tiny**"):]
    assert block[2].startswith("| budget | method |") and "POPE" in block[2]
    assert block[4].startswith("| Upper bound | vanilla |") and block[4].endswith("| 100.0% (1) |")
    group = [index for index, line in enumerate(block) if line.startswith("| 75% |")]
    assert group == [group[0], group[0] + 1] and group[0] > 4
    assert [block[index].split(" | ")[1] for index in group] == ["globalcom2", "random seed=1"]
    assert all(block[index].endswith("% (1) |") for index in group)
    pope_results = os.path.join(eval_dir, "results", "pope")
    [random_record] = [name for name in os.listdir(pope_results) if name.startswith("tiny-random-")
                       and name.endswith("-R0.75.json")]
    record = json.load(open(os.path.join(pope_results, random_record)))
    assert (record["method"], record["method_args"], record["retention_ratio"]) == ("random", {"seed": "1"}, 0.75)


# Every in-LLM method, each through a different script (loader, converter, science runner), with its pruning
# moved to layer 1 of the tiny model's 2 (the default layers lie past it): (script, method, METHOD_ARGS,
# RETENTION_RATIO, the arguments the results record names, the image tokens left after the prune for an image
# span of N tokens, newlines included, as each method's module docstring gives them).
IN_LLM_RUNS = [
    # FastV, convention=post: k = round(R N).
    pytest.param("pope", "fastv", "k=1", "0.25", {"k": "1"}, lambda span: round(span / 4), id="fastv-pope"),
    # PDrop, convention=average, one stage from layer 1 of 2: (N + kept) / 2 = 0.625 N gives lam = 0.25, int(N / 4)
    # (a ratio no other test here uses: the paper table's 75% group is checked above).
    pytest.param("gqa", "pdrop", "layers=1", "0.625", {"layers": "1"}, lambda span: span // 4, id="pdrop-gqa"),
    # SparseVLM after layer 0 of 2, convention=average: its equal tokens are the stage's total (recycled included),
    # which moves in steps of one token, so it is the whole number nearest to R N.
    pytest.param("mme", "sparsevlm", "layers=0", "0.25", {"layers": "0"}, lambda span: span / 4, id="sparsevlm-mme"),
    # DART, convention=post: b = round(R N), topk = b // 8 per pivot (4 image + 4 text), 4 + 8 topk kept.
    pytest.param("textvqa", "dart", "k=1", "0.25", {"k": "1"}, lambda span: 4 + 8 * (round(span / 4) // 8),
                 id="dart-textvqa"),
    # GlobalCom2 then FastV, split 0.5: FastV keeps R_in = sqrt(0.25) of the span GlobalCom2 sent.
    pytest.param("sqa", "globalcom2+fastv", "fastv.k=1", "0.25", {"fastv.k": "1", "split": "0.5"},
                 lambda span: round(span / 2), id="globalcom2+fastv-sqa"),
]


def _question_ids(eval_dir, script):
    """The script's question ids in question-file order."""
    if script == "sqa":  # a JSON list of conversations, not a file of question lines
        with open(os.path.join(eval_dir, "scienceqa", "llava_test_CQM-A.json")) as file:
            return [item["id"] for item in json.load(file)]
    [questions] = [run[2] for run in RUNS if run[0] == script]
    return [line["question_id"] for line in read_jsonl(os.path.join(eval_dir, questions))]


def _table_cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@pytest.mark.parametrize("script, method, method_args, ratio, recorded_args, post_pruning", IN_LLM_RUNS)
def test_in_llm_method_through_a_benchmark_script(eval_dir, tiny_checkpoint, script, method, method_args, ratio,
                                                  recorded_args, post_pruning):
    """The paper's Table 1 rows by the scripts: the method and its arguments reach the language model, which
    prunes (fewer image tokens after layer 1 than the span, their layer average between), the results record
    keeps the answers' mean equivalent tokens and the paper table shows them."""
    from llava.model.compression.__main__ import run_name

    result = _script(script, eval_dir, tiny_checkpoint, METHOD=method, METHOD_ARGS=method_args, RETENTION_RATIO=ratio,
                     TOKEN_LAYOUT="official")
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    name = f"tiny-{run_name(method, method_args.split())}-R{ratio}"
    [answers] = [run[1] for run in RUNS if run[0] == script]
    rows = read_jsonl(os.path.join(eval_dir, answers.format(name=name)))
    assert [row["question_id"] for row in rows] == _question_ids(eval_dir, script)
    per_question = []
    for row in rows:
        metadata = row["metadata"]
        assert "error" not in metadata and metadata["method"] == method
        assert metadata["retention_ratio"] == float(ratio)
        assert {key: str(metadata["method_args"][key]) for key in recorded_args} == recorded_args
        if not metadata["images"]:
            continue  # a text-only question (ScienceQA has some): nothing to prune, in no mean
        for image in metadata["images"]:
            span, post = image["in_llm"]["span_tokens"], image["post_pruning_image_tokens"]
            assert span == image["tokens_after"]  # the in-LLM part prunes what the pre-LLM part (if any) sent
            assert (image["tokens_after"] < image["tokens_before"]) == ("+" in method)
            assert abs(post - post_pruning(span)) <= 0.5 and post < span
            assert image["layer_image_tokens"] == [span, post] and image["in_llm"]["stages"] == [[1, post]]
            assert image["equivalent_image_tokens"] == (span + post) / 2
        per_question.append([sum(image[key] for image in metadata["images"])
                             for key in ("equivalent_image_tokens", "post_pruning_image_tokens")])
    assert per_question, "no question had an image"
    mean_equivalent, mean_post = (sum(counts) / len(counts) for counts in zip(*per_question))

    results = os.path.join(eval_dir, "results")
    with open(os.path.join(results, script, f"{name}.json")) as file:
        record = json.load(file)
    assert (record["method"], record["method_args"], record["retention_ratio"]) == (method, recorded_args, float(ratio))
    assert record["score"] >= 0
    assert record["equivalent_tokens"] == pytest.approx(mean_equivalent)
    assert record["post_pruning_tokens"] == pytest.approx(mean_post)

    table = subprocess.run([sys.executable, "-m", "llava.eval.summarize", "--table", "paper", "--results-dir", results],
                           cwd=REPO, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    header = _table_cells(next(line for line in lines if line.startswith("| budget | method |")))
    title = " ".join([method, *(f"{key}={value}" for key, value in sorted(recorded_args.items()))])
    [table_row] = [_table_cells(line) for line in lines if line.startswith(f"| {100 * float(ratio):g}% | {title} |")]
    assert table_row[header.index("Eq. tokens")] == f"{mean_equivalent:.0f}"


def _without_ids(rows):
    return [{key: value for key, value in row.items() if key != "answer_id"} for row in rows]


def test_a_sweep_writes_what_single_runs_write(tmp_path, tiny_checkpoint):
    """RETENTION_RATIOS x METHODS through one script, split over two 'GPUs': one answers file and one
    results record per setting, named as single runs name them; a single run of one setting then
    writes the same answers (apart from their ids), and a single run over the sweep's file resumes it
    without answering anything again."""
    sweep_dir = ensure_sample_suite(str(tmp_path / "sweep" / "eval"))
    result = _script("pope", sweep_dir, tiny_checkpoint, RETENTION_RATIOS="1,0.25", METHODS="globalcom2,fastv",
                     CUDA_VISIBLE_DEVICES="0,1")
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    names = ["tiny-R1", "tiny-R0.25", "tiny-fastv-R1", "tiny-fastv-R0.25"]
    answers = pathlib.Path(sweep_dir) / "pope" / "answers"
    assert sorted(path.name for path in answers.glob("*.jsonl")) == sorted(f"{name}.jsonl" for name in names)
    for name, method, ratio in zip(names, ["globalcom2", "globalcom2", "fastv", "fastv"], [1, 0.25, 1, 0.25]):
        record = json.load(open(os.path.join(sweep_dir, "results", "pope", f"{name}.json")))
        assert (record["method"], record["retention_ratio"]) == (method, ratio)
    single_dir = ensure_sample_suite(str(tmp_path / "single" / "eval"))
    assert _script("pope", single_dir, tiny_checkpoint, METHOD="fastv", RETENTION_RATIO="0.25").returncode == 0
    single = read_jsonl(os.path.join(single_dir, "pope", "answers", "tiny-fastv-R0.25.jsonl"))
    swept = read_jsonl(answers / "tiny-fastv-R0.25.jsonl")
    assert _without_ids(swept) == _without_ids(single)
    assert _script("pope", sweep_dir, tiny_checkpoint, METHOD="fastv", RETENTION_RATIO="0.25").returncode == 0
    assert read_jsonl(answers / "tiny-fastv-R0.25.jsonl") == swept  # resumed: nothing answered again


@pytest.mark.parametrize("script, answers, questions, images", [
    ("pope", "pope/answers/{name}.jsonl", "pope/llava_pope_test.jsonl", "pope/val2014"),
    ("mme", "MME/answers/{name}.jsonl", "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"),
], ids=["pope", "mme"])
def test_onevision_through_a_script(eval_dir, tiny_onevision_checkpoint, script, answers, questions, images):
    """MODEL_PATH a OneVision checkpoint, CONV_MODE unset: the runner asks in the checkpoint's qwen_1_5
    template, and each image sends OneVision's tokens (anyres_max_9, 27 x 27 views with newlines)."""
    result = _script(script, eval_dir, tiny_onevision_checkpoint, CKPT="ov", METHOD="random", RETENTION_RATIO="0.25")
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    rows = read_jsonl(os.path.join(eval_dir, answers.format(name="ov-random-R0.25")))
    lines = read_jsonl(os.path.join(eval_dir, questions))
    assert [row["question_id"] for row in rows] == [line["question_id"] for line in lines]
    for row, line in zip(rows, lines):
        metadata = row["metadata"]
        assert metadata["settings"]["conv_mode"] == "qwen_1_5" and metadata["settings"]["model"] == "llava-onevision-tiny"
        image, = metadata["images"]
        with Image.open(os.path.join(eval_dir, images, line["image"])) as file:
            assert image["tokens_before"] == onevision_visual_token_count(file.size)
        # random keeps round(R x vanilla image tokens), vanilla's newlines aside
        assert abs(image["image_tokens"] - 0.25 * image["vanilla_image_tokens"]) <= 0.5
        assert image["vanilla_image_tokens"] < image["tokens_before"]
    assert os.path.isfile(os.path.join(eval_dir, "results", script, "ov-random-R0.25.json"))


def test_the_template_the_runner_infers(tiny_onevision_checkpoint, tiny_checkpoint):
    """What common.sh relies on: the runner's default and --fallback-conv-mode give way to a family's own template
    (OneVision's qwen_1_5); LLaVA-NeXT keeps the fallback (upstream's llava_v1, or the scripts' vicuna_v1), and an
    explicit --conv-mode is used as given."""
    from llava.eval.runner import build_parser, resolve_conv_mode

    parser = build_parser("x", max_new_tokens=8)
    for argv, onevision, llava_next in [([], "qwen_1_5", "llava_v1"),
                                        (["--fallback-conv-mode", "vicuna_v1"], "qwen_1_5", "vicuna_v1"),
                                        (["--conv-mode", "vicuna_v1"], "vicuna_v1", "vicuna_v1")]:
        conv_mode = parser.parse_args(argv).conv_mode
        assert resolve_conv_mode(conv_mode, tiny_onevision_checkpoint) == onevision
        assert resolve_conv_mode(conv_mode, tiny_checkpoint) == llava_next
