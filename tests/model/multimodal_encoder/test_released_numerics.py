"""Released tower numerics (`CLIPVisionTower.set_numerics('released')`) against a hand-written copy of
the released GlobalCom2 code's patched CLIP attention (transformers 4.37): q * scale, bmm, softmax in the
tower dtype, bmm. A tiny tower (48 wide, 4 heads of 12: a scale of 12**-0.5 that rounds, so scaling
before or after the product differs), 17 tokens, 3 layers, weights large enough for peaked softmaxes."""

import argparse
import types

import pytest
import torch
from transformers import CLIPVisionConfig

from llava.eval.runner import UserError, build_parser, check_settings, run_settings
from llava.generation import add_compression_arguments
from llava.model.builder import load_pretrained_model
from llava.model.multimodal_encoder.clip_encoder import (
    RELEASED_ATTENTION, CLIPVisionTower, released_attention_forward,
)


@pytest.fixture
def tower(tmp_path):
    config = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                              image_size=56, patch_size=14, hidden_act="quick_gelu")
    config.save_pretrained(tmp_path)
    tower = CLIPVisionTower(str(tmp_path), types.SimpleNamespace(mm_vision_select_layer=-2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in tower.named_parameters():
            if "norm" not in name:  # every random weight from the generator, so each run sees the same tower
                weight.copy_(0.3 * torch.randn(weight.shape, generator=generator))
    return tower.eval()


def _pixels(views=2, seed=1):
    return torch.randn(views, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _split(states, num_heads):
    """`[V, T, C]` -> `[V * H, T, d]`, contiguous, as the released code's `_shape(...).view(proj_shape)`."""
    views, tokens, width = states.shape
    return states.view(views, tokens, num_heads, -1).transpose(1, 2).contiguous().view(views * num_heads, tokens, -1)


def _released_logits(attention, normed):
    """The released code's pre-softmax logits `[V * H, T, T]`: `q_proj(x) * scale` before the split."""
    query = _split(attention.q_proj(normed) * attention.scale, attention.num_heads)
    return torch.bmm(query, _split(attention.k_proj(normed), attention.num_heads).transpose(1, 2))


def _released_attention(attention, normed):
    """The released code's attention output `[V, T, C]`."""
    views, tokens, width = normed.shape
    probabilities = torch.softmax(_released_logits(attention, normed), dim=-1)  # tower dtype
    output = torch.bmm(probabilities, _split(attention.v_proj(normed), attention.num_heads))
    output = output.view(views, attention.num_heads, tokens, -1).transpose(1, 2).reshape(views, tokens, width)
    return attention.out_proj(output)


def _released_hidden_states(tower, pixels):
    """Every hidden state `[V, T, C]` of the tower, each layer run by hand with `_released_attention`."""
    model = tower.vision_tower.vision_model
    hidden = model.pre_layrnorm(model.embeddings(pixels.to(tower.dtype)))
    states = [hidden]
    for layer in model.encoder.layers:
        hidden = hidden + _released_attention(layer.self_attn, layer.layer_norm1(hidden))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        states.append(hidden)
    return states


@torch.no_grad()
def test_each_fp16_attention_layer_equals_the_hand_written_released_attention(tower):
    tower.half().set_numerics("released")
    generator = torch.Generator().manual_seed(2)
    for layer in tower.vision_tower.vision_model.encoder.layers:
        normed = layer.layer_norm1((3 * torch.randn(2, 17, 48, generator=generator)).half())
        output, _ = layer.self_attn(normed)
        assert output.dtype == torch.float16
        assert torch.equal(output, _released_attention(layer.self_attn, normed))


@torch.no_grad()
def test_fp16_tower_features_are_the_hand_run_released_layers_and_differ_from_sdpa(tower):
    tower.half()
    pixels = _pixels()
    sdpa_features = tower(pixels).features
    tower.set_numerics("released")
    features = tower(pixels).features
    assert torch.equal(features, _released_hidden_states(tower, pixels)[-2][:, 1:])
    assert not torch.equal(features, sdpa_features)  # the two roundings really differ in fp16


@torch.no_grad()
def test_fp32_released_mode_equals_sdpa_up_to_rounding(tower):
    signals = {"cls_logits_last", "cls_attn_penultimate", "cls_attn_heads_first", "tower_features"}
    pixels = _pixels()
    sdpa = tower(pixels, signals)
    tower.set_numerics("released")
    released = tower(pixels, signals)
    # within 1e-5 of each output's largest value (the features reach about 20 with these weights)
    for name, output, reference in [("features", released.features, sdpa.features),
                                    *((name, released.signals[name], sdpa.signals[name]) for name in signals)]:
        assert (output - reference).abs().max() <= 1e-5 * reference.abs().max(), name
    assert sdpa.signals["cls_logits_last"].std() > 1  # peaked enough for the comparison to mean something


@torch.no_grad()
def test_fp16_cls_scores_are_row_0_of_the_head_mean_of_the_last_layers_full_map(tower):
    tower.half().set_numerics("released")
    pixels = _pixels()
    signals = tower(pixels, {"cls_logits_last", "cls_attn_penultimate", "cls_attn_heads_penultimate"}).signals
    states = _released_hidden_states(tower, pixels)
    layers = tower.vision_tower.vision_model.encoder.layers

    def full_map(index):  # [V, H, T, T] logits of layer `index` (0..2), its input from the hand-run tower
        layer = layers[index]
        return _released_logits(layer.self_attn, layer.layer_norm1(states[index])).view(2, 4, 17, 17)

    scores = signals["cls_logits_last"]
    assert scores.dtype == torch.float16 and scores.shape == (2, 16)
    assert torch.equal(scores, full_map(2).mean(dim=1)[:, 0, 1:])
    # FasterVLM's rows: row 0 of the full fp16 softmax map of layer 1 (-2), per head and their mean
    probabilities = torch.softmax(full_map(1), dim=-1)[:, :, 0, 1:]
    assert torch.equal(signals["cls_attn_heads_penultimate"], probabilities)
    assert torch.equal(signals["cls_attn_penultimate"], probabilities.mean(dim=1))


def test_numerics_round_trip_and_unknown_mode(tower):
    assert tower.numerics == "sdpa"
    tower.set_numerics("released")
    assert tower.numerics == "released"
    tower.set_numerics("sdpa")
    assert tower.numerics == "sdpa" and tower.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="sdpa, released"):
        tower.set_numerics("eager")


def test_the_flag_defaults_to_sdpa_and_takes_released():
    parser = argparse.ArgumentParser()
    add_compression_arguments(parser)
    assert parser.parse_args([]).tower_numerics == "sdpa"
    assert parser.parse_args(["--tower-numerics", "released"]).tower_numerics == "released"
    with pytest.raises(SystemExit):
        parser.parse_args(["--tower-numerics", "eager"])


def test_the_model_hook_sets_the_towers_numerics(tiny_checkpoint):
    """The vision tower's, and the text tower's (CDPruner's), whether loaded before or after."""
    _, model, _, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=torch.float32)
    model.set_tower_numerics("released")
    assert model.get_vision_tower().numerics == "released"
    text_model = model.get_text_tower().text_model  # loaded now: it follows the vision tower
    assert text_model.config._attn_implementation == RELEASED_ATTENTION
    model.set_tower_numerics("sdpa")
    assert model.get_vision_tower().numerics == "sdpa" and text_model.config._attn_implementation == "sdpa"


def test_masked_released_attention_adds_the_masks_as_transformers_437(tiny_checkpoint):
    """The text tower's causal and padding masks, given either way transformers may give them, equal 4.37's
    eager CLIP attention bit for bit: `bmm(q * scale, k^T)`, + the causal mask, + the padding mask (both
    `finfo.min` where masked), softmax, `bmm` with v."""
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, width = 2, 3, 7, 8
    query, key, value = (torch.randn(batch, heads, tokens, width, generator=generator) for _ in range(3))
    keep = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)        # the second row right-padded
    lowest = torch.finfo(torch.float32).min
    causal = torch.full((tokens, tokens), lowest).triu(1)[None, None]         # [1, 1, T, T]
    padding = torch.where(keep, 0.0, lowest)[:, None, None, :].expand(batch, 1, tokens, tokens)
    folded = (batch * heads, tokens, width)
    logits = torch.bmm((query * 0.5).reshape(folded), key.reshape(folded).transpose(1, 2)).view(batch, heads, tokens,
                                                                                              tokens)
    probabilities = torch.softmax((logits + causal + padding).view(batch * heads, tokens, tokens), dim=-1)
    expected = torch.bmm(probabilities, value.reshape(folded)).view(batch, heads, tokens, width).transpose(1, 2)
    module = torch.nn.Module().eval()
    additive, _ = released_attention_forward(module, query, key, value, causal + padding, 0.5)
    boolean, _ = released_attention_forward(module, query, key, value, keep[:, None, None, :].expand(-1, 1, tokens, -1),
                                            0.5, is_causal=True)
    assert torch.equal(additive, expected) and torch.equal(boolean, expected)
    unmasked, _ = released_attention_forward(module, query, key, value, None, 0.5)
    assert not torch.equal(unmasked, expected)


def test_a_siglip_model_refuses_released_numerics(tiny_onevision_checkpoint):
    _, model, _, _ = load_pretrained_model(tiny_onevision_checkpoint, device="cpu", torch_dtype=torch.float32)
    model.set_tower_numerics("sdpa")  # its only numerics: accepted, nothing to change
    with pytest.raises(ValueError, match="CLIP towers"):
        model.set_tower_numerics("released")


def test_the_runners_fingerprint_keeps_released_answers_apart(tmp_path):
    parser = build_parser("test", max_new_tokens=8)
    args = parser.parse_args(["--model-path", str(tmp_path / "absent"), "--device", "cpu",
                              "--tower-numerics", "released"])
    settings = run_settings(args, {})
    assert settings["tower_numerics"] == "released"
    sdpa_row = {"metadata": {"settings": {**settings, "tower_numerics": "sdpa"}}}
    with pytest.raises(UserError, match="tower_numerics 'sdpa', but this run has tower_numerics 'released'"):
        check_settings([sdpa_row], settings, "answers.jsonl")
    older_row = {"metadata": {"settings": {key: value for key, value in settings.items() if key != "tower_numerics"}}}
    check_settings([older_row], {**settings, "tower_numerics": "sdpa"}, "answers.jsonl")  # older files were SDPA
