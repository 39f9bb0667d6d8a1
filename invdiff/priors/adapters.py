"""Foreign diffusion checkpoints as invdiff denoisers ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` (EDM convention).

Each family of networks gets one adapter that converts its own parameterisation to ``D``, and one loader
that rebuilds the architecture from the checkpoint's own configuration (nothing is downloaded), reads the
user's local file safely (:mod:`invdiff.priors.checkpoints`) and refuses any key or shape mismatch.

==============================  ================================  ==========================================
checkpoint (layout)             loader                            conversion to ``D(x, sigma)``
==============================  ================================  ==========================================
guided-diffusion / ADM          :func:`load_adm_checkpoint`       :class:`VPEpsAdapter`: ``x - sigma eps``
score-SDE NCSN++ (all_modules)  :func:`load_score_sde_checkpoint` :class:`VEScoreAdapter`: ``x + sigma^2 s``
EDM-port NCSN++ (VE)            :func:`load_ncsnpp_checkpoint`    :class:`VEScoreAdapter`: ``x + sigma^2 s``
EDM (DDPM++, NCSN++, ADM)       :func:`load_edm_checkpoint`       :class:`EDMAdapter`: ``c_skip x + c_out F``
diffusers ``UNet2DModel``       :func:`load_diffusers_unet`       :class:`VPEpsAdapter` (eps, v or x0)
any ``D(x, sigma)`` network     --                                :class:`DenoiserAdapter` (as is)
==============================  ================================  ==========================================

guided-diffusion and score-SDE networks are rebuilt by invdiff's own implementations with the original key
names (:mod:`invdiff.priors.adm`, :mod:`invdiff.priors.ncsnpp`), configured from the weights' keys and
shapes plus whatever flags the weights do not show; EDM layouts use deepinv's ports. Networks produced by
invdiff itself (``invdiff.priors.unet.EDMUNet``) already are denoisers and need no adapter. Every adapter
works in the data range its network was trained on ([-1, 1] for ADM and EDM, score-SDE's [0, 1] unless
``centered``); :class:`RescaledDenoiser` maps that range onto the caller's.

    >>> prior = load_adm_checkpoint("256x256_diffusion_uncond.pt")            # configuration read off the weights
    >>> prior = load_score_sde_checkpoint("checkpoint_95.pth")                 # score-MRI's NCSN++, EMA weights
    >>> x0_hat = prior(x, torch.full((len(x),), 1.5))      # (B, C, H, W) -> (B, C, H, W)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from invdiff.priors.base import Denoiser, as_sigma_batch
from invdiff.priors.checkpoints import has_common_prefix, load_state_dict, load_strict, strip_prefix
from invdiff.schedules import linear_beta_alphas_cumprod, sigmas_from_alphas_cumprod

log = logging.getLogger(__name__)

__all__ = ["VPEpsAdapter", "VEScoreAdapter", "NCSNppScore", "EDMAdapter", "DenoiserAdapter", "RescaledDenoiser",
           "ChannelwiseDenoiser", "load_adm_checkpoint", "load_ncsnpp_checkpoint", "load_score_sde_checkpoint",
           "load_foreign_prior", "is_foreign_prior", "save_as_safetensors", "load_edm_checkpoint", "load_diffusers_unet",
           "alphas_cumprod_from_scheduler_config"]

PREDICTIONS = ("epsilon", "v", "sample")
EDM_ARCHITECTURES = ("ddpmpp", "ncsnpp", "adm")

# deepinv's DiffUNet registers its own DDPM schedule as persistent buffers (derived, not learned); a state dict
# saved from it carries them, guided-diffusion's do not. The ADM loader drops them.
_DIFFUNET_SCHEDULE_BUFFERS = ("sqrt_1m_alphas_cumprod", "sqrt_alphas_cumprod")

# The EDM code base saves its networks inside a preconditioning wrapper whose body is ``self.model``.
_EDM_PRECOND_PREFIX = "model."


# ----------------------------------------------------------------------------------------------- helpers
def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a wrapped network computes in: its first floating parameter or buffer."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _as_image_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return size


def _channels(channels: int | None, network: nn.Module, name: str) -> int:
    channels = channels if channels is not None else getattr(network, "in_channels", None)
    if channels is None:
        raise ValueError(f"{name}: pass channels=...; the wrapped network has no in_channels attribute")
    return int(channels)


def _check_channels(x: torch.Tensor, channels: int, name: str) -> None:
    if x.ndim < 3 or x.shape[1] != channels:
        raise ValueError(f"{name} expects x of shape (B, {channels}, H, W), got {tuple(x.shape)}")


def _require_positive(sigma: torch.Tensor, name: str) -> None:
    # ln(sigma) enters the noise conditioning: sigma = 0 would feed -inf to the network.
    if not bool((sigma > 0).all()):
        raise ValueError(f"{name} needs sigma > 0, got {sigma.tolist()}")


def _edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """EDM Table 1 (Karras et al. 2022): ``(c_skip, c_out, c_in, c_noise)`` for a (B,) sigma.

    ``c_skip = sd^2/(sigma^2 + sd^2)``, ``c_out = sigma sd/sqrt(sigma^2 + sd^2)``,
    ``c_in = 1/sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma)/4`` with ``sd = sigma_data``.
    """
    total = sigma ** 2 + sigma_data ** 2
    return sigma_data ** 2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4


def _validate_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    abar = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if abar.ndim != 1 or len(abar) < 2:
        raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {tuple(abar.shape)}")
    if not bool(torch.isfinite(abar).all()) or not bool(((abar > 0) & (abar < 1)).all()):
        raise ValueError(f"alphas_cumprod must lie strictly inside (0, 1) (sigma_t = sqrt((1 - abar)/abar) "
                         f"finite and > 0), got range [{abar.min().item():.3g}, {abar.max().item():.3g}]")
    if not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError("alphas_cumprod must be strictly decreasing in t (noise grows with t)")
    return abar


# ----------------------------------------------------------------------------------------------- VP
class VPEpsAdapter(Denoiser):
    """A variance-preserving (DDPM/ADM) network as an EDM denoiser.

    ``D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))`` with
    ``t(sigma) = argmin_t |ln sigma_t - ln sigma|`` and ``sigma_t = sqrt((1 - abar_t)/abar_t)``.

    Why: VP noising is ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``; dividing by ``sqrt(abar_t)`` gives the
    EDM variable ``x = x0 + sigma_t eps``, so ``x_vp = x sqrt(abar) = x / sqrt(1 + sigma^2)`` and
    ``E[x0 | x] = x - sigma E[eps | x]`` (Karras et al. 2022, Table 1, VP). On grid points
    ``sigma = sigma_t`` the conversion is exact; between them ``t`` is the nearest grid point in log sigma,
    with an error first order in ``|ln sigma - ln sigma_t|`` (below 1 % of ``|D|`` on the linear 1000-step
    grid, measured against an exact Gaussian denoiser). ``continuous_timestep=True`` passes instead the
    fractional ``t`` interpolated linearly in log sigma, for networks whose timestep embedding accepts real
    ``t`` (ADM's sinusoidal one does).

    ``sigma_min = sigma_0`` and ``sigma_max = sigma_{T-1}`` are the ends of the model's grid (about 0.01 and
    157 for the linear 1e-4..2e-2 schedule over 1000 steps). Beyond them ``clip_timestep=True`` uses the end
    timestep (``sigma = 0`` gives ``t = 0``, and ``D = x`` for eps and v networks); ``clip_timestep=False``
    raises ``ValueError``.

    ``prediction``: what ``eps_model(x_vp, t)`` returns, ``"epsilon"`` (eps), ``"v"``
    (``v = sqrt(abar) eps - sqrt(1 - abar) x0``, so ``x0 = sqrt(abar) x_vp - sqrt(1 - abar) v``) or
    ``"sample"`` (x0 itself). ``learned_sigma``: the network returns ``2 C`` channels, the second half being
    the learned variance (improved DDPM / ADM), which ``D`` does not need and drops.

    x: (B, C, H, W) float; sigma: float or (B,); t passed to ``eps_model``: (B,) int64 (float64 when
    continuous). The network runs in its own dtype; the result has x's dtype.
    """

    def __init__(self, eps_model: nn.Module, alphas_cumprod, *, learned_sigma: bool = False,
                 clip_timestep: bool = True, prediction: str = "epsilon", continuous_timestep: bool = False,
                 channels: int | None = None, image_size=None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.eps_model = eps_model
        self.register_buffer("alphas_cumprod", _validate_alphas_cumprod(alphas_cumprod))
        self.learned_sigma = bool(learned_sigma)
        self.clip_timestep = bool(clip_timestep)
        self.prediction = prediction
        self.continuous_timestep = bool(continuous_timestep)
        self.channels = _channels(channels, eps_model, "VPEpsAdapter")
        self.image_size = _as_image_size(image_size)
        grid = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = float(grid[0]), float(grid[-1])

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.eps_model)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def extra_repr(self) -> str:
        return (f"T={self.num_timesteps}, sigma in [{self.sigma_min:.4g}, {self.sigma_max:.4g}], "
                f"prediction={self.prediction}, learned_sigma={self.learned_sigma}")

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """``t(sigma)`` for a (B,) sigma: nearest grid index in log sigma (int64), or fractional t (float64)."""
        # float64 keeps neighbouring grid sigmas apart (they differ by < 1 % near t = T); mps has no float64.
        lookup = torch.float32 if sigma.device.type == "mps" else torch.float64
        log_grid = sigmas_from_alphas_cumprod(self.alphas_cumprod.to(lookup)).log()
        log_sigma = sigma.detach().to(lookup).log()
        if not self.clip_timestep:
            self._check_in_grid(log_sigma, log_grid)
        # Clamping first makes sigma = 0 (log = -inf) and sigma = inf land on the end timesteps.
        log_sigma = log_sigma.clamp(log_grid[0], log_grid[-1])
        if not self.continuous_timestep:
            return (log_grid[None, :] - log_sigma[:, None]).abs().argmin(dim=1)
        upper = torch.searchsorted(log_grid, log_sigma.contiguous()).clamp(1, len(log_grid) - 1)
        below, above = log_grid[upper - 1], log_grid[upper]
        return (upper - 1).to(lookup) + (log_sigma - below) / (above - below)

    def _check_in_grid(self, log_sigma: torch.Tensor, log_grid: torch.Tensor) -> None:
        tolerance = 1e-5  # relative, in sigma: float32 round-off of the grid's own end points passes
        outside = (log_sigma < log_grid[0] - tolerance) | (log_sigma > log_grid[-1] + tolerance)
        if bool(outside.any()):
            raise ValueError(f"sigma {_sigma_list(log_sigma[outside])} lies outside the model's grid "
                             f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}] and clip_timestep=False")

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _check_channels(x, self.channels, "VPEpsAdapter")
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        t = self.timestep(sigma)
        sqrt_abar = _per_sample((1 + sigma ** 2).rsqrt(), x)          # sqrt(abar) at this sigma
        x_vp = x * sqrt_abar
        out = self.eps_model(x_vp.to(self.dtype), t).to(x.dtype)
        out = self._prediction_channels(out, x)
        sigma_b = _per_sample(sigma, x)
        if self.prediction == "epsilon":
            return x - sigma_b * out
        if self.prediction == "v":
            # sqrt(1 - abar) = sigma sqrt(abar).
            return sqrt_abar * x_vp - sigma_b * sqrt_abar * out
        return out

    def _prediction_channels(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        expected = 2 * c if self.learned_sigma else c
        if out.ndim != x.ndim or out.shape[1] != expected or out.shape[2:] != x.shape[2:]:
            raise ValueError(f"eps_model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; expected "
                             f"{expected} channels (learned_sigma={self.learned_sigma}) and the input's size")
        return out[:, :c]


def _sigma_list(log_sigma: torch.Tensor) -> list[float]:
    return [round(v, 6) for v in log_sigma.exp().tolist()]


class _ADMEpsilon(nn.Module):
    """:class:`~invdiff.priors.adm.ADMUNet` as ``(x_vp, t) -> [eps, (variance)]``, with a fixed class label for
    class-conditional networks; H and W are reflect-padded to the network's multiple and cropped back."""

    def __init__(self, net: nn.Module, class_label: int | None = None):
        super().__init__()
        self.net = net
        self.in_channels = net.in_channels
        self.class_label = class_label
        self.multiple = 2 ** (len(net.config.channel_mult) - 1)

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = None if self.class_label is None else torch.full((len(x_vp),), self.class_label, device=x_vp.device)
        h, w = x_vp.shape[-2:]
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            padded = F.pad(x_vp, (0, pad_w, 0, pad_h), mode=mode)
            return self.net(padded, t, y)[..., :h, :w]
        return self.net(x_vp, t, y)


def _adm_flags(path: Path, config) -> dict:
    from invdiff.priors.adm import read_adm_flags

    if config is None:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            log.info("%s: reading the guided-diffusion flags beside it, %s", path, sidecar)
            config = read_adm_flags(sidecar)
            if "architecture" in config:              # a prior description (load_foreign_prior), not flags
                config = config.get("config") or {}
                config = config if isinstance(config, Mapping) else sidecar.parent / config
    return read_adm_flags(config)


def load_adm_checkpoint(path: str | os.PathLike, *, config=None, image_size=None, in_channels: int | None = None,
                        learned_sigma: bool | None = None, class_label: int | None = None, alphas_cumprod=None,
                        clip_timestep: bool = True, continuous_timestep: bool = False, key: str | None = None,
                        **settings) -> VPEpsAdapter:
    """A guided-diffusion (ADM, Dhariwal & Nichol 2021) UNet checkpoint, in any configuration, as a :class:`VPEpsAdapter`.

    The network (:class:`invdiff.priors.adm.ADMUNet`, guided-diffusion's key names) is built from the
    checkpoint's own configuration: channels, ``channel_mult``, ``num_res_blocks``, attention levels,
    ``learn_sigma``, scale-shift norm, resampling kind and class conditioning are read from the weights
    (:func:`~invdiff.priors.adm.adm_config_from_state_dict`). What the weights do not show comes from
    ``config``: guided-diffusion's flags as a dict, a JSON file, or the flag string of its README
    (``"--attention_resolutions 32,16,8 --num_head_channels 64 --noise_schedule linear ..."``); by default a
    ``<checkpoint>.json`` beside the file. Without flags: ``num_head_channels=64``, legacy attention order and
    the linear 1000-step schedule, as in every released guided-diffusion model. ``settings`` (ADMConfig
    fields, e.g. ``num_heads=4``) override single values; stated values that contradict the weights raise.

    Schedule: ``alphas_cumprod``, else the flags' ``noise_schedule`` / ``diffusion_steps``, else DDPM's linear
    1e-4..2e-2 over 1000 steps; ``predict_xstart`` flags an x0-predicting network. Class-conditional networks
    need ``class_label`` (the class every denoising call is conditioned on). ``path`` holds the
    ``model.state_dict()`` guided-diffusion writes (``.pt``, read with ``weights_only=True``) or the same
    tensors as ``.safetensors``. The prior is in eval mode with frozen parameters, in the checkpoint's data
    range ([-1, 1]); it runs at any size (reflect-padded to a multiple of ``2**(levels - 1)``).

        >>> prior = load_adm_checkpoint("256x256_diffusion_uncond.pt", image_size=256)
    """
    from invdiff.priors.adm import ADMUNet, adm_config_from_flags, adm_config_from_state_dict, guided_diffusion_alphas_cumprod

    path = Path(path)
    state = load_state_dict(path, key=key)
    flags = _adm_flags(path, config)
    stated = {**adm_config_from_flags(flags), **settings}
    if image_size is not None and not isinstance(image_size, (tuple, list)):
        stated.setdefault("image_size", int(image_size))
    if in_channels is not None:
        stated["in_channels"] = int(in_channels)
    dropped = [k for k in _DIFFUNET_SCHEDULE_BUFFERS if k in state]
    if dropped:
        log.info("%s: dropping deepinv DiffUNet's derived schedule buffers %s", path, dropped)
        state = {k: v for k, v in state.items() if k not in dropped}
    cfg = adm_config_from_state_dict(state, source=path, **stated)
    log.info("%s: ADM configuration %s", path, cfg)
    if learned_sigma is not None and learned_sigma != cfg.learn_sigma:
        raise ValueError(f"{path}: learned_sigma={learned_sigma} but out.2.weight has {cfg.out_channels} rows for "
                         f"{cfg.in_channels} input channels (learned_sigma={cfg.learn_sigma})")
    if cfg.out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"{path}: out.2.weight has {cfg.out_channels} rows for {cfg.in_channels} input channels; "
                         f"expected {cfg.in_channels} (eps) or {2 * cfg.in_channels} (eps and learned variance)")
    if cfg.num_classes is not None and class_label is None:
        raise ValueError(f"{path}: class-conditional network (label_emb.weight: {cfg.num_classes} classes); pass "
                         f"class_label=... (the class to condition on)")
    if cfg.num_classes is None and class_label is not None:
        raise ValueError(f"{path}: class_label={class_label} given but the network is unconditional (no label_emb.weight)")
    if class_label is not None and not 0 <= class_label < cfg.num_classes:
        raise ValueError(f"{path}: class_label={class_label} outside [0, {cfg.num_classes})")
    net = ADMUNet(cfg)
    load_strict(net, state, path)
    net.eval().requires_grad_(False)
    if alphas_cumprod is None:
        alphas_cumprod = (guided_diffusion_alphas_cumprod(flags)
                          if {"noise_schedule", "diffusion_steps"} & set(flags) else linear_beta_alphas_cumprod())
    prediction = "sample" if str(flags.get("predict_xstart", "false")).lower() == "true" else "epsilon"
    return VPEpsAdapter(_ADMEpsilon(net, class_label), alphas_cumprod, learned_sigma=cfg.learn_sigma,
                        clip_timestep=clip_timestep, prediction=prediction, continuous_timestep=continuous_timestep,
                        channels=cfg.in_channels, image_size=image_size if image_size is not None else cfg.image_size)


# ----------------------------------------------------------------------------------------------- VE
class VEScoreAdapter(Denoiser):
    """A variance-exploding score network as a denoiser: ``D(x, sigma) = x + sigma^2 s(x, sigma)`` (Tweedie).

    ``score_model(x, sigma) -> grad_x log p_sigma(x)`` with sigma (B,); VE noising is ``x = x0 + sigma n``,
    the EDM variable itself, so no input scaling is needed. ``sigma_min``/``sigma_max`` are the model's
    training range (score-SDE NCSN++ in the [-1, 1] data range: 0.02 and 100 for CIFAR-10, EDM's VE
    defaults). x: (B, C, H, W); sigma > 0, float or (B,).
    """

    def __init__(self, score_model: nn.Module, *, sigma_min: float, sigma_max: float, channels: int | None = None,
                 image_size=None):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.score_model = score_model
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.channels = _channels(channels, score_model, "VEScoreAdapter")
        self.image_size = _as_image_size(image_size)

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.score_model)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _check_channels(x, self.channels, "VEScoreAdapter")
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        _require_positive(sigma, "VEScoreAdapter")
        score = self.score_model(x.to(self.dtype), sigma.to(self.dtype)).to(x.dtype)
        return x + _per_sample(sigma, x) ** 2 * score


class NCSNppScore(nn.Module):
    """Score of a VE-preconditioned NCSN++ body ``F``: ``s(x, sigma) = F(x, ln(sigma/2)) / sigma``.

    ``F`` is deepinv's ``NCSNpp.forward_unet``; x: (B, C, H, W), sigma: (B,) > 0.

    deepinv's NCSNpp is the EDM code base's SongUNet: it is conditioned on the noise level sigma (not on a
    timestep) through ``c_noise``, and its ``forward`` returns the *denoised* image
    ``D = c_skip x + c_out F(c_in x, c_noise)``. For VE score-SDE weights EDM's Table 1 (VE column) gives
    ``c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)``, so ``D = x + sigma F`` (``F`` estimates
    ``-eps``) and the score is ``(D - x)/sigma^2 = F/sigma``. The factor 1/2 in ``c_noise`` is EDM's: the
    original score-SDE networks were trained on [0, 1] data, where the same noise has half the sigma of the
    [-1, 1] range the converted weights are used in.
    """

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net.forward_unet(x, (sigma / 2).log()) / _per_sample(sigma, x)


def load_ncsnpp_checkpoint(path: str | os.PathLike, *, image_size: int | None = None, in_channels: int | None = None,
                           sigma_min: float | None = None, sigma_max: float | None = None, model_type: str = "ncsn",
                           key: str | None = None, **network_kwargs) -> VEScoreAdapter:
    """A score-SDE NCSN++ VE checkpoint (Song et al. 2021) as a :class:`VEScoreAdapter`, in either layout.

    - score_sde_pytorch's own layout (keys ``all_modules.N.*``: score-SDE, score-MRI, DiffusionMBIR) goes to
      :func:`load_score_sde_checkpoint`, which reads the configuration off the weights; ``network_kwargs``
      may hold its ``config=`` and settings; data range and sigma range are the training ones.
    - EDM's port (keys ``model.*`` of ``VEPrecond.state_dict()``, or the bare body's ``enc.*``, ``dec.*``):
      deepinv's ``NCSNpp(model_type, img_resolution=image_size, in_channels (default 3), ...)``, see
      :class:`NCSNppScore`; ``network_kwargs`` (``model_channels``, ``channel_mult``, ``num_blocks``,
      ``attn_resolutions``, ``augment_dim``, ...) must match the training configuration (deepinv's defaults
      otherwise; ``augment_dim`` is read from the checkpoint when not given); [-1, 1] data, sigma in
      [0.02, 100] unless given.

    ``.pt`` (read with ``weights_only=True``) or ``.safetensors``. Eval mode, frozen parameters.
    """
    state = load_state_dict(path, key=key)
    if any(k.startswith("all_modules.") for k in state):
        if in_channels is not None:
            network_kwargs["num_channels"] = in_channels
        if image_size is not None:
            network_kwargs["image_size"] = image_size
        log.info("%s: score_sde_pytorch layout (all_modules.N.*)", path)
        return load_score_sde_checkpoint(path, sigma_min=sigma_min, sigma_max=sigma_max, key=key, **network_kwargs)
    if image_size is None:
        raise ValueError(f"{path}: EDM-layout NCSN++ checkpoints need image_size=... (the training resolution)")
    in_channels = 3 if in_channels is None else in_channels
    state = _edm_family_state(state, path)
    net = _build_ncsnpp(model_type, image_size, in_channels, state, network_kwargs, path)
    load_strict(net, state, path)
    net.eval().requires_grad_(False)
    return VEScoreAdapter(NCSNppScore(net, in_channels), sigma_min=0.02 if sigma_min is None else sigma_min,
                          sigma_max=100.0 if sigma_max is None else sigma_max, channels=in_channels,
                          image_size=image_size)


class _ScoreSDEScore(nn.Module):
    """score_sde_pytorch's NCSN++ as ``(x, sigma) -> score``; see :func:`load_score_sde_checkpoint`.

    Fourier-embedded (continuous) networks take sigma itself. Positional (discrete) networks take the index
    ``t`` of the grid sigma nearest in log; the returned value is rescaled by ``(sigma_t/sigma)^2`` so that
    :class:`VEScoreAdapter`'s ``x + sigma^2 s`` is the network's own denoiser ``x + sigma_t^2 s_t``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.in_channels = net.in_channels
        self.positional = net.config.embedding_type == "positional"

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.positional:
            return self.net(x, sigma)
        grid = self.net.sigmas.to(sigma.dtype)
        index = (grid.log()[None, :] - sigma.log()[:, None]).abs().argmin(dim=1)
        return self.net(x, index) * _per_sample(grid[index] / sigma, x) ** 2


def _read_json_config(config, what: str) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    path = Path(os.fspath(config))
    if path.suffix == ".py":
        raise ValueError(f"{path}: {what} configs written in Python are code and are not executed; write the fields "
                         f"you need as JSON ({{\"model\": {{...}}, \"data\": {{...}}}}) and pass that")
    try:
        loaded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what} configuration as JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the {what} configuration must be a JSON object, got {type(loaded).__name__}")
    return loaded


def _flat_score_sde_config(config: Mapping) -> dict:
    flat = {}
    for part in ("data", "model", "training"):
        if isinstance(config.get(part), Mapping):
            flat.update(config[part])
    flat.update({k: v for k, v in config.items() if not isinstance(v, Mapping)})
    return flat


def _score_sde_model_state(obj, path: Path, key: str | None, ema: bool) -> dict[str, torch.Tensor]:
    """The weights of a score-SDE checkpoint: ``{"model", "ema", "optimizer", "step"}`` (EMA weights by default,
    mapped onto the model's names in parameter order) or any state dict :func:`load_state_dict` reads."""
    from invdiff.priors.checkpoints import is_shadow_ema, state_from_shadow_params

    container = isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and key is None
    if not container:
        return load_state_dict(path, key=key)
    model = dict(obj["model"])
    if has_common_prefix(model, "module."):
        model = strip_prefix(model, "module.")
    if not ema:
        log.info("%s: using the 'model' weights (ema=False)", path)
        return model
    if not is_shadow_ema(obj.get("ema")):
        log.warning("%s: no score-SDE EMA entry ('ema' with 'shadow_params'); using the 'model' weights", path)
        return model
    # ExponentialMovingAverage keeps the parameters with requires_grad, in model.parameters() order, which is
    # the state dict's order without buffers ('sigmas') and without the fixed Fourier features (all_modules.0.W).
    trainable = [k for k in model if k != "sigmas" and not (k == "all_modules.0.W" and model[k].ndim == 1)]
    log.info("%s: using the EMA weights (%d tensors)", path, len(trainable))
    return state_from_shadow_params(model, obj["ema"]["shadow_params"], trainable, path)


def save_as_safetensors(path: str | os.PathLike, out: str | os.PathLike | None = None, *, ema: bool = True,
                        key: str | None = None) -> Path:
    """Write the weights the loaders would use from ``path`` as a ``.safetensors`` file (tensors only) and return it.

    For score-SDE's training checkpoint that is its EMA weights under the model's names (``ema=False``: the
    'model' weights); otherwise what :func:`load_state_dict` reads. ``out`` defaults to ``path`` with the suffix
    ``.safetensors``. Convert once; later loads read no pickle at all.
    """
    from safetensors.torch import save_file

    from invdiff.priors.checkpoints import read_checkpoint

    path = Path(path)
    out = path.with_suffix(".safetensors") if out is None else Path(out)
    if out.resolve() == path.resolve():
        raise ValueError(f"{path}: already a .safetensors file")
    state = _score_sde_model_state(read_checkpoint(path), path, key, ema)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(out))
    log.info("%s: wrote %d tensors to %s", path, len(state), out)
    return out


def load_score_sde_checkpoint(path: str | os.PathLike, *, config=None, ema: bool = True, sigma_min: float | None = None,
                              sigma_max: float | None = None, key: str | None = None, **settings) -> VEScoreAdapter:
    """A score_sde_pytorch NCSN++ checkpoint (keys ``all_modules.N.*``, VE SDE) as a :class:`VEScoreAdapter`.

    ``D(x, sigma) = x + sigma^2 s(x, sigma)`` with ``s`` the network's score (Song et al. 2021; score-MRI and
    DiffusionMBIR use this layout). The network (:class:`invdiff.priors.ncsnpp.NCSNppScoreSDE`) is built from
    the checkpoint's own structure, read from its keys and shapes (channels, ``nf``, ``ch_mult``,
    ``num_res_blocks``, attention levels, embedding, resblock and pyramid types). Flags that leave no trace in
    the weights (``centered``, ``fir``/``fir_kernel``, ``skip_rescale``, ``scale_by_sigma``, ``nonlinearity``)
    come from ``config`` (score-SDE's config as a dict or JSON file, ``{"model": {...}, "data": {...},
    "training": {...}}``, same field names) or ``settings``, else take the VE NCSN++ values every public
    checkpoint of this family uses. Values that contradict the weights raise ``ValueError``.

    Data range: that of training, as score-SDE's sampler feeds the network (``data.centered=False``: [0, 1],
    e.g. score-MRI's magnitude images divided by their maximum); sigma in the same units. ``sigma_min`` and
    ``sigma_max`` default to ``model.sigma_min/max`` of ``config``, else to the ends of the checkpoint's
    ``sigmas`` buffer. The file may be score-SDE's training checkpoint ``{"model", "ema", "optimizer", "step"}``
    (``torch.load(weights_only=True)``): its EMA weights are used unless ``ema=False``, as score-SDE samples.
    Only VE-trained networks (``training.sde == "vesde"``) have this score form; VP ones are refused when the
    config says so. Eval mode, frozen parameters.

        >>> prior = load_score_sde_checkpoint("checkpoint_95.pth", config={"data": {"image_size": 320}})
    """
    from invdiff.priors.checkpoints import read_checkpoint
    from invdiff.priors.ncsnpp import NCSNppConfig, NCSNppScoreSDE, ncsnpp_config_from_state_dict

    path = Path(path)
    flat = _flat_score_sde_config(_read_json_config(config, "score-SDE"))
    if str(flat.get("sde", "vesde")).lower() != "vesde":
        raise ValueError(f"{path}: the config says training.sde={flat['sde']!r}; only VE (vesde) networks output "
                         f"the score this adapter converts")
    state = _score_sde_model_state(read_checkpoint(path), path, key, ema)
    if not any(k.startswith("all_modules.") for k in state):
        raise ValueError(f"{path}: no 'all_modules.N.*' keys; not a score_sde_pytorch NCSN++ checkpoint")
    fields = {f.name for f in dataclasses.fields(NCSNppConfig)}
    stated = {k: (v.lower() if isinstance(v, str) else v) for k, v in flat.items() if k in fields}
    if "sigmas" in state and "num_scales" in stated and "num_scales" not in settings:
        # Sampling configs often change num_scales (the number of steps); the file's buffer is what was saved.
        log.info("%s: config num_scales=%s, checkpoint 'sigmas' has %d entries; using the checkpoint's", path,
                 stated["num_scales"], len(state["sigmas"]))
        del stated["num_scales"]
    stated.update(settings)
    attn_resolutions = stated.pop("attn_resolutions", flat.get("attn_resolutions"))
    structure = ncsnpp_config_from_state_dict(state, source=path, **{k: v for k, v in stated.items()
                                                                      if k != "attn_levels"})
    if attn_resolutions is not None and "attn_levels" not in stated:
        if structure.image_size is None:
            raise ValueError(f"{path}: attn_resolutions needs data.image_size")
        stated["attn_levels"] = tuple(level for level in range(len(structure.ch_mult))
                                      if structure.image_size // 2 ** level in set(attn_resolutions))
    cfg = ncsnpp_config_from_state_dict(state, source=path, **stated)
    log.info("%s: NCSN++ configuration %s", path, cfg)
    net = NCSNppScoreSDE(cfg)
    optional = () if cfg.embedding_type == "positional" else ("sigmas",)
    if "sigmas" not in state and cfg.embedding_type == "positional":
        raise ValueError(f"{path}: positional (discrete) NCSN++ needs its 'sigmas' buffer, which the file lacks")
    load_strict(net, state, path, optional_keys=optional)
    net.eval().requires_grad_(False)
    sigma_min = sigma_min if sigma_min is not None else flat.get("sigma_min")
    sigma_max = sigma_max if sigma_max is not None else flat.get("sigma_max")
    if (sigma_min is None or sigma_max is None) and "sigmas" in state:
        ends = state["sigmas"].double()
        sigma_min = float(ends.min()) if sigma_min is None else sigma_min
        sigma_max = float(ends.max()) if sigma_max is None else sigma_max
    if sigma_min is None or sigma_max is None:
        raise ValueError(f"{path}: no 'sigmas' buffer and no model.sigma_min/sigma_max in the config; pass "
                         f"sigma_min=... and sigma_max=... (the training noise range)")
    return VEScoreAdapter(_ScoreSDEScore(net), sigma_min=float(sigma_min), sigma_max=float(sigma_max),
                          channels=cfg.num_channels, image_size=cfg.image_size)


def _load_edm_family_state(path, key) -> dict[str, torch.Tensor]:
    return _edm_family_state(load_state_dict(path, key=key), path)


def _edm_family_state(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    if any(k.startswith("all_modules.") for k in state):
        raise ValueError(f"{path}: this is the score_sde_pytorch layout (keys 'all_modules.*'), not EDM's; load it "
                         f"with load_score_sde_checkpoint (or load_ncsnpp_checkpoint)")
    if has_common_prefix(state, _EDM_PRECOND_PREFIX):
        log.info("%s: stripping EDM's preconditioning prefix %r", path, _EDM_PRECOND_PREFIX)
        state = strip_prefix(state, _EDM_PRECOND_PREFIX)
    return state


def _network_kwargs(kwargs: dict, state: Mapping[str, torch.Tensor], path) -> dict:
    kwargs = dict(kwargs)
    for reserved in ("pretrained", "img_resolution", "in_channels", "out_channels", "model_type"):
        if reserved in kwargs:
            raise ValueError(f"{path}: {reserved}= is set by the loader; remove it from the network keyword arguments")
    if kwargs.get("label_dim", 0):
        raise ValueError(f"{path}: class-conditional networks (label_dim={kwargs['label_dim']}) are not supported; "
                         f"invdiff priors are unconditional")
    if "augment_dim" not in kwargs:
        # EDM trains with a 9-dim augmentation label whose layer exists only when augment_dim > 0; it is
        # unused at sampling time, so reading its size from the file spares the user a guess.
        weight = state.get("map_augment.weight")
        kwargs["augment_dim"] = 0 if weight is None else int(weight.shape[1])
        log.info("%s: augment_dim=%d (read from the checkpoint)", path, kwargs["augment_dim"])
    kwargs.setdefault("dropout", 0.0)
    return kwargs


def _build_ncsnpp(model_type: str, image_size: int, in_channels: int, state, network_kwargs: dict,
                  path) -> nn.Module:
    from deepinv.models import NCSNpp

    kwargs = _network_kwargs(network_kwargs, state, path)
    return NCSNpp(model_type=model_type, img_resolution=int(image_size), in_channels=in_channels,
                  out_channels=in_channels, pretrained=None, **kwargs)


# ----------------------------------------------------------------------------------------------- EDM
class EDMAdapter(Denoiser):
    """An EDM network body ``F`` inside EDM preconditioning (Karras et al. 2022, Eq. 7 and Table 1).

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``, coefficients from :func:`_edm_coefficients` with
    ``sd = sigma_data``. ``network(x_in, c_noise) -> F``: x_in (B, C, H, W), c_noise (B,); deepinv's
    ``NCSNpp``/``ADMUNet`` bodies are called through their ``forward_unet``. x: (B, C, H, W); sigma > 0.
    """

    def __init__(self, network: nn.Module, *, sigma_data: float = 0.5, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, channels: int | None = None, image_size=None):
        super().__init__()
        if sigma_data <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(f"need sigma_data > 0 and 0 < sigma_min < sigma_max, got {sigma_data}, "
                             f"{sigma_min}, {sigma_max}")
        self.network = network
        self.sigma_data = float(sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.channels = _channels(channels, network, "EDMAdapter")
        self.image_size = _as_image_size(image_size)

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.network)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _check_channels(x, self.channels, "EDMAdapter")
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        _require_positive(sigma, "EDMAdapter")
        c_skip, c_out, c_in, c_noise = _edm_coefficients(sigma, self.sigma_data)
        f = self.network((_per_sample(c_in, x) * x).to(self.dtype), c_noise.to(self.dtype)).to(x.dtype)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * f


class _UNetBody(nn.Module):
    """The unpreconditioned body ``F(x_in, c_noise)`` of a deepinv ``NCSNpp`` or ``ADMUNet``."""

    def __init__(self, net: nn.Module, in_channels: int):
        super().__init__()
        self.net = net
        self.in_channels = in_channels

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.net.forward_unet(x_in, c_noise)


def load_edm_checkpoint(path: str | os.PathLike, *, architecture: str, image_size: int, in_channels: int = 3,
                        sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        key: str | None = None, **network_kwargs) -> EDMAdapter:
    """An EDM-preconditioned checkpoint (Karras et al. 2022) as an :class:`EDMAdapter`.

    ``architecture``: ``"ddpmpp"`` (deepinv ``NCSNpp(model_type="ddpm")``, EDM's VP-trained SongUNet),
    ``"ncsnpp"`` (``NCSNpp(model_type="ncsn")``, EDM's VE-trained SongUNet) or ``"adm"`` (deepinv
    ``ADMUNet``, EDM's DhariwalUNet); ``network_kwargs`` (``model_channels``, ``channel_mult``,
    ``num_blocks``, ``attn_resolutions``, ...) must match the training configuration. ``path`` holds
    ``EDMPrecond.state_dict()`` (keys ``model.*``, what the EDM code base's networks contain) or the bare
    body's, as ``.pt`` or ``.safetensors``; EDM's own ``.pkl`` snapshots carry code and are refused:
    convert them once, where you trust them, with
    ``safetensors.torch.save_file(pickle.load(f)["ema"].state_dict(), "edm.safetensors")``.
    Unconditional networks only. Eval mode, frozen parameters, [-1, 1] data range with ``sigma_data=0.5``.

    Networks trained by invdiff (``invdiff.priors.unet.EDMUNet``) are denoisers already and load through
    invdiff's own prior loading; a network of any other design that computes ``D(x, sigma)`` itself is
    wrapped as is by :class:`DenoiserAdapter`.
    """
    if architecture not in EDM_ARCHITECTURES:
        raise ValueError(f"architecture must be one of {EDM_ARCHITECTURES}, got {architecture!r}")
    state = _load_edm_family_state(path, key)
    if architecture == "adm":
        from deepinv.models import ADMUNet

        kwargs = _network_kwargs(network_kwargs, state, path)
        net = ADMUNet(img_resolution=int(image_size), in_channels=in_channels, out_channels=in_channels,
                      pretrained=None, **kwargs)
    else:
        net = _build_ncsnpp("ddpm" if architecture == "ddpmpp" else "ncsn", image_size, in_channels, state,
                            network_kwargs, path)
    load_strict(net, state, path)
    net.eval().requires_grad_(False)
    return EDMAdapter(_UNetBody(net, in_channels), sigma_data=sigma_data, sigma_min=sigma_min,
                      sigma_max=sigma_max, channels=in_channels, image_size=image_size)


class DenoiserAdapter(Denoiser):
    """A network that already computes ``D(x, sigma)`` (EDM convention), wrapped as is.

    ``denoiser(x, sigma)`` with x (B, C, H, W) and sigma (B,) returns x0_hat; this class only adds the
    protocol's ``sigma_min``, ``sigma_max``, ``channels``, ``image_size`` and the dtype cast at the boundary.
    """

    def __init__(self, denoiser: nn.Module, *, sigma_min: float, sigma_max: float, channels: int | None = None,
                 image_size=None):
        super().__init__()
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.denoiser = denoiser
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.channels = _channels(channels, denoiser, "DenoiserAdapter")
        self.image_size = _as_image_size(image_size)

    @property
    def dtype(self) -> torch.dtype:
        return _module_dtype(self.denoiser)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _check_channels(x, self.channels, "DenoiserAdapter")
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        return self.denoiser(x.to(self.dtype), sigma.to(self.dtype)).to(x.dtype)


class RescaledDenoiser(Denoiser):
    """A prior trained on ``u = scale x + shift``, ``D(x, s) = (D_u(scale x + shift, scale s) - shift)/scale``.

    Why: ``x = x0 + sigma n`` maps to ``u = u0 + (scale sigma) n`` with ``u0 = scale x0 + shift``, and
    ``E[x0 | x] = (E[u0 | u] - shift) / scale``. E.g. a [-1, 1] checkpoint on images in [0, 1]:
    ``RescaledDenoiser(prior, scale=2.0, shift=-1.0)``; sigma_min/max are divided by ``scale``.
    """

    def __init__(self, prior: Denoiser, *, scale: float, shift: float = 0.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.prior = prior
        self.scale, self.shift = float(scale), float(shift)
        self.sigma_min, self.sigma_max = prior.sigma_min / self.scale, prior.sigma_max / self.scale
        self.channels, self.image_size = prior.channels, prior.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = as_sigma_batch(sigma, x.shape[0], x)
        return (self.prior(self.scale * x + self.shift, self.scale * sigma) - self.shift) / self.scale


class ChannelwiseDenoiser(Denoiser):
    """A ``k``-channel prior applied to each group of ``k`` channels of a ``C``-channel image, as independent images.

    ``D(x, sigma)[:, g k:(g + 1) k] = D_k(x[:, g k:(g + 1) k], sigma)``: the prior of the image is the product of
    the prior over groups. For a 1-channel prior on a complex MRI image (C = 2, real and imaginary) this is how
    score-MRI (Chung & Ye 2022) uses its magnitude-trained network: the real and imaginary parts are denoised as
    two separate images. x: (B, C, H, W); the groups are batched into one call of the wrapped prior.
    """

    def __init__(self, prior: Denoiser, channels: int):
        super().__init__()
        if channels < 1 or channels % prior.channels:
            raise ValueError(f"ChannelwiseDenoiser: {channels} channels do not split into groups of the prior's "
                             f"{prior.channels}")
        self.prior = prior
        self.channels = int(channels)
        self.sigma_min, self.sigma_max, self.image_size = prior.sigma_min, prior.sigma_max, prior.image_size

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        _check_channels(x, self.channels, "ChannelwiseDenoiser")
        batch, groups = x.shape[0], self.channels // self.prior.channels
        sigma = as_sigma_batch(sigma, batch, x)
        flat = x.reshape(batch * groups, self.prior.channels, *x.shape[2:])
        return self.prior(flat, sigma.repeat_interleave(groups)).reshape(x.shape)


# ----------------------------------------------------------------------------------------------- foreign priors by path
FOREIGN_ARCHITECTURES = ("guided-diffusion", "score-sde")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def _foreign_spec(path: Path) -> dict | None:
    """The prior description in ``path`` if it is a foreign prior (see :func:`load_foreign_prior`), else None."""
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return spec if isinstance(spec, dict) and spec.get("architecture") in FOREIGN_ARCHITECTURES else None
    if suffix not in _CHECKPOINT_SUFFIXES:
        return None
    sidecar = path.with_suffix(".json")
    if suffix == ".safetensors" and sidecar.is_file() and _foreign_spec(sidecar) is None:
        return None                                       # an invdiff export: weights + its own metadata
    return {"checkpoint": path.name}


def is_foreign_prior(name_or_path) -> bool:
    """True for a guided-diffusion / score-SDE checkpoint file or a JSON describing one (:func:`load_foreign_prior`)."""
    return _foreign_spec(Path(str(name_or_path))) is not None


def load_foreign_prior(name_or_path) -> Denoiser:
    """A prior from a guided-diffusion or score-SDE checkpoint, by path, for ``invdiff.load_prior`` and ``--prior``.

    ``name_or_path``: the checkpoint itself (layout recognised from its keys: ``all_modules.N.*`` is score-SDE
    NCSN++, ``input_blocks.*`` guided-diffusion; network and data range as trained) or a JSON file describing it::

        {"architecture": "score-sde",           # or "guided-diffusion"
         "checkpoint": "checkpoint_95.pth",     # relative to the JSON file
         "config": {"data": {"image_size": 320}},   # score-SDE config / guided-diffusion flags (dict or file)
         "options": {"ema": true},              # further keyword arguments of the loader
         "scale": 1.0, "shift": 0.0,            # the network saw u = scale x + shift (RescaledDenoiser)
         "channels": 2}                         # apply per group of channels (ChannelwiseDenoiser)

    With ``channels`` larger than the network's, the network denoises each group of its own channel count
    separately (a 1-channel magnitude prior on the real and imaginary parts of a complex MRI image). The returned
    prior carries ``name``, ``sha256`` (of the weights file) and ``metadata`` (the description), for the records
    outputs keep; its ``image_size`` is None: both networks run at any size divisible by 2^(levels - 1).
    """
    from invdiff.priors.train import sha256_file

    source = Path(str(name_or_path))
    spec = _foreign_spec(source)
    if spec is None:
        raise ValueError(f"{source}: not a guided-diffusion / score-SDE checkpoint nor a JSON describing one "
                         f"(\"architecture\" one of {FOREIGN_ARCHITECTURES})")
    if "checkpoint" not in spec:
        raise ValueError(f"{source}: key 'checkpoint' missing; expected the weights file, relative to the JSON")
    checkpoint = (source.parent / spec["checkpoint"]).resolve()
    options = dict(spec.get("options", {}))
    config = spec.get("config")
    if isinstance(config, str):
        config = str(source.parent / config)
    architecture = spec.get("architecture")
    if architecture is None:
        keys = load_state_dict(checkpoint).keys()
        architecture = ("score-sde" if any(k.startswith("all_modules.") for k in keys) else
                        "guided-diffusion" if "input_blocks.0.0.weight" in keys else None)
        if architecture is None:
            raise ValueError(f"{checkpoint}: neither score-SDE NCSN++ (all_modules.N.*) nor guided-diffusion "
                             f"(input_blocks.*) keys; load other layouts with invdiff.priors.adapters' loaders")
    if architecture == "score-sde":
        prior = load_score_sde_checkpoint(checkpoint, config=config, **options)
    else:
        prior = load_adm_checkpoint(checkpoint, config={} if config is None else config, **options)
    if spec.get("scale", 1.0) != 1.0 or spec.get("shift", 0.0) != 0.0:
        prior = RescaledDenoiser(prior, scale=float(spec.get("scale", 1.0)), shift=float(spec.get("shift", 0.0)))
    channels = int(spec.get("channels", prior.channels))
    if channels != prior.channels:
        prior = ChannelwiseDenoiser(prior, channels)
    prior.image_size = None
    prior.name = source.stem
    prior.sha256 = sha256_file(checkpoint)
    prior.metadata = {**spec, "architecture": architecture, "checkpoint": str(checkpoint), "sha256": prior.sha256}
    return prior.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- diffusers
# DDPMScheduler's defaults, used when a folder carries no scheduler_config.json.
DDPM_SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                           "beta_schedule": "linear", "prediction_type": "epsilon"}
_DIFFUSERS_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}


def alphas_cumprod_from_scheduler_config(config: Mapping) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` (float64, (T,)) from a diffusers scheduler config.

    ``beta_schedule``: ``"linear"`` (betas evenly spaced), ``"scaled_linear"`` (square roots evenly spaced,
    Stable Diffusion), ``"squaredcos_cap_v2"`` (Nichol & Dhariwal 2021, Eq. 17: ``abar(t) = f(t)/f(0)``,
    ``f(t) = cos((t/T + 0.008)/1.008 * pi/2)^2``, betas capped at 0.999), or explicit ``trained_betas``.
    """
    config = {**DDPM_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config: rescale_betas_zero_snr=True makes abar_T = 0 (sigma_max = inf), "
                         "which an EDM-style denoiser cannot represent")
    steps = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if "trained_betas" in config:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], steps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, steps,
                               dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)],
                             dtype=torch.float64)
    else:
        raise ValueError(f"scheduler config: beta_schedule {schedule!r} is not supported; expected 'linear', "
                         f"'scaled_linear', 'squaredcos_cap_v2' or trained_betas")
    return torch.cumprod(1 - betas, dim=0)


class _DiffusersEpsilon(nn.Module):
    """diffusers ``UNet2DModel`` as ``(x_vp, t) -> prediction``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.in_channels = unet.config.in_channels

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x_vp, t).sample


def _read_scheduler_config(folder: Path, scheduler_config) -> dict:
    if isinstance(scheduler_config, Mapping):
        return dict(scheduler_config)
    if scheduler_config is not None:
        return json.loads(Path(scheduler_config).read_text())
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if candidate.is_file():
            log.info("using scheduler config %s", candidate)
            return json.loads(candidate.read_text())
    log.warning("%s: no scheduler_config.json; assuming DDPMScheduler defaults %s", folder, DDPM_SCHEDULER_DEFAULTS)
    return dict(DDPM_SCHEDULER_DEFAULTS)


def load_diffusers_unet(folder: str | os.PathLike, scheduler_config=None, *, clip_timestep: bool = True,
                        continuous_timestep: bool = False) -> VPEpsAdapter:
    """A diffusers ``UNet2DModel`` folder (``config.json`` + weights) as a :class:`VPEpsAdapter`.

    ``folder`` holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``) itself, or is
    a pipeline folder with ``unet/`` (and ``scheduler/``). The schedule and ``prediction_type`` (``epsilon``,
    ``v_prediction`` or ``sample``) come from ``scheduler_config`` (a dict or a path), else from
    ``scheduler_config.json`` beside the UNet, else from DDPMScheduler's defaults (with a logged warning).
    The network is built with ``UNet2DModel.from_config`` (no hub access) and loaded strictly. Needs the
    optional package ``diffusers``. VE folders (``ScoreSdeVeScheduler``) are not supported.
    """
    try:
        from diffusers import UNet2DModel
    except ImportError as err:
        raise ImportError("load_diffusers_unet needs the optional package 'diffusers': pip install diffusers") from err
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (nor unet/config.json); "
                                f"expected a diffusers UNet2DModel folder")
    config = json.loads(config_path.read_text())
    weights = next((unet_dir / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                    if (unet_dir / name).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{unet_dir}: no diffusion_pytorch_model.safetensors (or .bin)")
    schedule = _read_scheduler_config(folder, scheduler_config)
    if "ScoreSdeVe" in str(schedule.get("_class_name", "")):
        raise ValueError(f"{folder}: {schedule['_class_name']} (variance exploding) folders are not supported")
    prediction_type = schedule.get("prediction_type", "epsilon")
    if prediction_type not in _DIFFUSERS_PREDICTIONS:
        raise ValueError(f"{folder}: prediction_type {prediction_type!r} not supported; expected one of "
                         f"{sorted(_DIFFUSERS_PREDICTIONS)}")
    unet = UNet2DModel.from_config(config)
    load_strict(unet, load_state_dict(weights), weights)
    unet.eval().requires_grad_(False)
    in_channels = int(unet.config.in_channels)
    return VPEpsAdapter(_DiffusersEpsilon(unet), alphas_cumprod_from_scheduler_config(schedule),
                        learned_sigma=int(unet.config.out_channels) == 2 * in_channels,
                        clip_timestep=clip_timestep, prediction=_DIFFUSERS_PREDICTIONS[prediction_type],
                        continuous_timestep=continuous_timestep, channels=in_channels,
                        image_size=unet.config.sample_size)
