"""invdiff: imaging inverse problems with diffusion priors.

    >>> import invdiff
    >>> invdiff.list_operators()
"""
from __future__ import annotations

import logging

from invdiff import registry
from invdiff.problem import InverseProblem, simulate
from invdiff.registry import (example_operator, list_operators, list_priors, list_samplers, load_plugins,
                              operator, register_operator, register_prior, register_sampler)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "InverseProblem", "simulate", "registry", "operator", "example_operator", "list_operators",
    "list_priors", "list_samplers", "load_plugins", "register_operator", "register_prior",
    "register_sampler", "__version__",
]
