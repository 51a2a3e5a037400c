"""Prompt rendering of the conversation templates, checked against hand-written upstream strings."""

import pytest

from llava.conversation import (
    Conversation,
    SeparatorStyle,
    conv_llava_llama_2,
    conv_templates,
    default_conversation,
    first_turn_prompt,
    get_conv_template,
)


def render(name, *turns):
    """Render template `name` with alternating user/assistant turns; None marks an open turn."""
    conv = get_conv_template(name)
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
    return conv.get_prompt()


def test_vicuna_v1_one_turn():
    assert render("vicuna_v1", "<image>\nWhat is shown?", None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT:"
    )


def test_first_turn_prompt_is_one_open_exchange_and_leaves_the_template_alone():
    asked = first_turn_prompt("vicuna_v1", "<image>\nWhat is shown?")
    assert asked == render("vicuna_v1", "<image>\nWhat is shown?", None)
    assert asked.endswith("USER: <image>\nWhat is shown? ASSISTANT:") and conv_templates["vicuna_v1"].messages == []
    assert first_turn_prompt("vicuna_v1", "<image>\nWhat is shown?") == asked


def test_vicuna_v1_two_turns():
    assert render("vicuna_v1", "Q1", "A1", "Q2", None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    )


def test_llava_v1_one_turn():
    assert render("llava_v1", "<image>\nWhat is shown?", None) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown? ASSISTANT:"
    )


def test_mistral_instruct():
    assert render("mistral_instruct", "<image>\nQ", None) == "[INST] <image>\nQ [/INST]"
    assert render("mistral_instruct", "Q1", "A1", "Q2", None) == "[INST] Q1 [/INST] A1 </s>[INST] Q2 [/INST]"


def test_chatml_direct():
    assert render("chatml_direct", "<image>\nQ", None) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
    )


def test_qwen_1_5_as_llava_onevision_prompts():
    # LLaVA-VL's CHATML: "<system><|im_end|>\n", then "<role>\n<text><|im_end|>\n" per turn, "<role>\n" when open.
    assert render("qwen_1_5", "<image>\nWhat is shown?", None) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render("qwen_2", "Q1", "A1", "Q2", None) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    conv = get_conv_template("qwen_1_5")
    conv.system = ""  # no system turn at all, not an empty one
    conv.append_message(conv.roles[0], ("What is shown?", None, "Default"))  # the image moved to the front
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n<|im_start|>assistant\n"


def test_plain():
    assert render("plain", "<image>", None) == "<image>\n"


def test_llava_llama_2_wraps_system_in_first_instruction():
    assert render("llava_llama_2", "Q", None) == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the "
        "visual content that the user provides, and assist the user with a variety of tasks using natural "
        "language.\n<</SYS>>\n\nQ [/INST]"
    )


def test_llava_v0_single_style():
    assert render("llava_v0", "Q", None) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.###Human: Q###Assistant:"
    )


def test_tuple_first_message_moves_image_to_front():
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", ("What?\n<image>", None, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat? ASSISTANT:"
    )
    # Rendering must not rewrite the stored history.
    assert conv.messages[0][1] == ("What?\n<image>", None, "Default")


def test_tuple_first_message_mmtag_inserts_image_exchange():
    conv = get_conv_template("v1_mmtag")
    conv.append_message("USER", ("<image>\nWhat?", None, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt().endswith(
        "</Image>. USER: <Image><image></Image> ASSISTANT: Received.</s>USER: What? ASSISTANT:"
    )


def test_copy_does_not_mutate_templates():
    before = {name: list(conv.messages) for name, conv in conv_templates.items()}
    conv = get_conv_template("vicuna_v1")
    conv.append_message("USER", "hi")
    default_conversation.copy().append_message("USER", "hi")
    assert {name: list(conv.messages) for name, conv in conv_templates.items()} == before
    assert conv_templates["vicuna_v1"].messages == []


def test_unknown_template_lists_valid_names():
    with pytest.raises((KeyError, ValueError), match="vicuna_v1"):
        get_conv_template("nope")


def test_llama_2_requires_user_first():
    conv = conv_llava_llama_2.copy()
    conv.append_message("ASSISTANT", "A")
    with pytest.raises(ValueError, match="USER"):
        conv.get_prompt()


def test_to_dict_reduces_image_messages_to_text():
    conv = get_conv_template("llava_v1")
    conv.append_message("USER", ("<image>\nQ", None, "Default"))
    assert conv.to_dict()["messages"] == [["USER", "<image>\nQ"]]


def test_unknown_style_raises():
    conv = Conversation(system="", roles=("a", "b"), messages=[], sep_style="bogus")
    with pytest.raises(ValueError):
        conv.get_prompt()
    assert isinstance(conv_templates["mpt"].sep_style, SeparatorStyle)
