"""The compression defaults `llava_arch` starts with (`retention_ratio`, `token_layout`,
`compression_method`), read from its source without importing it, so without torch: the benchmark
scripts start with them. `python -m llava.model.defaults` prints the three on one line."""

from __future__ import annotations

import ast
import pathlib

NAMES = ("retention_ratio", "token_layout", "compression_method")
LLAVA_ARCH = pathlib.Path(__file__).with_name("llava_arch.py")


def read_defaults(path: pathlib.Path = LLAVA_ARCH) -> dict:
    """`{name: value}` of the module-level literal assignments of `NAMES` in `path` (the last one wins,
    as when the module runs)."""
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in NAMES:
                    values[target.id] = ast.literal_eval(node.value)
    missing = [name for name in NAMES if name not in values]
    if missing:
        raise ValueError(f"{path} assigns no literal {', '.join(missing)}")
    return values


if __name__ == "__main__":
    defaults = read_defaults()
    print(*(defaults[name] for name in NAMES))
