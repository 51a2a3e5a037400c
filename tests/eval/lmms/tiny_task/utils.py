"""The tiny task's document functions (named by globalcom2_tiny.yaml; lmms-eval imports this file)."""

from PIL import Image


def doc_to_visual(doc):
    """The document's images, decoded (as lmms-eval's tasks give them, PIL images)."""
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc):
    """The question as it is: the model wrapper places the `<image>` lines."""
    return doc["question"]
