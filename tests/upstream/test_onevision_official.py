"""The official LLaVA-NeXT code (LLaVA-VL/LLaVA-NeXT, `llava` 1.7.0.dev0) run for real on the tiny
OneVision checkpoint: its `qwen_1_5` prompts and ids, its `process_images` pixel values, its visual token
counts under `anyres_max_9` and its vanilla logits equal ours.

Slow, and skipped unless both are found:
- the official code: a git checkout or mirror of LLaVA-VL/LLaVA-NeXT at `LLAVA_NEXT_REPO`, else
  `/work/.mirror/LLaVA-VL+LLaVA-NeXT/repo`; its `llava/` is exported (git archive HEAD) to a temporary
  directory put first on the interpreter's PYTHONPATH, nothing in it changed;
- an interpreter for it at `LLAVA_NEXT_PYTHON`, else `.venv-llava-next/bin/python` in the repository, which
  `sh scripts/install.sh llava-next` makes (transformers 4.40.2 with tokenizers 0.19, einops, accelerate,
  pillow; the installed torch kept). The official code pins transformers at a 4.40.0.dev0 commit; 4.40.2 is
  its nearest release.

The official `build_vision_tower` sends any `mm_vision_tower` that exists as a path to its CLIP tower
and loads SigLIP only by hub id (the real checkpoints name `google/siglip-so400m-patch14-384`), so the
probe runs outside the checkpoint, offline, with a private hub cache holding our tower's files under the
name our config gives it. Both sides load the same fp16 weights and compute in fp32.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import noise_image

from llava.conversation import first_turn_prompt
from llava.mm_utils import onevision_visual_token_count, process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

PROBE = Path(__file__).with_name("onevision_probe.py")
DEFAULT_REPO = "/work/.mirror/LLaVA-VL+LLaVA-NeXT/repo"
DEFAULT_PYTHON = str(Path(__file__).resolve().parents[2] / ".venv-llava-next" / "bin" / "python")
OFFICIAL_TRANSFORMERS = "4.40.2"
QUESTION = "<image>\nWhat is shown in this image?"
# PIL (w, h): a 1x1 grid; two 4x3 grids (columns x rows) either side of anyres_max_9's threshold, times =
# sqrt(canvas / (9 * 729)) > 1.1: 81 x 98 unpadded (times 1.0999, kept whole) and 81 x 108 (1.155, downsampled);
# a large 6x4 grid (downsampled); extreme aspect ratios.
IMAGE_SIZES = [(300, 200), (1400, 1152), (1536, 1152), (2000, 1500), (2000, 150), (120, 1800)]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("vanilla")]


def _official_environment(official_code: Path, home: Path) -> dict:
    """Ours, without what would put this repository on the path, with the official `llava` first and
    an offline, private Hugging Face home."""
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(PYTHONPATH=str(official_code), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       HF_HOME=str(home), HF_HUB_CACHE=str(home / "hub"))
    return environment


@pytest.fixture(scope="module")
def official_code(tmp_path_factory) -> Path:
    """The directory whose `llava/` is the official package, exported from the repository's HEAD."""
    repo = os.environ.get("LLAVA_NEXT_REPO", DEFAULT_REPO)
    export = tmp_path_factory.mktemp("llava-next")
    archive = subprocess.run(["git", "-C", repo, "archive", "HEAD", "llava"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the official LLaVA-NeXT code is not at {repo} (LLAVA_NEXT_REPO): {archive.stderr[-300:]!r}")
    # tar itself: tarfile's safe `filter` is missing from Python releases before 3.11.4
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive.stdout, check=True)
    return export


@pytest.fixture(scope="module")
def official_python(official_code, tmp_path_factory) -> str:
    python = os.environ.get("LLAVA_NEXT_PYTHON", DEFAULT_PYTHON)
    if not os.path.isfile(python):
        pytest.skip(f"no interpreter for the official LLaVA-NeXT code ({python}; sh scripts/install.sh llava-next)")
    home = tmp_path_factory.mktemp("hf-home")
    found = subprocess.run([python, "-c", "import llava.model.builder"], cwd=home, capture_output=True, text=True,
                           env=_official_environment(official_code, home))
    if found.returncode != 0:
        pytest.skip(f"{python} cannot import the official LLaVA-NeXT code: {found.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("ov-images")
    files = []
    for seed, size in enumerate(IMAGE_SIZES):
        files.append(str(folder / f"noise-{size[0]}x{size[1]}.png"))
        noise_image(size, seed).save(files[-1])
    return files


def _hub_cache_with_tower(checkpoint: str, home: Path) -> None:
    """`home/hub` as the hub cache would be after downloading the tower our config names: its files
    (links to the checkpoint's own) in one snapshot that `main` points at."""
    with open(os.path.join(checkpoint, "config.json")) as handle:
        tower = json.load(handle)["mm_vision_tower"]
    repo_folder = home / "hub" / ("models--" + tower.replace("/", "--"))
    revision = "0" * 40
    snapshot = repo_folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(os.path.join(checkpoint, tower)):
        (snapshot / name).symlink_to(os.path.join(checkpoint, tower, name))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(revision)


def _user_turns(sample_questions) -> list[str]:
    return ["<image>\n" + question for question in sample_questions]


@pytest.fixture(scope="module")
def official(official_python, official_code, tiny_onevision_checkpoint, sample_questions, images,
             tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("official")  # no tower directory here, see the module docstring
    home = tmp_path_factory.mktemp("hf-home")
    _hub_cache_with_tower(tiny_onevision_checkpoint, home)
    request = {"checkpoint": tiny_onevision_checkpoint, "prompts": _user_turns(sample_questions),
               "question": QUESTION, "images": images, "out": str(work / "official.pt")}
    (work / "request.json").write_text(json.dumps(request))
    run = subprocess.run([official_python, str(PROBE), str(work / "request.json")], cwd=work,
                         env=_official_environment(official_code, home), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(request["out"])


@pytest.fixture(scope="module")
def ours(tiny_onevision_checkpoint):
    """(tokenizer, model, image_processor): the fp16 weights the official loader gets, computed in fp32."""
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_onevision_checkpoint, device="cpu",
                                                                 torch_dtype=torch.float16)
    return tokenizer, model.float(), image_processor


def test_it_is_the_official_code_that_ran(official, official_code):
    versions = official["versions"]
    assert versions["transformers"] == OFFICIAL_TRANSFORMERS
    assert Path(versions["llava"]).is_relative_to(official_code)  # the export, never this repository's
    assert versions["tower"] == "SigLipVisionTower" and versions["tower_layers"] == 2  # 3 published, last dropped


def test_same_qwen_prompts_and_ids(official, ours, sample_questions):
    tokenizer = ours[0]
    user_turns = _user_turns(sample_questions)
    assert len(official["prompts"]) == len(user_turns) > 0
    for user_turn, theirs in zip(user_turns, official["prompts"]):
        prompt = first_turn_prompt("qwen_1_5", user_turn)
        assert theirs["prompt"] == prompt
        assert theirs["ids"] == tokenizer_image_token(prompt, tokenizer)


def test_same_pixel_values(official, ours, images):
    """The same views (thumbnail, then the crops row-major), bit for bit."""
    _, model, image_processor = ours
    assert len(official["images"]) == len(images)
    for image_file, theirs in zip(images, official["images"]):
        image = Image.open(image_file).convert("RGB")
        pixel_values = process_images([image], image_processor, model.config)[0]
        assert torch.equal(pixel_values, theirs["pixel_values"]), image_file


def test_same_visual_token_counts(official, images):
    """The official count for each size is our formula's; the 1x1 grid by hand: 300x200 leaves
    int(200 * 27 / 300) = 18 rows, padding (27 - 18) // 2 = 4 each side, so 19 rows of 27 + a newline
    after the 729 thumbnail tokens: 729 + 19 * 28 = 1261."""
    counts = [theirs["visual_tokens"] for theirs in official["images"]]
    assert counts[0] == 1261
    assert counts == [onevision_visual_token_count(size) for size in IMAGE_SIZES]


def test_same_vanilla_logits(official, ours, images):
    """Equal within 1e-4 at every position, the image span included (equal lengths: our model splices in
    as many visual tokens as the official one)."""
    tokenizer, model, image_processor = ours
    input_ids = torch.tensor([tokenizer_image_token(first_turn_prompt("qwen_1_5", QUESTION), tokenizer)])
    for image_file, theirs in zip(images, official["images"]):
        image = Image.open(image_file).convert("RGB")
        with torch.no_grad():
            logits = model(input_ids, images=process_images([image], image_processor, model.config),
                           image_sizes=[image.size]).logits[0]
        assert logits.shape == theirs["logits"].shape, image_file
        assert (logits - theirs["logits"]).abs().max().item() <= 1e-4, image_file
