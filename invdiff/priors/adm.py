"""The ADM UNet (Dhariwal & Nichol 2021, guided-diffusion) in any configuration, keyed as guided-diffusion keys it.

``eps, [variance] = ADMUNet(config)(x_vp, t, y)``: x_vp (B, C, H, W), t (B,) timestep (int or fractional),
y (B,) class ids for class-conditional networks. Parameter names follow guided-diffusion's ``UNetModel``
(``time_embed.0``, ``input_blocks.N.M.in_layers.0``, ``middle_block.1.qkv``, ``output_blocks.N.M.*``,
``out.2``, ``label_emb``), so a guided-diffusion ``state_dict`` loads without renaming.

:func:`adm_config_from_state_dict` reads the configuration off a state dict: input / output channels,
``model_channels``, ``channel_mult``, ``num_res_blocks``, the levels with attention, resampling by ResBlock
(``resblock_updown``) or by convolution, ``use_scale_shift_norm`` and the number of classes all fix key names
or shapes. Three settings leave no trace in the weights and come from the user's flags (guided-diffusion's own
names, :func:`adm_config_from_flags`) or default to what every released guided-diffusion model uses:
``num_head_channels=64`` (else ``num_heads``), ``use_new_attention_order=False`` and the noise schedule.

Architecture (one level per entry of ``channel_mult``; ``ch = mult * model_channels``)::

    emb = Linear-SiLU-Linear(sinusoid(t, model_channels)) [+ label_emb(y)]
    input_blocks:  conv3x3 | per level: num_res_blocks x (ResBlock [+ Attention]) | down (not after the last)
    middle_block:  ResBlock, Attention, ResBlock
    output_blocks: per level, reversed: (num_res_blocks + 1) x (ResBlock(cat skip) [+ Attention]) [+ up]
    out:           GroupNorm(32) - SiLU - conv3x3

ResBlock: ``skip(x) + out_layers(in_layers(x) (+) emb_layers(emb))`` where (+) is an added bias or, with
``use_scale_shift_norm``, ``GroupNorm(h) (1 + scale) + shift``. Attention: multi-head dot-product attention
over pixels, residual. Every GroupNorm has 32 groups, so channel counts are multiples of 32.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["ADMConfig", "ADMUNet", "adm_config_from_state_dict", "adm_config_from_flags", "read_adm_flags",
           "guided_diffusion_alphas_cumprod", "timestep_embedding"]

NORM_GROUPS = 32


@dataclass(frozen=True)
class ADMConfig:
    """Everything that shapes an ADM UNet. ``attention_ds``: downsampling factors (1, 2, 4, ...) of the levels
    with attention (guided-diffusion's ``attention_resolutions`` are ``image_size // ds``)."""

    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 6
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 1, 2, 2, 4, 4)
    attention_ds: tuple = (8, 16, 32)
    num_classes: int | None = None
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    use_new_attention_order: bool = False
    image_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_ds", tuple(int(d) for d in self.attention_ds))

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    def heads(self, channels: int, upsample: bool = False) -> int:
        """Heads of an attention block over ``channels``: ``channels // num_head_channels`` unless that is -1."""
        if self.num_head_channels != -1:
            if channels % self.num_head_channels:
                raise ValueError(f"attention over {channels} channels cannot have num_head_channels="
                                 f"{self.num_head_channels}; set num_head_channels (or num_heads) to the training value")
            return channels // self.num_head_channels
        heads = self.num_heads_upsample if upsample and self.num_heads_upsample != -1 else self.num_heads
        if channels % heads:
            raise ValueError(f"attention over {channels} channels cannot have {heads} heads")
        return heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- layers
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim // 2))``, k < dim // 2 (zero-padded to odd dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups) evaluated in float32 whatever the input dtype."""

    def __init__(self, channels: int):
        super().__init__(NORM_GROUPS, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


class _Resample(nn.Module):
    """Nearest 2x upsampling or 2x downsampling, followed / done by a 3x3 convolution when ``conv``."""

    def __init__(self, channels: int, up: bool, conv: bool):
        super().__init__()
        self.up_mode = up
        if conv and up:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        elif conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        if self.up_mode:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if hasattr(self, "conv") else x
        return self.op(x) if hasattr(self, "op") else F.avg_pool2d(x, 2)


class _ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.resample = _Resample(channels, up=up, conv=False) if (up or down) else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.scale_shift = scale_shift

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        if self.resample is not None:                       # BigGAN-style resampling inside the block
            h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class _Attention(nn.Module):
    """Residual multi-head self-attention over the H W pixels; qkv and proj_out are 1x1 Conv1d."""

    def __init__(self, channels: int, heads: int, new_order: bool):
        super().__init__()
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.heads, self.new_order = heads, new_order

    def forward(self, x):
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        if self.new_order:      # rows [q(all heads), k(all heads), v(all heads)]
            q, k, v = (part.reshape(b * self.heads, d, h * w) for part in qkv.chunk(3, dim=1))
        else:                   # rows [head 0: q, k, v | head 1: q, k, v | ...] (guided-diffusion's legacy order)
            q, k, v = qkv.reshape(b * self.heads, 3 * d, h * w).split(d, dim=1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k).float() / math.sqrt(d), dim=-1).to(q.dtype)
        attended = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
        return (flat + self.proj_out(attended)).reshape(b, c, h, w)


class _EmbedSequential(nn.Sequential):
    """A block of layers; ResBlocks receive the embedding, the others only x."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _ResBlock) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------- network
class ADMUNet(nn.Module):
    """guided-diffusion's UNet for 2-D images, built from an :class:`ADMConfig` (see the module docstring).

    forward(x (B, C, H, W), t (B,), y (B,) int64 or None) -> (B, out_channels, H, W). H and W must be
    divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = cfg = config
        self.in_channels = cfg.in_channels
        emb_dim = 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(c_in, c_out, **updown):
            return _ResBlock(c_in, emb_dim, c_out, cfg.use_scale_shift_norm, **updown)

        ch = int(cfg.channel_mult[0] * cfg.model_channels)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skips, ds = [ch], 1
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, int(mult * cfg.model_channels))]
                ch = int(mult * cfg.model_channels)
                if ds in cfg.attention_ds:
                    layers.append(_Attention(ch, cfg.heads(ch), cfg.use_new_attention_order))
                self.input_blocks.append(_EmbedSequential(*layers))
                skips.append(ch)
            if level != last:
                down = res(ch, ch, down=True) if cfg.resblock_updown else _Resample(ch, up=False, conv=cfg.conv_resample)
                self.input_blocks.append(_EmbedSequential(down))
                skips.append(ch)
                ds *= 2
        self.middle_block = _EmbedSequential(res(ch, ch), _Attention(ch, cfg.heads(ch), cfg.use_new_attention_order),
                                             res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), int(mult * cfg.model_channels))]
                ch = int(mult * cfg.model_channels)
                if ds in cfg.attention_ds:
                    layers.append(_Attention(ch, cfg.heads(ch, upsample=True), cfg.use_new_attention_order))
                if level and i == cfg.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if cfg.resblock_updown
                                  else _Resample(ch, up=True, conv=cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"ADMUNet with {len(self.config.channel_mult)} levels needs H and W divisible by "
                             f"{factor}, got {tuple(x.shape[-2:])}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if self.config.num_classes is not None:
            if y is None:
                raise ValueError(f"this ADM network is class-conditional ({self.config.num_classes} classes); pass y")
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------------- configuration
_RES = re.compile(r"^input_blocks\.(\d+)\.(\d+)\.")


def _sub_blocks(state: Mapping[str, torch.Tensor], pattern: re.Pattern) -> dict[int, dict[int, set[str]]]:
    """{block: {layer: {parameter suffixes}}} for ``input_blocks``."""
    blocks: dict[int, dict[int, set[str]]] = {}
    for key in state:
        match = pattern.match(key)
        if match:
            block, layer = int(match.group(1)), int(match.group(2))
            blocks.setdefault(block, {}).setdefault(layer, set()).add(key[match.end():])
    return blocks


def _kind(suffixes: set[str]) -> str:
    if "in_layers.2.weight" in suffixes:
        return "res"
    if "qkv.weight" in suffixes:
        return "attn"
    if suffixes & {"conv.weight", "op.weight"}:
        return "resample"
    return "?"


def adm_config_from_state_dict(state: Mapping[str, torch.Tensor], *, source="checkpoint", **settings) -> ADMConfig:
    """The :class:`ADMConfig` a guided-diffusion ``state_dict`` was made with (see the module docstring).

    ``settings`` fix the fields the weights do not show (``num_heads``, ``num_head_channels``,
    ``num_heads_upsample``, ``use_new_attention_order``, ``image_size``) and may restate the others, which are
    then checked against the weights. Raises ``ValueError`` naming ``source`` and the key that does not fit.
    """
    def need(key):
        if key not in state:
            raise ValueError(f"{source}: key {key!r} missing; not a guided-diffusion UNet state dict")
        return state[key]

    first = need("input_blocks.0.0.weight")
    model_channels_0, in_channels = int(first.shape[0]), int(first.shape[1])
    model_channels = int(need("time_embed.0.weight").shape[1])
    out_channels = int(need("out.2.weight").shape[0])
    inputs = _sub_blocks(state, _RES)
    n_in = max(inputs) + 1 if inputs else 0
    emb_rows = int(need("input_blocks.1.0.emb_layers.1.weight").shape[0])
    ch0 = int(need("input_blocks.1.0.out_layers.3.weight").shape[0])
    label = state.get("label_emb.weight")
    common = dict(in_channels=in_channels, model_channels=model_channels, out_channels=out_channels,
                  num_classes=None if label is None else int(label.shape[0]), use_scale_shift_norm=emb_rows == 2 * ch0)
    # The input blocks are the first conv plus, per level, num_res_blocks ResBlocks and a downsampler (none after
    # the last level): n_in = levels (num_res_blocks + 1). Each split of n_in is a candidate; the one whose
    # network has exactly the state's keys and shapes is it (a parameter-free downsampler leaves a gap).
    candidates = []
    for levels in range(1, n_in + 1):
        if n_in % levels or n_in // levels < 2:
            continue
        num_res_blocks = n_in // levels - 1
        channel_mult, attention_ds = [], []
        for level in range(levels):
            block = 1 + level * (num_res_blocks + 1)
            weight = state.get(f"input_blocks.{block}.0.out_layers.3.weight")
            if weight is None:
                break
            mult = int(weight.shape[0]) / model_channels
            channel_mult.append(int(mult) if mult == int(mult) else mult)
            if _kind(inputs.get(block, {}).get(1, set())) == "attn":
                attention_ds.append(2 ** level)
        else:
            down = _kind(inputs.get(num_res_blocks + 1, {}).get(0, set())) if levels > 1 else "resample"
            candidates.append(dict(common, num_res_blocks=num_res_blocks, channel_mult=tuple(channel_mult),
                                   attention_ds=tuple(attention_ds), resblock_updown=down == "res",
                                   conv_resample=down in ("res", "resample")))
    if not candidates:
        raise ValueError(f"{source}: {n_in} input blocks fit no ADM UNet structure; not a guided-diffusion UNet")
    # Exact fit first; else the closest, so that loading names the few keys that differ.
    inferred = min(candidates, key=lambda c: _layout_mismatch(ADMConfig(**c), state))
    channel_mult = inferred["channel_mult"]
    if int(channel_mult[0] * model_channels) != model_channels_0:
        raise ValueError(f"{source}: input_blocks.0.0.weight has {model_channels_0} rows; expected "
                         f"channel_mult[0] * model_channels = {channel_mult[0] * model_channels}")
    for name, value in settings.items():
        if name in inferred and value is not None and _normal(value) != _normal(inferred[name]):
            raise ValueError(f"{source}: the configuration says {name}={value!r} but the weights say "
                             f"{inferred[name]!r}")
    known = {f.name for f in dataclasses.fields(ADMConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"{source}: unknown ADM settings {unknown}; expected some of {sorted(known)}")
    extra = {k: v for k, v in settings.items() if k not in inferred and v is not None}
    if "num_heads" in extra and "num_head_channels" not in extra:
        extra["num_head_channels"] = -1                   # a head count given alone is the head count
    return ADMConfig(**inferred, **extra)


def _layout_mismatch(config: ADMConfig, state: Mapping[str, torch.Tensor]) -> int:
    """How many keys ``ADMUNet(config)`` and ``state`` do not share with equal shapes (built on the meta device)."""
    try:
        with torch.device("meta"):
            net = ADMUNet(dataclasses.replace(config, num_heads=1, num_head_channels=-1, num_heads_upsample=-1))
    except (ValueError, RuntimeError):
        return len(state) + 1
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    return len(set(own.items()) ^ set(theirs.items()))


def _normal(value):
    return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else value


# guided-diffusion's command-line flags (script_util.model_and_diffusion_defaults) -> ADMConfig fields.
_FLAG_FIELDS = {"num_channels": "model_channels", "num_res_blocks": "num_res_blocks", "num_heads": "num_heads",
                "num_head_channels": "num_head_channels", "num_heads_upsample": "num_heads_upsample",
                "use_scale_shift_norm": "use_scale_shift_norm", "resblock_updown": "resblock_updown",
                "use_new_attention_order": "use_new_attention_order", "image_size": "image_size"}
# Flags that shape the schedule or only the training run; accepted and not needed for the network.
_FLAG_IGNORED = {"dropout", "use_checkpoint", "use_fp16", "use_kl", "rescale_timesteps", "rescale_learned_sigmas",
                 "timestep_respacing", "learn_sigma", "class_cond", "diffusion_steps", "noise_schedule",
                 "predict_xstart", "sigma_small", "channel_mult", "attention_resolutions",
                 # sampling-script flags that often travel with the model flags (guided-diffusion, DPS configs)
                 "batch_size", "num_samples", "use_ddim", "clip_denoised", "model_path", "classifier_path",
                 "classifier_scale"}


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


def _ints(text) -> tuple:
    if isinstance(text, (list, tuple)):
        return tuple(text)
    return tuple(float(v) if "." in v else int(v) for v in str(text).split(",") if v.strip())


def adm_config_from_flags(flags: Mapping) -> dict:
    """guided-diffusion flags (``{"num_channels": 128, "attention_resolutions": "32,16,8", ...}``) as
    :func:`adm_config_from_state_dict` settings. ``attention_resolutions`` become ``attention_ds`` through
    ``image_size``; ``channel_mult`` "" means guided-diffusion's default for that image size."""
    unknown = sorted(set(flags) - set(_FLAG_FIELDS) - _FLAG_IGNORED)
    if unknown:
        raise ValueError(f"unknown guided-diffusion flags {unknown}")
    settings = {}
    for flag, name in _FLAG_FIELDS.items():
        if flag in flags:
            value = flags[flag]
            settings[name] = _as_bool(value) if name.startswith(("use_", "resblock")) else int(value)
    image_size = settings.get("image_size")
    if "attention_resolutions" in flags:
        if image_size is None:
            raise ValueError("attention_resolutions needs image_size (guided-diffusion divides one by the other)")
        settings["attention_ds"] = tuple(image_size // int(r) for r in _ints(flags["attention_resolutions"]))
    if flags.get("channel_mult", ""):
        settings["channel_mult"] = _ints(flags["channel_mult"])
    if "class_cond" in flags and not _as_bool(flags["class_cond"]):
        settings["num_classes"] = None
    return settings


def read_adm_flags(config) -> dict:
    """guided-diffusion flags from a dict, a JSON file, or the flag string its README uses
    (``"--attention_resolutions 32,16,8 --class_cond False ..."``)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if text.lstrip().startswith("--"):
        words = shlex.split(text)
        if len(words) % 2:
            raise ValueError(f"flag string has an odd number of words: {text!r}")
        return {words[i].lstrip("-"): words[i + 1] for i in range(0, len(words), 2)}
    path = Path(os.fspath(config))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the guided-diffusion configuration ({err}); expected a JSON object "
                         f"of its flags") from None


def guided_diffusion_alphas_cumprod(flags: Mapping) -> torch.Tensor:
    """``abar_t`` (float64, (T,)) of guided-diffusion's ``noise_schedule`` over ``diffusion_steps``.

    "linear": betas evenly spaced from ``1e-4 s`` to ``2e-2 s`` with ``s = 1000 / T``; "cosine": Nichol &
    Dhariwal 2021, Eq. 17, ``abar(t) = f(t)/f(0)``, ``f(t) = cos((t/T + 0.008)/1.008 pi/2)^2``, betas capped at 0.999.
    """
    steps = int(flags.get("diffusion_steps", 1000))
    schedule = flags.get("noise_schedule", "linear")
    if schedule == "linear":
        scale = 1000 / steps
        betas = torch.linspace(scale * 1e-4, scale * 2e-2, steps, dtype=torch.float64)
    elif schedule == "cosine":
        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"noise_schedule {schedule!r} is not one of guided-diffusion's ('linear', 'cosine')")
    return torch.cumprod(1 - betas, dim=0)

