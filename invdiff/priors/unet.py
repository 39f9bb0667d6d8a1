"""A compact, fully convolutional UNet denoiser with EDM preconditioning (Karras et al. 2022).

``D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))`` (EDM Eq. 7, Table 1), with
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4`` and ``sd = sigma_data``.

No layer has a fixed spatial size, so a network trained on 64x64 patches runs at scan resolution; inputs
whose sides are not multiples of ``2^(levels-1)`` are reflect-padded and cropped back. One optional
self-attention block (``attention=True``) sits in the middle, at the coarsest level.

Resolution awareness (``spacing_conditioning=True``): the network also takes the pixel spacing ``s`` (mm per
pixel) it works at, as Fourier features of ``ln(s)`` through a small MLP added to the noise embedding, so one
prior serves 1 mm patches and whole heads at 3-4 mm. ``net.at_spacing(s)`` returns a view that passes ``s`` at
every call (``None``: ``config.default_spacing_mm``); a prior without the conditioning ignores spacing.

    >>> net = EDMUNet(UNetConfig(channels=2, base_channels=16, channel_mults=(1, 2)))
    >>> net(torch.randn(1, 2, 37, 29), torch.tensor([0.5])).shape
    torch.Size([1, 2, 37, 29])
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from invdiff.priors.base import Denoiser, as_sigma_batch


@dataclass
class UNetConfig:
    """Everything needed to rebuild an :class:`EDMUNet`; round-trips through JSON (``to_dict`` / ``from_dict``)."""

    channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    embedding_dim: int = 64
    groups: int = 8
    dropout: float = 0.0
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # Added 2026-12 (absent from older exported priors, whose configs load with these defaults):
    attention: bool = False                    # one self-attention block at the coarsest level (mid)
    spacing_conditioning: bool = False         # take the pixel spacing (mm/pixel) as conditioning
    default_spacing_mm: float | None = None    # the spacing used when none is given (required if conditioned)

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        if self.channels < 1 or self.base_channels < 1 or not self.channel_mults:
            raise ValueError(f"UNetConfig needs channels >= 1, base_channels >= 1 and channel_mults non-empty; "
                             f"got {self.channels}, {self.base_channels}, {self.channel_mults}")
        for width in self.widths():
            if width % self.groups:
                raise ValueError(f"UNetConfig: width {width} is not divisible by groups={self.groups}")
        if self.spacing_conditioning and not (self.default_spacing_mm and self.default_spacing_mm > 0):
            raise ValueError(f"UNetConfig: spacing_conditioning needs default_spacing_mm > 0, got "
                             f"{self.default_spacing_mm!r}")

    def widths(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mults]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"UNetConfig: unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM Table 1 coefficients ``(c_skip, c_out, c_in, c_noise)`` for a (B,) sigma, each (B,)."""
    total = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / total
    c_out = sigma * sigma_data / total.sqrt()
    c_in = 1 / total.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class FourierEmbedding(nn.Module):
    """``[cos(2 pi f_k t), sin(2 pi f_k t)]`` with fixed log-spaced frequencies ``f_k`` in [f_low, f_high].

    Noise: c_noise = ln(sigma)/4 spans about [-1.6, 1.1] for sigma in [0.002, 80]; with the default [1/4, 32]
    the lowest frequency varies once over the range and the highest resolves ~1 % changes of sigma.
    """

    def __init__(self, dim: int, f_low: float = 0.25, f_high: float = 32.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(f_low), math.log(f_high), dim // 2))
        self.register_buffer("freqs", 2 * math.pi * freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs[None, :].to(t.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; the noise embedding sets a per-channel scale and shift (FiLM) on the second norm."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # Zero-initialised last conv: each block starts as the identity, which keeps early training stable.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        out = self.conv2(self.dropout(F.silu(out)))
        return (self.skip(h) + out) / math.sqrt(2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions, residual, zero-initialised output (starts as the identity)."""

    def __init__(self, width: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, width // head_dim)
        self.norm = nn.GroupNorm(groups, width)
        self.qkv = nn.Conv2d(width, 3 * width, 1)
        self.proj = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        q, k, v = self.qkv(self.norm(h)).reshape(b, 3, self.heads, c // self.heads, height * width).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return (h + self.proj(out.transpose(-1, -2).reshape(b, c, height, width))) / math.sqrt(2)


# Pixel spacings (mm/pixel) the spacing embedding resolves: ln(s) for s in [0.25, 16] spans [-1.4, 2.8]; the
# frequencies [1/8, 2] vary at most a few times over that range, so nearby spacings get nearby embeddings.
SPACING_FREQUENCIES = (0.125, 2.0)


class EDMUNet(Denoiser):
    """UNet ``F`` inside EDM preconditioning: ``D(x, sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4 [, ln s])``.

    x: (B, C, H, W) float, any H, W >= 2; sigma: float or (B,); spacing (mm/pixel, only used when
    ``config.spacing_conditioning``): None (the config's default), float or (B,). Returns x0_hat with x's shape
    and dtype.
    """

    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        config = dataclasses.replace(config or UNetConfig(), **overrides)
        self.config = config
        self.channels = config.channels
        self.image_size = None
        self.sigma_min = config.sigma_min
        self.sigma_max = config.sigma_max
        self.sigma_data = config.sigma_data
        widths = config.widths()
        emb_dim = config.embedding_dim
        block = lambda c_in, c_out: ResBlock(c_in, c_out, 4 * emb_dim, config.groups, config.dropout)  # noqa: E731

        self.embed = FourierEmbedding(emb_dim)
        self.embed_mlp = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.SiLU(), nn.Linear(4 * emb_dim, 4 * emb_dim))
        if config.spacing_conditioning:
            self.spacing_embed = FourierEmbedding(emb_dim, *SPACING_FREQUENCIES)
            self.spacing_mlp = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.SiLU(),
                                             nn.Linear(4 * emb_dim, 4 * emb_dim))
        self.conv_in = nn.Conv2d(config.channels, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_widths = [widths[0]]
        width = widths[0]
        for level, level_width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                blocks.append(block(width, level_width))
                width = level_width
                skip_widths.append(width)
            self.down.append(blocks)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skip_widths.append(width)
        self.mid = nn.ModuleList([block(width, width), block(width, width)])
        self.mid_attention = SelfAttention(width, config.groups) if config.attention else None

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(block(width + skip_widths.pop(), widths[level]))
                width = widths[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(width, width, 3, padding=1))
        self.norm_out = nn.GroupNorm(config.groups, width)
        self.conv_out = nn.Conv2d(width, config.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def levels(self) -> int:
        return len(self.config.channel_mults)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def default_spacing_mm(self) -> float | None:
        return self.config.default_spacing_mm

    def at_spacing(self, spacing_mm: float | None) -> Denoiser:
        """This prior at pixel spacing ``spacing_mm`` (None: ``config.default_spacing_mm``); ``self`` if unconditioned."""
        if not self.config.spacing_conditioning:
            return self
        return SpacingView(self, spacing_mm)

    def forward(self, x: torch.Tensor, sigma, spacing=None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"EDMUNet expects x of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        c_skip, c_out, c_in, c_noise = (c[:, None, None, None] if i < 3 else c
                                        for i, c in enumerate(edm_preconditioning(sigma, self.sigma_data)))
        f = self.network(c_in * x, c_noise, self._spacing_batch(spacing, x))
        return c_skip * x + c_out * f

    def _spacing_batch(self, spacing, x: torch.Tensor) -> torch.Tensor | None:
        if not self.config.spacing_conditioning:
            return None
        spacing = self.config.default_spacing_mm if spacing is None else spacing
        spacing = as_sigma_batch(spacing, x.shape[0], x)
        if not bool((spacing > 0).all()):
            raise ValueError(f"pixel spacing must be > 0 mm, got {spacing.tolist()}")
        return spacing

    def network(self, x: torch.Tensor, c_noise: torch.Tensor, spacing: torch.Tensor | None = None) -> torch.Tensor:
        """The raw UNet ``F(x_in, c_noise[, spacing])`` of EDM Eq. 7; pads to a multiple of ``2^(levels-1)``
        and crops back."""
        h, w = x.shape[-2:]
        x_padded = _pad_to_multiple(x, 2 ** (self.levels - 1))
        emb = self.embed_mlp(self.embed(c_noise))
        if spacing is not None:
            emb = emb + self.spacing_mlp(self.spacing_embed(spacing.log()))
        hidden = self.conv_in(x_padded)
        skips = [hidden]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                hidden = blk(hidden, emb)
                skips.append(hidden)
            if level < len(self.downsample):
                hidden = self.downsample[level](hidden)
                skips.append(hidden)
        hidden = self.mid[0](hidden, emb)
        if self.mid_attention is not None:
            hidden = self.mid_attention(hidden)
        hidden = self.mid[1](hidden, emb)
        for i, blocks in enumerate(self.up):
            for blk in blocks:
                hidden = blk(torch.cat([hidden, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                hidden = self.upsample[i](F.interpolate(hidden, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(hidden)))
        return out[..., :h, :w]


class SpacingView(Denoiser):
    """A spacing-conditioned :class:`EDMUNet` bound to one pixel spacing: ``view(x, sigma) = net(x, sigma, s)``.

    Shares the network's parameters (no copy); ``metadata``, ``name`` and ``config`` are the network's.
    """

    def __init__(self, net: "EDMUNet", spacing_mm: float | None):
        super().__init__()
        if spacing_mm is not None and not spacing_mm > 0:
            raise ValueError(f"pixel spacing must be > 0 mm or None, got {spacing_mm!r}")
        self.net = net
        self.spacing_mm = float(spacing_mm) if spacing_mm is not None else float(net.config.default_spacing_mm)
        self.channels, self.image_size = net.channels, net.image_size
        self.sigma_min, self.sigma_max, self.sigma_data = net.sigma_min, net.sigma_max, net.sigma_data
        self.config = net.config
        for attr in ("metadata", "name"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def at_spacing(self, spacing_mm: float | None) -> Denoiser:
        return self.net.at_spacing(spacing_mm)

    def forward(self, x: torch.Tensor, sigma, spacing=None) -> torch.Tensor:
        return self.net(x, sigma, self.spacing_mm if spacing is None else spacing)

    def extra_repr(self) -> str:
        return f"spacing_mm={self.spacing_mm}"


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of (B, C, H, W) to multiples of ``multiple``: reflect when possible, else replicate."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # Reflect padding needs pad < size; for tiny inputs fall back to replicate (still continuous at the border).
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
