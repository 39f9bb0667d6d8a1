"""Posterior samplers and classical baselines, one file per method (``invdiff.registry``)."""
from invdiff._autoload import import_submodules

import_submodules(__name__, __path__)
