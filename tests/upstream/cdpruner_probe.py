"""Run only by the upstream LLaVA interpreter (`.venv-upstream`: transformers 4.37.2) with the official CDPruner
code (`Theia-4869/CDPruner`, its `llava/` exported) first on PYTHONPATH; never by pytest or this repository's
Python. `tests/upstream/test_cdpruner_official.py` starts it.

    cd <checkpoint> && PYTHONPATH=<official copy> <upstream python> cdpruner_probe.py request.json

As `vispruner_probe.py` (same request and output; the budget is `{"visual_token_num": T}`, and each image's
text is the official `texts` argument, the question as its eval loaders pass it), with two differences:

- the official loader runs with `device_map="auto"`, its eval scripts' default, and `device="cpu"` (which places
  everything on the CPU): that path leaves CLIP's text tower and visual projection in float32 as loaded, as in
  the official evaluation (spec Q7), where `device_map="cpu"` would cast them to fp16 and the official
  projection of `.float()` features would fail on fp16 weights;
- the official `CLIPVisionTower.forward` runs its image and text passes on two CUDA streams unconditionally
  (Q7), which a CPU build of torch cannot create: `torch.cuda.Stream` and `torch.cuda.synchronize` are
  replaced by no-ops here, so both passes run one after the other, as the synchronised streams order them.
  Nothing of the official code itself is changed.
"""

import contextlib
import sys

import torch
import vispruner_probe


def run_streams_on_the_cpu() -> None:
    """Sequential stand-ins for the CUDA stream calls of the official tower's forward."""
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None


if __name__ == "__main__":
    run_streams_on_the_cpu()
    vispruner_probe.main(sys.argv[1], device_map="auto")
