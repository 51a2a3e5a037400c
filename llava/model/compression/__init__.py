"""Visual-token compression methods for LLaVA-NeXT, one module each, registered by name.

Every module below registers its entry point on import (`registry.register`); they are imported
here explicitly, in sorted order, so the registry never depends on import order. Adding a method
is one new module listed here and one test file. `python -m llava.model.compression --list`
prints every method with its arguments.
"""

from llava.model.compression import fastervlm, globalcom2, pooling, random  # noqa: F401  (registers each method)
from llava.model.compression.registry import describe, get_method, method_names, parse_method_args  # noqa: F401
