"""The quick-start demo: build the tiny checkpoint if missing, then ask it about a sample image.

The tiny checkpoint has random weights, so its answer is noise; the point is the path (AnyRes
preprocessing, vision tower, projector, splice, generation) and the summary line.
"""

from __future__ import annotations

import os
import sys

from llava.eval import run_llava
from llava.tiny import DEFAULT_OUT, ensure_tiny_checkpoint
from llava.utils import quiet_transformers

SAMPLE_IMAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images", "shapes-800x500.png")


def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    model_path = ensure_tiny_checkpoint(DEFAULT_OUT)
    return run_llava.main([
        "--model-path", model_path,
        "--image-file", SAMPLE_IMAGE,
        "--query", "What is shown in this image?",
        "--max-new-tokens", "16",
        *(argv if argv is not None else sys.argv[1:]),
    ])


if __name__ == "__main__":
    sys.exit(main())
