"""`load_pretrained_model` on original-layout checkpoints: formats, variants, dtypes, bad paths."""

import json
import os
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file

from llava.generation import infer_conv_mode
from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwenForCausalLM
from llava.model.builder import CheckpointError, llava_classes, load_pretrained_model
from llava.tiny import build_tiny_checkpoint

# These compare against vanilla LLaVA-NeXT (transformers' model, upstream token counts).
pytestmark = pytest.mark.usefixtures("vanilla")


def _checkpoint_tensors(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


def test_loads_every_tensor_of_the_checkpoint(tiny_checkpoint, tiny):
    _, model, _ = tiny
    assert isinstance(model, LlavaLlamaForCausalLM) and model.dtype == torch.float32
    ours = model.state_dict()
    saved = _checkpoint_tensors(tiny_checkpoint)
    # The tower's weights come from the checkpoint (original key names), not from a fresh CLIP.
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in saved
    assert set(saved) == set(ours)
    assert all(torch.equal(ours[name], tensor) for name, tensor in saved.items())


def test_config_drives_the_model(tiny):
    config = tiny[1].config
    assert config.image_aspect_ratio == "anyres" and config.mm_patch_merge_type == "spatial_unpad"
    assert config.mm_vision_select_layer == -2 and config.mm_projector_type == "mlp2x_gelu"
    assert [module.__class__.__name__ for module in tiny[1].get_model().mm_projector] == ["Linear", "GELU", "Linear"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "bfloat16"])
def test_dtypes(tiny_checkpoint, dtype):
    _, model, _, _ = load_pretrained_model(tiny_checkpoint, device="cpu", torch_dtype=dtype)
    expected = torch.bfloat16 if dtype == "bfloat16" else dtype
    assert model.dtype == expected and model.get_vision_tower().dtype == expected


def test_pytorch_bin_checkpoint_in_a_dir_without_llava_in_its_name(tiny_checkpoint, tiny, tmp_path):
    target = tmp_path / "my-model"
    shutil.copytree(tiny_checkpoint, target)
    torch.save(_checkpoint_tensors(tiny_checkpoint), target / "pytorch_model.bin")
    for name in os.listdir(target):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(target / name)
    _, model, _, _ = load_pretrained_model(str(target), device="cpu")
    assert isinstance(model, LlavaLlamaForCausalLM)
    assert torch.equal(model.get_model().image_newline, tiny[1].get_model().image_newline)


def test_mistral_variant(tmp_path):
    path = build_tiny_checkpoint(str(tmp_path / "llava-v1.6-mistral-tiny"), llm="mistral")
    tokenizer, model, processor, _ = load_pretrained_model(path, device="cpu")
    assert isinstance(model, LlavaMistralForCausalLM)
    assert model.config.num_key_value_heads == 2
    assert infer_conv_mode(path, model.config) == "mistral_instruct"
    ids = torch.tensor([[1, 5, -200, 6]])
    pixels = torch.zeros(1, 5, 3, 336, 336)
    with torch.no_grad():
        logits = model(ids, images=pixels, image_sizes=[(800, 500)]).logits
    assert logits.shape == (1, 3 + 2046, len(tokenizer))


def test_sentencepiece_tokenizer_model_like_the_original_checkpoints(tiny_checkpoint, tmp_path):
    """v1.6 checkpoints ship only a sentencepiece `tokenizer.model`; the loaded tokenizer must
    give sentencepiece's own ids (with BOS), piece by piece as `tokenizer_image_token` uses it."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from llava.tiny import _corpus

    target = tmp_path / "llava-sp"
    shutil.copytree(tiny_checkpoint, target)
    os.remove(target / "tokenizer.json")
    (tmp_path / "corpus.txt").write_text("\n".join(_corpus()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(target / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2,
    )
    (target / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}))
    tokenizer, _, _, _ = load_pretrained_model(str(target), device="cpu")
    reference = sentencepiece.SentencePieceProcessor(model_file=str(target / "tokenizer.model"))
    for piece in ["A chat between a curious user. USER: ", "\nWhat is shown? ASSISTANT:", "é\nx"]:
        assert tokenizer(piece).input_ids == [1] + reference.encode(piece)


def test_conv_mode_rules(tiny):
    config = tiny[1].config
    assert infer_conv_mode("liuhaotian/llava-v1.6-vicuna-7b", config) == "llava_v1"
    assert infer_conv_mode("liuhaotian/llava-v1.6-34b", config) == "chatml_direct"
    assert infer_conv_mode("./liuhaotian/llava-next-7b", config) == "vicuna_v1"


def test_family_from_the_original_configs():
    """Each family's config.json as its checkpoints write it; a OneVision config (model_type `llava`, as
    LLaVA-1.5's) is Qwen, no longer Llama (which dropped its attention biases)."""
    def model_class(architectures, model_type):
        return llava_classes({"architectures": architectures, "model_type": model_type})[1]

    assert model_class(["LlavaLlamaForCausalLM"], "llava") is LlavaLlamaForCausalLM  # v1.5, v1.6 Vicuna, 34B
    assert model_class(["LlavaMistralForCausalLM"], "llava_mistral") is LlavaMistralForCausalLM
    assert model_class(["LlavaQwenForCausalLM"], "llava") is LlavaQwenForCausalLM  # lmms-lab OneVision
    assert model_class(None, "llava_qwen") is LlavaQwenForCausalLM and model_class([], "llava") is LlavaLlamaForCausalLM


@pytest.mark.parametrize("identity, named", [
    ({"architectures": ["LlavaGemmaForCausalLM"], "model_type": "llava_gemma"}, "architecture 'LlavaGemmaForCausalLM'"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architecture 'LlamaForCausalLM'"),
    ({"model_type": "llava_phi3"}, "model_type 'llava_phi3' (no architectures)"),
])
def test_unknown_family_is_refused_before_any_weight_is_read(tiny_checkpoint, tmp_path, identity, named):
    target = tmp_path / "llava-unknown"
    shutil.copytree(tiny_checkpoint, target, ignore=lambda directory, names: [  # its weights, not the CLIP dir's
        name for name in names if directory == tiny_checkpoint and name.startswith("model.")])
    (target / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail differently
    config = {key: value for key, value in json.loads((target / "config.json").read_text()).items()
              if key not in ("architectures", "model_type")}
    (target / "config.json").write_text(json.dumps({**config, **identity}))
    with pytest.raises(CheckpointError) as refused:
        load_pretrained_model(str(target), device="cpu")
    message = str(refused.value)
    assert named in message and "\n" not in message
    assert "supported architectures: LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwenForCausalLM" in message
    (target / "config.json").write_text(json.dumps({**config, "architectures": ["LlavaLlamaForCausalLM"]}))
    with pytest.raises(Exception) as read:  # a known family does reach the (unreadable) weights
        load_pretrained_model(str(target), device="cpu")
    assert not isinstance(read.value, CheckpointError)


def test_conv_mode_for_qwen_checkpoints():
    qwen = types.SimpleNamespace(model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"])
    assert infer_conv_mode("lmms-lab/llava-onevision-qwen2-7b-ov", qwen) == "qwen_1_5"
    assert infer_conv_mode("./checkpoints/my-ov-run", qwen) == "qwen_1_5"  # from the config, whatever the name
    llama = types.SimpleNamespace(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"])
    assert infer_conv_mode("lmms-lab/llava-onevision-qwen2-0.5b-ov", llama) == "qwen_1_5"  # or the name


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no mm_vision_tower"):
        load_pretrained_model(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(CheckpointError, match="no weights"):
        load_pretrained_model(str(tmp_path), device="cpu")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained_model(str(tmp_path / "missing"), device="cpu")


def test_checkpoint_without_tower_weights_loads_them_from_the_clip_directory(tiny_checkpoint, tmp_path):
    """LLaVA-1.5 style: the tower's weights are not in the checkpoint, so they come from the
    CLIP model named by mm_vision_tower (here a local directory), after the main load."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip_dir = tmp_path / "clip"
    tower_config = CLIPVisionConfig.from_pretrained(os.path.join(tiny_checkpoint, "clip-vit-tiny-patch14-336"))
    torch.manual_seed(3)
    CLIPVisionModel(tower_config).save_pretrained(clip_dir)

    target = tmp_path / "llava-no-tower"
    shutil.copytree(tiny_checkpoint, target)
    tensors = {k: v for k, v in _checkpoint_tensors(tiny_checkpoint).items() if not k.startswith("model.vision_tower.")}
    for name in os.listdir(target):
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".json")):
            os.remove(target / name)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config.update(mm_vision_tower=str(clip_dir), unfreeze_mm_vision_tower=False)
    (target / "config.json").write_text(json.dumps(config))

    _, model, _, _ = load_pretrained_model(str(target), device="cpu")
    reference = CLIPVisionModel.from_pretrained(clip_dir).state_dict()
    loaded = model.get_vision_tower().vision_tower.vision_model.state_dict()
    assert set(reference) == set(loaded)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in reference.items())


def test_device_map_auto_on_cpu(tiny_checkpoint):
    _, model, _, _ = load_pretrained_model(tiny_checkpoint, device="cpu", device_map="auto")
    assert model.device.type == "cpu" and model.get_vision_tower().device.type == "cpu"
