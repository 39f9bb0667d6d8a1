"""Built-in forward operators. Importing this package registers every module in it (``invdiff.registry``)."""
from invdiff._autoload import import_submodules
from invdiff.operators.base import Operator, conjugate_gradient

import_submodules(__name__, __path__)

__all__ = ["Operator", "conjugate_gradient"]
