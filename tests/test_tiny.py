"""The tiny checkpoint: reproducible, real geometry, Llama-style tokenizer."""

import hashlib
import json
import os

from llava.tiny import build_tiny_checkpoint


def _digest(path):
    digests = {}
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                digests[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def test_same_seed_same_files(tiny_checkpoint, tmp_path):
    again = build_tiny_checkpoint(str(tmp_path / "again"))
    other_seed = build_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    first = _digest(tiny_checkpoint)
    assert first == _digest(again)
    changed = {name for name, digest in _digest(other_seed).items() if first[name] != digest}
    assert changed and all(name.endswith(".safetensors") for name in changed)


def test_original_layout_and_geometry(tiny_checkpoint):
    with open(os.path.join(tiny_checkpoint, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava"
    assert config["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert (config["mm_patch_merge_type"], config["mm_projector_type"], config["mm_vision_select_layer"]) == ("spatial_unpad", "mlp2x_gelu", -2)
    assert config["unfreeze_mm_vision_tower"] is True
    with open(os.path.join(tiny_checkpoint, config["mm_vision_tower"], "config.json")) as handle:
        tower = json.load(handle)
    assert (tower["vision_config"]["image_size"], tower["vision_config"]["patch_size"]) == (336, 14)
    assert os.path.isfile(os.path.join(tiny_checkpoint, "model.safetensors.index.json"))


def test_tokenizer_is_llama_style(tiny):
    tokenizer = tiny[0]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    ids = tokenizer("é\nx").input_ids
    # BOS, word-start marker, 'é' as two UTF-8 bytes (not in the tiny vocabulary), newline byte.
    assert tokenizer.convert_ids_to_tokens(ids[:5]) == ["<s>", "▁", "<0xC3>", "<0xA9>", "<0x0A>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "é\nx"
