"""lmms-eval plug-in: `lmms-eval --model globalcom2 --model_args pretrained=PATH,retention_ratio=0.1,...`.

lmms-eval (an optional extra: `pip install -e .[lmms]`, or `sh scripts/install.sh lmms` for the lean
install that keeps torch) finds the model through the `lmms_eval.models` entry point that
`pyproject.toml` points at `manifest` below. This module must stay import-light: lmms-eval loads
every entry point while it starts, and one that raises makes it skip all of them with only a
warning, so neither torch nor lmms-eval is imported here until lmms-eval calls `manifest`. The
model itself is `llava.eval.lmms_eval.model.GlobalCom2`; the id is not `llava`, which would
silently replace lmms-eval's own LLaVA wrapper.
"""

MODEL_ID = "globalcom2"
MODEL_CLASS = "llava.eval.lmms_eval.model.GlobalCom2"


def manifest():
    """The entry point's payload, called by lmms-eval's registry (which has imported its own
    `registry_v2` by then)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
