"""Run only by the upstream LLaVA interpreter (`.venv-upstream`: transformers 4.37.2) with the official FasterVLM
code (`Theia-4869/FasterVLM`, its `llava/` exported) first on PYTHONPATH; never by pytest or this repository's
Python. `tests/upstream/test_fastervlm_official.py` starts it.

    cd <checkpoint> && PYTHONPATH=<official copy> <upstream python> fastervlm_probe.py request.json

As `vispruner_probe.py` (same request and output), with the budget `{"visual_token_num": T}` (T per view, as the
fork's LLaVA-NeXT eval scripts pass it). The fork's `llava/` has no `__init__.py`: in its own environment it is a
namespace package, but here the installed upstream `llava` (a regular package) would win the import whatever the
path order, so the fork's directory is bound to the name `llava` first, as a namespace package (Python's own path
finder on that one entry). Differences that need no code here: the fork's `process_images` picks the grid from the
config's `image_grid_pinpoints` (the number of views varies with the image size), and its
`prepare_inputs_labels_for_multimodal` returns the tower's [CLS] attentions as an eighth value (spec F5), which
the shared runner ignores. Nothing of the official code is changed.
"""

import importlib.machinery
import importlib.util
import os
import sys


def import_the_fork_as_llava(official_root: str) -> None:
    """Bind `llava` to `official_root/llava` (no `__init__.py`) before anything imports the installed one."""
    spec = importlib.machinery.PathFinder.find_spec("llava", [official_root])
    if spec is None or spec.origin not in (None, "namespace"):
        raise RuntimeError(f"{official_root} holds no namespace `llava` (found {spec and spec.origin})")
    sys.modules["llava"] = importlib.util.module_from_spec(spec)


if __name__ == "__main__":
    import_the_fork_as_llava(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    import vispruner_probe

    vispruner_probe.main(sys.argv[1])
