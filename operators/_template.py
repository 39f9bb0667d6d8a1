"""Template for a new operator: copy this file, rename two names, replace the maths.

This file is skipped by ``invdiff.load_plugins`` because its name starts with ``_``. As shipped it is a
complete, working operator (a per-pixel weighting ``y = w * x``), so a copy passes the contract tests
before you change anything; then replace the maths step by step and re-run them.

1. Copy it under the name of your operator (no leading underscore):
       cp operators/_template.py operators/my_blur.py
2. Rename the registered name ``"my_operator"`` below (required: names must be unique) and the class.
3. Fill in ``__init__`` (arguments and buffers), ``in_shape``, ``A`` and ``A_adjoint``; optionally
   ``A_dagger`` and ``A_adjoint_A``, the two class flags, and a small ``example``. Then run
       pytest tests/test_operator_contract.py -k my_operator
"""
from __future__ import annotations

import torch

# Import only the public API: the base class and the registry decorator.
from invdiff.operators.base import Operator
from invdiff.registry import register_operator


# ``example`` builds a *small* instance (tens of pixels): the contract tests run on it in float32 and
# float64. Every registered operator should give one, or its contract tests cannot run.
@register_operator("my_operator",
                   example=lambda: MyOperator(torch.linspace(0.1, 1.0, 48).reshape(6, 8), channels=2))
class MyOperator(Operator):
    """Per-pixel weighting ``y = w x`` (replace with your model, in one line of math).

    x: (B, C, H, W) real, float32 or float64; y: (B, C, H, W), same dtype.
    weights: (H, W) real with |w| <= 1, broadcast over batch and channels.
    """

    # True only if ||A|| <= 1 for every instance (the contract tests check it by power iteration).
    normalized = True
    # True if A_dagger below is a closed form; otherwise delete A_dagger and the base class solves
    # A^T A x = A^T y by conjugate gradients (correct, but iterative: keep it out of per-step loops).
    has_exact_pinv = True

    # Constructor arguments are recorded automatically, so ``op.replace(weights=...)`` makes a changed
    # copy. Take everything that defines the operator as a named argument; validate it here, with a
    # ValueError that names the argument, the expected and the actual value.
    def __init__(self, weights, channels: int = 1):
        super().__init__()
        weights = torch.as_tensor(weights)
        if weights.ndim != 2 or weights.is_complex() or weights.abs().max() > 1:
            raise ValueError(f"weights must be a real (H, W) tensor with |w| <= 1, got shape "
                             f"{tuple(weights.shape)}, dtype {weights.dtype}")
        self.channels = channels
        # Tensors are buffers, never plain attributes: then .to(device) / .to(dtype) move them, and
        # state_dict() saves them. Store real tensors; a complex one would lose its imaginary part in
        # .to(float32): keep real and imaginary parts as two real buffers instead.
        self.register_buffer("weights", weights.clone())

    @property
    def in_shape(self) -> tuple[int, ...]:
        """One input image without the batch dimension (the contract tests draw x of this shape)."""
        return (self.channels, *self.weights.shape)

    # A and A_adjoint must not store anything on self (no caches): one operator is shared by samplers,
    # threads and devices. Compute in the input's precision: cast buffers to x.dtype at call time
    # (for complex maths, build complex64 from float32 input and complex128 from float64 input) and
    # return a real tensor.
    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``y = w x``."""
        return self.weights.to(x.dtype) * x

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^T y = w y``: the exact transpose, so that <A x, y> = <x, A^T y> to rounding."""
        return self.weights.to(y.dtype) * y

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^+ y = y / w`` where ``w != 0`` and 0 elsewhere (minimum-norm least squares)."""
        weights = self.weights.to(y.dtype)
        nonzero = weights != 0
        return torch.where(nonzero, y / torch.where(nonzero, weights, 1.0), 0.0)

    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``A^T A x = w^2 x`` (optional: the base class computes A_adjoint(A(x)); deepinv's solvers use it too)."""
        return self.weights.to(x.dtype) ** 2 * x
