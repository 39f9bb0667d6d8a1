"""invdiff: imaging inverse problems with diffusion priors.

    >>> import invdiff
    >>> invdiff.list_operators()
    >>> op = invdiff.operator("cartesian_mri", mask=invdiff.mask("random", shape=(64, 64)), img_size=(64, 64))
    >>> result = invdiff.sample("cg-sense", invdiff.simulate(op, x, 0.01), None)

Everything but the registry is imported on first use (torch, deepinv, the samplers, fastMRI I/O), so
``import invdiff`` and ``invdiff --help`` stay fast; ``tests/test_imports.py`` holds it to that.
"""
from __future__ import annotations

import importlib
import logging

from invdiff import registry
from invdiff.registry import (example_operator, list_operators, list_priors, list_samplers, list_solvers,
                              load_plugins, operator, register_operator, register_prior, register_sampler,
                              register_solver)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def sample(name: str, problem, prior, **kwargs):
    """Run the solver registered as ``name``: ``invdiff.sample("reddiff", problem, prior, generator=g)``."""
    return registry.get_solver(name).factory(problem, prior, **kwargs)


_LAZY = {
    "InverseProblem": ("invdiff.problem", "InverseProblem"),
    "simulate": ("invdiff.problem", "simulate"),
    "InputError": ("invdiff.errors", "InputError"),
    "settings": ("invdiff.settings", None),
    "tasks": ("invdiff.tasks", None),
    "mask": ("invdiff.operators.masks", "make_mask"),
    "read_scan": ("invdiff.datasets.fastmri", "read_scan"),
    "write_reconstruction": ("invdiff.datasets.submission", "write_reconstruction"),
    "load_prior": ("invdiff.priors.loading", "load_prior"),
    "SampleResult": ("invdiff.samplers._common", "SampleResult"),
    "metrics": ("invdiff.metrics", None),
    "callbacks": ("invdiff.callbacks", None),
    "normalise": ("invdiff.normalisation", "normalise"),
    "denormalise": ("invdiff.normalisation", "denormalise"),
    "prior_info": ("invdiff.priors.loading", "prior_info"),
    "ScanError": ("invdiff.datasets.fastmri", "ScanError"),
    "FastMRIDataset": ("invdiff.datasets.fastmri", "FastMRIDataset"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'invdiff' has no attribute {name!r}")


__all__ = [
    "sample", "registry", "operator", "example_operator", "list_operators", "list_priors", "list_solvers",
    "list_samplers", "load_plugins", "register_operator", "register_prior", "register_solver", "register_sampler",
    "__version__", *_LAZY,
]
