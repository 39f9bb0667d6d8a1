"""Super-resolution: blur with a separable anti-aliasing kernel, then keep every ``factor``-th pixel.

``y = S_f (h * x)`` with periodic boundaries, so the operator is a Kronecker product ``A = A_H (x) A_W`` of
two 1-D "circular convolution + decimation" matrices and ``A x = A_H x A_W^T`` per image.

Why periodic: ``A_H A_H^T`` is then circulant on the low-resolution grid, so the exact pseudo-inverse
``A^+ = A^T (A A^T)^{-1}`` costs two FFTs of the small image instead of an iterative solve.
"""
from __future__ import annotations

import math

import torch

from invdiff.operators.base import Operator, check_positive
from invdiff.registry import register_operator

FACTORS = (2, 4)
KERNELS = ("box", "bicubic")

# (A A^T) eigenvalues below PINV_RTOL * largest are treated as zero (pseudo-inverse of the Gram matrix).
# Both kernels keep the Gram matrix well conditioned (smallest/largest eigenvalue per axis ~0.47 for
# bicubic x2 and x4, exactly 1 for box), so on these kernels the guard never fires; it is there so that a
# future kernel with a spectral zero gives the pseudo-inverse instead of Inf.
PINV_RTOL = 1e-10


def keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (support [-2, 2]); ``a = -0.5`` is the value PIL and torch use."""
    t = t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def downsampling_taps(factor: int, kernel: str) -> tuple[torch.Tensor, int]:
    """Taps ``h`` and first offset ``m0`` with ``y[i] = sum_r h[r] x[factor * i + m0 + r]`` (float64).

    The low-resolution pixel ``i`` sits at the centre of input pixels ``factor*i .. factor*i + factor - 1``
    (half-pixel convention, ``align_corners=False``). ``bicubic`` is the anti-aliased kernel of
    PIL/``imresize``: the Keys kernel stretched by ``factor``, sampled at the input pixel centres and
    normalised to sum 1.
    """
    if kernel == "box":
        return torch.full((factor,), 1.0 / factor, dtype=torch.float64), 0
    offsets = torch.arange(-2 * factor, 3 * factor, dtype=torch.float64)
    # distance from the output pixel centre, in output pixels: (m + 1/2 - f/2) / f
    t = (offsets + 0.5 - factor / 2) / factor
    inside = t.abs() < 2
    taps = keys_cubic(t[inside])
    return taps / taps.sum(), int(offsets[inside][0])


def decimation_matrix(size: int, factor: int, kernel: str) -> torch.Tensor:
    """Dense ``(size // factor, size)`` float64 matrix of periodic convolution followed by decimation."""
    taps, first = downsampling_taps(factor, kernel)
    rows = torch.arange(size // factor).unsqueeze(1)
    columns = (factor * rows + first + torch.arange(len(taps))) % size       # periodic wrap
    matrix = torch.zeros(size // factor, size, dtype=torch.float64)
    # index_put with accumulate: taps that wrap onto the same column (tiny images) add up, as they should
    matrix.index_put_((rows.expand_as(columns), columns), taps.expand_as(columns), accumulate=True)
    return matrix


def circulant_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric circulant matrix: the DFT of its first column (real)."""
    return torch.fft.fft(gram[:, 0]).real


def _as_size(img_size) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    size = tuple(int(s) for s in img_size)
    if len(size) == 3:  # (C, H, W), as deepinv writes img_size
        size = size[1:]
    if len(size) != 2:
        raise ValueError(f"img_size must be H, (H, W) or (C, H, W); got {img_size!r}")
    return size


@register_operator("super_resolution",
                   example=lambda: SuperResolution((16, 24), factor=2, kernel="bicubic", channels=2))
class SuperResolution(Operator):
    """Periodic anti-aliased downsampling by ``factor``, ``y = S_f (h * x)``, i.e. ``y = A_H x A_W^T``.

    x: (B, C, H, W) real, float32 or float64; y: (B, C, H / factor, W / factor), same dtype.
    factor: 2 or 4 (H and W must be divisible by it). kernel:

    - ``"box"``: average pooling over ``factor x factor`` blocks; ``A A^T = I / f^2``, so
      ``A^+ = f^2 A^T`` and ``||A|| = 1 / f``.
    - ``"bicubic"``: the anti-aliased bicubic kernel of PIL / ``imresize`` (Keys, a = -0.5, stretched by
      ``f``, normalised to sum 1), with a *periodic* boundary: it equals
      ``F.interpolate(x, scale_factor=1/f, mode="bicubic", antialias=True)`` away from the border (to
      rounding), and differs within ``2 f`` input pixels of it, where torch truncates and renormalises
      the kernel instead. ``A^+ = A^T (A A^T)^{-1}`` is exact, by FFT on the low-resolution grid.

    ``||A|| = sqrt(max eig(A_H A_H^T) max eig(A_W A_W^T)) = 1/f`` for both kernels (the maximum sits at
    zero frequency even with bicubic's negative lobes), see :meth:`spectral_norm`; hence ``normalized``.

    >>> op = SuperResolution(64, factor=4, kernel="bicubic", channels=3)
    >>> op.A(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 3, 16, 16])
    """

    normalized = True
    has_exact_pinv = True

    def __init__(self, img_size, factor: int = 2, kernel: str = "bicubic", channels: int = 1):
        super().__init__()
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        check_positive("channels", channels)
        height, width = _as_size(img_size)
        if height % factor or width % factor:
            raise ValueError(f"img_size must be divisible by factor={factor}; got (H, W) = ({height}, {width})")
        self.factor, self.kernel, self.channels = factor, kernel, int(channels)
        self.size = (height, width)
        matrix_h = decimation_matrix(height, factor, kernel)
        matrix_w = decimation_matrix(width, factor, kernel)
        self.register_buffer("matrix_h", matrix_h)
        self.register_buffer("matrix_w", matrix_w)
        # A A^T = (A_H A_H^T) (x) (A_W A_W^T); both factors are circulant on the low-resolution grid.
        self.register_buffer("gram_eigenvalues_h", circulant_eigenvalues(matrix_h @ matrix_h.T))
        self.register_buffer("gram_eigenvalues_w", circulant_eigenvalues(matrix_w @ matrix_w.T))

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def A(self, x: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``y = A_H x A_W^T`` per image and channel."""
        return self.matrix_h.to(x.dtype) @ x @ self.matrix_w.to(x.dtype).T

    def A_adjoint(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """``A^T y = A_H^T y A_W``."""
        return self.matrix_h.to(y.dtype).T @ y @ self.matrix_w.to(y.dtype)

    def A_dagger(self, y: torch.Tensor, **kwargs) -> torch.Tensor:  # noqa: N802
        """Exact minimum-norm solution ``A^+ y = A^T (A A^T)^+ y`` (closed form, no iterations)."""
        if self.kernel == "box":
            return self.factor ** 2 * self.A_adjoint(y)
        eigenvalues = (self.gram_eigenvalues_h.to(y.dtype).unsqueeze(1)
                       * self.gram_eigenvalues_w.to(y.dtype).unsqueeze(0))
        kept = eigenvalues > PINV_RTOL * eigenvalues.max()
        inverse = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
        z = torch.fft.ifft2(torch.fft.fft2(y) * inverse).real
        return self.A_adjoint(z)

    def spectral_norm(self) -> float:
        """Exact ``||A||_2``: square root of the largest eigenvalue of ``A A^T``."""
        return math.sqrt(float(self.gram_eigenvalues_h.max() * self.gram_eigenvalues_w.max()))
