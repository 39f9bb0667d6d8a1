"""Import the repository's scripts (``benchmarks/``, ``recipes/``, ``data/``) in tests.

They are not an installed package, and pytest does not put the repository root on ``sys.path``, so each is
loaded from its file. The module is registered in ``sys.modules`` first: dataclasses look their module up there.
"""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, module_name: str):
    """The module at ``REPO / relative_path``, imported under ``module_name``."""
    spec = importlib.util.spec_from_file_location(module_name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
