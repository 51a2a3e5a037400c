"""Visual-token compression methods for LLaVA-NeXT, one module each, registered by name.

Every module of this package other than the shared ones (`common`, `registry`) is a method and
registers its entry point on import (`registry.register`); they are imported here in sorted
order, so the registry never depends on import order. Adding a method is one new module and one
test file, nothing else. `python -m llava.model.compression --list` prints every method with its
arguments.
"""

import importlib
import pkgutil

from llava.model.compression.registry import describe, get_method, method_names, parse_method_args  # noqa: F401

SHARED_MODULES = {"common", "registry"}

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    if _module not in SHARED_MODULES and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
