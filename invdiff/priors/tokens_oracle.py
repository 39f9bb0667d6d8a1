r"""An exact discrete oracle for token samplers: a tiny token grid with an explicit joint, enumerated.

The model: ``L = h w`` positions (4 to 9), ``K`` codes (4 to 16), a joint over all ``K^L`` configurations

    log p(z) = sum_i u_i[z_i] + sum_{(i, j) grid neighbours} J_ij[z_i, z_j] - log Z,

with random unary ``u`` and pairwise ``J`` tables (``J`` leans towards equal neighbours, so the positions are
correlated and the masked conditionals matter), a codebook ``c_k`` in ``R^D`` and a fixed linear decoder
``x = G vec(e)``, ``e_i = c_{z_i}``. Everything the samplers need is exact by enumeration:

- the masked model ``p(z_i = k | z_U)`` for every masked position ``i`` given the unmasked tokens ``z_U``
  (the marginal of the joint restricted to configurations that agree with ``z_U``): the ``x_theta(Z)`` of an
  absorbing-state masked diffusion trained to perfection;
- the posterior under ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)``:
  ``p(z | y) ∝ p(z) exp(-||A G vec(c_z) - y||^2 / (2 sigma_y^2))`` over all configurations.

Configurations are indexed ``sum_i z_i K^(L - 1 - i)`` (position 0 most significant), the order of
:attr:`DiscreteOracle.configurations`; histograms of sampled ids use the same index
(:meth:`DiscreteOracle.config_index`).

    >>> oracle = DiscreteOracle.random(grid=(2, 3), num_codes=4, generator=torch.Generator().manual_seed(0))
    >>> op = MatrixOperator(matrix, in_shape=oracle.image_shape)
    >>> problem = simulate(op, oracle.decode_ids(oracle.sample(1, generator)), 0.1, generator)
    >>> posterior = oracle.posterior(problem)                    # (1, K^L), sums to 1
"""
from __future__ import annotations

import itertools
import math

import torch

from invdiff.priors.tokens import TokenPrior

MAX_CONFIGURATIONS = 2 ** 18
"""Largest ``K^L`` the oracle enumerates (262,144: L = 9 with K = 4, L = 6 with K = 8, L = 4 with K = 16)."""


class DiscreteOracle(TokenPrior):
    """Explicit joint over a ``(h, w)`` token grid with ``K`` codes, a codebook and a linear decoder.

    log_joint: (K^L,) float64 log-probabilities (normalised here); codebook: (K, D); decoder: (prod(image_shape),
    L D) real, ``x = decoder @ vec(e)`` with ``vec(e)`` the (L, D) embeddings flattened row-major; image_shape:
    (C, H, W). Computes in float64 (samplers' state may be float32: the boundary casts).
    """

    def __init__(self, log_joint: torch.Tensor, codebook: torch.Tensor, decoder: torch.Tensor,
                 grid: tuple[int, int], image_shape: tuple[int, int, int]):
        super().__init__()
        h, w = (int(n) for n in grid)
        num_codes, dim = codebook.shape
        length = h * w
        if num_codes ** length > MAX_CONFIGURATIONS:
            raise ValueError(f"K^L = {num_codes}^{length} = {num_codes ** length} configurations; the oracle "
                             f"enumerates at most {MAX_CONFIGURATIONS}")
        if log_joint.shape != (num_codes ** length,):
            raise ValueError(f"log_joint must have shape ({num_codes ** length},) = (K^L,), "
                             f"got {tuple(log_joint.shape)}")
        if decoder.shape != (math.prod(image_shape), length * dim):
            raise ValueError(f"decoder must have shape ({math.prod(image_shape)}, {length * dim}) = "
                             f"(prod(image_shape), L D), got {tuple(decoder.shape)}")
        self.grid = (h, w)
        self.num_codes = int(num_codes)
        self.image_shape = tuple(int(n) for n in image_shape)
        configurations = torch.tensor(list(itertools.product(range(num_codes), repeat=length)), dtype=torch.long)
        self.register_buffer("configurations", configurations)                   # (N, L)
        self.register_buffer("log_joint", torch.log_softmax(log_joint.to(torch.float64), dim=0))
        self.register_buffer("codebook", codebook.to(torch.float64).clone())
        self.register_buffer("decoder", decoder.to(torch.float64).clone())
        # one-hot of every configuration, (N, L K): the masked marginals are one matrix product
        self.register_buffer("_one_hot", torch.nn.functional.one_hot(configurations, num_codes)
                             .reshape(len(configurations), -1).to(torch.float64))

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def random(cls, *, grid: tuple[int, int] = (2, 3), num_codes: int = 4, dim: int = 2, patch: int = 2,
               coupling: float = 1.0, leak: float = 0.1, generator: torch.Generator | None = None) -> "DiscreteOracle":
        """A random oracle: unary N(0, 1) tables, neighbour couplings ``coupling (I + N(0, 0.5^2))``, codes
        N(0, I_D), and a decoder that paints token ``i`` as a ``patch x patch`` block of one channel (a fixed
        random ``patch^2 x D`` map per block) plus a weak random leak ``leak N(0, 1)`` to every pixel (so A G is not
        block diagonal even for a diagonal A). ``coupling=0, leak=0`` with a block-diagonal A gives a posterior that
        factorises over positions."""
        h, w = grid
        length = h * w
        configurations = torch.tensor(list(itertools.product(range(num_codes), repeat=length)), dtype=torch.long)
        unary = torch.randn(length, num_codes, generator=generator, dtype=torch.float64)
        energy = unary[torch.arange(length), configurations].sum(dim=1)
        for i in range(length):
            r, c = divmod(i, w)
            for j in ((i + 1) if c + 1 < w else None, (i + w) if r + 1 < h else None):
                if j is None:
                    continue
                table = coupling * (torch.eye(num_codes, dtype=torch.float64)
                                    + 0.5 * torch.randn(num_codes, num_codes, generator=generator, dtype=torch.float64))
                energy = energy + table[configurations[:, i], configurations[:, j]]
        codebook = torch.randn(num_codes, dim, generator=generator, dtype=torch.float64)
        height, width = h * patch, w * patch
        decoder = leak * torch.randn(height * width, length * dim, generator=generator, dtype=torch.float64)
        blocks = torch.randn(length, patch * patch, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
        for i in range(length):
            r, c = divmod(i, w)
            pixels = [(r * patch + a) * width + (c * patch + b) for a in range(patch) for b in range(patch)]
            decoder[pixels, i * dim:(i + 1) * dim] += blocks[i]
        return cls(energy, codebook, decoder, grid, (1, height, width))

    # ---- the TokenPrior protocol -------------------------------------------------------------------------
    def grid_for(self, image_shape) -> tuple[int, int]:
        if tuple(image_shape[-2:]) != self.image_shape[-2:]:
            raise ValueError(f"this oracle decodes to images of shape {self.image_shape}; got {tuple(image_shape)}")
        return self.grid

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``log p(z_i = k | z_U)`` at every position, (B, L, K) float64; unmasked positions: their own token
        (log 1 = 0, every other code -inf-like)."""
        return self.conditionals(ids, mask).clamp_min(1e-300).log()

    def decode(self, embeddings: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``x = G vec(e)``: (B, L, D) -> (B, C, H, W), linear and differentiable."""
        flat = embeddings.reshape(embeddings.shape[0], -1)
        return (flat @ self.decoder.to(flat.dtype).T).reshape(flat.shape[0], *self.image_shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The configuration whose decoded image is nearest to ``x`` (least squares over all K^L): (B, L)."""
        images = self.decode_ids(self.configurations).reshape(len(self.configurations), -1)
        distances = torch.cdist(x.reshape(x.shape[0], -1).to(torch.float64), images)
        return self.configurations[distances.argmin(dim=1)]

    # ---- exact quantities ---------------------------------------------------------------------------------
    def config_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) configuration index ``sum_i z_i K^(L - 1 - i)``."""
        length = ids.shape[-1]
        powers = self.num_codes ** torch.arange(length - 1, -1, -1, device=ids.device)
        return (ids.long() * powers).sum(dim=-1)

    def histogram(self, ids: torch.Tensor) -> torch.Tensor:
        """Empirical distribution over the K^L configurations of a batch of (B, L) ids: (K^L,) float64."""
        counts = torch.bincount(self.config_index(ids), minlength=len(self.configurations))
        return counts.to(torch.float64) / ids.shape[0]

    def conditionals(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``p(z_i = k | z_U)``, (B, L, K) float64, by enumeration: the joint restricted to configurations that
        agree with the unmasked tokens, marginalised per position. ids: (B, L) long (values at masked positions
        are ignored); mask: (B, L) bool, True where masked."""
        agree = (self.configurations[None] == ids[:, None, :].long()) | mask[:, None, :]      # (B, N, L)
        consistent = agree.all(dim=2)
        log_weights = self.log_joint[None].masked_fill(~consistent, -math.inf)
        weights = torch.softmax(log_weights, dim=1)                                           # p(z | z_U)
        return (weights @ self._one_hot).reshape(ids.shape[0], ids.shape[1], self.num_codes)

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, C, H, W) float64 images."""
        return self.decode(self.codebook[ids.long()])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the joint, (n, L) long."""
        index = torch.multinomial(self.log_joint.exp(), n, replacement=True, generator=generator)
        return self.configurations[index]

    def log_likelihood(self, problem) -> torch.Tensor:
        """``-||A G vec(c_z) - y_b||^2 / (2 sigma_y^2)`` for every configuration and every y_b: (B, N) float64."""
        images = self.decode_ids(self.configurations)
        measured = problem.operator.A(images).reshape(len(images), -1).to(torch.float64)      # (N, m)
        y = problem.y.reshape(problem.y.shape[0], -1).to(torch.float64)                         # (B, m)
        return -torch.cdist(y, measured) ** 2 / (2 * float(problem.sigma_y) ** 2)

    def posterior(self, problem) -> torch.Tensor:
        """``p(z | y_b)`` over the K^L configurations for each measurement in the batch: (B, N) float64."""
        return torch.softmax(self.log_joint[None] + self.log_likelihood(problem), dim=1)

    def prior_probabilities(self) -> torch.Tensor:
        """``p(z)`` over the K^L configurations, (N,) float64."""
        return self.log_joint.exp()


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """``TV(p, q) = sum |p - q| / 2`` between two distributions on the same finite set."""
    return float((p.to(torch.float64) - q.to(torch.float64)).abs().sum() / 2)
