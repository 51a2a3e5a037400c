"""The tower's two outputs against transformers' own CLIP forward and an eager attention map."""

import copy

import pytest
import torch

from llava.model.compression.registry import SIGNALS, example_signals
from llava.model.multimodal_encoder.clip_encoder import SIGNAL_FUNCTIONS, resolve_vision_tower


def _pixels(views=3, seed=0):
    return torch.randn(views, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


def _eager_cls_scores(layer, layer_input):
    """Full 577x577 attention logits of every head (eager, as the released code computes them),
    averaged over heads, then the [CLS] row against the patch columns."""
    attention = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    views, tokens, width = normed.shape
    heads = attention.num_heads
    query = (attention.q_proj(normed) * attention.scale).view(views, tokens, heads, -1).transpose(1, 2)
    keys = attention.k_proj(normed).view(views, tokens, heads, -1).transpose(1, 2)
    logits = query @ keys.transpose(-1, -2)  # [V, H, 577, 577]
    return logits.mean(dim=1)[:, 0, 1:]


def test_features_and_scores_match_reference(tiny, hook_free_copy):
    tower = tiny[1].get_vision_tower()
    pixels = _pixels()
    with torch.no_grad():
        features, signals = tower(pixels, {"cls_logits_last"})
        scores = signals["cls_logits_last"]
        reference = hook_free_copy(tower.vision_tower.vision_model)(pixels, output_hidden_states=True).hidden_states
        eager = _eager_cls_scores(tower.vision_tower.vision_model.encoder.layers[-1], reference[-2])
    assert features.shape == (3, 576, tower.hidden_size) and scores.shape == (3, 576)
    assert torch.allclose(features, reference[-2][:, 1:], atol=1e-6)
    assert (scores - eager).abs().max() <= 1e-5
    assert scores.std() > 0  # the scores really rank patches


def test_tower_keeps_fast_attention(tiny):
    tower = tiny[1].get_vision_tower()
    assert tower.config._attn_implementation == "sdpa"


def test_select_layer_last_and_cls_patch(tiny, hook_free_copy):
    tower = tiny[1].get_vision_tower()
    pixels = _pixels(views=1, seed=1)
    old = (tower.select_layer, tower.select_feature)
    try:
        tower.select_layer, tower.select_feature = -1, "cls_patch"
        with torch.no_grad():
            features, _ = tower(pixels)
            reference = hook_free_copy(tower.vision_tower.vision_model)(pixels, output_hidden_states=True).hidden_states[-1]
    finally:
        tower.select_layer, tower.select_feature = old
    assert features.shape == (1, 577, tower.hidden_size)
    assert torch.allclose(features, reference, atol=1e-6)


def test_geometry_is_the_real_one(tiny):
    tower = tiny[1].get_vision_tower()
    assert (tower.config.image_size, tower.config.patch_size, tower.num_patches_per_side, tower.num_patches) == (336, 14, 24, 576)


def test_openai_tower_is_known_offline():
    config, processor, _ = resolve_vision_tower("openai/clip-vit-large-patch14-336")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert (config.image_size, config.patch_size, config.hidden_act) == (336, 14, "quick_gelu")
    assert processor.crop_size == {"height": 336, "width": 336} and processor.size == {"shortest_edge": 336}


def test_unknown_tower_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not-a/clip-tower"):
        resolve_vision_tower("not-a/clip-tower")


def _eager_model(vision_model, hook_free_copy):
    """A copy of the tower's CLIP model with eager attention, so `output_attentions` returns maps."""
    eager = hook_free_copy(vision_model)
    eager.set_attn_implementation("eager")
    return eager


def test_cls_attention_matches_hf_eager_attentions(tiny, hook_free_copy):
    """FasterVLM's score: layer -2's post-softmax [CLS] row, [CLS] column dropped, head mean."""
    tower = tiny[1].get_vision_tower()
    pixels = _pixels(seed=2)
    with torch.no_grad():
        _, signals = tower(pixels, {"cls_attn_penultimate"})
        reference = _eager_model(tower.vision_tower.vision_model, hook_free_copy)(pixels, output_attentions=True)
    eager = reference.attentions[-2][:, :, 0, 1:].mean(dim=1)  # as FasterVLM's code takes it
    assert set(signals) == {"cls_attn_penultimate"}
    assert signals["cls_attn_penultimate"].shape == (3, 576)
    assert (signals["cls_attn_penultimate"] - eager).abs().max() <= 1e-7
    # Not renormalised: the patch columns miss exactly the [CLS] key's share of each head's row.
    cls_share = reference.attentions[-2][:, :, 0, 0].mean(dim=1)
    assert torch.allclose(signals["cls_attn_penultimate"].sum(dim=1), 1 - cls_share, atol=1e-6)


def test_signals_are_computed_only_when_asked_and_together(tiny):
    tower = tiny[1].get_vision_tower()
    pixels = _pixels(views=2, seed=3)
    with torch.no_grad():
        plain, none = tower(pixels)
        features, both = tower(pixels, {"cls_logits_last", "cls_attn_penultimate"})
        _, logits_only = tower(pixels, {"cls_logits_last"})
        _, attention_only = tower(pixels, {"cls_attn_penultimate"})
    assert none == {} and set(logits_only) == {"cls_logits_last"} and set(attention_only) == {"cls_attn_penultimate"}
    assert set(both) == {"cls_logits_last", "cls_attn_penultimate"}
    assert torch.equal(features, plain)
    assert torch.equal(both["cls_logits_last"], logits_only["cls_logits_last"])
    assert torch.equal(both["cls_attn_penultimate"], attention_only["cls_attn_penultimate"])


def test_cls_attention_in_half_precision_follows_the_official_fp16_softmax(tiny):
    """transformers 4.37 (the official code's version) takes the softmax in fp16; the signal
    rounds an fp32 softmax to fp16, which agrees to the last bit or so."""
    layer = copy.deepcopy(tiny[1].get_vision_tower().vision_tower.vision_model.encoder.layers[-2]).half()
    layer_input = (3 * torch.randn(2, 577, layer.self_attn.embed_dim, generator=torch.Generator().manual_seed(4))).half()
    with torch.no_grad():
        scores = SIGNAL_FUNCTIONS["cls_attn_penultimate"](layer, layer_input)
        attention, normed = layer.self_attn, layer.layer_norm1(layer_input)
        heads = attention.num_heads
        query = (attention.q_proj(normed) * attention.scale).view(2, 577, heads, -1).transpose(1, 2)
        keys = attention.k_proj(normed).view(2, 577, heads, -1).transpose(1, 2)
        official = torch.softmax(query @ keys.transpose(-1, -2), dim=-1)[:, :, 0, 1:].mean(dim=1)
    assert scores.dtype == torch.float16
    assert torch.allclose(scores.float(), official.float(), rtol=2**-10, atol=0)


def _projection_outputs(layer, layer_input):
    """`q_proj` and `k_proj` outputs `[V, 1 + P, C]` of one layer, captured by forward hooks on a
    plain (SDPA) forward of the layer, as HiRED's and PruMerge's codes capture them."""
    captured = {}
    hooks = [getattr(layer.self_attn, name).register_forward_hook(
        lambda module, inputs, output, name=name: captured.__setitem__(name, output)) for name in ("q_proj", "k_proj")]
    try:
        layer(layer_input, None)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["q_proj"], captured["k_proj"]


def test_per_head_cls_attention_of_layers_0_and_22_match_hf_eager_attentions(tiny, hook_free_copy):
    """HiRED's and VisionZip's inputs: each head's post-softmax [CLS] row, [CLS] column dropped."""
    tower = tiny[1].get_vision_tower()
    pixels = _pixels(views=2, seed=5)
    with torch.no_grad():
        _, signals = tower(pixels, {"cls_attn_heads_first", "cls_attn_heads_penultimate", "cls_attn_penultimate"})
        reference = _eager_model(tower.vision_tower.vision_model, hook_free_copy)(pixels, output_attentions=True)
    heads = tower.config.num_attention_heads
    for name, layer in (("cls_attn_heads_first", 0), ("cls_attn_heads_penultimate", -2)):
        assert signals[name].shape == (2, heads, 576)
        assert (signals[name] - reference.attentions[layer][:, :, 0, 1:]).abs().max() <= 1e-7, name
    assert torch.equal(signals["cls_attn_heads_penultimate"].mean(dim=1), signals["cls_attn_penultimate"])
    assert not torch.allclose(signals["cls_attn_heads_first"], signals["cls_attn_heads_penultimate"])


def test_keys_and_full_width_attention_match_hooked_projections(tiny, hook_free_copy):
    """VisionZip's head-mean keys of layer -2; PruMerge's keys and one-head, full-width
    attention of the last layer (scale 1/sqrt(C), softmax over all keys, [CLS] column dropped)."""
    tower = tiny[1].get_vision_tower()
    layers = tower.vision_tower.vision_model.encoder.layers
    pixels = _pixels(views=2, seed=6)
    names = {"keys_head_mean_penultimate", "cls_attn_full_width_last", "keys_last"}
    with torch.no_grad():
        _, signals = tower(pixels, names)
        hidden = hook_free_copy(tower.vision_tower.vision_model)(pixels, output_hidden_states=True).hidden_states
        _, keys_22 = _projection_outputs(layers[-2], hidden[-3])
        query_23, keys_23 = _projection_outputs(layers[-1], hidden[-2])
    width, heads = tower.hidden_size, tower.config.num_attention_heads
    expected_mean_keys = keys_22.view(2, 577, heads, width // heads).mean(dim=2)
    attention = torch.softmax(query_23[:, :1] @ keys_23.transpose(1, 2) / width**0.5, dim=-1)[:, 0, 1:]
    assert signals["keys_head_mean_penultimate"].shape == (2, 577, width // heads)
    assert (signals["keys_head_mean_penultimate"] - expected_mean_keys).abs().max() <= 1e-5
    assert signals["keys_last"].shape == (2, 576, width)
    assert (signals["keys_last"] - keys_23[:, 1:]).abs().max() <= 1e-5
    assert signals["cls_attn_full_width_last"].shape == (2, 576)
    assert (signals["cls_attn_full_width_last"] - attention).abs().max() <= 1e-6
    assert (signals["cls_attn_full_width_last"].sum(dim=1) < 1).all()  # the [CLS] key's share is left out


def test_tower_features_are_the_selected_hidden_state_with_cls(tiny, hook_free_copy):
    tower = tiny[1].get_vision_tower()
    pixels = _pixels(views=2, seed=7)
    with torch.no_grad():
        features, signals = tower(pixels, {"tower_features"})
        reference = hook_free_copy(tower.vision_tower.vision_model)(pixels, output_hidden_states=True).hidden_states[-2]
    assert signals["tower_features"].shape == (2, 577, tower.hidden_size)
    assert torch.equal(signals["tower_features"][:, 1:], features)
    assert torch.allclose(signals["tower_features"], reference, atol=1e-6)


def test_every_declared_tower_signal_has_the_declared_shape(tiny):
    tower = tiny[1].get_vision_tower()
    tower_signals = {name for name, signal in SIGNALS.items() if signal.source == "tower"}
    with torch.no_grad():
        _, signals = tower(_pixels(views=2, seed=8), tower_signals)
    examples = example_signals(tower_signals, 2, 576, tower.hidden_size, tower.config.num_attention_heads)
    assert set(signals) == tower_signals
    assert {name: tuple(value.shape) for name, value in signals.items()} == {
        name: tuple(value.shape) for name, value in examples.items()}
