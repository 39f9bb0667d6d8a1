"""score-SDE's NCSN++ (Song et al. 2021) keyed as the original ``score_sde_pytorch`` keys it (``all_modules.N.*``).

``score = NCSNppScoreSDE(config)(x, label)``: x (B, C, H, W) in the training data range ([0, 1] unless
``centered``; the network maps it to [-1, 1] itself), label (B,) the noise level sigma (Fourier embedding,
continuous training) or an index into the ``sigmas`` buffer (positional embedding, discrete training). With
``scale_by_sigma`` the output is already divided by sigma: it is the score ``grad_x log p_sigma(x)`` in the
units of x. This is the layout of the public score-based MRI / CT checkpoints (score-MRI, DiffusionMBIR).

Every module sits in one flat ``nn.ModuleList`` in the order the original code creates it, so its index is
part of the key; the forward pass walks the list in the same order::

    [Fourier W | -] [Linear, Linear if conditional] conv3x3(C, nf)
    per level:  num_res_blocks x (ResBlock [+ Attn]) ; down (not after the last): ResBlock(down) or Downsample,
                then the input pyramid's module (progressive_input "residual": strided conv, "input_skip": 1x1)
    middle:     ResBlock, Attn, ResBlock
    per level, reversed: (num_res_blocks + 1) x ResBlock(cat skip) [+ Attn] [+ output-pyramid modules]
                [+ up: ResBlock(up) or Upsample]
    GroupNorm, conv3x3(., C)        (unless progressive == "output_skip")

ResBlocks (BigGAN type: up/down-sampling inside, ``Conv_2`` 1x1 shortcut; DDPM type: ``NIN_0`` shortcut) add
``Dense_0(act(temb))`` after their first conv and, with ``skip_rescale``, return ``(x + h)/sqrt(2)``.
Resampling uses the FIR kernel ``fir_kernel`` (outer product, normalised; zero-padded convolution as in
StyleGAN2's ``upfirdn2d``) when ``fir``, else nearest / 2x2 averages. GroupNorm has ``min(C // 4, 32)`` groups.

Attention is placed by level (where the level's resolution at ``image_size`` is in ``attn_resolutions``), which
is the original's placement at the training size and carries over to other sizes. Configurations the original
PyTorch code cannot run either (FIR upsampling with a convolution) are refused.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NCSNppConfig", "NCSNppScoreSDE", "ncsnpp_config_from_state_dict", "fir_resample"]

_ACTIVATIONS = {"swish": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(0.2)}


@dataclass(frozen=True)
class NCSNppConfig:
    """score-SDE's ``config.model`` / ``config.data`` fields that shape NCSN++ (same names and defaults as its VE
    NCSN++ continuous configurations, which the public MRI and CT checkpoints use). ``attn_levels``: indices of
    the levels with attention (from ``attn_resolutions`` and ``image_size``: level l has resolution
    ``image_size // 2**l``)."""

    num_channels: int = 1
    nf: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_levels: tuple = (3,)
    image_size: int | None = None
    centered: bool = False
    conditional: bool = True
    embedding_type: str = "fourier"
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    resamp_with_conv: bool = True
    fir: bool = True
    fir_kernel: tuple = (1, 3, 3, 1)
    skip_rescale: bool = True
    scale_by_sigma: bool = True
    nonlinearity: str = "swish"
    num_scales: int = 2000

    def __post_init__(self):
        for name in ("ch_mult", "attn_levels", "fir_kernel"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        choices = {"embedding_type": ("fourier", "positional"), "resblock_type": ("biggan", "ddpm"),
                   "progressive": ("none", "output_skip", "residual"),
                   "progressive_input": ("none", "input_skip", "residual"), "progressive_combine": ("sum", "cat"),
                   "nonlinearity": tuple(_ACTIVATIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"NCSN++ {name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.fir and (self.progressive == "residual" or (self.resblock_type == "ddpm" and self.resamp_with_conv)):
            raise ValueError("NCSN++ with FIR upsampling followed by a convolution (progressive='residual', or "
                             "resblock_type='ddpm' with resamp_with_conv) is not supported: score_sde_pytorch "
                             "cannot run it either")

    @classmethod
    def from_score_sde(cls, config: Mapping) -> NCSNppConfig:
        """From score-SDE's config as a dict: ``{"model": {...}, "data": {...}}`` or one flat dict of their fields.

        ``attn_resolutions`` become ``attn_levels`` through ``data.image_size``; fields that do not shape the
        network (``sigma_min``, ``dropout``, ``ema_rate``, ...) are ignored."""
        flat = {}
        for part in ("data", "model"):
            flat.update(config.get(part, {}) if isinstance(config.get(part), Mapping) else {})
        flat.update({k: v for k, v in config.items() if not isinstance(v, Mapping)})
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in flat.items() if k in names}
        for key in ("embedding_type", "resblock_type", "progressive", "progressive_input", "progressive_combine",
                    "nonlinearity"):
            if key in values:
                values[key] = str(values[key]).lower()
        if "attn_resolutions" in flat:
            if flat.get("image_size") is None:
                raise ValueError("score-SDE config: attn_resolutions needs data.image_size")
            levels = len(values.get("ch_mult", cls.ch_mult))
            values["attn_levels"] = tuple(l for l in range(levels)
                                          if int(flat["image_size"]) // 2 ** l in set(flat["attn_resolutions"]))
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- FIR resampling
def _fir_kernel(taps, gain: float, like: torch.Tensor) -> torch.Tensor:
    k = torch.as_tensor(taps, dtype=like.dtype, device=like.device)
    k = torch.outer(k, k) if k.ndim == 1 else k
    return k * (gain / k.sum())


def _upfirdn(x: torch.Tensor, kernel: torch.Tensor, up: int, down: int, pad0: int, pad1: int) -> torch.Tensor:
    """Zero-insertion upsampling by ``up``, zero padding (pad0 before, pad1 after, both axes), convolution with
    ``kernel`` (flipped, i.e. a true convolution), keeping every ``down``-th sample: StyleGAN2's upfirdn2d."""
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    if up > 1:
        stuffed = x.new_zeros(b * c, 1, h * up, w * up)
        stuffed[:, :, ::up, ::up] = x
        x = stuffed
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    x = F.conv2d(x, kernel.flip(0, 1)[None, None], stride=down)
    return x.reshape(b, c, x.shape[-2], x.shape[-1])


def fir_resample(x: torch.Tensor, taps, *, up: bool) -> torch.Tensor:
    """2x FIR up- or downsampling with the separable kernel ``taps`` (normalised to keep constants constant)."""
    p = len(taps) - 2
    if up:
        return _upfirdn(x, _fir_kernel(taps, 4.0, x), 2, 1, (p + 1) // 2 + 1, p // 2)
    return _upfirdn(x, _fir_kernel(taps, 1.0, x), 1, 2, (p + 1) // 2, p // 2)


def _nearest_up(x):
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


def _mean_down(x):
    return F.avg_pool2d(x, 2)


# ---------------------------------------------------------------------------------------------- layers
def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def _conv(c_in: int, c_out: int, size: int = 3, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, size, padding=kwargs.pop("padding", size // 2), **kwargs)


class _FourierProjection(nn.Module):
    """``[sin(2 pi W u), cos(2 pi W u)]`` of ``u = ln sigma``; W is a fixed (untrained) random vector."""

    def __init__(self, size: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(size), requires_grad=False)

    def forward(self, u):
        angles = 2 * math.pi * u[:, None] * self.W[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def _positional_embedding(labels: torch.Tensor, dim: int) -> torch.Tensor:
    """``[sin(l w_k), cos(l w_k)]`` with ``w_k = 10000^(-k / (dim // 2 - 1))`` (score-SDE's convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=labels.device) / (half - 1))
    angles = labels.float()[:, None] * freqs[None]
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


class _NIN(nn.Module):
    """Per-pixel linear map ``y[o] = sum_c x[c] W[c, o] + b[o]`` (W stored (in, out))."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(c_in, c_out))
        self.b = nn.Parameter(torch.zeros(c_out))

    def forward(self, x):
        return torch.einsum("bchw,co->bohw", x, self.W) + self.b[:, None, None]


class _Attn(nn.Module):
    """Single-head self-attention over pixels with NIN projections, residual (divided by sqrt 2 if rescaled)."""

    def __init__(self, channels: int, skip_rescale: bool):
        super().__init__()
        self.GroupNorm_0 = _norm(channels)
        self.NIN_0, self.NIN_1, self.NIN_2, self.NIN_3 = (_NIN(channels, channels) for _ in range(4))
        self.skip_rescale = skip_rescale

    def forward(self, x):
        b, c, h, w = x.shape
        normed = self.GroupNorm_0(x)
        q, k, v = (layer(normed).reshape(b, c, h * w) for layer in (self.NIN_0, self.NIN_1, self.NIN_2))
        weight = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(c), dim=-1)
        out = x + self.NIN_3(torch.einsum("bqk,bck->bcq", weight, v).reshape(b, c, h, w))
        return out / math.sqrt(2) if self.skip_rescale else out


class _ResBlock(nn.Module):
    """BigGAN-type (``biggan=True``: optional 2x up/down inside, 1x1 ``Conv_2`` shortcut) or DDPM-type
    (``NIN_0`` shortcut) residual block with a noise-embedding bias."""

    def __init__(self, cfg: NCSNppConfig, c_in: int, c_out: int | None = None, up=False, down=False):
        super().__init__()
        c_out = c_out or c_in
        self.GroupNorm_0 = _norm(c_in)
        self.Conv_0 = _conv(c_in, c_out)
        self.Dense_0 = nn.Linear(4 * cfg.nf, c_out)
        self.GroupNorm_1 = _norm(c_out)
        self.Conv_1 = _conv(c_out, c_out)
        biggan = cfg.resblock_type == "biggan"
        if biggan and (c_in != c_out or up or down):
            self.Conv_2 = _conv(c_in, c_out, 1)
        elif not biggan and c_in != c_out:
            self.NIN_0 = _NIN(c_in, c_out)
        self.act = _ACTIVATIONS[cfg.nonlinearity]()
        self.up, self.down, self.cfg = up, down, cfg

    def _resample(self, x):
        if self.up:
            return fir_resample(x, self.cfg.fir_kernel, up=True) if self.cfg.fir else _nearest_up(x)
        if self.down:
            return fir_resample(x, self.cfg.fir_kernel, up=False) if self.cfg.fir else _mean_down(x)
        return x

    def forward(self, x, temb):
        h = self._resample(self.act(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.act(self.GroupNorm_1(h)))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        elif hasattr(self, "NIN_0"):
            x = self.NIN_0(x)
        return (x + h) / math.sqrt(2) if self.cfg.skip_rescale else x + h


class _FIRConv(nn.Module):
    """3x3 convolution fused with 2x FIR downsampling: FIR blur (padded for both), then a stride-2 conv."""

    def __init__(self, c_in: int, c_out: int, taps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, 3, 3))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.taps = tuple(taps)

    def forward(self, x):
        p = len(self.taps) - 2 + 2
        x = _upfirdn(x, _fir_kernel(self.taps, 1.0, x), 1, 1, (p + 1) // 2, p // 2)
        return F.conv2d(x, self.weight, self.bias, stride=2)


class _Downsample(nn.Module):
    def __init__(self, cfg: NCSNppConfig, c_in: int, c_out: int | None = None, with_conv: bool = False):
        super().__init__()
        c_out = c_out or c_in
        if with_conv and cfg.fir:
            self.Conv2d_0 = _FIRConv(c_in, c_out, cfg.fir_kernel)
        elif with_conv:
            self.Conv_0 = _conv(c_in, c_out, stride=2, padding=0)
        self.cfg = cfg

    def forward(self, x):
        if hasattr(self, "Conv2d_0"):
            return self.Conv2d_0(x)
        if hasattr(self, "Conv_0"):
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))      # TensorFlow's 'SAME' padding for stride 2
        return fir_resample(x, self.cfg.fir_kernel, up=False) if self.cfg.fir else _mean_down(x)


class _Upsample(nn.Module):
    def __init__(self, cfg: NCSNppConfig, c_in: int, c_out: int | None = None, with_conv: bool = False):
        super().__init__()
        if with_conv:           # fir is False here (refused by NCSNppConfig otherwise)
            self.Conv_0 = _conv(c_in, c_out or c_in)
        self.cfg = cfg

    def forward(self, x):
        if self.cfg.fir:
            return fir_resample(x, self.cfg.fir_kernel, up=True)
        x = _nearest_up(x)
        return self.Conv_0(x) if hasattr(self, "Conv_0") else x


class _Combine(nn.Module):
    def __init__(self, c_in: int, c_out: int, method: str):
        super().__init__()
        self.Conv_0 = _conv(c_in, c_out, 1)
        self.method = method

    def forward(self, pyramid, h):
        p = self.Conv_0(pyramid)
        return torch.cat([p, h], dim=1) if self.method == "cat" else p + h


# ---------------------------------------------------------------------------------------------- network
class NCSNppScoreSDE(nn.Module):
    """NCSN++ with score_sde_pytorch's parameter names; see the module docstring. forward(x, label) -> score."""

    def __init__(self, config: NCSNppConfig):
        super().__init__()
        self.config = cfg = config
        self.in_channels = cfg.num_channels
        self.register_buffer("sigmas", torch.zeros(cfg.num_scales))
        self.act = _ACTIVATIONS[cfg.nonlinearity]()
        nf, levels = cfg.nf, len(cfg.ch_mult)
        mods: list[nn.Module] = []
        if cfg.embedding_type == "fourier":
            mods.append(_FourierProjection(nf))
        if cfg.conditional:
            embed = 2 * nf if cfg.embedding_type == "fourier" else nf
            mods += [nn.Linear(embed, 4 * nf), nn.Linear(4 * nf, 4 * nf)]
        mods.append(_conv(cfg.num_channels, nf))
        skips, ch, pyramid_in = [nf], nf, cfg.num_channels
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                mods.append(_ResBlock(cfg, ch, nf * cfg.ch_mult[level]))
                ch = nf * cfg.ch_mult[level]
                if level in cfg.attn_levels:
                    mods.append(_Attn(ch, cfg.skip_rescale))
                skips.append(ch)
            if level != levels - 1:
                mods.append(_ResBlock(cfg, ch, down=True) if cfg.resblock_type == "biggan"
                            else _Downsample(cfg, ch, with_conv=cfg.resamp_with_conv))
                if cfg.progressive_input == "input_skip":
                    mods.append(_Combine(pyramid_in, ch, cfg.progressive_combine))
                    ch = 2 * ch if cfg.progressive_combine == "cat" else ch
                elif cfg.progressive_input == "residual":
                    mods.append(_Downsample(cfg, pyramid_in, ch, with_conv=True))
                    pyramid_in = ch
                skips.append(ch)
        mods += [_ResBlock(cfg, ch), _Attn(ch, cfg.skip_rescale), _ResBlock(cfg, ch)]
        pyramid_ch = 0
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                mods.append(_ResBlock(cfg, ch + skips.pop(), nf * cfg.ch_mult[level]))
                ch = nf * cfg.ch_mult[level]
            if level in cfg.attn_levels:
                mods.append(_Attn(ch, cfg.skip_rescale))
            if cfg.progressive == "output_skip":
                mods += [_norm(ch), _conv(ch, cfg.num_channels)]
            elif cfg.progressive == "residual":
                if level == levels - 1:
                    mods += [_norm(ch), _conv(ch, ch)]
                else:
                    mods.append(_Upsample(cfg, pyramid_ch, ch, with_conv=True))
                pyramid_ch = ch
            if level != 0:
                mods.append(_ResBlock(cfg, ch, up=True) if cfg.resblock_type == "biggan"
                            else _Upsample(cfg, ch, with_conv=cfg.resamp_with_conv))
        if cfg.progressive != "output_skip":
            mods += [_norm(ch), _conv(ch, cfg.num_channels)]
        self.all_modules = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        cfg, act = self.config, self.act
        levels = len(cfg.ch_mult)
        factor = 2 ** (levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"NCSN++ with {levels} levels needs H and W divisible by {factor}, got {tuple(x.shape[-2:])}")
        modules = iter(self.all_modules)
        if cfg.embedding_type == "fourier":
            sigma = label
            temb = next(modules)(sigma.log())
        else:
            sigma = self.sigmas[label.long()]
            temb = _positional_embedding(label, cfg.nf)
        if cfg.conditional:
            temb = next(modules)(temb)
            temb = next(modules)(act(temb))
        else:
            temb = None
        if not cfg.centered:
            x = 2 * x - 1                                   # [0, 1] data -> [-1, 1]

        def merge(a, b):
            return (a + b) / math.sqrt(2) if cfg.skip_rescale else a + b

        pyramid = x
        hs = [next(modules)(x)]
        for level in range(levels):
            for _ in range(cfg.num_res_blocks):
                h = next(modules)(hs[-1], temb)
                if level in cfg.attn_levels:
                    h = next(modules)(h)
                hs.append(h)
            if level != levels - 1:
                down = next(modules)
                h = down(hs[-1], temb) if isinstance(down, _ResBlock) else down(hs[-1])
                if cfg.progressive_input == "input_skip":
                    pyramid = fir_resample(pyramid, cfg.fir_kernel, up=False) if cfg.fir else _mean_down(pyramid)
                    h = next(modules)(pyramid, h)
                elif cfg.progressive_input == "residual":
                    pyramid = merge(next(modules)(pyramid), h)
                    h = pyramid
                hs.append(h)
        h = hs[-1]
        h = next(modules)(h, temb)
        h = next(modules)(h)
        h = next(modules)(h, temb)
        pyramid = None
        for level in reversed(range(levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
            if level in cfg.attn_levels:
                h = next(modules)(h)
            if cfg.progressive == "output_skip":
                branch = _norm_act_conv(modules, h, act)
                if pyramid is None:
                    pyramid = branch
                else:
                    up = fir_resample(pyramid, cfg.fir_kernel, up=True) if cfg.fir else _nearest_up(pyramid)
                    pyramid = up + branch
            elif cfg.progressive == "residual":
                if level == levels - 1:
                    pyramid = _norm_act_conv(modules, h, act)
                else:
                    pyramid = merge(next(modules)(pyramid), h)
                    h = pyramid
            if level != 0:
                up = next(modules)
                h = up(h, temb) if isinstance(up, _ResBlock) else up(h)
        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = _norm_act_conv(modules, h, act)
        if next(modules, None) is not None:
            raise RuntimeError("NCSN++: modules left over after the forward pass (construction and forward disagree)")
        if cfg.scale_by_sigma:
            h = h / sigma.reshape(-1, 1, 1, 1).to(h.dtype)
        return h


def _norm_act_conv(modules, h, act):
    """conv(act(norm(h))) with norm and conv the next two modules, taken in that order."""
    norm = next(modules)
    conv = next(modules)
    return conv(act(norm(h)))


# ---------------------------------------------------------------------------------------------- configuration
_MODULE = re.compile(r"^all_modules\.(\d+)\.(.+)$")


def _modules(state: Mapping[str, torch.Tensor]) -> dict[int, dict[str, tuple]]:
    out: dict[int, dict[str, tuple]] = {}
    for key, value in state.items():
        match = _MODULE.match(key)
        if match:
            out.setdefault(int(match.group(1)), {})[match.group(2)] = tuple(value.shape)
    return out


def _is_res(m) -> bool:
    return "Conv_1.weight" in m and "GroupNorm_0.weight" in m


def _res_channels(m) -> tuple[int, int]:
    return m["GroupNorm_0.weight"][0], m["Conv_1.weight"][0]


def ncsnpp_config_from_state_dict(state: Mapping[str, torch.Tensor], *, source="checkpoint", **settings) -> NCSNppConfig:
    """The :class:`NCSNppConfig` of a score_sde_pytorch NCSN++ ``state_dict``, read off its keys and shapes.

    Read from the weights: ``num_channels``, ``nf``, ``ch_mult``, ``num_res_blocks``, ``attn_levels``,
    ``embedding_type``, ``conditional``, ``resblock_type``, ``progressive``, ``progressive_input`` (and ``fir``
    and ``progressive_combine`` where they leave a trace), ``num_scales``. Not visible in the weights, so taken
    from ``settings`` or the VE NCSN++ defaults of :class:`NCSNppConfig`: ``centered``, ``fir_kernel``,
    ``skip_rescale``, ``scale_by_sigma``, ``nonlinearity`` (and ``fir`` when no FIR convolution exists).
    ``settings`` that contradict the weights raise ``ValueError``.
    """
    mods = _modules(state)
    if not mods:
        raise ValueError(f"{source}: no 'all_modules.N.*' keys; not a score_sde_pytorch NCSN++ state dict")

    def fail(index, what):
        raise ValueError(f"{source}: all_modules.{index} ({sorted(mods.get(index, {}))}) is not {what}; pass the "
                         f"score-SDE configuration (config=...) or check that this is an NCSN++ checkpoint")

    i, inferred = 0, {}
    if set(mods.get(0, {})) == {"W"}:
        inferred["embedding_type"], i = "fourier", 1
    else:
        inferred["embedding_type"] = "positional"
    m = mods.get(i, {})
    inferred["conditional"] = len(m.get("weight", ())) == 2
    i += 2 if inferred["conditional"] else 0
    conv_in = mods.get(i, {}).get("weight", ())
    if len(conv_in) != 4:
        fail(i, "the input convolution")
    nf, channels = conv_in[0], conv_in[1]
    inferred.update(nf=nf, num_channels=channels)
    i += 1
    biggan = None

    def is_down(index):
        m = mods.get(index)
        if m is None or not _is_res(m):
            return m is None or "NIN_3.W" not in m          # a Downsample (conv or parameter-free) module
        c_in, c_out = _res_channels(m)
        return "Conv_2.weight" in m and c_in == c_out      # BigGAN ResBlock(down=True)

    ch, pyramid_in, levels, r = nf, channels, [], None
    while True:
        count, attn, out = 0, False, ch
        while i in mods and _is_res(mods[i]) and not is_down(i) and (r is None or count < r):
            out = _res_channels(mods[i])[1]
            i += 1
            count += 1
            if "NIN_3.W" in mods.get(i, {}):
                attn = True
                i += 1
        if count == 0 or (r is not None and count != r):
            fail(i, f"a ResBlock of level {len(levels)}")
        r = count
        levels.append((out, attn))
        ch = out
        if not is_down(i):                                   # the middle block begins
            break
        m = mods.get(i)
        if m is not None and _is_res(m):
            biggan = True
        else:
            biggan = False
            inferred["resamp_with_conv"] = m is not None
        i += 1
        nxt = mods.get(i, {})
        if set(nxt) == {"Conv2d_0.weight", "Conv2d_0.bias"} or (set(nxt) == {"Conv_0.weight", "Conv_0.bias"}
                                                               and nxt["Conv_0.weight"][1] == pyramid_in
                                                               and nxt["Conv_0.weight"][-1] == 3):
            inferred["progressive_input"] = "residual"
            inferred["fir"] = "Conv2d_0.weight" in nxt
            pyramid_in = ch
            i += 1
        elif set(nxt) == {"Conv_0.weight", "Conv_0.bias"} and nxt["Conv_0.weight"][-1] == 1:
            inferred["progressive_input"] = "input_skip"
            following = mods.get(i + 1, {})
            if _is_res(following) and _res_channels(following)[0] == 2 * ch:
                inferred["progressive_combine"] = "cat"
                ch *= 2
            i += 1
        else:
            inferred["progressive_input"] = "none"
    inferred["resblock_type"] = "ddpm" if biggan is False else "biggan"
    if biggan is None:
        fail(i, "a downsampling module (single-level networks are not inferred)")
    for offset, what in ((0, "the middle ResBlock"), (1, "the middle attention"), (2, "the middle ResBlock")):
        m = mods.get(i + offset, {})
        if not (_is_res(m) if offset != 1 else "NIN_3.W" in m):
            fail(i + offset, what)
    for value in {out for out, _ in levels}:
        if value % nf:
            fail(i, f"consistent with nf={nf} (a level has {value} channels)")
    inferred["ch_mult"] = tuple(out // nf for out, _ in levels)
    inferred["num_res_blocks"] = r
    inferred["attn_levels"] = tuple(level for level, (_, attn) in enumerate(levels) if attn)
    last = max(mods)
    norms = [k for k, m in mods.items() if set(m) == {"weight", "bias"} and len(m["weight"]) == 1 and k < last - 1]
    if not norms:
        inferred["progressive"] = "none"
    else:
        head = mods.get(norms[0] + 1, {}).get("weight", ())
        inferred["progressive"] = "output_skip" if head and head[0] == channels else "residual"
    if "sigmas" in state:
        inferred["num_scales"] = int(state["sigmas"].shape[0])

    names = {f.name for f in dataclasses.fields(NCSNppConfig)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"{source}: unknown NCSN++ settings {unknown}; expected some of {sorted(names)}")
    for name, value in settings.items():
        if name in inferred and value is not None and _same(value) != _same(inferred[name]):
            raise ValueError(f"{source}: the configuration says {name}={value!r} but the weights say {inferred[name]!r}")
    return NCSNppConfig(**{**inferred, **{k: v for k, v in settings.items() if v is not None}})


def _same(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
