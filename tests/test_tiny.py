"""The tiny checkpoints: reproducible, real geometry, their own tokenizers (Llama-style for LLaVA-NeXT,
Qwen-style ChatML for OneVision); the OneVision one loads, generates and runs through run_llava."""

import hashlib
import json
import os

import pytest
import sentencepiece
from hypothesis import given, settings, strategies as st
from PIL import Image
from safetensors import safe_open

from llava.conversation import first_turn_prompt
from llava.mm_utils import onevision_visual_token_count, tokenizer_image_token
from llava.model.builder import load_pretrained_model, load_tokenizer
from llava.tiny import build_tiny_checkpoint, build_tiny_onevision_checkpoint, build_tokenizer


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
    # The tower directory holds its weights, as `openai/clip-vit-large-patch14-336` does.
    with safe_open(os.path.join(tiny_checkpoint, config["mm_vision_tower"], "model.safetensors"), "pt") as weights:
        assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in weights.keys()
    with open(os.path.join(tiny_checkpoint, "tokenizer.json"), encoding="utf-8") as handle:
        saved = json.load(handle)
    # tokenizers < 0.20 reads merges only as "left right" strings, Metaspace only with add_prefix_space.
    assert all(isinstance(merge, str) and merge.count(" ") == 1 for merge in saved["model"]["merges"])
    assert saved["pre_tokenizer"]["add_prefix_space"] is True and "split" not in saved["pre_tokenizer"]


def test_tokenizer_is_llama_style(tiny):
    tokenizer = tiny[0]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([3, 13, 258]) == ["<0x00>", "<0x0A>", "<0xFF>"]
    ids = tokenizer("é\nx").input_ids
    # BOS, word-start marker, 'é' as two UTF-8 bytes (not in the tiny vocabulary), newline byte.
    assert tokenizer.convert_ids_to_tokens(ids[:5]) == ["<s>", "▁", "<0xC3>", "<0xA9>", "<0x0A>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "é\nx"


@pytest.fixture(scope="module")
def sentencepiece_model(tiny_checkpoint):
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(tiny_checkpoint, "tokenizer.model"))


@pytest.fixture(scope="module")
def built_tokenizer():
    return build_tokenizer()


def test_loader_reads_the_original_tokenizer_files_as_built(tiny_checkpoint, tiny, built_tokenizer, llama_chat_prompts,
                                                           tmp_path):
    """The checkpoint's `tokenizer.json`, and its `tokenizer.model` alone (the `liuhaotian/llava-v1.6-*`
    layout, converted by transformers), both give the in-memory tokenizer's ids on the sample prompts."""
    prompts = [prompt for _, _, prompt in llama_chat_prompts]
    expected = [tokenizer_image_token(prompt, built_tokenizer) for prompt in prompts]
    assert [tokenizer_image_token(prompt, tiny[0]) for prompt in prompts] == expected
    only_sentencepiece = tmp_path / "llava-sp-only"
    only_sentencepiece.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (only_sentencepiece / name).write_bytes(open(os.path.join(tiny_checkpoint, name), "rb").read())
    converted = load_tokenizer(str(only_sentencepiece))
    assert [tokenizer_image_token(prompt, converted) for prompt in prompts] == expected


def test_sentencepiece_model_on_the_sample_prompts(sentencepiece_model, built_tokenizer, llama_chat_prompts):
    for _, _, prompt in llama_chat_prompts:
        for chunk in prompt.split("<image>"):
            assert sentencepiece_model.encode(chunk) == built_tokenizer(chunk, add_special_tokens=False).input_ids


def _pieces_as_text(tokenizer) -> list[str]:
    return [piece.replace("▁", " ") for piece in tokenizer.get_vocab() if not piece.startswith("<")]


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_sentencepiece_model_replays_the_merges(sentencepiece_model, built_tokenizer, data):
    """Scores -id make sentencepiece join pairs in the merges' order: same ids for any text, whether
    spelled from vocabulary pieces (where a pair outside the merge list could join) or from single
    characters, out-of-vocabulary ones (byte fallback) and newlines included."""
    pieces = _pieces_as_text(built_tokenizer)
    characters = sorted({character for piece in pieces for character in piece}) + ["\n", "é", "Q", "€"]
    text = data.draw(st.one_of(
        st.lists(st.sampled_from(pieces), min_size=1, max_size=12).map("".join),
        st.text(alphabet=characters, min_size=1, max_size=40),
    ).filter(lambda text: not text.startswith(" ")))
    assert sentencepiece_model.encode(text) == built_tokenizer(text, add_special_tokens=False).input_ids


def test_sentencepiece_model_prefixes_leading_spaces_as_llamas_does(sentencepiece_model, built_tokenizer):
    """The one known difference (the real Llama files have it too): sentencepiece adds its `▁` prefix
    even before a leading space, the fast tokenizer does not. No template starts a chunk with one."""
    word_start = built_tokenizer.convert_tokens_to_ids("▁")
    ids = built_tokenizer(" What", add_special_tokens=False).input_ids
    assert sentencepiece_model.encode(" What") == [word_start] + ids


# ----------------------------------------------------------------------------------------------
# The tiny OneVision checkpoint (`python -m llava.tiny --family onevision`)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onevision_checkpoint(tiny_onevision_checkpoint):
    return tiny_onevision_checkpoint


@pytest.fixture(scope="module")
def onevision(onevision_checkpoint):
    tokenizer, model, processor, _ = load_pretrained_model(onevision_checkpoint, device="cpu", torch_dtype="float32")
    return tokenizer, model, processor


def test_onevision_same_seed_same_files(onevision_checkpoint, tmp_path):
    again = build_tiny_onevision_checkpoint(str(tmp_path / "again"))
    other_seed = build_tiny_onevision_checkpoint(str(tmp_path / "other"), seed=1)
    first = _digest(onevision_checkpoint)
    assert first == _digest(again)
    changed = {name for name, digest in _digest(other_seed).items() if first[name] != digest}
    assert changed and all(name.endswith(".safetensors") for name in changed)



def test_onevision_tokenizer_files_as_qwen2_ships_them(onevision_checkpoint, onevision, sample_questions, tmp_path):
    """The slow Qwen2Tokenizer's `vocab.json` and `merges.txt` alone give `tokenizer.json`'s ids on the sample
    questions in `qwen_1_5`; the merges are "left right" strings, the form tokenizers < 0.20 reads."""
    with open(os.path.join(onevision_checkpoint, "tokenizer.json"), encoding="utf-8") as handle:
        merges = json.load(handle)["model"]["merges"]
    assert merges and all(isinstance(merge, str) and merge.count(" ") == 1 for merge in merges)
    only_slow = tmp_path / "llava-onevision-slow"
    only_slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (only_slow / name).write_bytes(open(os.path.join(onevision_checkpoint, name), "rb").read())
    slow = load_tokenizer(str(only_slow))
    for question in sample_questions:
        prompt = first_turn_prompt("qwen_1_5", "<image>\n" + question)
        assert tokenizer_image_token(prompt, slow) == tokenizer_image_token(prompt, onevision[0])

def test_onevision_original_layout_and_geometry(onevision_checkpoint):
    with open(os.path.join(onevision_checkpoint, "config.json")) as handle:
        config = json.load(handle)
    assert config["architectures"] == ["LlavaQwenForCausalLM"] and config["model_type"] == "llava"
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"], config["mm_projector_type"]) == \
        ("anyres_max_9", "spatial_unpad", "mlp2x_gelu")
    # The (1x1)..(6x6) grids of 384 px, widths in the outer loop, as the ov config.json lists them.
    assert config["image_grid_pinpoints"][:7] == [[384, 384], [384, 768], [384, 1152], [384, 1536], [384, 1920],
                                                  [384, 2304], [768, 384]]
    assert len(config["image_grid_pinpoints"]) == 36 and config["image_grid_pinpoints"][-1] == [2304, 2304]
    assert config["tie_word_embeddings"] is True and config["use_sliding_window"] is False
    tower_dir = os.path.join(onevision_checkpoint, config["mm_vision_tower"])
    with open(os.path.join(tower_dir, "config.json")) as handle:
        tower = json.load(handle)
    vision = tower["vision_config"]
    assert tower["model_type"] == "siglip" and vision["vision_use_head"] is True
    assert (vision["image_size"], vision["patch_size"], config["mm_hidden_size"]) == (384, 14, vision["hidden_size"])
    with open(os.path.join(onevision_checkpoint, "model.safetensors.index.json")) as handle:
        names = set(json.load(handle)["weight_map"])
    kept_layers = vision["num_hidden_layers"] - 1  # the published tower has one layer more than LLaVA keeps
    prefix = "model.vision_tower.vision_tower.vision_model.encoder.layers"
    assert f"{prefix}.{kept_layers - 1}.mlp.fc1.weight" in names
    assert f"{prefix}.{kept_layers}.mlp.fc1.weight" not in names
    assert not any("head" in name for name in names if "vision_tower" in name)
    assert {"model.layers.0.self_attn.q_proj.bias", "model.image_newline", "model.mm_projector.2.weight"} <= names


def test_onevision_tokenizer_is_chatml(onevision):
    tokenizer, model, _ = onevision
    size = len(tokenizer)
    assert tokenizer.convert_ids_to_tokens([size - 3, size - 2, size - 1]) == ["<|endoftext|>", "<|im_start|>",
                                                                               "<|im_end|>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (None, size - 1, size - 3)
    assert model.config.eos_token_id == size - 1 and model.config.vocab_size == size
    ids = tokenizer("<|im_start|>user\né<|im_end|>").input_ids
    assert ids[0] == size - 2 and ids[-1] == size - 1  # the special tokens stay whole
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\né"


def test_onevision_loads_and_generates_with_the_qwen_template(onevision, onevision_checkpoint):
    from llava.generation import answer, answer_batch, infer_conv_mode

    tokenizer, model, processor = onevision
    assert type(model).__name__ == "LlavaQwenForCausalLM" and infer_conv_mode(onevision_checkpoint, model.config) \
        == "qwen_1_5"
    prompt = first_turn_prompt("qwen_1_5", "<image>\nWhat is it?")
    images = [Image.new("RGB", size, color) for size, color in [((800, 500), "red"), ((2304, 2304), "blue")]]
    model.set_compression(retention_ratio=1.0)
    try:
        alone = [answer(model, tokenizer, processor, prompt, [image], max_new_tokens=4) for image in images]
        together = answer_batch(model, tokenizer, processor, [prompt, prompt], [[image] for image in images],
                                max_new_tokens=4)
    finally:
        model.set_compression()
    assert [reply.visual_tokens for reply in alone] == [onevision_visual_token_count(image.size) for image in images]
    assert [reply.grids for reply in alone] == [[(3, 2)], [(6, 6)]]
    assert all(reply.new_tokens > 0 for reply in alone)
    assert [(reply.text, reply.accounting, reply.prompt_tokens) for reply in together] == \
        [(reply.text, reply.accounting, reply.prompt_tokens) for reply in alone]


@pytest.mark.parametrize("arguments, shown", [(["--retention-ratio", "1"], "visual tokens 4829 of 4829 (100.0%)"),
                                              (["--retention-ratio", "0.25", "--method", "random"], "random R 0.25"),
                                              (["--retention-ratio", "0.25", "--method", "pooling"], "pooling R 0.25")])
def test_onevision_run_llava_prints_the_summary(onevision_checkpoint, arguments, shown, capsys):
    from llava.eval import run_llava

    run_llava.main(["--model-path", onevision_checkpoint, "--image-file", "images/shapes-800x500.png",
                    "--query", "What is shown?", "--max-new-tokens", "2", *arguments])
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[summary]")]
    assert len(summary) == 1 and "grid 3x2" in summary[0] and shown in summary[0]


def test_onevision_run_llava_refuses_globalcom2_in_one_line(onevision_checkpoint, capsys):
    from llava.eval import run_llava
    from llava.model.compression import get_method, parse_method_args
    from llava.model.multimodal_encoder.siglip_encoder import OFFERED_SIGNALS

    if get_method("globalcom2").signals_for(parse_method_args("globalcom2", []), False) <= OFFERED_SIGNALS:
        pytest.skip("GlobalCom2's default score no longer needs [CLS]")
    with pytest.raises(SystemExit):
        run_llava.main(["--model-path", onevision_checkpoint, "--image-file", "images/shapes-800x500.png",
                        "--query", "What is shown?", "--max-new-tokens", "2", "--retention-ratio", "0.25"])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "globalcom2 needs cls_logits_last" in error[0] and "SigLIP" in error[0]
