"""A dense matrix as an operator, ``y = A vec(x)``, and :func:`to_dense`, the matrix of any operator.

These are the tools of the oracle tests: small problems (1-D, 2-D, d = 16) whose posterior is known in
closed form (``invdiff.priors.analytic``), and brute-force checks of real operators on tiny images.

    >>> op = MatrixOperator(torch.randn(7, 12, dtype=torch.float64), in_shape=(1, 3, 4))
    >>> op.A(torch.randn(2, 1, 3, 4, dtype=torch.float64)).shape
    torch.Size([2, 7])
"""
from __future__ import annotations

import math

import torch

from invdiff.operators.base import Operator
from invdiff.registry import register_operator

MAX_DENSE_DIM = 4096
"""Largest image dimension ``d`` for which :func:`to_dense` builds a matrix (``d`` columns, float64)."""


def _example_matrix_operator() -> "MatrixOperator":
    # A fixed, well-conditioned 7 x 12 matrix: underdetermined, so A_dagger is a true pseudo-inverse.
    generator = torch.Generator().manual_seed(20240607)
    matrix = torch.randn(7, 12, generator=generator, dtype=torch.float64) / math.sqrt(12)
    return MatrixOperator(matrix, in_shape=(1, 3, 4))


@register_operator("matrix", example=_example_matrix_operator)
class MatrixOperator(Operator):
    """A dense real matrix acting on flattened images, ``y = A vec(x)``.

    matrix: (m, d) real, d = prod(in_shape); x: (B, *in_shape) -> y: (B, m). Computes in the input's
    precision (the matrix is cast to ``x.dtype`` at call time). ``A_dagger`` is the exact Moore-Penrose
    pseudo-inverse, computed once in float64 at construction (``torch.linalg.pinv``) and kept as a buffer;
    it is recomputed in float64 when a float64 input meets a lower-precision operator.
    """

    has_exact_pinv = True

    def __init__(self, matrix: torch.Tensor, in_shape: tuple[int, ...]):
        super().__init__()
        matrix = torch.as_tensor(matrix)
        if matrix.ndim != 2 or matrix.is_complex() or not matrix.is_floating_point():
            raise ValueError(f"matrix must be a real floating (m, d) tensor, got dtype {matrix.dtype} "
                             f"and shape {tuple(matrix.shape)}")
        in_shape = tuple(int(n) for n in in_shape)
        if not in_shape or any(n < 1 for n in in_shape):
            raise ValueError(f"in_shape must be a non-empty tuple of positive sizes, got {in_shape}")
        if math.prod(in_shape) != matrix.shape[1]:
            raise ValueError(f"in_shape {in_shape} has {math.prod(in_shape)} entries but matrix has "
                             f"{matrix.shape[1]} columns; expected d = prod(in_shape)")
        self._in_shape = in_shape
        self.register_buffer("matrix", matrix.clone())
        self.register_buffer("pinv", torch.linalg.pinv(matrix.to(torch.float64)).to(matrix.dtype))

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self._in_shape

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self._in_shape:
            raise ValueError(f"MatrixOperator expects x of shape (B, {', '.join(map(str, self._in_shape))}), "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def _check_measurement(self, y: torch.Tensor) -> None:
        if y.ndim != 2 or y.shape[1] != self.matrix.shape[0]:
            raise ValueError(f"MatrixOperator expects y of shape (B, {self.matrix.shape[0]}), got {tuple(y.shape)}")

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y = x_flat A^T``: (B, *in_shape) -> (B, m)."""
        return self._flatten(x) @ self.matrix.to(x.dtype).T

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^T y``: (B, m) -> (B, *in_shape)."""
        self._check_measurement(y)
        return (y @ self.matrix.to(y.dtype)).reshape(y.shape[0], *self._in_shape)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """Minimum-norm least-squares solution ``A^+ y``: (B, m) -> (B, *in_shape)."""
        self._check_measurement(y)
        pinv = self.pinv
        if torch.finfo(y.dtype).bits > torch.finfo(pinv.dtype).bits:
            # A float32-rounded pseudo-inverse is not exact enough for float64 oracle checks.
            pinv = torch.linalg.pinv(self.matrix.to(y.dtype))
        return (y @ pinv.to(y.dtype).T).reshape(y.shape[0], *self._in_shape)


def to_dense(operator: Operator, in_shape: tuple[int, ...] | None = None, *,
             max_dim: int = MAX_DENSE_DIM, chunk: int = 256) -> torch.Tensor:
    """The (m, d) float64 matrix of a linear operator: column j is ``vec(A e_j)``.

    operator: any invdiff operator (it must compute in its input's precision, as the contract requires);
    in_shape: image shape without batch, default ``operator.in_shape``; d = prod(in_shape) <= max_dim.
    The basis vectors go through ``A`` ``chunk`` at a time, in float64, on the operator's device.
    For a :class:`MatrixOperator` this is its matrix in float64.
    """
    in_shape = tuple(operator.in_shape if in_shape is None else in_shape)
    d = math.prod(in_shape)
    if d > max_dim:
        raise ValueError(f"to_dense: image dimension d = {d} (in_shape {in_shape}) exceeds max_dim = {max_dim}; "
                         f"a dense matrix is for tiny images only")
    if isinstance(operator, MatrixOperator):
        return operator.matrix.to(torch.float64)
    device = operator.device
    columns = []
    for start in range(0, d, chunk):
        stop = min(start + chunk, d)
        basis = torch.zeros(stop - start, d, dtype=torch.float64, device=device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        out = operator.A(basis.reshape(stop - start, *in_shape))
        if out.is_complex() or out.dtype != torch.float64:
            raise ValueError(f"to_dense: {type(operator).__name__}.A returned {out.dtype} for float64 input; "
                             f"expected real float64 (operators compute in their input's precision)")
        columns.append(out.reshape(stop - start, -1))
    return torch.cat(columns).T.contiguous()
