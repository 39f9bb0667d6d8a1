"""Pure shared pieces of the samplers: the result type and small helpers with no sampler logic."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SampleResult:
    """What every sampler and baseline returns.

    x: the reconstruction ``(B, C, H, W)`` (the posterior mean estimate or the single sample);
    diagnostics: at least ``nfe`` (network evaluations) and ``seconds``, plus method-specific records;
    samples: optional ensemble ``(N, B, C, H, W)`` and ``weights`` ``(N, B)`` for samplers that keep one;
    trajectory: optional list of intermediate states recorded by a callback.
    """

    x: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    trajectory: list | None = None
