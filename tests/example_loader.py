"""The demos in examples/ loaded as modules by the tests that run them or reuse their pieces."""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str) -> ModuleType:
    """examples/<name>.py as the module `example_<name>` (its folder on sys.path first, for the
    demos' own imports)."""
    path = os.path.join(ROOT, "examples", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
