"""The one exception type for bad input.

Anything a user can get wrong (a file, a flag, a hyperparameter, a shape they passed) raises
:class:`InputError` with one line naming what, where, what was expected and what was found; the command line
prints that line and exits 2. Every other exception is a bug in invdiff and keeps its traceback (exit 1).
It subclasses ``ValueError``, so callers that catch ``ValueError`` keep working.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: reported in one line, exit status 2 on the command line."""


class UnsupportedOperatorError(InputError):
    """A solver cannot run on this operator (DDRM without an SVD, FBP without a CT geometry): a comparison shows
    the row as ``n/a`` with this reason and goes on."""


__all__ = ["InputError", "UnsupportedOperatorError"]
