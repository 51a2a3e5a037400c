"""Conversation templates for prompting LLaVA checkpoints.

Each template renders byte-identical prompt strings to upstream LLaVA's
``llava/conversation.py`` (same template names, system texts, role names and
separators), because checkpoints are only reliable with the exact prompt
format they were fine-tuned on.
"""

from __future__ import annotations

import dataclasses
import enum

from llava.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(enum.Enum):
    """How turns are joined when a conversation is rendered to a prompt."""

    SINGLE = enum.auto()
    TWO = enum.auto()
    MPT = enum.auto()
    PLAIN = enum.auto()
    LLAMA_2 = enum.auto()
    CHATML = enum.auto()


def _text_of(message):
    """The text of a message; image-carrying messages are `(text, image, mode)` tuples."""
    return message[0] if isinstance(message, tuple) else message


@dataclasses.dataclass
class Conversation:
    """A chat history plus the template that turns it into a model prompt.

    `messages` holds `[role, message]` pairs; a message of None (or "") is an
    open turn: the prompt ends by inviting that role to speak.
    """

    system: str
    roles: tuple[str, str]
    messages: list
    offset: int = 0
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        # Fresh pair lists, so a copy can be extended without touching the template.
        return dataclasses.replace(self, messages=[[role, msg] for role, msg in self.messages])

    def to_dict(self) -> dict:
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _text_of(msg)] for role, msg in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    def get_prompt(self) -> str:
        messages = [(role, _text_of(msg)) for role, msg in self._messages_with_image_prefix()]
        render = {
            SeparatorStyle.SINGLE: self._render_single,
            SeparatorStyle.TWO: self._render_two,
            SeparatorStyle.MPT: self._render_mpt,
            SeparatorStyle.LLAMA_2: self._render_llama_2,
            SeparatorStyle.PLAIN: self._render_plain,
            SeparatorStyle.CHATML: self._render_chatml,
        }.get(self.sep_style)
        if render is None:
            raise ValueError(f"Unknown separator style: {self.sep_style!r}")
        return render(messages)

    def _messages_with_image_prefix(self) -> list:
        """Move the image token of an image-carrying first message to where the template expects it.

        Upstream normalises this message so the image always leads the first
        user turn; "mmtag" templates instead get a synthetic image exchange.
        """
        messages = list(self.messages)
        if not messages or not isinstance(messages[0][1], tuple):
            return messages
        role, (text, *_rest) = messages[0]
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if "mmtag" in self.version:
            return [
                (self.roles[0], "<Image><image></Image>"),
                (self.roles[1], "Received."),
                (role, text),
                *messages[1:],
            ]
        return [(role, DEFAULT_IMAGE_TOKEN + "\n" + text), *messages[1:]]

    def _render_single(self, messages: list) -> str:
        ret = self.system + self.sep
        for role, text in messages:
            ret += f"{role}: {text}{self.sep}" if text else f"{role}:"
        return ret

    def _render_two(self, messages: list) -> str:
        seps = (self.sep, self.sep2)
        ret = self.system + seps[0]
        for i, (role, text) in enumerate(messages):
            ret += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
        return ret

    def _render_mpt(self, messages: list) -> str:
        ret = self.system + self.sep
        for role, text in messages:
            ret += role + text + self.sep if text else role
        return ret

    def _render_llama_2(self, messages: list) -> str:
        if messages:
            role, text = messages[0]
            if role != self.roles[0]:
                raise ValueError(
                    f"LLAMA_2 prompts must start with a {self.roles[0]!r} message, got one from {role!r}"
                )
            if not text:
                raise ValueError("LLAMA_2 prompts must start with a non-empty user message")
        system = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n" if self.system else ""
        ret = ""
        for i, (_role, text) in enumerate(messages):
            if not text:
                continue
            if i == 0:
                text = system + text
            if i % 2 == 0:
                ret += f"{self.sep}[INST] {text} [/INST]"
            else:
                ret += f" {text} {self.sep2}"
        # Upstream strips the leading BOS marker character-wise (str.lstrip), not as a prefix.
        return ret.lstrip(self.sep)

    def _render_plain(self, messages: list) -> str:
        # sep2 is None in the plain template; upstream never reaches it on inference prompts.
        seps = (self.sep, self.sep2 or "")
        ret = self.system
        for i, (_role, text) in enumerate(messages):
            if text:
                ret += text + seps[i % 2]
        return ret

    def _render_chatml(self, messages: list) -> str:
        # LLaVA-NeXT (LLaVA-VL)'s ChatML: each turn "role\ntext<|im_end|>\n", the system turn only if non-empty.
        ret = f"{self.system}{self.sep}\n" if self.system else ""
        for role, text in messages:
            ret += f"{role}\n{text}{self.sep}\n" if text else f"{role}\n"
        return ret


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

# Upstream ships vicuna_v0 with few-shot example messages; here it starts empty.
conv_vicuna_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0",
)

conv_vicuna_v1 = Conversation(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llama_2 = Conversation(
    system=(
        "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
        "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
        "toxic, dangerous, or illegal content. Please ensure that your responses are socially "
        "unbiased and positive in nature.\n\nIf a question does not make any sense, or is not "
        "factually coherent, explain why instead of answering something not correct. If you don't "
        "know the answer to a question, please don't share false information."
    ),
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

conv_llava_llama_2 = Conversation(
    system=(
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural "
        "language."
    ),
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
    version="llama_v2",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=_CHATML_ROLES,
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)

conv_mpt = Conversation(
    system=(
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers."
    ),
    roles=_CHATML_ROLES,
    messages=[],
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)

# LLaVA-OneVision's template (LLaVA-VL's `qwen_1_5`, also its `qwen_2`): Qwen's default system prompt.
conv_qwen = Conversation(
    system="<|im_start|>system\nYou are a helpful assistant.",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    messages=[],
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
    version="qwen",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    messages=[],
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=[],
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

default_conversation = conv_vicuna_v1

conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
    "qwen_1_5": conv_qwen,
    "qwen_2": conv_qwen,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh, independently mutable copy of the named template."""
    try:
        template = conv_templates[name]
    except KeyError:
        valid = ", ".join(sorted(conv_templates))
        raise KeyError(f"Unknown conversation template {name!r}; valid names: {valid}") from None
    return template.copy()


def first_turn_prompt(conv_mode: str, user_turn) -> str:
    """The prompt asking `user_turn` (text, or upstream's `(text, image, mode)` tuple) as the first user
    turn of template `conv_mode`, the assistant's reply left open: how every runner asks a question."""
    conv = get_conv_template(conv_mode)
    conv.append_message(conv.roles[0], user_turn)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()
