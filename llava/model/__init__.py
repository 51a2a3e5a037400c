"""The LLaVA models (import name kept as upstream's `llava.model`). The classes load on first use, so
torch-free helpers under this package (`llava.model.defaults`) and the method registry do not start
transformers."""

_CLASSES = {
    "LlavaConfig": "llava.model.language_model.llava_llama",
    "LlavaLlamaForCausalLM": "llava.model.language_model.llava_llama",
    "LlavaMistralConfig": "llava.model.language_model.llava_mistral",
    "LlavaMistralForCausalLM": "llava.model.language_model.llava_mistral",
    "LlavaQwenConfig": "llava.model.language_model.llava_qwen",
    "LlavaQwenForCausalLM": "llava.model.language_model.llava_qwen",
}

__all__ = list(_CLASSES)


def __getattr__(name: str):
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_CLASSES[name]), name)
