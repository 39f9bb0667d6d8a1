"""Masked token prior for APS: the protocol (``TokenPrior``).

The tokenizer and masked transformer networks and their training follow in this module.
"""
from __future__ import annotations

import torch
from torch import nn


class TokenPrior(nn.Module):
    """The discrete prior protocol the token samplers (``aps``, ``masked-diffusion``) talk to.

    A tokenizer and a masked token model over ``K = num_codes`` codes, with ``mask_id = K``:

    - ``grid_for(image_shape) -> (h, w)``: the token grid of an image of shape (..., H, W); ``L = h w``;
    - ``encode(x) -> ids``: (B, C, H, W) -> (B, L) long;
    - ``decode(e, grid) -> x``: codebook embeddings (B, L, D) -> (B, C, H, W), differentiable in ``e``;
    - ``codebook``: (K, D), the embedding ``c_k`` of code ``k``;
    - ``logits(ids, mask, grid) -> (B, L, K)``: ``log x_theta(Z)``, the model's categorical at every position
      given the unmasked tokens (ids (B, L) long, mask (B, L) bool, True = masked; ids at masked positions are
      ignored). Only the masked positions' rows are used by the samplers.
    """

    num_codes: int

    @property
    def mask_id(self) -> int:
        return int(self.num_codes)

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def grid_for(self, image_shape) -> tuple[int, int]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, embeddings: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError
