"""A small synthetic evaluation suite: every benchmark's real files, a handful of generated items.

The evaluation shell scripts expect `playground/data/eval/<bench>/...` laid out exactly as the
official downloads (question files, annotation files, image folders). Those are gigabytes and
not redistributable, so CPU smoke runs use this suite instead: for each of the 12 benchmarks
(GQA, VQAv2, VizWiz, ScienceQA, TextVQA, POPE, MME, MMBench, MMBench-CN, SEED-Bench,
LLaVA-Bench-in-the-Wild, MM-Vet) it writes 4-8 questions on drawn images (coloured shapes, some
text) in the same formats, file names and directory layout as the real data
(`/work/shared/spec/evaluation.md`), so runner -> answers file -> converter/scorer runs end to end
against a tiny random-weight checkpoint. Scores are meaningless; the pipeline is what is tested.

The answers in the annotation files are true of the drawn images, the question texts carry the
benchmarks' exact prompt suffixes, and the edge cases the scorers must survive are present (an
empty TextVQA OCR token list, palette and RGBA ScienceQA images, text-only ScienceQA problems,
MMBench rows without hint or with only two options, SEED video items, MME's double-space tail).
Image sizes are chosen so that every LLaVA-NeXT AnyRes grid occurs.

Deterministic: the same seed writes the same bytes. Small (well under 2 MB) and fast (about a
second). Usage:

    python -m llava.eval.sample_suite --out playground/sample/eval [--seed 0] [--if-missing]

then point a script's `playground/data/eval` root at `playground/sample/eval` (the scripts do so
with SAMPLE=1). `--if-missing` / `ensure_sample_suite(out_dir)` build only when the suite is not
there yet.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import os
import shutil
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from llava.eval.jsonl import write_jsonl

SINGLE_WORD = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
MME_TAIL = " Please answer yes or no."

# Written last by a build, so its presence means a complete suite (see ensure_sample_suite).
MARKER = ".sample_suite.json"

# (width, height); with the v1.6 pinpoints these select the grids 672x336, 336x672, 672x672,
# 1008x336, 336x1008 and (upscaled from a tiny image) 336x672 again.
SIZES = ((400, 260), (260, 400), (380, 360), (720, 200), (200, 720), (96, 64))

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 150, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 200, 30),
    "purple": (130, 60, 170),
    "orange": (245, 135, 25),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("STOP", "CAFE", "OPEN", "EXIT", "SALE", "PARK", "TAXI", "HOTEL", "PIZZA", "BAKERY")


@dataclass(frozen=True)
class Thing:
    """One drawn shape."""

    colour: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


# ------------------------------------------------------------------------------------------------
# Shared helpers: drawing, writing, small text utilities


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _picture(rng: np.random.Generator, size: tuple[int, int], words=()) -> tuple[Image.Image, list[Thing]]:
    """An RGB image with three shapes of distinct colours and kinds, side by side, and `words` on a
    white sign along the bottom. The shapes are returned left to right (position questions rely
    on that order)."""
    width, height = size
    image = Image.new("RGB", size, tuple(int(value) for value in rng.integers(170, 250, 3)))
    draw = ImageDraw.Draw(image)
    # Shapes live in the top 60 % (all of it without words), one per third of the width, so
    # they never overlap and left/right is unambiguous.
    band = int(height * 0.6) if words else height
    slot = width / 3
    colours = rng.permutation(list(COLOURS))[:3]
    shapes = rng.permutation(SHAPES)
    things = []
    for k, (colour, shape) in enumerate(zip(colours, shapes)):
        radius = min(slot, band) * rng.uniform(0.25, 0.42)
        x = slot * (k + 0.5) + rng.uniform(-0.05, 0.05) * slot
        y = band / 2 + rng.uniform(-0.1, 0.1) * band
        box = [x - radius, y - radius, x + radius, y + radius]
        fill = COLOURS[str(colour)]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - radius), (x + radius, y + radius), (x - radius, y + radius)], fill=fill)
        things.append(Thing(str(colour), str(shape)))
    if words:
        draw.rectangle([0, band, width, height], fill=(255, 255, 255))
        line_height = (height - band) / len(words)
        # a glyph is about 0.6 em wide: the longest word must fit the width, each word its line
        longest = max(map(len, words))
        font = _font(max(8, int(min(line_height * 0.75, (width - 8) / (0.6 * longest)))))
        for k, word in enumerate(words):
            draw.text((4, band + k * line_height), word, fill=(0, 0, 0), font=font)
    return image, things


def _words(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    return tuple(str(word) for word in rng.choice(WORDS, count, replace=False))


def _absent(rng: np.random.Generator, things: list[Thing]) -> str:
    """The name of a shape that is not in the picture (its colour is not used at all)."""
    unused = [colour for colour in COLOURS if colour not in {thing.colour for thing in things}]
    return f"{rng.choice(unused)} {rng.choice(SHAPES)}"


def _other_colours(thing: Thing) -> list[str]:
    return [colour for colour in COLOURS if colour != thing.colour]


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase


def _distinct_ints(rng: np.random.Generator, count: int, low: int, high: int) -> list[int]:
    """`count` distinct integers in [low, high), ascending (ids that look like the real ones)."""
    return sorted(int(value) + low for value in rng.choice(high - low, count, replace=False))


def _choices(rng: np.random.Generator, correct: str, distractors, count: int) -> tuple[list[str], int]:
    """`count` options, the correct one at a random position: (options, index of the correct one)."""
    options = [correct] + [str(option) for option in rng.choice(distractors, count - 1, replace=False)]
    order = rng.permutation(count)
    return [options[k] for k in order], int(np.argmax(order == 0))


def _lettered(options) -> str:
    """Options as the upstream question files write them: `\\nA. ...\\nB. ...`."""
    return "".join(f"\n{'ABCDE'[k]}. {option}" for k, option in enumerate(options))


def _single_word(question: str) -> str:
    return f"{question}\n{SINGLE_WORD}"


def _ensure_parent(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def _save_image(image: Image.Image, path: str) -> None:
    image.save(_ensure_parent(path))  # format from the extension: .jpg -> JPEG, .png -> PNG


def _write_json(path: str, data) -> None:
    with open(_ensure_parent(path), "w", encoding="utf-8") as out:
        json.dump(data, out)


def _write_jsonl(path: str, rows) -> None:
    write_jsonl(_ensure_parent(path), rows)


def _write_text(path: str, text: str) -> None:
    with open(_ensure_parent(path), "w", encoding="utf-8") as out:
        out.write(text)


# ------------------------------------------------------------------------------------------------
# One writer per benchmark: writes under `root` and returns {question file: number of questions}.


def _gqa_query(thing: Thing) -> dict:
    return {
        "question": f"What color is the {thing.shape}?",
        "answer": thing.colour,
        "fullAnswer": f"The {thing.shape} is {thing.colour}.",
        "types": {"structural": "query", "semantic": "attr", "detailed": "queryAttr"},
        "semantic": [
            {"operation": "select", "dependencies": [], "argument": f"{thing.shape} (0)"},
            {"operation": "query", "dependencies": [0], "argument": "color"},
        ],
        "groups": {"global": "color", "local": f"10q-{thing.shape}_color"},
    }


def _gqa_verify(name: str, present: bool) -> dict:
    colour, shape = name.split()
    return {
        "question": f"Is there {_a(name)} in the picture?",
        "answer": "yes" if present else "no",
        "fullAnswer": f"Yes, there is {_a(name)}." if present else f"No, there is no {name}.",
        "types": {"structural": "verify", "semantic": "obj", "detailed": "existAttr"},
        "semantic": [
            {"operation": "select", "dependencies": [], "argument": f"{shape} (0)"},
            {"operation": "filter color", "dependencies": [0], "argument": colour},
            {"operation": "exist", "dependencies": [1], "argument": "?"},
        ],
        "groups": {"global": None, "local": f"13-{shape}_{colour}"},
    }


def _gqa(root: str, rng: np.random.Generator) -> dict[str, int]:
    question_ids = iter(_distinct_ints(rng, 6, 200_000_000, 210_000_000))
    annotations, lines = {}, []
    for k, number in enumerate(_distinct_ints(rng, 4, 1, 2_400_000)):
        image_id = f"n{number}"
        image, things = _picture(rng, SIZES[k])
        _save_image(image, f"{root}/gqa/data/images/{image_id}.jpg")
        asked = [_gqa_query(things[k % 3])]
        if k % 2 == 0:  # binary questions too, so the scorer's open/binary split has both
            present = k == 0
            asked.append(_gqa_verify(things[1].name if present else _absent(rng, things), present))
        for question in asked:
            question_id = str(next(question_ids))
            annotations[question_id] = {
                "imageId": image_id, **question, "isBalanced": True,
                "entailed": [], "equivalent": [question_id],
                "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
            }
            lines.append({"question_id": question_id, "image": f"{image_id}.jpg",
                          "text": _single_word(question["question"]), "category": "default"})
    _write_json(f"{root}/gqa/data/testdev_balanced_questions.json", annotations)
    _write_jsonl(f"{root}/gqa/llava_gqa_testdev_balanced.jsonl", lines)
    return {"gqa/llava_gqa_testdev_balanced.jsonl": len(lines)}


def _vqav2(root: str, rng: np.random.Generator) -> dict[str, int]:
    test_dev, test = [], []
    for k, image_id in enumerate(_distinct_ints(rng, 4, 1, 582_000)):
        name = f"COCO_test2015_{image_id:012d}.jpg"
        image, things = _picture(rng, SIZES[k])
        _save_image(image, f"{root}/vqav2/test2015/{name}")
        for n, question in enumerate([f"What color is the {things[k % 3].shape}?", "How many shapes are there?"]):
            # VQA question ids are the image id times 1000 plus a running number
            line = {"question_id": image_id * 1000 + n, "image": name, "text": _single_word(question), "category": "default"}
            test.append(line)
            # test-dev is a subset of test2015: the upload must still list the other questions
            if n == 0 or k % 2 == 0:
                test_dev.append(line)
    _write_jsonl(f"{root}/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", test_dev)
    _write_jsonl(f"{root}/vqav2/llava_vqav2_mscoco_test2015.jsonl", test)
    return {"vqav2/llava_vqav2_mscoco_test-dev2015.jsonl": len(test_dev)}


VIZWIZ_QUESTIONS = ("What is this?", "What color is this?", "What does this say?", "Can you tell me what this is?")


def _vizwiz(root: str, rng: np.random.Generator) -> dict[str, int]:
    lines, annotations = [], []
    for question_id, question in enumerate(VIZWIZ_QUESTIONS):
        name = f"VizWiz_test_{question_id:08d}.jpg"
        image, _ = _picture(rng, SIZES[question_id], words=_words(rng, 1))
        _save_image(image, f"{root}/vizwiz/test/{name}")
        lines.append({"question_id": question_id, "image": name, "category": "default",
                      "text": f"{question}\n{UNANSWERABLE}\n{SINGLE_WORD}"})
        annotations.append({"image": name, "question": question})
    _write_json(f"{root}/vizwiz/test.json", annotations)
    _write_jsonl(f"{root}/vizwiz/llava_test.jsonl", lines)
    return {"vizwiz/llava_test.jsonl": len(lines)}


# Text-only ScienceQA problems: (question, hint, correct choice, wrong choices).
SCIENCEQA_TEXT_ONLY = (
    ("How many sides does a triangle have?", "", "3", ("4", "5", "6")),
    ("Which colour do you get by mixing blue and yellow paint?", "Think of grass.", "green", ("orange", "purple", "red")),
)
# Image modes of the ScienceQA image problems: real ScienceQA has palette and RGBA PNGs, which the
# runner passes on without RGB conversion.
SCIENCEQA_IMAGE_MODES = ("RGB", "P", "RGBA", "RGB")


def _scienceqa_image(image: Image.Image, mode: str) -> Image.Image:
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "RGBA":  # a round cut-out: transparent corners
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).ellipse([0, 0, image.width - 1, image.height - 1], fill=255)
        cut_out = image.convert("RGBA")
        cut_out.putalpha(mask)
        return cut_out
    return image


def _scienceqa_problem(question, hint, choices, answer, image, split) -> dict:
    return {"question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
            "task": "closed choice", "grade": "grade2", "subject": "natural science", "topic": "colours and shapes",
            "category": "Identify shapes and colours", "skill": "Identify colours", "lecture": "", "solution": "",
            "split": split}


def _scienceqa(root: str, rng: np.random.Generator) -> dict[str, int]:
    *test_pids, train_pid = (str(pid) for pid in _distinct_ints(rng, 7, 1, 21_000))
    problems, items = {}, []
    for k, (pid, mode) in enumerate(zip(test_pids, SCIENCEQA_IMAGE_MODES)):
        image, things = _picture(rng, SIZES[k])
        _save_image(_scienceqa_image(image, mode), f"{root}/scienceqa/images/test/{pid}/image.png")
        thing = things[k % 3]
        choices, answer = _choices(rng, thing.colour, _other_colours(thing), 2 + k)  # 2 to 5 options
        hint = "Look at the picture." if k % 2 == 0 else ""
        problems[pid] = _scienceqa_problem(f"Which color is the {thing.shape}?", hint, choices, answer, "image.png", "test")
    for pid, (question, hint, correct, wrong) in zip(test_pids[len(SCIENCEQA_IMAGE_MODES):], SCIENCEQA_TEXT_ONLY):
        choices, answer = _choices(rng, correct, wrong, 3)
        problems[pid] = _scienceqa_problem(question, hint, choices, answer, None, "test")
    # A train problem the question file does not ask: the scorer must keep to the test split.
    problems[train_pid] = _scienceqa_problem("How many corners does a square have?", "", ["4", "3"], 0, None, "train")
    for pid in test_pids:
        problem = problems[pid]
        human = ("<image>\n" if problem["image"] else "") + (f"Context: {problem['hint']}\n" if problem["hint"] else "")
        human += problem["question"] + _lettered(problem["choices"])
        item = {"id": pid, "conversations": [{"from": "human", "value": human},
                                             {"from": "gpt", "value": f"The answer is {'ABCDE'[problem['answer']]}."}]}
        if problem["image"]:
            item["image"] = f"{pid}/image.png"
        items.append(item)
    _write_json(f"{root}/scienceqa/problems.json", problems)
    _write_json(f"{root}/scienceqa/pid_splits.json", {"train": [train_pid], "val": [], "test": test_pids})
    _write_json(f"{root}/scienceqa/llava_test_CQM-A.json", items)
    return {"scienceqa/llava_test_CQM-A.json": len(items)}


def _ten_answers(rng: np.random.Generator, answer: str) -> list[str]:
    """Ten annotator answers: `answer` 3 to 10 times (so partial credit occurs), the rest variants,
    one of which ("the <answer>") only matches after answer normalisation."""
    agreeing = int(rng.integers(3, 11))
    variants = ["unanswerable", f"the {answer}", f"{answer} sign"]
    answers = [answer] * agreeing + [variants[k % 3] for k in range(10 - agreeing)]
    return [answers[k] for k in rng.permutation(10)]


def _textvqa(root: str, rng: np.random.Generator) -> dict[str, int]:
    question_ids = iter(_distinct_ints(rng, 6, 34_602, 39_602))
    lines, data = [], []
    for k in range(4):
        image_id = rng.bytes(8).hex()
        words = _words(rng, k + 1) if k < 3 else ()  # the last image has no text: empty OCR list
        image, things = _picture(rng, SIZES[k], words)
        _save_image(image, f"{root}/textvqa/train_images/{image_id}.jpg")
        if words:
            asked = [("what does the sign say?", words[0].lower())]
            if len(words) > 1:  # a second question on the same image: question ids repeat
                asked.append(("what is the last word on the sign?", words[-1].lower()))
        else:
            asked = [(f"what color is the {things[0].shape}?", things[0].colour)]
        ocr_tokens = ", ".join(word.lower() for word in words)
        for question, answer in asked:
            data.append({"question": question, "image_id": image_id, "image_classes": [], "image_width": image.width,
                         "image_height": image.height, "answers": _ten_answers(rng, answer),
                         "question_tokens": question.rstrip("?").split(), "question_id": next(question_ids),
                         "set_name": "val"})
            lines.append({"question_id": image_id, "image": f"{image_id}.jpg", "category": "default",
                          "text": f"{question}\nReference OCR token: {ocr_tokens}\n{SINGLE_WORD}"})
    _write_json(f"{root}/textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_type": "val", "data": data})
    _write_jsonl(f"{root}/textvqa/llava_textvqa_val_v051_ocr.jsonl", lines)
    return {"textvqa/llava_textvqa_val_v051_ocr.jsonl": len(lines)}


# POPE categories in the order of the LLaVA question file, with their number of questions.
POPE_CATEGORIES = (("adversarial", 3), ("popular", 3), ("random", 2))


def _pope(root: str, rng: np.random.Generator) -> dict[str, int]:
    pictures = []
    for k, number in enumerate(_distinct_ints(rng, 3, 1, 582_000)):
        name = f"COCO_val2014_{number:012d}.jpg"
        image, things = _picture(rng, SIZES[k])
        _save_image(image, f"{root}/pope/val2014/{name}")
        pictures.append((name, things))
    lines = []
    for category, count in POPE_CATEGORIES:
        labels = []
        for n in range(count):
            name, things = pictures[n % len(pictures)]
            present = n % 2 == 0
            question = f"Is there {_a(things[n % 3].name if present else _absent(rng, things))} in the image?"
            labels.append({"question_id": n + 1, "image": name, "text": question, "label": "yes" if present else "no"})
            lines.append({"question_id": len(lines) + 1, "image": name, "text": _single_word(question), "category": category})
        # The scorer pairs these lines positionally with the question file's lines of the category.
        _write_jsonl(f"{root}/pope/coco/coco_pope_{category}.json", labels)
    _write_jsonl(f"{root}/pope/llava_pope_test.jsonl", lines)
    return {"pope/llava_pope_test.jsonl": len(lines)}


# The 14 MME categories (perception, then cognition) with a file name in the style of each.
MME_IMAGES = {
    "existence": "000000006040.jpg",
    "count": "000000027620.jpg",
    "position": "000000040361.jpg",
    "color": "000000052007.jpg",
    "posters": "tt0048545.jpg",
    "celebrity": "tt0032138_shot_0395_img_0.jpg",
    "scene": "Places365_val_00000001.jpg",
    "landmark": "03d5e3bfc958be38.jpg",
    "artwork": "14777.jpg",
    "OCR": "0001.jpg",
    "commonsense_reasoning": "0001.png",
    "numerical_calculation": "0001.png",
    "text_translation": "0001.png",
    "code_reasoning": "0001.png",
}
# Categories whose images sit in `images/` and answers in `questions_answers_YN/`.
MME_SPLIT_LAYOUT = {"artwork", "celebrity", "landmark", "posters", "scene"}
# Categories not about the drawn shapes: (words drawn, question answered Yes, question answered No).
MME_FIXED_QUESTIONS = {
    "posters": (("SUNRISE",), "Is this movie titled Sunrise?", "Is this movie titled Moonlight?"),
    "celebrity": ((), "Is the actor inside the red bounding box named Ada Lovelace?",
                  "Is the actor inside the red bounding box named Grace Hopper?"),
    "scene": ((), "Does this image describe a place of playground?", "Does this image describe a place of airport?"),
    "landmark": ((), "Is this a photo of Stonehenge?", "Is this a photo of Big Ben?"),
    "artwork": ((), "Is this artwork created by Kandinsky?", "Is this artwork created by Rembrandt?"),
    "OCR": (("OPEN",), 'Is the word in the logo "OPEN"?', 'Is the word in the logo "SHUT"?'),
    "commonsense_reasoning": ((), "Are these shapes suitable for teaching colours?", "Are these shapes edible?"),
    "numerical_calculation": (("12 + 7 = ?",), "Is the answer to the arithmetic question in the image 19?",
                              "Is the answer to the arithmetic question in the image 20?"),
    "text_translation": (("STOP",), 'Is it appropriate to translate the word in the image into Chinese as "停"?',
                         'Is it appropriate to translate the word in the image into Chinese as "走"?'),
    "code_reasoning": (("print(2 + 3)",), "The image shows a python code. Is the output of the code '5'?",
                       "The image shows a python code. Is the output of the code '6'?"),
}
# Some official lines have two spaces before the tail; the converter falls back to that variant.
MME_DOUBLE_SPACED = ("code_reasoning", "No")


def _mme_shape_questions(category: str, things: list[Thing], rng: np.random.Generator) -> tuple[str, str]:
    """(question answered Yes, question answered No) about the drawn shapes."""
    left, right = things[0], things[-1]
    if category == "existence":
        return f"Is there {_a(left.name)} in this image?", f"Is there {_a(_absent(rng, things))} in this image?"
    if category == "count":
        return f"Are there {len(things)} shapes in this image?", f"Are there {len(things) + 2} shapes in this image?"
    if category == "position":
        return (f"Is the {left.name} on the left of the {right.name}?",
                f"Is the {left.name} on the right of the {right.name}?")
    assert category == "color", category
    return f"Is the {left.shape} {left.colour}?", f"Is the {left.shape} {rng.choice(_other_colours(left))}?"


def _mme(root: str, rng: np.random.Generator) -> dict[str, int]:
    benchmark = f"{root}/MME/MME_Benchmark_release_version"
    lines = []
    for k, (category, name) in enumerate(MME_IMAGES.items()):
        fixed = MME_FIXED_QUESTIONS.get(category)
        image, things = _picture(rng, SIZES[k % len(SIZES)], fixed[0] if fixed else ())
        stem = name.split(".")[0]
        if category in MME_SPLIT_LAYOUT:
            image_path, answers_path = f"{category}/images/{name}", f"{category}/questions_answers_YN/{stem}.txt"
        else:
            image_path, answers_path = f"{category}/{name}", f"{category}/{stem}.txt"
        _save_image(image, f"{benchmark}/{image_path}")
        questions = fixed[1:] if fixed else _mme_shape_questions(category, things, rng)
        ground_truth = ""
        for question, answer in zip(questions, ("Yes", "No")):
            tail = " " + MME_TAIL if (category, answer) == MME_DOUBLE_SPACED else MME_TAIL
            ground_truth += f"{question}{tail}\t{answer}\n"
            lines.append({"question_id": image_path, "image": image_path, "text": _single_word(question), "category": category})
        _write_text(f"{benchmark}/{answers_path}", ground_truth)
    _write_jsonl(f"{root}/MME/llava_mme.jsonl", lines)
    return {"MME/llava_mme.jsonl": len(lines)}


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split"]
MMBENCH_FILES = {"en": "mmbench/mmbench_dev_20230712.tsv", "cn": "mmbench_cn/mmbench_dev_cn_20231003.tsv"}
MMBENCH_PHRASES = {
    "en": {"question": "What color is the {shape}?", "hint": "The picture shows simple shapes.",
           "colours": {colour: colour for colour in COLOURS}, "shapes": {shape: shape for shape in SHAPES}},
    "cn": {"question": "图中的{shape}是什么颜色？", "hint": "图片中有一些简单的形状。",
           "colours": {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
                       "orange": "橙色", "black": "黑色"},
           "shapes": {"circle": "圆形", "square": "正方形", "triangle": "三角形"}},
}
# Per question: number of options (2 leaves C and D empty) and whether it has a hint; empty cells
# read back as NaN, which the runner treats as "none".
MMBENCH_LAYOUTS = ((4, True), (4, False), (2, True), (3, False), (4, True))
# CircularEval: the server also asks each question with rotated options, under index + k * 1e6.
MMBENCH_ROTATION_OFFSET = 1_000_000


def _base64(image: Image.Image, image_format: str) -> str:
    encoded = io.BytesIO()
    image.save(encoded, format=image_format)
    return base64.b64encode(encoded.getvalue()).decode("ascii")


def _mmbench(root: str, rng: np.random.Generator) -> dict[str, int]:
    """MMBench and MMBench-CN: the same questions on the same images, in English and in Chinese."""
    questions = []  # (index, Thing asked about, options as colour keys, answer position, hint?, image)
    for k, (index, (option_count, has_hint)) in enumerate(zip(_distinct_ints(rng, 5, 0, 4_000), MMBENCH_LAYOUTS)):
        image, things = _picture(rng, SIZES[k])
        thing = things[k % 3]
        options, answer = _choices(rng, thing.colour, _other_colours(thing), option_count)
        # mostly JPEG like the real files, one PNG
        questions.append((index, thing, options, answer, has_hint, _base64(image, "PNG" if k == 3 else "JPEG")))
    index, thing, options, answer, has_hint, image = questions[0]
    questions.append((index + MMBENCH_ROTATION_OFFSET, thing, options[1:] + options[:1],
                      (answer - 1) % len(options), has_hint, image))
    for language, path in MMBENCH_FILES.items():
        phrases = MMBENCH_PHRASES[language]
        rows = []
        for index, thing, options, answer, has_hint, image in questions:
            letters = dict(zip("ABCD", (phrases["colours"][option] for option in options)))
            rows.append({"index": index, "question": phrases["question"].format(shape=phrases["shapes"][thing.shape]),
                         "hint": phrases["hint"] if has_hint else None, **letters, "answer": "ABCD"[answer],
                         "category": "attribute_recognition", "image": image, "source": "MMBench",
                         "l2-category": "finegrained_perception (instance-level)", "comment": None, "split": "dev"})
        table = pd.DataFrame(rows, columns=MMBENCH_COLUMNS)
        table.to_csv(_ensure_parent(f"{root}/{path}"), sep="\t", index=False)
    return {path: len(questions) for path in MMBENCH_FILES.values()}


SEED_QUESTION_TYPES = ("Scene Understanding", "Instance Identity", "Instance Attributes", "Instance Location",
                       "Instances Counting", "Spatial Relation", "Instance Interaction", "Visual Reasoning",
                       "Text Understanding", "Action Recognition", "Action Prediction", "Procedure Understanding")
# Video items: (question type, video file in the official data, question, correct option, wrong options).
SEED_VIDEO_QUESTIONS = (
    ("Action Recognition", "74225.webm", "What action is performed in the video?", "Moving something from left to right",
     ("Pushing something off a table", "Turning something upside down", "Putting something into a box")),
    ("Procedure Understanding", "P03/cam01/P03_cereals.avi", "Which steps are shown in the video?",
     "Take bowl, pour cereals, pour milk", ("Crack eggs, stir, fry", "Cut bun, add butter, close bun",
                                            "Pour water, add coffee, stir")),
)


def _seed_image_question(k: int, things: list[Thing]) -> tuple[str, str, str, list[str]]:
    """(question type, question, correct option, wrong options) about a drawn picture."""
    thing = things[k % 3]
    return [
        ("Instance Attributes", f"What is the color of the {thing.shape}?", thing.colour, _other_colours(thing)),
        ("Instances Counting", "How many shapes are in the image?", str(len(things)), ["1", "2", "4", "5"]),
        ("Spatial Relation", f"Which shape is to the left of the {things[1].shape}?", things[0].shape,
         [things[1].shape, things[2].shape, "star"]),
        ("Scene Understanding", "What best describes the image?", "Simple coloured shapes",
         ["A crowded street", "A forest at night", "A kitchen table"]),
    ][k % 4]


def _seed(root: str, rng: np.random.Generator) -> dict[str, int]:
    question_ids = _distinct_ints(rng, 4 + len(SEED_VIDEO_QUESTIONS), 100_000, 120_000)
    items = []  # (question type, question, correct option, wrong options, data_id, data_type, image path)
    for k, (first, second) in enumerate(rng.integers(1_000_000, 3_000_000_000, (4, 2))):
        data_id = f"{first}_{second}.jpg"
        image, things = _picture(rng, SIZES[k])
        _save_image(image, f"{root}/seed_bench/SEED-Bench-image/{data_id}")
        items.append((*_seed_image_question(k, things), data_id, "image", f"SEED-Bench-image/{data_id}"))
    for k, (question_type, data_id, question, correct, wrong) in enumerate(SEED_VIDEO_QUESTIONS):
        # upstream's extract_video_frames.py saves a video's middle frame as "<type id>_<question id>.png"
        type_id = SEED_QUESTION_TYPES.index(question_type) + 1
        frame = f"SEED-Bench-video-image/{type_id}_{question_ids[len(items)]}.png"
        image, _ = _picture(rng, SIZES[4 + k])
        _save_image(image, f"{root}/seed_bench/{frame}")
        items.append((question_type, question, correct, wrong, data_id, "video", frame))
    annotations, lines = [], []
    for question_id, (question_type, question, correct, wrong, data_id, data_type, image) in zip(question_ids, items):
        options, answer = _choices(rng, correct, wrong, 4)
        annotations.append({"question_id": str(question_id), "question": question,
                            **{f"choice_{letter}": option for letter, option in zip("abcd", options)},
                            "answer": "ABCD"[answer], "data_id": data_id, "data_type": data_type,
                            "question_type_id": SEED_QUESTION_TYPES.index(question_type) + 1})
        lines.append({"image": image, "text": question + _lettered(options) + "\n" + OPTION_LETTER,
                      "category": question_type, "question_id": question_id})
    _write_json(f"{root}/seed_bench/SEED-Bench.json",
                {"question_type": {name: k + 1 for k, name in enumerate(SEED_QUESTION_TYPES)}, "questions": annotations})
    _write_jsonl(f"{root}/seed_bench/llava-seed-bench.jsonl", lines)
    return {"seed_bench/llava-seed-bench.jsonl": len(lines)}


SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
LLAVA_BENCH_CATEGORIES = ("conv", "detail", "complex")


def _llava_bench_pair(category: str, things: list[Thing], caption: str) -> tuple[str, str]:
    """(question, GPT-4 reference answer) of a category."""
    if category == "conv":
        return f"What color is the {things[0].shape}?", f"The {things[0].shape} is {things[0].colour}."
    if category == "detail":
        return "Describe the image in detail.", caption
    return ("What could a teacher use this picture for?",
            "A teacher could use it to teach young children the names of colours and shapes.")


def _llava_bench(root: str, rng: np.random.Generator) -> dict[str, int]:
    bench = f"{root}/llava-bench-in-the-wild"
    questions, contexts, references = [], [], []
    for k in range(3):
        name = f"{k + 1:03d}.jpg"
        image, things = _picture(rng, SIZES[k])
        _save_image(image, f"{bench}/images/{name}")
        caption = "From left to right: " + ", ".join(_a(thing.name) for thing in things) + "."
        contexts.append({"id": name.split(".")[0], "image": name, "caption": caption})
        for _ in range(2):
            question_id = len(questions)
            category = LLAVA_BENCH_CATEGORIES[question_id % 3]
            question, reference = _llava_bench_pair(category, things, caption)
            questions.append({"question_id": question_id, "image": name, "text": question, "category": category})
            references.append({"question_id": question_id, "text": reference,
                               "answer_id": "".join(rng.choice(list(SHORTUUID_ALPHABET), 22)),
                               "model_id": "gpt-4-0314", "metadata": {}})
    _write_jsonl(f"{bench}/questions.jsonl", questions)
    _write_jsonl(f"{bench}/context.jsonl", contexts)
    _write_jsonl(f"{bench}/answers_gpt4.jsonl", references)
    return {"llava-bench-in-the-wild/questions.jsonl": len(questions)}


def _mm_vet(root: str, rng: np.random.Generator) -> dict[str, int]:
    lines, ground_truth = [], {}
    for question_id in range(4):
        name = f"v1_{question_id}.png"
        words = _words(rng, 1) if question_id == 0 else ()
        image, things = _picture(rng, SIZES[question_id], words)
        _save_image(image, f"{root}/mm-vet/images/{name}")
        question, answer, capabilities = [
            ("What is written in the image?", words[0] if words else "", ["ocr"]),
            (f"What color is the {things[1].shape}?", things[1].colour, ["rec"]),
            ("How many shapes are there in the image? Add two.", str(len(things) + 2), ["rec", "math"]),
            ("Which shape is on the left?", things[0].shape, ["rec", "spat"]),
        ][question_id]
        lines.append({"image": name, "text": question, "category": "conv", "question_id": question_id})
        # mm-vet.json is the official grader's ground truth; the LLaVA scripts only read the jsonl
        ground_truth[f"v1_{question_id}"] = {"imagename": name, "capability": capabilities, "question": question,
                                             "answer": answer}
    _write_json(f"{root}/mm-vet/mm-vet.json", ground_truth)
    _write_jsonl(f"{root}/mm-vet/llava-mm-vet.jsonl", lines)
    return {"mm-vet/llava-mm-vet.jsonl": len(lines)}


# Writer per benchmark (MMBench writes the English and the Chinese set). Each draws from its own
# random stream, so one benchmark's output does not depend on the others.
BENCHMARKS = {
    "gqa": _gqa,
    "vqav2": _vqav2,
    "vizwiz": _vizwiz,
    "scienceqa": _scienceqa,
    "textvqa": _textvqa,
    "pope": _pope,
    "mme": _mme,
    "mmbench": _mmbench,
    "seed_bench": _seed,
    "llava_bench": _llava_bench,
    "mm_vet": _mm_vet,
}


# ------------------------------------------------------------------------------------------------
# Entry points


def build_sample_suite(out_dir: str, seed: int = 0) -> str:
    """Write the suite under `out_dir` (same relative layout as `playground/data/eval`) and return
    `out_dir`.

    The suite is written to a sibling folder and moved into place, so `out_dir` never holds a
    half-built suite or files of another seed. A previous suite there (answers written into it
    included) is replaced; any other non-empty folder is refused rather than deleted.
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir) and read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} is not empty and holds no sample suite; not replacing it")
    staging = os.path.normpath(out_dir) + ".partial"
    shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted build
    try:
        questions = {}
        for name, write in BENCHMARKS.items():
            questions.update(write(staging, np.random.default_rng([seed, zlib.crc32(name.encode())])))
        _write_json(os.path.join(staging, MARKER), {"seed": seed, "questions": questions})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_marker(out_dir: str) -> dict | None:
    """What a complete build wrote there ({"seed", "questions": {question file: count}}), or None."""
    try:
        with open(os.path.join(out_dir, MARKER), encoding="utf-8") as marker:
            return json.load(marker)
    except FileNotFoundError:
        return None


def _is_built(out_dir: str, seed: int) -> bool:
    marker = read_marker(out_dir)
    return marker is not None and marker["seed"] == seed


def ensure_sample_suite(out_dir: str, seed: int = 0) -> str:
    """Build the suite unless a complete build with this seed is already there; return `out_dir`."""
    if not _is_built(out_dir, seed):
        build_sample_suite(out_dir, seed)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="playground/sample/eval", help="suite root (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--if-missing", action="store_true",
                        help="keep a suite of this seed already there (and the answers written into it)")
    args = parser.parse_args(argv)
    if args.if_missing and _is_built(args.out, args.seed):
        print(f"sample suite already in {args.out} (seed {args.seed})")
        return 0
    try:
        build_sample_suite(args.out, args.seed)
    except FileExistsError as error:
        parser.error(str(error))
    files = [os.path.join(folder, name) for folder, _, names in os.walk(args.out) for name in names]
    size = sum(os.path.getsize(path) for path in files)
    print(f"wrote {args.out} (seed {args.seed}): {len(files)} files, {size / 1024:.0f} KiB")
    for question_file, count in read_marker(args.out)["questions"].items():
        print(f"  {question_file}: {count} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
