"""Shared fixtures: the tiny checkpoint is built once per test session and loaded once."""

import os

# Tests never reach a hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from llava.model.builder import load_pretrained_model
from llava.tiny import build_tiny_checkpoint
from llava.utils import quiet_transformers

quiet_transformers()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llava-next-tiny"))


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(tokenizer, model, image_processor) of the tiny checkpoint, fp32 on CPU."""
    tokenizer, model, image_processor, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=torch.float32)
    return tokenizer, model, image_processor


@pytest.fixture(scope="module")
def vanilla():
    """Compression off (R = 1) through the module constant, for a whole test module."""
    from llava.model import llava_arch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llava_arch, "retention_ratio", 1.0)
        yield
