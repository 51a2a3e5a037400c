"""The CLIP text tower on the tiny checkpoint's CLIP: segmentation (Q5), the text and image
embeddings against transformers' own CLIP modules, float32 (Q7), and where it is looked for."""

import json
import os

import pytest
import torch
from transformers import CLIPModel, CLIPVisionConfig

from llava.model.multimodal_encoder.clip_text import (
    TextTowerNotFound, load_text_tower, resolve_text_tower, visual_projection_weight,
)
from llava.tiny import TOWER_DIR

LONG_TEXT = " ".join(["Is there a red square on the blue background next to the small green circle?"] * 8)


@pytest.fixture(scope="module")
def clip_dir(tiny_checkpoint):
    return os.path.join(tiny_checkpoint, TOWER_DIR)


@pytest.fixture(scope="module")
def text_tower(clip_dir):
    return load_text_tower(clip_dir)


@pytest.fixture(scope="module")
def clip_model(clip_dir):
    return CLIPModel.from_pretrained(clip_dir).eval()


def test_short_text_is_one_segment_with_bos_eos_and_zero_padding(text_tower):
    ids, mask = text_tower.segments("What color is the sky?")
    tokens = text_tower.tokenizer("What color is the sky?").input_ids
    assert ids.shape == mask.shape == (1, 77)
    assert ids[0, :len(tokens)].tolist() == tokens and not ids[0, len(tokens):].any()
    assert mask[0].tolist() == [1] * len(tokens) + [0] * (77 - len(tokens))
    assert (tokens[0], tokens[-1]) == (text_tower.tokenizer.bos_token_id, text_tower.tokenizer.eos_token_id)


def test_long_text_is_cut_into_77_token_segments_without_repair(text_tower):
    tokens = text_tower.tokenizer(LONG_TEXT).input_ids
    count = -(-len(tokens) // 77)  # ceil
    assert count >= 2
    ids, mask = text_tower.segments(LONG_TEXT)
    assert ids.shape == (count, 77)
    assert ids.flatten()[:len(tokens)].tolist() == tokens and not ids.flatten()[len(tokens):].any()
    assert mask.flatten().tolist() == [1] * len(tokens) + [0] * (77 * count - len(tokens))
    bos, eos = text_tower.tokenizer.bos_token_id, text_tower.tokenizer.eos_token_id
    # Only the first segment starts with BOS, only the last holds the EOS (Q5).
    assert [row[0] == bos for row in ids.tolist()] == [True] + [False] * (count - 1)
    assert [eos in row for row in ids.tolist()] == [False] * (count - 1) + [True]


def test_instruction_embeds_are_the_legacy_pooled_projection_of_each_segment(text_tower, clip_model):
    """Restated: each segment's last hidden state at the position of its largest id (CLIP's
    legacy pooling, `eos_token_id` 2 in the config: the EOS where there is one, else the
    largest-id token), through the text projection."""
    assert text_tower.text_model.config.eos_token_id == 2
    ids, mask = text_tower.segments(LONG_TEXT)
    with torch.no_grad():
        embeds = text_tower.instruction_embeds(LONG_TEXT)
        hidden = clip_model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = hidden[torch.arange(ids.shape[0]), ids.argmax(dim=-1)]
        expected = clip_model.text_projection(pooled)
        # The segments are encoded apart: one alone gives the same row.
        alone = clip_model.get_text_features(input_ids=ids[:1], attention_mask=mask[:1]).pooler_output
    assert embeds.shape == (ids.shape[0], clip_model.config.projection_dim) and embeds.dtype == torch.float32
    assert torch.allclose(embeds, expected, atol=1e-5)
    assert torch.allclose(embeds[0], alone[0], atol=1e-5)
    assert embeds.std(dim=0).sum() > 0  # different segments, different embeddings


def test_patch_embeds_project_layer_minus_2_after_post_layernorm_in_float32(tiny, text_tower, clip_dir, hook_free_copy):
    _, model, _ = tiny
    tower = model.get_vision_tower()
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features, _ = tower(pixels)
        embeds = text_tower.patch_embeds(features, tower)
        vision_model = tower.vision_tower.vision_model
        hidden = hook_free_copy(vision_model)(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        weight = CLIPModel.from_pretrained(clip_dir).visual_projection.weight
        expected = vision_model.post_layernorm(hidden).float() @ weight.T
    assert embeds.shape == (2, 576, weight.shape[0]) and embeds.dtype == torch.float32
    assert torch.allclose(embeds, expected, atol=1e-5)
    assert set(text_tower.image_signals({"patch_embeds", "cls_logits_last"}, features, tower)) == {"patch_embeds"}


def test_the_text_tower_stays_float32(tiny_checkpoint, clip_dir):
    tower = load_text_tower(clip_dir, device="cpu")
    assert tower.text_model.dtype == torch.float32 and tower.visual_projection.weight.dtype == torch.float32
    assert not any(parameter.requires_grad for parameter in tower.text_model.parameters())
    assert torch.equal(tower.visual_projection.weight, visual_projection_weight(clip_dir))


def test_the_tiny_clip_has_clip_l_proportions(clip_dir, text_tower):
    with open(os.path.join(clip_dir, "config.json")) as handle:
        config = json.load(handle)
    text, vision = config["text_config"], config["vision_config"]
    assert text["hidden_size"] * 4 == vision["hidden_size"] * 3 == config["projection_dim"] * 4  # 768 : 1024
    assert text["hidden_size"] // text["num_attention_heads"] == vision["hidden_size"] // vision["num_attention_heads"]
    assert text["intermediate_size"] == 4 * text["hidden_size"] and text["max_position_embeddings"] == 77
    tokenizer = text_tower.tokenizer
    assert tokenizer.eos_token_id == len(tokenizer) - 1 and tokenizer.bos_token_id == len(tokenizer) - 2
    assert CLIPVisionConfig.from_pretrained(clip_dir).image_size == 336  # the vision tower still reads it


def test_the_default_is_the_vision_towers_clip_relative_to_the_checkpoint(tiny_checkpoint, clip_dir):
    assert resolve_text_tower(TOWER_DIR, tiny_checkpoint) == clip_dir
    assert resolve_text_tower(clip_dir) == clip_dir


def test_a_missing_text_tower_is_one_clear_error(tiny_checkpoint, tmp_path):
    vision_only = tmp_path / "clip-vision-only"
    CLIPVisionConfig().save_pretrained(vision_only)
    with pytest.raises(TextTowerNotFound) as missing:
        resolve_text_tower(str(vision_only), tiny_checkpoint, needed_by="cdpruner")
    message = str(missing.value)
    assert message.startswith("cdpruner needs a CLIP text tower") and "--text-tower PATH" in message
    assert str(vision_only) in message and "local Hugging Face cache" in message and "\n" not in message
    with pytest.raises(TextTowerNotFound, match="'no-such/clip'"):
        resolve_text_tower("no-such/clip")


def test_a_clip_of_another_width_is_refused(clip_dir):
    with pytest.raises(ValueError, match="the vision tower's width is 1024: --text-tower must be the CLIP"):
        load_text_tower(clip_dir, vision_width=1024)
