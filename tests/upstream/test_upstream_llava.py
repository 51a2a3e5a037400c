"""Upstream LLaVA 1.2.2 (`llava-torch`, transformers 4.37.2) opens the tiny checkpoint unchanged, tokenizes
the sample prompts as we do, and its vanilla logits equal ours.

Slow, and skipped unless that interpreter exists: `sh scripts/install.sh upstream` makes it at
`.venv-upstream` (the test install makes it too); `LLAVA_UPSTREAM_PYTHON` names another one. Upstream's
package is also called `llava`, so it runs in a subprocess that never sees this repository.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.conversation import first_turn_prompt
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("upstream_probe.py")
UPSTREAM_VERSIONS = {"transformers": "4.37.2", "tokenizers": "0.15.1"}

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("vanilla")]


def _upstream_environment() -> dict:
    """Our environment without anything that would put this repository on upstream's path."""
    return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def upstream_python(tmp_path_factory) -> str:
    python = os.environ.get("LLAVA_UPSTREAM_PYTHON") or str(REPO / ".venv-upstream" / "bin" / "python")
    if not os.path.isfile(python):
        pytest.skip(f"upstream LLaVA is not installed ({python}; sh scripts/install.sh upstream)")
    found = subprocess.run(
        [python, "-c", "import llava.model.builder, transformers; print(transformers.__version__, llava.__file__)"],
        cwd=tmp_path_factory.mktemp("upstream-check"), env=_upstream_environment(), capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"{python} cannot import upstream LLaVA: {found.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Three grids: 672x336 (landscape), 336x672 (portrait), 1008x336 (a wide one, drawn here)."""
    wide = tmp_path_factory.mktemp("wide") / "wide-1000x250.png"
    Image.radial_gradient("L").resize((1000, 250)).convert("RGB").save(wide)
    return [str(REPO / "images" / "shapes-800x500.png"), str(REPO / "images" / "shapes-500x900.png"), str(wide)]


@pytest.fixture(scope="module")
def upstream(upstream_python, tiny_checkpoint, llama_chat_prompts, images, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("upstream")
    request = {
        "prompts": [[conv_mode, user_turn] for conv_mode, user_turn, _ in llama_chat_prompts],
        "logits": [[image, "llava_v1", "<image>\nWhat is shown in this image?"] for image in images],
        "out": str(work / "upstream.pt"),
    }
    (work / "request.json").write_text(json.dumps(request))
    run = subprocess.run([upstream_python, str(PROBE), str(work / "request.json")], cwd=tiny_checkpoint,
                         env=_upstream_environment(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(request["out"])


def test_it_is_upstream_that_ran(upstream):
    versions = upstream["versions"]
    assert {name: versions[name] for name in UPSTREAM_VERSIONS} == UPSTREAM_VERSIONS
    assert versions["slow_tokenizer"] == "LlamaTokenizer"  # sentencepiece, from tokenizer.model
    assert "site-packages" in Path(versions["llava"]).parts  # upstream's `llava`, never this repository's


def test_same_prompts_and_ids(upstream, tiny, llama_chat_prompts):
    """Upstream's templates make our prompts; its slow tokenizer (`tokenizer.model`), its fast one and
    `tokenizers` 0.15 reading `tokenizer.json` all give our ids."""
    tokenizer = tiny[0]
    assert len(upstream["prompts"]) == len(llama_chat_prompts)
    for (_, _, prompt), theirs in zip(llama_chat_prompts, upstream["prompts"]):
        ours = tokenizer_image_token(prompt, tokenizer)
        assert theirs["prompt"] == prompt
        assert theirs["slow"] == ours and theirs["fast"] == ours
        chunks = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split("<image>")]
        assert theirs["chunks"] == chunks


def test_same_vanilla_logits(upstream, tiny_checkpoint, images):
    """Both from the fp16 weights upstream loads, computed in fp32: equal within 1e-4 at every position."""
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu",
                                                                 torch_dtype=torch.float16)
    model = model.float()
    prompt = first_turn_prompt("llava_v1", "<image>\nWhat is shown in this image?")
    input_ids = torch.tensor([tokenizer_image_token(prompt, tokenizer)])
    assert len(upstream["logits"]) == len(images)
    for image_file, theirs in zip(images, upstream["logits"]):
        image = Image.open(image_file).convert("RGB")
        with torch.no_grad():
            ours = model(input_ids, images=process_images([image], image_processor, model.config),
                         image_sizes=[image.size]).logits[0]
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4
