"""Limited-angle CT: parallel-beam projections only inside a wedge of view angles.

A user operator in the plugin folder: ``invdiff.load_plugins()`` imports this file, the decorator
registers it, and the contract tests pick up its example. It only uses invdiff's public API.

    >>> op = invdiff.operator("limited_angle_ct", img_size=128, max_angle=120, num_angles=80)
    >>> y = op.A(x)                        # x: (B, 1, 128, 128) -> y: (B, 1, 80, 182)
"""
import numpy as np

from invdiff.operators.ct import ParallelBeamCT
from invdiff.registry import register_operator


@register_operator("limited_angle_ct", example=lambda: LimitedAngleCT(24, max_angle=120.0, num_angles=6))
class LimitedAngleCT(ParallelBeamCT):
    """Parallel-beam CT with ``num_angles`` equispaced views in ``[start_angle, start_angle + max_angle)``
    degrees, ``0 < max_angle <= 180``: directions outside the wedge are never measured (a missing wedge
    in Fourier space), so ``A`` has a large null space that only a prior can fill.

    x: (B, 1, H, W) float32/float64; y: (B, 1, num_angles, num_detectors), same dtype.
    """

    def __init__(self, img_size, max_angle: float = 120.0, num_angles: int = 60, start_angle: float = 0.0,
                 num_detectors=None, detector_spacing: float = 1.0):
        if not 0 < max_angle <= 180:
            raise ValueError(f"max_angle must be in (0, 180] degrees, got {max_angle!r}")
        if isinstance(num_angles, bool) or not isinstance(num_angles, (int, np.integer)) or num_angles < 1:
            raise ValueError(f"num_angles must be a positive int, got {num_angles!r}")
        angles = start_angle + np.arange(num_angles) * (max_angle / num_angles)
        super().__init__(img_size, angles, num_detectors=num_detectors, detector_spacing=detector_spacing)
