"""The SigLIP tower (LLaVA-OneVision's: last layer and head removed) against transformers' own
SigLIP forward and eager attention maps, and the [CLS]-free signals on hand-made cases."""

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, SiglipConfig, SiglipModel, SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

from llava.model.compression.registry import SIGNALS, example_signals
from llava.model.multimodal_encoder.clip_encoder import (CLIPVisionTower, build_vision_tower, mean_received_attention,
                                                         negative_cosine_to_mean, negative_received_attention)
from llava.model.multimodal_encoder.siglip_encoder import (OFFERED_SIGNALS, SigLipImagePreprocessor, SigLipVisionTower,
                                                           resolve_siglip_tower)

LAYERS = 3  # as published; the tower keeps 2
WIDTH, HEADS = 32, 4


@pytest.fixture(scope="module")
def siglip_checkpoint(tmp_path_factory):
    """`(directory, model)`: a tiny random `SiglipModel` saved as google's SigLIP checkpoints are
    (both sides, the vision head included), at the real geometry: 384 px, 14 px patches."""
    torch.manual_seed(0)
    vision = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=384, patch_size=14)
    text = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=HEADS, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
    with torch.no_grad():  # sharper attention than the initialisation's, so the maps really differ per patch
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    directory = tmp_path_factory.mktemp("siglip-tiny-patch14-384")
    model.save_pretrained(directory)
    return str(directory), model


@pytest.fixture(scope="module")
def tower(siglip_checkpoint):
    tower = build_vision_tower(SimpleNamespace(mm_vision_tower=siglip_checkpoint[0], mm_vision_select_layer=-2))
    tower.load_model()
    return tower.eval()


def _pixels(views=3, seed=0):
    return torch.randn(views, 3, 384, 384, generator=torch.Generator().manual_seed(seed))


def _reference(siglip_checkpoint, eager=False):
    """A copy of the checkpoint's whole vision model (all layers), eager when maps are wanted."""
    model = copy.deepcopy(siglip_checkpoint[1].vision_model)
    if eager:
        model.set_attn_implementation("eager")
    return model


def test_dispatch_loads_siglip_without_last_layer_and_head(tower, siglip_checkpoint):
    assert isinstance(tower, SigLipVisionTower)
    names = [name for name, _ in tower.named_parameters()]
    assert all(name.startswith("vision_tower.vision_model.") for name in names)  # + `model.vision_tower.` in OV
    layer_indices = {int(name.split(".")[4]) for name in names if ".encoder.layers." in name}
    assert layer_indices == set(range(LAYERS - 1))
    assert not any(".head." in name for name in names)
    assert "vision_tower.vision_model.post_layernorm.weight" in names  # kept: the checkpoints hold it
    assert (tower.config.num_hidden_layers, tower.config.vision_use_head) == (LAYERS - 1, False)
    assert (tower.num_patches_per_side, tower.num_patches, tower.hidden_size) == (27, 729, WIDTH)
    assert tower.config._attn_implementation == "sdpa"
    published = siglip_checkpoint[1].vision_model.encoder.layers[LAYERS - 2].mlp.fc1.weight
    assert torch.equal(tower.vision_tower.vision_model.encoder.layers[-1].mlp.fc1.weight, published)


def test_features_are_the_last_kept_layers_output(tower, siglip_checkpoint):
    pixels = _pixels()
    with torch.no_grad():
        features, signals = tower(pixels)
        hidden_states = _reference(siglip_checkpoint)(pixels, output_hidden_states=True).hidden_states
    assert len(hidden_states) == LAYERS + 1 and signals == {}
    assert features.shape == (3, 729, WIDTH)
    assert torch.allclose(features, hidden_states[-2], atol=1e-6)  # the published layer -2: no post_layernorm
    assert not torch.allclose(features, hidden_states[-1], atol=1e-3)


def test_neg_attn_matches_eager_attention_maps(tower, siglip_checkpoint):
    pixels = _pixels(views=2, seed=1)
    with torch.no_grad():
        _, signals = tower(pixels, {"neg_attn"})
        maps = _reference(siglip_checkpoint, eager=True)(pixels, output_attentions=True).attentions
    last_kept = maps[LAYERS - 2]                                  # [V, H, 729, 729]
    expected = -last_kept.mean(dim=(1, 2))                        # mean over heads and queries, per key
    assert set(signals) == {"neg_attn"} and signals["neg_attn"].dtype == torch.float32
    assert signals["neg_attn"].shape == (2, 729)
    assert (signals["neg_attn"] - expected).abs().max() <= 1e-5
    assert torch.allclose(signals["neg_attn"].sum(dim=1), torch.full((2,), -1.0))  # each row sums to 1
    assert signals["neg_attn"].std() > 1e-2 / 729  # the scores really rank patches


def test_neg_cos_mean_of_the_tower_features(tower):
    pixels = _pixels(views=2, seed=2)
    with torch.no_grad():
        features, signals = tower(pixels, {"neg_cos_mean"})
    mean = features.mean(dim=1, keepdim=True)
    expected = -(features * mean).sum(-1) / (features.norm(dim=-1) * mean.norm(dim=-1))
    assert signals["neg_cos_mean"].shape == (2, 729) and signals["neg_cos_mean"].dtype == torch.float32
    assert torch.allclose(signals["neg_cos_mean"], expected, atol=1e-6)


def test_batched_views_equal_one_at_a_time(tower):
    pixels = _pixels(views=3, seed=3)
    with torch.no_grad():
        batched = tower(pixels, OFFERED_SIGNALS)
        single = [tower(pixels[index:index + 1], OFFERED_SIGNALS) for index in range(3)]
    assert torch.allclose(batched.features, torch.cat([each.features for each in single]), atol=1e-6)
    for name in OFFERED_SIGNALS:
        assert torch.allclose(batched.signals[name], torch.cat([each.signals[name] for each in single]), atol=1e-7)


def test_signals_have_the_declared_shapes_and_cls_signals_are_refused(tower):
    with torch.no_grad():
        _, signals = tower(_pixels(views=2, seed=4), OFFERED_SIGNALS)
    examples = example_signals(OFFERED_SIGNALS, 2, 729, WIDTH, HEADS)
    assert ({name: value.shape for name, value in signals.items()}
            == {name: value.shape for name, value in examples.items()})
    assert all(SIGNALS[name].source == "tower" for name in OFFERED_SIGNALS)
    with pytest.raises(ValueError, match=r"no \[CLS\].*cls_logits_last"):
        tower(_pixels(views=1), {"cls_logits_last"})


def test_neg_cos_mean_by_hand():
    # Two orthogonal unit features: g = (1/2, 1/2), each at 45 degrees from it.
    assert torch.allclose(negative_cosine_to_mean(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])),
                          torch.full((1, 2), -1 / math.sqrt(2)))
    # g = (2/3, 1/3): cos with (1, 0) is 2/sqrt(5), with (0, 1) is 1/sqrt(5); a second view, scaled, the same.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]])
    expected = -torch.tensor([2, 2, 1]) / math.sqrt(5)
    assert torch.allclose(negative_cosine_to_mean(features), expected.expand(2, 3))


def test_mean_received_attention_by_hand():
    # Head 0: query 0 sees logits (ln 3, 0) -> (3/4, 1/4); query 1 sees (0, 0) -> (1/2, 1/2):
    # key 0 receives (3/4 + 1/2) / 2 = 5/8, key 1 3/8. Head 1 (zero queries) is uniform: 1/2 each.
    queries = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]]]).unsqueeze(0)  # [V=1, H=2, T=2, d=1]
    keys = torch.tensor([[[math.log(3)], [0.0]], [[5.0], [-1.0]]]).unsqueeze(0)
    head_0 = mean_received_attention(queries[:, :1], keys[:, :1], scale=1.0)
    both_heads = mean_received_attention(queries, keys, scale=1.0)
    one_row_per_block = mean_received_attention(queries, keys, scale=1.0, block_elements=1)
    assert torch.allclose(head_0, torch.tensor([[5 / 8, 3 / 8]]))
    assert torch.allclose(both_heads, torch.tensor([[9 / 16, 7 / 16]]))  # ((5/8 + 1/2) / 2, (3/8 + 1/2) / 2)
    assert torch.allclose(one_row_per_block, both_heads)
    # The scale multiplies the logits: ln 9 * 1/2 = ln 3.
    assert torch.allclose(mean_received_attention(queries[:, :1], 2 * keys[:, :1], scale=0.5), head_0)


def test_neg_attn_of_a_layer_without_queries_is_uniform():
    """Zero query projections: every logit is 0, every patch receives 1/T; a [CLS] model's patches
    (`first_patch=1`) drop column 0 without renormalising."""
    config = SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)
    layer = SiglipEncoderLayer(config)
    with torch.no_grad():
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.q_proj.bias.zero_()
        layer_input = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(negative_received_attention(layer, layer_input, first_patch=0), torch.full((2, 5), -0.2))
        assert torch.allclose(negative_received_attention(layer, layer_input, first_patch=1), torch.full((2, 4), -0.2))


def test_clip_tower_offers_the_cls_free_signals(tiny, hook_free_copy):
    """On CLIP (the paper compares the three scores there): `neg_attn` of the last layer, queries
    and softmax over all 577 tokens, patch columns; `neg_cos_mean` of the selected layer's patches."""
    clip = tiny[1].get_vision_tower()
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        features, signals = clip(pixels, {"neg_attn", "neg_cos_mean"})
        eager = hook_free_copy(clip.vision_tower.vision_model)
        eager.set_attn_implementation("eager")
        maps = eager(pixels, output_attentions=True).attentions
    assert (signals["neg_attn"] - (-maps[-1].mean(dim=(1, 2))[:, 1:])).abs().max() <= 1e-5
    assert torch.allclose(signals["neg_cos_mean"], negative_cosine_to_mean(features))


def test_preprocessing_squashes_the_whole_image_to_384():
    """No centre crop: a 2:1 image with a black left and a white right half keeps both halves."""
    pixels = np.zeros((192, 384, 3), dtype=np.uint8)
    pixels[:, 192:] = 255
    processed = SigLipImagePreprocessor().preprocess(Image.fromarray(pixels))["pixel_values"]
    assert processed.shape == (1, 3, 384, 384) and processed.dtype == torch.float32
    assert torch.all(processed[..., :, :150] == -1) and torch.all(processed[..., :, 234:] == 1)
    # Against the steps by hand: bicubic resize to 384 x 384, x / 255, (x - 0.5) / 0.5.
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((384, 384), resample=Image.Resampling.BICUBIC)).astype(np.float64) / 255
    expected = torch.from_numpy(((resized - 0.5) / 0.5).transpose(2, 0, 1)).float()
    assert torch.allclose(SigLipImagePreprocessor().preprocess(image)["pixel_values"][0], expected, atol=1e-6)


def test_preprocessing_equals_transformers_siglip_processor():
    pil_processor = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    reference = pil_processor.SiglipImageProcessorPil(size={"height": 384, "width": 384})
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (500, 280, 3), dtype=np.uint8))
    ours = SigLipImagePreprocessor().preprocess(image)["pixel_values"]
    assert torch.allclose(ours, reference(image, return_tensors="pt")["pixel_values"], atol=1e-6)


def test_known_siglip_id_is_resolved_offline():
    config, location = resolve_siglip_tower("google/siglip-so400m-patch14-384")
    assert location == "google/siglip-so400m-patch14-384"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1152, 4304, 27)
    assert (config.num_attention_heads, config.image_size, config.patch_size) == (16, 384, 14)
    assert (config.hidden_act, config.layer_norm_eps) == ("gelu_pytorch_tanh", 1e-6)
    with pytest.raises(FileNotFoundError, match="not-a/siglip-tower"):
        resolve_siglip_tower("not-a/siglip-tower")


def test_dispatch_by_local_model_type_and_by_name(tmp_path):
    clip_dir, other_dir = tmp_path / "clip", tmp_path / "other"
    CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     image_size=28, patch_size=14).save_pretrained(clip_dir)
    other_dir.mkdir()
    (other_dir / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert isinstance(build_vision_tower(SimpleNamespace(mm_vision_tower=str(clip_dir), mm_vision_select_layer=-2)),
                      CLIPVisionTower)
    with pytest.raises(ValueError, match="model_type 'bert'"):
        build_vision_tower(SimpleNamespace(mm_vision_tower=str(other_dir)))
    with pytest.raises(FileNotFoundError, match="SigLIP"):  # a SigLIP name not found anywhere: SigLIP's error
        build_vision_tower(SimpleNamespace(mm_vision_tower="someone/siglip-missing"))
