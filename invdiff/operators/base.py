"""The operator base class: a deepinv ``LinearPhysics`` with sigpy-style algebra and value semantics.

An operator is defined by its buffers (masks, coil maps, angles) and constructor arguments; ``A`` and
``A_adjoint`` never store anything, so one operator can be shared by samplers, threads and devices.
To change a parameter, make a new operator with :meth:`Operator.replace`; the original is unchanged.

Tensors are real: images ``(B, C, H, W)`` (complex images as ``C = 2``, real and imaginary), so every
sampler sees plain real vectors and Gaussian noise with per-entry variance ``sigma^2``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from deepinv.physics import LinearPhysics


class Operator(LinearPhysics):
    """Base class of every invdiff operator: implement ``A``, ``A_adjoint`` and ``in_shape``.

    Subclasses may override ``A_dagger`` (closed-form pseudo-inverse) and ``A_adjoint_A`` (``A^H A``, deepinv's
    name, so deepinv's own solvers get the fast closed form too).
    Constructor arguments are recorded automatically, so :meth:`replace` works for user operators too.

    Class attributes:
        normalized: True when ``||A|| <= 1`` by construction (the contract tests check it).
        has_exact_pinv: True when ``A_dagger`` is a closed form rather than an iterative solve.
    """

    normalized: ClassVar[bool] = False
    has_exact_pinv: ClassVar[bool] = False
    registered_name: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            # Only the outermost constructor call records its arguments: a subclass's __init__ that
            # calls super().__init__(...) must not overwrite them with the parent's.
            if "_init_arguments" not in self.__dict__:
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(bound.arguments)
                arguments.pop(next(iter(signature.parameters)))  # self
                for name, param in signature.parameters.items():
                    if param.kind is inspect.Parameter.VAR_KEYWORD:
                        arguments.update(arguments.pop(name, {}))
                    elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                        raise TypeError(f"{cls.__name__}.__init__ takes *{name}; operators need named arguments")
                object.__setattr__(self, "_init_arguments", arguments)
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def __init__(self):
        super().__init__()

    # ---- what a subclass defines -------------------------------------------------------------------
    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input image without the batch dimension, e.g. ``(2, H, W)``."""
        raise NotImplementedError(f"{type(self).__name__} must define in_shape")

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        raise NotImplementedError(f"{type(self).__name__} must define A")

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        raise NotImplementedError(f"{type(self).__name__} must define A_adjoint")

    def image_support(self) -> torch.Tensor | None:
        """Pixels the model defines the image on, as a bool (B|1, 1, H, W) tensor, or None (all of them).

        SENSE with ESPIRiT maps is the case in point: the maps are zero outside the object, so there ``A x``
        does not depend on ``x`` and the measurements carry no information; a generative prior is free to paint
        anything there. Reconstruction pipelines zero every solver's output outside the support
        (:func:`restrict_to_support`), as ESPIRiT-based reconstructions do.
        """
        return None

    # ---- derived algebra ---------------------------------------------------------------------------
    def A_adjoint_A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802 (deepinv's name)
        """``A^H A x``; override where a closed form is cheaper (deepinv's solvers call this one)."""
        return self.A_adjoint(self.A(x))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """Deprecated name of :meth:`A_adjoint_A` (plugins written against it keep working)."""
        return self.A_adjoint_A(x)

    def A_dagger(self, y: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-6, **kwargs) -> torch.Tensor:  # noqa: N802
        """Minimum-norm least-squares solution ``A^+ y`` by conjugate gradients on the normal equations.

        Subclasses with a closed form override this. Started from zero, CG on ``A^H A x = A^H y`` stays in
        the row space of ``A``, so it converges to the minimum-norm solution.
        """
        return conjugate_gradient(self.A_adjoint_A, self.A_adjoint(y), max_iter=max_iter, tol=tol)

    def replace(self, **changes: Any) -> "Operator":
        """A new operator with some constructor arguments changed, on the same device; ``self`` is unchanged.

        >>> op_next = op.replace(mask=op.mask | new_lines)
        """
        unknown = set(changes) - set(self._init_arguments)
        if unknown:
            raise TypeError(f"{type(self).__name__}.replace: unknown argument(s) {sorted(unknown)}; "
                            f"expected some of {sorted(self._init_arguments)}")
        new = type(self)(**{**self._init_arguments, **changes})
        return new.to(self.device)

    @property
    def device(self) -> torch.device:
        for tensor in list(self.buffers()) + list(self.parameters()):
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        shown = []
        for key, value in self._init_arguments.items():
            if isinstance(value, torch.Tensor):
                value = f"Tensor{tuple(value.shape)}"
            shown.append(f"{key}={value}")
        return ", ".join(shown)


def conjugate_gradient(normal, rhs: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-6,
                       x0: torch.Tensor | None = None, return_residual: bool = False):
    """Solve ``normal(x) = rhs`` for a Hermitian positive semi-definite ``normal``, batch-wise.

    Each batch element has its own step sizes (inner products over all non-batch axes). Stops when every
    element's residual is below ``tol`` relative to its ``rhs``. return_residual: also return each element's
    relative residual ``|rhs - normal(x)| / |rhs|`` as CG's recursion tracks it (shape (B,); no extra ``normal``
    call, and equal to the true residual up to rounding over the few iterations of a well-conditioned solve).
    """
    dims = tuple(range(1, rhs.ndim))
    tiny = torch.finfo(rhs.dtype).tiny

    def dot(a, b):
        return (a * b).sum(dim=dims, keepdim=True)

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - normal(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rs = dot(r, r)
    rhs_sq = dot(rhs, rhs).clamp_min(tiny)
    threshold = (tol ** 2) * rhs_sq
    for _ in range(max_iter):
        if bool((rs <= threshold).all()):
            break
        Ap = normal(p)
        alpha = rs / dot(p, Ap).clamp_min(tiny)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = dot(r, r)
        p = r + (rs_new / rs.clamp_min(tiny)) * p
        rs = rs_new
    if return_residual:
        return x, (rs / rhs_sq).sqrt().reshape(-1)
    return x


def check_positive(name: str, value: float, *, strict: bool = True) -> float:
    """Validate a scalar argument with an error that names it."""
    ok = value > 0 if strict else value >= 0
    if not ok:
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")
    return value


def zero_outside(x: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the pixels where the bool ``support`` is False set to zero (``x`` itself when it is None)."""
    if support is None:
        return x
    return torch.where(support.to(x.device), x, torch.zeros((), dtype=x.dtype, device=x.device))


def restrict_to_support(operator, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the pixels outside ``operator.image_support()`` set to zero (``x`` itself when there is none)."""
    return zero_outside(x, operator.image_support() if hasattr(operator, "image_support") else None)
