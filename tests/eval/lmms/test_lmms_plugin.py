"""The lmms-eval plug-in (`llava.eval.lmms_eval`, model id `globalcom2`) run by lmms-eval itself on
the tiny checkpoint, offline: a five-document local task (tiny_task/, on the sample suite's POPE
images, one document with two images) through `simple_evaluate` at batch 1 and 3 and once through
the `lmms-eval` command with `--include_path`. The exact match lmms-eval reports is checked against
targets made from our own `answer` outputs (three documents' targets are the model's answer, two
are not: 3/5), the answers against `python -m llava.eval.model_vqa_loader` on the same questions.
Every run is under a socket guard (network_guard.py) that fails any connect or name lookup.
Skipped where lmms-eval is not installed (`sh scripts/install.sh lmms`)."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

# datasets reads these when lmms-eval's evaluator imports it: set before that, for this process.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (sh scripts/install.sh lmms)")

import torch  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

import network_guard  # noqa: E402
from llava.conversation import first_turn_prompt  # noqa: E402
from llava.eval.jsonl import read_jsonl, write_jsonl  # noqa: E402
from llava.eval.lmms_eval.model import GlobalCom2, cut_at_stop, generation_settings  # noqa: E402
from llava.eval.sample_suite import ensure_sample_suite  # noqa: E402
from llava.generation import answer, image_prompt  # noqa: E402
from llava.mm_utils import load_image  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
TASK = "globalcom2_tiny"
METRIC = "exact_match,none"
COMPRESSION = dict(method="globalcom2", retention_ratio=0.25)
MAX_NEW_TOKENS = 3      # tiny_task/globalcom2_tiny.yaml's
MATCHED = (0, 2, 3)     # documents whose target is the model's own (cut, stripped) answer
SINGLE_IMAGE = 4        # POPE questions 1-4 on one image each; the fifth document has two images


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return ensure_sample_suite(str(tmp_path_factory.mktemp("suite") / "eval"))


@pytest.fixture(scope="module")
def questions(suite):
    """The documents' images (paths) and questions: four POPE questions, then one on two images."""
    pope = os.path.join(suite, "pope")
    rows = read_jsonl(os.path.join(pope, "llava_pope_test.jsonl"))[:SINGLE_IMAGE]
    docs = [dict(images=[os.path.join(pope, "val2014", row["image"])], question=row["text"]) for row in rows]
    docs.append(dict(images=docs[0]["images"] + docs[1]["images"], question="Which image shows more shapes?"))
    return docs


@pytest.fixture(scope="module")
def own_answers(tiny_checkpoint, questions):
    """Our own `answer` on every document, greedy, fp32: the prompt as the runners build it in the
    template the tiny checkpoint's name gives (`vicuna_v1`, infer_conv_mode's fallback)."""
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu",
                                                                 torch_dtype=torch.float32)
    model.set_compression(**COMPRESSION)
    texts = []
    for doc in questions:
        images = [load_image(path) for path in doc["images"]]
        prompt = first_turn_prompt("vicuna_v1", image_prompt(doc["question"], len(images)))
        texts.append(answer(model, tokenizer, image_processor, prompt, images, max_new_tokens=MAX_NEW_TOKENS).text)
    return texts


@pytest.fixture(scope="module")
def stop(own_answers):
    """The task's `until`: two characters from inside the first answer, so that lmms-eval's stop
    string cuts at least that one."""
    assert len(own_answers[0]) >= 3, own_answers
    return own_answers[0][1:3]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, questions, own_answers, stop):
    """tiny_task/ copied with its documents: the answer cut at the stop string and stripped (as
    lmms-eval scores it) as the target of MATCHED, a different text as the others'."""
    folder = tmp_path_factory.mktemp("task")
    docs = []
    for index, (doc, text) in enumerate(zip(questions, own_answers)):
        scored = text.split(stop)[0].strip()
        docs.append(dict(doc, target=scored if index in MATCHED else "not " + scored))
    write_jsonl(str(folder / "docs.jsonl"), docs)
    shutil.copy(HERE / "tiny_task" / "utils.py", folder / "utils.py")
    yaml = (HERE / "tiny_task" / f"{TASK}.yaml").read_text()
    yaml = yaml.replace("DOCS_JSONL", str(folder / "docs.jsonl")).replace("CACHE_DIR", str(folder / "cache"))
    (folder / f"{TASK}.yaml").write_text(yaml.replace('"STOP"', json.dumps(stop)))
    return folder


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, task_dir, tmp_path_factory):
    """`simple_evaluate` at batch 1 and 3 under the socket guard: {batch: (results, accounting rows,
    network attempts)}."""
    out = tmp_path_factory.mktemp("runs")
    evaluated = {}
    for batch_size in (1, 3):
        accounting = out / f"accounting{batch_size}.jsonl"
        with network_guard.guarded() as attempts:
            model = GlobalCom2(pretrained=tiny_checkpoint, dtype="float32", device="cpu", batch_size=batch_size,
                               accounting_file=str(accounting), **COMPRESSION)
            results = simple_evaluate(model=model, tasks=[TASK], log_samples=True,
                                      task_manager=TaskManager("WARNING", include_path=str(task_dir)))
        evaluated[batch_size] = results, read_jsonl(str(accounting)), list(attempts)
    return evaluated


def responses(results) -> list[str]:
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    return [sample["resps"][0][0] for sample in samples]


def guard_environment(tmp_path) -> tuple[dict, pathlib.Path]:
    """A subprocess environment, offline, whose Pythons start with the socket guard logging to the
    returned file."""
    guard, log = tmp_path / "guard", tmp_path / "network.log"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(network_guard.sitecustomize_source(str(log)))
    path = os.pathsep.join([str(guard), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, **OFFLINE, "PYTHONPATH": path}, log


def test_the_guard_catches_a_connect_and_a_lookup():
    real_lookup = socket.getaddrinfo
    with network_guard.guarded() as attempts:
        with pytest.raises(OSError, match="offline test"):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
        with pytest.raises(OSError, match="offline test"):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("192.0.2.1", 80))
    assert [attempt.split()[0] for attempt in attempts] == ["getaddrinfo", "connect"]
    assert socket.getaddrinfo is real_lookup  # restored


@pytest.mark.parametrize("batch_size", [1, 3])
def test_simple_evaluate_scores_our_own_answers(runs, own_answers, stop, batch_size):
    results, _, attempts = runs[batch_size]
    assert attempts == []
    assert results["results"][TASK][METRIC] == pytest.approx(len(MATCHED) / len(own_answers))  # 3/5
    assert responses(results) == [text.split(stop)[0] for text in own_answers]
    assert len(responses(results)[0]) < len(own_answers[0])  # the stop string cut it


def test_batch_3_equals_batch_1(runs):
    (results1, accounting1, _), (results3, accounting3, _) = runs[1], runs[3]
    assert responses(results3) == responses(results1)
    assert results3["results"][TASK][METRIC] == results1["results"][TASK][METRIC]
    by_doc = lambda rows: sorted(rows, key=lambda row: row["doc_id"])  # noqa: E731
    assert by_doc(accounting3) == by_doc(accounting1)


def test_the_accounting_file_has_each_sample_compressed(runs, questions):
    _, accounting, _ = runs[1]
    assert sorted(row["doc_id"] for row in accounting) == list(range(len(questions)))
    for row in accounting:
        assert (row["task"], row["split"], row["method"], row["retention_ratio"]) == (TASK, "test", "globalcom2", 0.25)
        assert len(row["images"]) == len(questions[row["doc_id"]]["images"])
        assert row["visual_tokens_before"] == sum(image["tokens_before"] for image in row["images"])
        assert 0 < row["visual_tokens"] < row["visual_tokens_before"]


def test_answers_equal_the_runners_at_batch_1(runs, questions, tiny_checkpoint, stop, tmp_path):
    """model_vqa_loader on the single-image documents, same settings: the same answers (cut at the
    task's stop string, which lmms-eval asks for) and the same visual token counts."""
    question_file, answers_file = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    write_jsonl(str(question_file), [dict(question_id=index, image=doc["images"][0], text=doc["question"])
                                     for index, doc in enumerate(questions[:SINGLE_IMAGE])])
    env, log = guard_environment(tmp_path)
    command = [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", tiny_checkpoint,
               "--question-file", str(question_file), "--image-folder", "/", "--answers-file", str(answers_file),
               "--conv-mode", "vicuna_v1", "--temperature", "0", "--max-new-tokens", str(MAX_NEW_TOKENS),
               "--dtype", "float32", "--device", "cpu", "--method", COMPRESSION["method"],
               "--retention-ratio", str(COMPRESSION["retention_ratio"])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not log.exists()
    runner = read_jsonl(str(answers_file))
    results, accounting, _ = runs[1]
    assert responses(results)[:SINGLE_IMAGE] == [row["text"].split(stop)[0] for row in runner]
    plugin_tokens = {row["doc_id"]: row["visual_tokens"] for row in accounting}
    assert [plugin_tokens[row["question_id"]] for row in runner] == [row["metadata"]["visual_tokens"]
                                                                     for row in runner]


def test_the_lmms_eval_command_at_batch_3(tiny_checkpoint, task_dir, tmp_path):
    """The entry point's `--model globalcom2` through the real command; `--verbosity DEBUG` makes an
    exception in the evaluation exit 1 (otherwise lmms-eval logs it and exits 0)."""
    env, log = guard_environment(tmp_path)
    model_args = ",".join([f"pretrained={tiny_checkpoint}", "dtype=float32", "device=cpu",
                           f"accounting_file={tmp_path / 'accounting.jsonl'}",
                           *(f"{key}={value}" for key, value in COMPRESSION.items())])
    command = [os.path.join(os.path.dirname(sys.executable), "lmms-eval"), "--model", "globalcom2",
               "--model_args", model_args, "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "3",
               "--output_path", str(tmp_path / "out"), "--log_samples", "--verbosity", "DEBUG"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not log.exists(), log.read_text()
    [results_file] = (tmp_path / "out").rglob("*_results.json")
    assert json.loads(results_file.read_text())["results"][TASK][METRIC] == pytest.approx(3 / 5)
    assert len(read_jsonl(str(tmp_path / "accounting.jsonl"))) == 5
    assert "globalcom2: ignoring the task's generation_kwargs image_aspect_ratio" in done.stderr


def test_the_entry_point_names_the_class_and_its_module_is_import_light():
    assert get_model("globalcom2") is GlobalCom2
    code = "import sys, llava.eval.lmms_eval; print('torch' in sys.modules, 'lmms_eval' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


@pytest.mark.parametrize("model_args, message", [
    (dict(retention_ratio=1.5), "retention_ratio: must be a number in (0, 1]"),
    (dict(retention_ratio=0.5, visual_tokens=64), "visual_tokens: not allowed with retention_ratio"),
    (dict(method="nope"), "method: invalid choice: 'nope'"),
    (dict(method="globalcom2", method_args="alpha=0;bogus=1"), "method globalcom2 has no argument 'bogus'"),
    (dict(token_layout="diagonal"), "token_layout: invalid choice"),
    (dict(conv_template="nope"), "conv_template: Unknown conversation template 'nope'"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(batch_size="auto"), "batch_size must be a whole number >= 1"),
    (dict(retention=0.1), "unknown retention; valid: pretrained, model_base, method"),
    (dict(tower_numerics="fast"), "tower_numerics: invalid choice: 'fast'"),
    (dict(reverse_crops="yes"), "reverse_crops must be true or false, got 'yes'"),
])
def test_a_bad_setting_is_refused_in_one_line_before_the_model_loads(tmp_path, model_args, message):
    with pytest.raises(ValueError) as refused:  # a load would fail otherwise: there is no checkpoint
        GlobalCom2(pretrained=str(tmp_path / "no-checkpoint"), **model_args)
    assert message in str(refused.value) and "\n" not in str(refused.value)


class _Request:
    """What the model reads of lmms-eval's `Instance`: its `args`."""

    def __init__(self, *args):
        self.args = args


def test_tower_numerics_and_reverse_crops_reach_every_answer(tiny_checkpoint, questions, tmp_path):
    """`tower_numerics=released,reverse_crops=true`: the tower runs the released numerics, and each response
    and its accounting are those of our own `answer(..., reverse_crops=True)` with them."""
    plugin = GlobalCom2(pretrained=tiny_checkpoint, dtype="float32", device="cpu", tower_numerics="released",
                        reverse_crops=True, accounting_file=str(tmp_path / "accounting.jsonl"), **COMPRESSION)
    assert plugin.model.get_vision_tower().numerics == "released"
    plugin.task_dict = {TASK: {"test": dict(enumerate(questions))}}
    gen_kwargs = {"max_new_tokens": MAX_NEW_TOKENS}
    requests = [_Request(doc["question"], gen_kwargs, lambda doc: [load_image(path) for path in doc["images"]],
                         doc_id, TASK, "test") for doc_id, doc in enumerate(questions)]
    responses = [result.text for result in plugin.generate_until(requests)]
    expected = []
    for doc in questions:
        images = [load_image(path) for path in doc["images"]]
        prompt = first_turn_prompt("vicuna_v1", image_prompt(doc["question"], len(images)))
        expected.append(answer(plugin.model, plugin.tokenizer, plugin.image_processor, prompt, images,
                               max_new_tokens=MAX_NEW_TOKENS, reverse_crops=True))
    assert responses == [result.text for result in expected]
    records = read_jsonl(str(tmp_path / "accounting.jsonl"))
    assert [record["images"] for record in records] == [result.accounting for result in expected]
    reversed_flags = [image["crops_reversed"] for record in records for image in record["images"]]
    assert any(reversed_flags)


def test_batches_are_sorted_by_expected_prompt_length(tiny_checkpoint, questions, tmp_path, monkeypatch):
    """At batch 2 the requests (in reverse order here, so that sorting moves them) are answered shortest
    expected prompt first, two per `generate` call, and the results come back in the requests' order."""
    from llava.eval.lmms_eval import model as plugin_module
    from llava.generation import expected_prompt_tokens

    plugin = GlobalCom2(pretrained=tiny_checkpoint, dtype="float32", device="cpu", batch_size=2,
                        accounting_file=str(tmp_path / "accounting.jsonl"), **COMPRESSION)
    plugin.task_dict = {TASK: {"test": dict(enumerate(questions))}}
    visuals = lambda doc: [load_image(path) for path in doc["images"]]  # noqa: E731
    requests = [_Request(doc["question"], {"max_new_tokens": 1}, visuals, doc_id, TASK, "test")
                for doc_id, doc in reversed(list(enumerate(questions)))]
    calls, real_answer_batch = [], plugin_module.answer_batch

    def recording_answer_batch(model, tokenizer, processor, prompts, images, **kwargs):
        calls.append(list(prompts))
        return real_answer_batch(model, tokenizer, processor, prompts, images, **kwargs)

    monkeypatch.setattr(plugin_module, "answer_batch", recording_answer_batch)
    results = plugin.generate_until(requests)
    asked = [plugin.prompt_of(request) for request in requests]
    lengths = [expected_prompt_tokens(plugin.model, plugin.tokenizer, prompt, [image.size for image in images])
               for prompt, images, _ in asked]
    by_length = sorted(range(len(requests)), key=lengths.__getitem__)
    assert by_length != list(range(len(requests)))  # the sort has work to do
    assert calls == [[asked[index][0] for index in by_length[start:start + 2]] for start in range(0, len(requests), 2)]
    expected = plugin_module.answer_batch(plugin.model, plugin.tokenizer, plugin.image_processor, [asked[0][0]],
                                          [asked[0][1]], max_new_tokens=1)
    assert results[0].text == expected[0].text  # the first request's own answer, wherever its batch ran


def test_generation_settings_follow_the_task():
    greedy = dict(temperature=0.0, top_p=None, num_beams=1, max_new_tokens=1024)
    assert generation_settings({}) == (greedy, [])
    assert generation_settings({"temperature": 0.7, "do_sample": False, "until": "\n"}) == (greedy, ["\n"])
    assert generation_settings({"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 8})[0] == dict(
        temperature=0.2, top_p=0.9, num_beams=1, max_new_tokens=8)
    assert generation_settings({"do_sample": True, "temperature": 0})[0]["temperature"] == 1.0


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("yes.\n\nNo", ["\n\n", "."]) == "yes"
    assert cut_at_stop("yes", ["\n\n", ""]) == "yes"


def test_onevision_through_simple_evaluate(tiny_onevision_checkpoint, questions, task_dir, stop, tmp_path):
    """The tiny LLaVA-OneVision checkpoint (Qwen2, SigLIP, anyres_max_9) with GlobalCom2's [CLS]-free
    score: the `qwen_1_5` template inferred, batch 3 equal to batch 1, and the responses our own `answer`
    with that template, cut at the task's stop string."""
    compression = dict(method="globalcom2", method_args="score=neg_cos_mean", retention_ratio=0.25)
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_onevision_checkpoint, device="cpu",
                                                                 torch_dtype=torch.float32)
    model.set_compression(method="globalcom2", method_args=["score=neg_cos_mean"], retention_ratio=0.25)
    expected = []
    for doc in questions:
        images = [load_image(path) for path in doc["images"]]
        prompt = first_turn_prompt("qwen_1_5", image_prompt(doc["question"], len(images)))
        text = answer(model, tokenizer, image_processor, prompt, images, max_new_tokens=MAX_NEW_TOKENS).text
        expected.append(text.split(stop)[0])
    got = {}
    for batch_size in (1, 3):
        with network_guard.guarded() as attempts:
            plugin = GlobalCom2(pretrained=tiny_onevision_checkpoint, dtype="float32", device="cpu",
                                batch_size=batch_size, accounting_file=str(tmp_path / f"ov{batch_size}.jsonl"),
                                **compression)
            results = simple_evaluate(model=plugin, tasks=[TASK], log_samples=True,
                                      task_manager=TaskManager("WARNING", include_path=str(task_dir)))
        assert attempts == []
        got[batch_size] = responses(results)
    assert got[1] == got[3] == expected
