"""Priors: the denoiser protocol, analytic oracles, our UNet, adapters for foreign checkpoints."""
from invdiff._autoload import import_submodules
from invdiff.priors.base import Denoiser, SliceDenoiser

import_submodules(__name__, __path__)

__all__ = ["Denoiser", "SliceDenoiser"]
