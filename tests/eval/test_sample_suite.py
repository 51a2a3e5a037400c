"""The synthetic evaluation suite: deterministic, small, and in the formats the runners and scorers
read (every question file parses, every image it names opens, annotations line up with questions)."""

import base64
import io
import json
import os

import pandas as pd
import pytest
from PIL import Image

from llava.eval import sample_suite
from llava.eval.jsonl import read_jsonl
from llava.eval.sample_suite import OPTION_LETTER, SINGLE_WORD, UNANSWERABLE
from llava.mm_utils import select_best_resolution
from llava.tiny import V16_PINPOINTS

# (question file, image folder the runner is given) of the JSON-lines benchmarks
JSONL_BENCHMARKS = [
    ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images"),
    ("vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015"),
    ("vqav2/llava_vqav2_mscoco_test2015.jsonl", "vqav2/test2015"),
    ("vizwiz/llava_test.jsonl", "vizwiz/test"),
    ("textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images"),
    ("pope/llava_pope_test.jsonl", "pope/val2014"),
    ("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"),
    ("seed_bench/llava-seed-bench.jsonl", "seed_bench"),
    ("llava-bench-in-the-wild/questions.jsonl", "llava-bench-in-the-wild/images"),
    ("mm-vet/llava-mm-vet.jsonl", "mm-vet/images"),
]
MMBENCH_TSVS = ["mmbench/mmbench_dev_20230712.tsv", "mmbench_cn/mmbench_dev_cn_20231003.tsv"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> str:
    return sample_suite.build_sample_suite(str(tmp_path_factory.mktemp("suite") / "eval"))


def _contents(root: str) -> dict[str, bytes]:
    contents = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as file:
                contents[os.path.relpath(os.path.join(folder, name), root)] = file.read()
    return contents


def _lines(suite: str, path: str) -> list[dict]:
    report = io.StringIO()
    lines = read_jsonl(os.path.join(suite, path), report=report)
    assert report.getvalue() == "", report.getvalue()  # no malformed line
    return lines


def _json(suite: str, path: str):
    with open(os.path.join(suite, path), encoding="utf-8") as file:
        return json.load(file)


def _mmbench_images(suite: str) -> list[Image.Image]:
    table = pd.read_table(os.path.join(suite, MMBENCH_TSVS[0]))
    return [Image.open(io.BytesIO(base64.b64decode(encoded))) for encoded in table["image"]]


def test_same_seed_same_bytes_other_seed_other_images(suite, tmp_path):
    built = _contents(suite)
    assert _contents(sample_suite.build_sample_suite(str(tmp_path / "again"))) == built
    other = _contents(sample_suite.build_sample_suite(str(tmp_path / "other"), seed=1))
    assert other[".sample_suite.json"] != built[".sample_suite.json"]
    assert other["gqa/data/testdev_balanced_questions.json"] != built["gqa/data/testdev_balanced_questions.json"]


def test_small_and_complete(suite):
    assert sum(map(len, _contents(suite).values())) < 2_000_000
    questions = sample_suite.read_marker(suite)["questions"]
    assert len(questions) == 12 and all(4 <= count <= 28 for count in questions.values())
    assert all(os.path.isfile(os.path.join(suite, path)) for path in questions)


@pytest.mark.parametrize("question_file, image_folder", JSONL_BENCHMARKS)
def test_questions_parse_and_images_open(suite, question_file, image_folder):
    lines = _lines(suite, question_file)
    assert len(lines) >= 4
    for line in lines:
        assert {"question_id", "image", "text"} <= set(line)
        Image.open(os.path.join(suite, image_folder, line["image"])).load()


def test_every_anyres_grid_occurs(suite):
    images = [Image.open(os.path.join(folder, name)) for folder, _, names in os.walk(suite)
              for name in names if name.endswith((".jpg", ".png"))] + _mmbench_images(suite)
    grids = {select_best_resolution(image.size, V16_PINPOINTS) for image in images}
    assert grids == {tuple(pinpoint) for pinpoint in V16_PINPOINTS}
    assert any(image.width > image.height for image in images) and any(image.width < image.height for image in images)


def test_prompt_suffixes(suite):
    def texts(path):
        return [line["text"] for line in _lines(suite, path)]

    for path in ("gqa/llava_gqa_testdev_balanced.jsonl", "vqav2/llava_vqav2_mscoco_test2015.jsonl",
                 "textvqa/llava_textvqa_val_v051_ocr.jsonl", "pope/llava_pope_test.jsonl", "MME/llava_mme.jsonl"):
        assert all(text.endswith("\n" + SINGLE_WORD) and text.count("\n") in (1, 2) for text in texts(path)), path
    assert all(text.endswith(f"\n{UNANSWERABLE}\n{SINGLE_WORD}") for text in texts("vizwiz/llava_test.jsonl"))
    for text in texts("seed_bench/llava-seed-bench.jsonl"):
        lines = text.split("\n")
        assert [line[:3] for line in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "] and lines[5:] == [OPTION_LETTER]
    ocr_lines = [text.split("\n")[1] for text in texts("textvqa/llava_textvqa_val_v051_ocr.jsonl")]
    assert all(line.startswith("Reference OCR token: ") for line in ocr_lines)
    assert "Reference OCR token: " in ocr_lines  # an empty token list
    for path in ("llava-bench-in-the-wild/questions.jsonl", "mm-vet/llava-mm-vet.jsonl"):
        assert not any("\n" in text for text in texts(path))


def test_gqa_annotation_covers_the_questions(suite):
    annotations = _json(suite, "gqa/data/testdev_balanced_questions.json")
    lines = _lines(suite, "gqa/llava_gqa_testdev_balanced.jsonl")
    assert sorted(annotations) == sorted(line["question_id"] for line in lines)
    for line in lines:
        question = annotations[line["question_id"]]
        assert question["isBalanced"] and line["image"] == question["imageId"] + ".jpg"
        assert line["text"] == question["question"] + "\n" + SINGLE_WORD
        assert {"structural", "semantic", "detailed"} <= set(question["types"])
        assert all({"operation", "argument", "dependencies"} <= set(step) for step in question["semantic"])
    assert {question["types"]["structural"] for question in annotations.values()} == {"query", "verify"}


def test_vqav2_test_dev_is_a_subset_of_test(suite):
    test_dev = {line["question_id"] for line in _lines(suite, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")}
    test = {line["question_id"] for line in _lines(suite, "vqav2/llava_vqav2_mscoco_test2015.jsonl")}
    assert test_dev < test and all(isinstance(question_id, int) for question_id in test)


def test_scienceqa_files_agree(suite):
    items = _json(suite, "scienceqa/llava_test_CQM-A.json")
    problems = _json(suite, "scienceqa/problems.json")
    splits = _json(suite, "scienceqa/pid_splits.json")
    assert [item["id"] for item in items] == splits["test"] and set(splits["train"]) <= set(problems) - set(splits["test"])
    modes = set()
    for item in items:
        problem, human = problems[item["id"]], item["conversations"][0]["value"]
        assert 0 <= problem["answer"] < len(problem["choices"]) <= 5
        assert human.endswith("".join(f"\n{'ABCDE'[k]}. {choice}" for k, choice in enumerate(problem["choices"])))
        if "image" in item:
            assert human.startswith("<image>\n") and problem["image"] == "image.png"
            image = Image.open(os.path.join(suite, "scienceqa/images/test", item["image"]))
            image.load()
            modes.add(image.mode)
        else:
            assert "<image>" not in human and problem["image"] is None
    assert modes == {"RGB", "P", "RGBA"}
    assert sum("image" not in item for item in items) >= 1


def test_textvqa_annotation_has_ten_answers_and_matches_prompts(suite):
    annotation = _json(suite, "textvqa/TextVQA_0.5.1_val.json")
    assert (annotation["dataset_name"], annotation["dataset_type"]) == ("textvqa", "val")
    assert all(len(item["answers"]) == 10 for item in annotation["data"])
    keys = {(item["image_id"], item["question"].lower()) for item in annotation["data"]}
    lines = _lines(suite, "textvqa/llava_textvqa_val_v051_ocr.jsonl")
    # the scorer recovers the question as line 1 of a 3-line prompt and looks up (image id, question)
    assert [(line["question_id"], line["text"].split("\n")[0].lower()) for line in lines] == \
        [(item["image_id"], item["question"]) for item in annotation["data"]]
    assert len(keys) == len(lines) > len({line["question_id"] for line in lines})  # an image asked twice
    assert all(line["image"] == line["question_id"] + ".jpg" and len(line["question_id"]) == 16 for line in lines)


def test_pope_labels_align_with_the_question_file(suite):
    lines = _lines(suite, "pope/llava_pope_test.jsonl")
    assert [line["question_id"] for line in lines] == list(range(1, len(lines) + 1))
    label_files = sorted(os.listdir(os.path.join(suite, "pope/coco")))
    categories = [name[len("coco_pope_"):-len(".json")] for name in label_files]
    assert categories == ["adversarial", "popular", "random"]
    for category, name in zip(categories, label_files):
        labels = _lines(suite, f"pope/coco/{name}")
        questions = [line for line in lines if line["category"] == category]
        assert len(labels) == len(questions) > 0
        for question, label in zip(questions, labels):
            assert question["image"] == label["image"]
            assert question["text"] == label["text"] + "\n" + SINGLE_WORD
        assert {label["label"] for label in labels} == {"yes", "no"}


def test_mme_pairs_and_ground_truth(suite):
    root = os.path.join(suite, "MME/MME_Benchmark_release_version")
    # the converter's ground-truth table: (category, txt name, question) -> answer, from every txt
    ground_truth = {}
    for category in os.listdir(root):
        for folder, _, names in os.walk(os.path.join(root, category)):
            for name in (name for name in names if name.endswith(".txt")):
                with open(os.path.join(folder, name), encoding="utf-8") as file:
                    for row in file.read().splitlines():
                        question, answer = row.split("\t")
                        ground_truth[(category, name, question)] = answer
    lines = _lines(suite, "MME/llava_mme.jsonl")
    assert len({line["category"] for line in lines}) == 14 and len(lines) == 28
    double_spaced = 0
    for first, second in zip(lines[::2], lines[1::2]):
        assert first["image"] == second["image"] == first["question_id"] == second["question_id"]
        answers = []
        for line in (first, second):
            category = line["question_id"].split("/")[0]
            txt = os.path.basename(line["question_id"]).split(".")[0] + ".txt"
            question = line["text"][:-len(SINGLE_WORD)].strip()
            key = (category, txt, question + " Please answer yes or no.")
            if key not in ground_truth:
                key, double_spaced = (category, txt, question + "  Please answer yes or no."), double_spaced + 1
            answers.append(ground_truth[key])
        assert answers == ["Yes", "No"]
    assert double_spaced == 1
    for category in ("artwork", "celebrity", "landmark", "posters", "scene"):
        assert sorted(os.listdir(os.path.join(root, category))) == ["images", "questions_answers_YN"]


@pytest.mark.parametrize("path", MMBENCH_TSVS)
def test_mmbench_none_like_cells(suite, path):
    table = pd.read_table(os.path.join(suite, path))
    assert list(table.columns) == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                                   "source", "l2-category", "comment", "split"]
    assert table["hint"].isna().any() and table["hint"].notna().any()
    # the runner keeps options up to the first none-like cell: 2, 3 and 4 options all occur
    option_counts = {int(row[["A", "B", "C", "D"]].notna().cumprod().sum()) for _, row in table.iterrows()}
    assert option_counts == {2, 3, 4}
    assert all(row["answer"] in "ABCD"[:count] for (_, row), count in
               zip(table.iterrows(), table[["A", "B", "C", "D"]].notna().sum(axis=1)))
    assert table["index"].is_unique and (table["index"] >= 1_000_000).any()
    for encoded in table["image"]:
        Image.open(io.BytesIO(base64.b64decode(encoded))).load()


def test_seed_annotation_matches_the_questions(suite):
    annotation = _json(suite, "seed_bench/SEED-Bench.json")
    lines = _lines(suite, "seed_bench/llava-seed-bench.jsonl")
    assert len(annotation["question_type"]) == 12
    assert [int(question["question_id"]) for question in annotation["questions"]] == [line["question_id"] for line in lines]
    for question, line in zip(annotation["questions"], lines):
        options = "".join(f"\n{letter}. {question['choice_' + letter.lower()]}" for letter in "ABCD")
        assert line["text"] == question["question"] + options + "\n" + OPTION_LETTER
        assert question["answer"] in "ABCD"
        assert annotation["question_type"][line["category"]] == question["question_type_id"]
        if question["data_type"] == "image":
            assert line["image"] == "SEED-Bench-image/" + question["data_id"]
        else:
            assert line["image"] == f"SEED-Bench-video-image/{question['question_type_id']}_{question['question_id']}.png"
    assert {question["data_type"] for question in annotation["questions"]} == {"image", "video"}


def test_llava_bench_and_mm_vet_files_agree(suite):
    bench = "llava-bench-in-the-wild"
    questions, references = _lines(suite, f"{bench}/questions.jsonl"), _lines(suite, f"{bench}/answers_gpt4.jsonl")
    assert [line["question_id"] for line in questions] == [line["question_id"] for line in references]
    assert {line["category"] for line in questions} == {"conv", "detail", "complex"}
    assert {line["image"] for line in questions} == {line["image"] for line in _lines(suite, f"{bench}/context.jsonl")}
    mm_vet = _lines(suite, "mm-vet/llava-mm-vet.jsonl")
    assert [line["image"] for line in mm_vet] == [f"v1_{line['question_id']}.png" for line in mm_vet]
    assert sorted(_json(suite, "mm-vet/mm-vet.json")) == [f"v1_{line['question_id']}" for line in mm_vet]


def test_ensure_builds_only_when_missing(tmp_path):
    out = str(tmp_path / "eval")
    sample_suite.ensure_sample_suite(out)
    answers = os.path.join(out, "pope/answers/run.jsonl")  # what a script would write into the suite
    os.makedirs(os.path.dirname(answers))
    open(answers, "w").close()
    sample_suite.ensure_sample_suite(out)
    assert os.path.exists(answers)
    sample_suite.ensure_sample_suite(out, seed=1)  # another seed: a fresh suite replaces it
    assert not os.path.exists(answers) and sample_suite.read_marker(out)["seed"] == 1


def test_refuses_to_replace_a_folder_that_is_no_suite(tmp_path):
    (tmp_path / "data.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        sample_suite.build_sample_suite(str(tmp_path))
    assert os.listdir(tmp_path) == ["data.txt"]


def test_cli_prints_the_question_counts(tmp_path, capsys):
    out_dir = str(tmp_path / "eval")
    assert sample_suite.main(["--out", out_dir, "--seed", "2", "--if-missing"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"wrote {out_dir} (seed 2): ")
    assert len(out) == 13 and all(line.endswith(" questions") for line in out[1:])
    assert sample_suite.main(["--out", out_dir, "--seed", "2", "--if-missing"]) == 0
    assert capsys.readouterr().out == f"sample suite already in {out_dir} (seed 2)\n"
