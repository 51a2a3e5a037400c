"""Shared fixtures: the tiny checkpoint is built once per test session and loaded once."""

import copy
import os
import struct
import sys
import zlib

# Tests never reach a hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Subprocesses that run `python` (the benchmark scripts, the tools) get this interpreter, also
# where the quick start's `.venv` is not activated and no `python` is on the PATH at all.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from llava.model.builder import load_pretrained_model
from llava.tiny import build_tiny_checkpoint, build_tiny_onevision_checkpoint
from llava.utils import quiet_transformers

quiet_transformers()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llava-next-tiny"))


@pytest.fixture(scope="session")
def tiny_onevision_checkpoint(tmp_path_factory) -> str:
    """The tiny LLaVA-OneVision checkpoint (`python -m llava.tiny --family onevision`)."""
    return build_tiny_onevision_checkpoint(str(tmp_path_factory.mktemp("ov") / "llava-onevision-tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(tokenizer, model, image_processor) of the tiny checkpoint, fp32 on CPU."""
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=torch.float32)
    return tokenizer, model, image_processor


@pytest.fixture(scope="session")
def sample_questions(tmp_path_factory) -> list[str]:
    """Every distinct question text of the sample suite's JSONL files, in file order: the benchmarks'
    own prompt suffixes, OCR token lists, options and MME's double-space tail."""
    import glob
    import json

    from llava.eval.sample_suite import build_sample_suite

    root = build_sample_suite(str(tmp_path_factory.mktemp("suite") / "eval"))
    texts = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.jsonl"), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            texts.update((json.loads(line).get("text"), None) for line in handle)
    return [text for text in texts if text]


# The templates a Llama-tokenizer checkpoint is run with (v1.6 Vicuna and Mistral, LLaVA-1.5, pretraining).
LLAMA_CONV_MODES = ("llava_v1", "vicuna_v1", "llava_llama_2", "mistral_instruct", "v1_mmtag", "plain")


@pytest.fixture(scope="session")
def llama_chat_prompts(sample_questions) -> list[tuple[str, str, str]]:
    """`(conv_mode, user_turn, prompt)`: each sample question, its image first, as the first user turn
    of each Llama-family template, as the runners ask it."""
    from llava.conversation import first_turn_prompt

    return [(conv_mode, "<image>\n" + question, first_turn_prompt(conv_mode, "<image>\n" + question))
            for conv_mode in LLAMA_CONV_MODES for question in sample_questions]


@pytest.fixture(scope="module")
def vanilla():
    """Compression off (R = 1) through the module constant, for a whole test module."""
    from llava.model import llava_arch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llava_arch, "retention_ratio", 1.0)
        yield


def black_png(path, width, height):
    """A 1-bit black PNG written row by row: a few kB on disk whatever its size in pixels."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    compressor, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="session")
def bomb(tmp_path_factory):
    """A 20000x20000 image: over twice PIL's decompression-bomb limit, so PIL refuses to decode it."""
    return black_png(tmp_path_factory.mktemp("bomb") / "huge.png", 20000, 20000)


@pytest.fixture(scope="session")
def hook_free_copy():
    """`hook_free_copy(model)`: a deep copy of a transformers model without forward hooks, to take
    transformers' own `hidden_states`/`attentions` from as a reference. transformers 5 installs its
    output-capturing hooks once per model, but a parent model (the LLaVA backbone, which some tests
    call directly) installing after its CLIP child did installs the child's again, and
    `output_hidden_states` then repeats every layer; the copy installs them once."""
    def copy_without_hooks(model):
        clean = copy.deepcopy(model)
        for module in clean.modules():
            module._forward_hooks.clear()
            if getattr(module, "_output_capturing_hooks_installed", False):
                module._output_capturing_hooks_installed = False
        return clean

    return copy_without_hooks
