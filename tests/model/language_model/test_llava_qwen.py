"""LLaVA on Qwen2 (`llava.model.language_model.llava_qwen`): a tiny LLaVA-Qwen checkpoint in the original
OneVision layout (built here from the tiny checkpoint's tower, tokenizer and LLaVA keys, with a 2-layer
Qwen2 whose attention biases are random, not zero) loads through the builder with every tensor; its text
logits equal transformers' plain `Qwen2ForCausalLM` with the same weights (tied embeddings too); and the
in-LLM pruning mechanism runs on Qwen2's layers: its scores equal eager attention, a keep-everything
stage and FastV at R = 1 equal the vanilla model, a ragged batch equals each row alone."""

import json
import math
import os
import shutil
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaQwenConfig, LlavaQwenForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.language_model import pruning
from llava.model.language_model.pruning import PruningRequest

# Qwen2 keys as the OneVision configs write them (sliding window named but off), tiny widths and 2 KV heads.
QWEN_KEYS = {"num_key_value_heads": 2, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768,
             "use_sliding_window": False, "max_window_layers": 2, "attention_dropout": 0.0}


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every float tensor from one seeded generator: matrices N(0, 1/fan_in), vectors (biases, norms,
    the newline) N(0, 1) scaled by 0.5 around their init, so no bias is zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point() or tensor.ndim == 0:
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.ndim == 1:
            tensor.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.5 * noise)
        else:
            tensor.copy_(noise * math.prod(tensor.shape[1:]) ** -0.5)


def _text_config(**overrides) -> dict:
    """A tiny Qwen2 language model's keys (2 layers, 4 query heads on 2 KV heads)."""
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1024,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, **QWEN_KEYS)
    return {**text, **overrides}


@pytest.fixture(scope="module")
def qwen_checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint's tower, tokenizer and LLaVA keys around a Qwen2 language model, saved as
    LLaVA-VL writes OneVision (`LlavaQwenForCausalLM`, model_type `llava`)."""
    target = str(tmp_path_factory.mktemp("qwen") / "llava-qwen-tiny")
    shutil.copytree(tiny_checkpoint, target, ignore=lambda directory, names: [  # its weights, not the CLIP dir's
        name for name in names if directory == tiny_checkpoint and name.startswith("model.safetensors")])
    with open(os.path.join(tiny_checkpoint, "config.json")) as handle:
        config_dict = {**json.load(handle), **QWEN_KEYS, "architectures": ["LlavaQwenForCausalLM"],
                       "model_type": "llava"}
    config = LlavaQwenConfig(**{key: value for key, value in config_dict.items()
                                if key not in ("architectures", "model_type")})
    config._name_or_path = target  # the tower's relative mm_vision_tower
    model = LlavaQwenForCausalLM(config)
    _randomise(model, seed=3)
    model.save_pretrained(target)
    with open(os.path.join(target, "config.json"), "w") as handle:
        json.dump(config_dict, handle, indent=2)
    return target


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint):
    tokenizer, model, processor, _ = load_pretrained_model(qwen_checkpoint, device="cpu", torch_dtype=torch.float32)
    return tokenizer, model, processor


def _plain_qwen2(llava_model) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM with the LLaVA model's language-model weights (every name must match)."""
    text_keys = {key: value for key, value in llava_model.config.to_dict().items()
                 if key in Qwen2Config.__dataclass_fields__ and key not in ("architectures", "model_type")}
    plain = Qwen2ForCausalLM(Qwen2Config(**text_keys)).eval()
    multimodal = ("model.vision_tower.", "model.mm_projector.", "model.image_newline")
    weights = {name: tensor for name, tensor in llava_model.state_dict().items() if not name.startswith(multimodal)}
    plain.load_state_dict(weights, strict=True)
    return plain


def test_loads_as_qwen_with_every_tensor_and_its_biases(qwen_checkpoint, qwen):
    model = qwen[1]
    assert isinstance(model, LlavaQwenForCausalLM) and model.config.architectures == ["LlavaQwenForCausalLM"]
    saved = load_file(os.path.join(qwen_checkpoint, "model.safetensors"))
    ours = model.state_dict()
    assert set(saved) == set(ours) and all(torch.equal(ours[name], tensor) for name, tensor in saved.items())
    for name in ("q_proj", "k_proj", "v_proj"):
        bias = ours[f"model.layers.1.self_attn.{name}.bias"]
        assert bias.abs().min() > 0  # random, so a dropped bias (Qwen loaded as Llama) would be caught
    assert "model.image_newline" in saved and "lm_head.weight" in saved
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.layer_types == ["full_attention"] * 2


def test_text_logits_equal_plain_qwen2(qwen):
    tokenizer, model, _ = qwen
    plain = _plain_qwen2(model)
    ids = torch.tensor([[1, 57, 300, 9, 801, 44, 2], [0, 0, 1, 12, 600, 33, 700]])
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = plain(ids, attention_mask=mask).logits
        generated = model.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=5, do_sample=False)
        reference = plain.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=5, do_sample=False)
    valid = mask.bool()
    assert torch.equal(ours[valid], theirs[valid])
    assert generated.tolist() == reference[:, ids.shape[1]:].tolist()  # ours returns only the new tokens


def test_tied_embeddings_save_and_reload(tmp_path):
    """The 0.5B ties lm_head to the embeddings: one tensor, saved once, tied again on reload."""
    config = LlavaQwenConfig(**_text_config(tie_word_embeddings=True))
    model = LlavaQwenForCausalLM(config).eval()
    _randomise(model, seed=4)
    assert model.lm_head.weight is model.get_model().embed_tokens.weight
    model.save_pretrained(tmp_path)
    reloaded = LlavaQwenForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.get_model().embed_tokens.weight
    ids = torch.tensor([[1, 7, 99, 500, 3]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, _plain_qwen2(model)(ids).logits)


# --- the in-LLM pruning mechanism on Qwen2's layers -----------------------------------------

@pytest.mark.parametrize("layer", [0, 1])
def test_last_query_attention_equals_eager_attentions(layer):
    config = Qwen2Config(**_text_config(vocab_size=50), attn_implementation="eager")
    model = Qwen2Model(config).eval()
    _randomise(model, seed=5)
    embeds = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding, ragged rows
    mask[2, :5] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_attentions=True,
                    output_hidden_states=True, use_cache=True)
        layer_input = out.hidden_states[layer]
        cos_sin = model.rotary_emb(layer_input, position_ids=position_ids)
        scores = pruning.last_query_attn(model.layers[layer], layer_input, cos_sin, mask.bool())
        cache = getattr(out, "cache", None) or out.past_key_values
        keys = pruning.cached_keys(cache, layer, 9)
        from_cache = pruning.last_query_attn(model.layers[layer], layer_input, cos_sin, mask.bool(), keys=keys)
    reference = out.attentions[layer][:, :, -1, :].float().mean(1)
    assert torch.allclose(scores, reference, atol=1e-5)
    assert torch.all(scores[mask == 0] == 0)
    assert torch.allclose(keys, pruning.layer_keys(model.layers[layer], layer_input, cos_sin), atol=1e-6)
    assert torch.allclose(from_cache, scores, atol=1e-6)


def _keep_all_request(starts, counts, layer):
    """A stage at `layer` whose keep rule keeps every token of each span."""
    def keep_all(scores, image_tokens, targets, args):
        return torch.ones_like(scores, dtype=torch.bool)

    method = types.SimpleNamespace(select=keep_all, needs={"last_query_attn"})
    return PruningRequest(torch.arange(len(starts)), torch.tensor(starts), torch.tensor(counts),
                          [((layer, count),) for count in counts], method, None)


def test_keeping_everything_equals_the_model(qwen):
    """The mechanism's own loop, masks and RoPE over Qwen2's layers: the vanilla logits."""
    model = qwen[1]
    embeds = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        vanilla = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        model.get_model().pruning_request = _keep_all_request([3, 9], [20, 15], 1)
        pruned = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert torch.allclose(pruned, vanilla, atol=1e-5)


def test_sliding_window_layers_are_refused():
    config = LlavaQwenConfig(**_text_config(use_sliding_window=True, sliding_window=8, max_window_layers=1))
    model = LlavaQwenForCausalLM(config).eval()
    model.get_model().pruning_request = _keep_all_request([1], [4], 1)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model(inputs_embeds=torch.zeros(1, 10, 64))


# --- FastV through the tiny LLaVA-Qwen checkpoint (2 layers: K = 1) ---------------------------

def _inputs(qwen, sizes, questions):
    tokenizer, model, processor = qwen
    generator = torch.Generator().manual_seed(7)
    images = [Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator,
                                            dtype=torch.uint8).numpy()) for width, height in sizes]
    pixel_values = process_images(images, processor, model.config)
    rows = [tokenizer_image_token(f"user <image>\n{question} assistant", tokenizer, return_tensors="pt")
            for question in questions]
    longest = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - len(row):], mask[index, longest - len(row):] = row, 1
    return ids, mask, pixel_values, list(sizes)


def _generate(model, ids, mask, pixel_values, sizes, **compression):
    model.set_compression(**compression)
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, images=pixel_values, image_sizes=sizes, do_sample=False,
                                  max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_compression()


def test_fastv_at_full_budget_is_the_vanilla_model(qwen):
    model = qwen[1]
    ids, mask, pixel_values, sizes = _inputs(qwen, [(800, 500)], ["What is shown?"])
    vanilla = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="globalcom2")
    full = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="fastv", method_args=["k=1"])
    assert full.sequences.tolist() == vanilla.sequences.tolist()
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(full.logits, vanilla.logits))
    pruned = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=0.25, method="fastv",
                       method_args=["k=1"])
    span = model.last_accounting[0]["in_llm"]["span_tokens"]
    assert model.last_accounting[0]["in_llm"]["stages"] == [[1, round(0.25 * span)]]
    assert not torch.equal(pruned.logits[0], vanilla.logits[0])


def test_fastv_ragged_batch_equals_each_row_alone(qwen):
    model = qwen[1]
    sizes, questions = [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky in this picture?"]
    ids, mask, pixel_values, image_sizes = _inputs(qwen, sizes, questions)
    batched = _generate(model, ids, mask, pixel_values, image_sizes, retention_ratio=0.25, method="fastv",
                        method_args=["k=1"])
    spans = [record["in_llm"]["span_tokens"] for record in model.last_accounting]
    assert spans[0] != spans[1]
    for row in range(2):
        alone_ids, alone_mask, _, _ = _inputs(qwen, sizes[row:row + 1], questions[row:row + 1])
        alone = _generate(model, alone_ids, alone_mask, pixel_values[row:row + 1], image_sizes[row:row + 1],
                          retention_ratio=0.25, method="fastv", method_args=["k=1"])
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        assert torch.allclose(batched.logits[0][row], alone.logits[0][0], atol=1e-4)
