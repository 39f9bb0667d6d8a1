"""EDM training of an :class:`~invdiff.priors.unet.EDMUNet` prior: seeded, resumable, exportable.

Loss (Karras et al. 2022, Eq. 8 with Table 1's training choices):
``E_{x0, ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2 I)} [ lambda(sigma) ||D(x0 + n, sigma) - x0||^2 ]``,
``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``, ``P_mean = -1.2``, ``P_std = 1.2``.

A run lives in one folder: ``checkpoint.safetensors`` (model, EMA, Adam state and both RNG states as
tensors; step, configs and history as JSON in the file's metadata; replaced atomically), ``loss.jsonl``
(one line per ``log_every`` steps) and ``train.log``. Rerunning the same command continues from the
checkpoint and gives bit-identical results to an uninterrupted run. ``export_prior`` writes the EMA weights
as ``<name>.safetensors`` plus ``<name>.json`` metadata, which :func:`invdiff.priors.loading.load_prior` reads.

    python -m invdiff.priors.train --data ct-anatomy --channels 1 --size 64 --steps 12000 \\
        --batch 8 --out runs/ct-anatomy

The recipe (2026-12): ``sigma_data`` is measured from the data source (std over ``SIGMA_DATA_IMAGES`` training
images drawn with their own generator) unless ``--sigma-data`` sets it; the learning rate warms up linearly and
then follows a cosine to ``lr_floor * lr`` at ``lr_decay_steps`` (a pure function of the step, so a resumed run
continues the same curve) and stays there; one CPU thread per job by default (two single-thread jobs on two
cores beat one job on two threads on a busy machine). A spacing-conditioned network
(``--spacing-conditioning``) is trained on the per-image pixel spacings its source reports. On a GPU, which one CPU
core cannot feed, ``--data-workers N`` draws batches in N processes from the per-step stream (batch k from seed
(seed, k): the same run for any N; :mod:`invdiff.priors.batch_stream`), and ``--max-minutes`` caps a run in time.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from invdiff.priors.unet import EDMUNet, UNetConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LOSS_LOG = "loss.jsonl"
FORMAT_VERSION = 1
SIGMA_DATA_IMAGES = 512


@dataclass
class TrainConfig:
    """Training hyperparameters; everything but the run-length and bookkeeping fields must match on resume."""

    data: str = "mni-brain"
    channels: int = 2
    size: int = 64
    batch: int = 16
    lr: float = 2e-4
    warmup_steps: int = 1000
    lr_schedule: str = "constant"          # "constant" after warm-up, or "cosine" decay (see learning_rate)
    lr_decay_steps: int = 0                # cosine horizon; 0: `steps` (the pre-2026-12 behaviour)
    lr_floor: float = 0.0                  # cosine ends at lr_floor * lr and stays there
    sigma_data_images: int = 0             # images sigma_data was measured on (0: given, not measured)
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    data_stream: str = "generator"         # or "per-step": batch k from seed (seed, k); see batch_stream
    unet: dict = field(default_factory=lambda: UNetConfig().to_dict())
    # Run length and bookkeeping: may change between invocations of the same run.
    steps: int = 100_000
    log_every: int = 50
    checkpoint_every_minutes: float = 5.0
    checkpoint_every_steps: int = 0        # 0: time-based only

    RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every_minutes", "checkpoint_every_steps")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- math
def edm_loss(net: EDMUNet, x0: torch.Tensor, generator: torch.Generator, *, p_mean: float = -1.2,
             p_std: float = 1.2, spacing: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """EDM Eq. 8: mean over the batch of ``lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 / numel``.

    spacing: (B,) mm/pixel of each image, passed to a spacing-conditioned network (ignored otherwise).
    bf16: run the network under bfloat16 autocast (on CUDA about twice the throughput; the loss stays float32).
    """
    b = x0.shape[0]
    # sigma and noise come from the CPU generator and then move to x0's device: a seed gives the same noise
    # on every device, so a run resumed on another device continues the same noise stream.
    log_sigma = p_mean + p_std * torch.randn(b, generator=generator, dtype=x0.dtype)
    sigma = log_sigma.exp().to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) * sigma[:, None, None, None]
    sd = net.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    # bf16 autocast covers the network only; the loss and its weights stay in float32 (EDM's weights span
    # several decades, and bf16 has 8 bits of mantissa).
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        x0_hat = net(x0 + noise, sigma, spacing) if net.config.spacing_conditioning else net(x0 + noise, sigma)
    per_image = (x0_hat.to(x0.dtype) - x0).pow(2).flatten(1).mean(dim=1)
    return (weight * per_image).mean()


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then constant, or a cosine from ``lr`` at step 0 to
    ``lr_floor * lr`` at ``lr_decay_steps`` (``steps`` when 0), constant after that:
    ``lr (f + (1 - f) (1 + cos(pi min(1, t / T))) / 2)``. A pure function of the step (resumes exactly)."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.lr_schedule == "constant":
        return config.lr * warm
    if config.lr_schedule == "cosine":
        horizon = config.lr_decay_steps or config.steps
        progress = min(1.0, step / max(1, horizon))
        floor = config.lr_floor
        return config.lr * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {config.lr_schedule!r}")


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """``theta_ema <- decay theta_ema + (1 - decay) theta``."""
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - decay)


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """EMA decay with a warm-up ``min(decay, (1 + step) / (10 + step))`` so early weights are forgotten fast."""
    return min(config.ema_decay, (1 + step) / (10 + step))


def measure_sigma_data(source, seed: int, images: int | None = None) -> float:
    """Std of all pixel values of ``images`` training images, drawn with their own generator (seed + 7919) so
    the training data stream is unchanged. EDM's ``sigma_data`` (Karras et al. 2022, Sec. 5) is this std."""
    images = images or SIGMA_DATA_IMAGES
    generator = torch.Generator().manual_seed(seed + 7919)
    batches, drawn = [], 0
    while drawn < images:
        batches.append(source.batch(generator).double())
        drawn += batches[-1].shape[0]
    return float(torch.cat(batches)[:images].std())


# ------------------------------------------------------------------------------------------ the state
class TrainingState:
    """Model, EMA, Adam and the two RNGs (data, noise) of one run, with (de)serialisation to a checkpoint."""

    def __init__(self, config: TrainConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        unet_config = UNetConfig.from_dict(config.unet)
        if unet_config.channels != config.channels:
            raise ValueError(f"unet.channels={unet_config.channels} but channels={config.channels}")
        # Deterministic initialisation without touching the caller's global RNG: fork it, seed, restore.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = EDMUNet(unet_config)     # initialised on the CPU: the same weights on every device
        self.net.to(self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.noise_generator = torch.Generator().manual_seed(config.seed + 1_000_003)
        self.step = 0
        self.wall_seconds = 0.0
        self.commands: list[str] = []
        self.last_loss: float | None = None
        self.warm_start_from: dict | None = None   # the init prior's metadata (provenance chain), if any

    # -- serialisation ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"optim.{index}.{key}"] = torch.as_tensor(value)
        out["rng.data"] = self.data_generator.get_state()
        out["rng.noise"] = self.noise_generator.get_state()
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def metadata(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]]
        return {"format": FORMAT_VERSION, "step": self.step, "wall_seconds": self.wall_seconds,
                "config": self.config.to_dict(), "param_groups": groups, "commands": self.commands,
                "last_loss": self.last_loss, "warm_start_from": self.warm_start_from}

    def save(self, path: Path) -> None:
        """Write model + EMA + Adam + RNGs atomically: a temporary file in the same folder, then rename."""
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file(self.tensors(), str(tmp), metadata={"invdiff": json.dumps(self.metadata())})
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["invdiff"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        saved = TrainConfig.from_dict(meta["config"])
        _check_compatible(saved, self.config, path)
        self.net.load_state_dict(_strip(tensors, "model."), strict=True)
        self.ema.load_state_dict(_strip(tensors, "ema."), strict=True)
        optim_state: dict[int, dict] = {}
        for key, value in _strip(tensors, "optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
        param_ids = list(range(len(list(self.net.parameters()))))
        groups = [dict(g, params=param_ids) for g in meta["param_groups"]]
        self.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        self.data_generator.set_state(tensors["rng.data"])
        self.noise_generator.set_state(tensors["rng.noise"])
        self.step = int(meta["step"])
        self.wall_seconds = float(meta["wall_seconds"])
        self.commands = list(meta.get("commands", []))
        self.last_loss = meta.get("last_loss")
        self.warm_start_from = meta.get("warm_start_from")

    def warm_start(self, prior_path: str) -> None:
        """Initialise model and EMA from an exported prior (optimizer, step and RNGs start fresh)."""
        from invdiff.priors.loading import load_prior

        prior = load_prior(prior_path)
        if prior.config.to_dict() != self.net.config.to_dict():
            raise ValueError(f"--init {prior_path}: network config {prior.config.to_dict()} differs from this "
                             f"run's {self.net.config.to_dict()}")
        self.net.load_state_dict(prior.state_dict(), strict=True)
        self.ema.load_state_dict(prior.state_dict(), strict=True)
        keep = ("name", "data", "steps", "seed", "p_mean", "p_std", "lr", "batch", "final_loss", "training_commands",
                "wall_seconds", "sha256", "warm_start_from")
        self.warm_start_from = {k: prior.metadata[k] for k in keep if k in prior.metadata}
        log.info("warm start from %s", prior_path)


def _with_sigma_data(config: TrainConfig, checkpoint: Path, source) -> TrainConfig:
    """Fill ``unet.sigma_data``: from the run's checkpoint when resuming, else measured on the source."""
    if checkpoint.exists():
        saved = TrainConfig.from_dict(_checkpoint_metadata(checkpoint)["config"])
        sigma_data, images = saved.unet["sigma_data"], saved.sigma_data_images
    else:
        sigma_data, images = measure_sigma_data(source, config.seed), SIGMA_DATA_IMAGES
        log.info("sigma_data measured on %d images of %s: %.4f", images, config.data, sigma_data)
    return dataclasses.replace(config, unet=dict(config.unet, sigma_data=sigma_data), sigma_data_images=images)


def _strip(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_compatible(saved: TrainConfig, wanted: TrainConfig, path) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name in TrainConfig.RESUMABLE_CHANGES:
            continue
        a, b = getattr(saved, f.name), getattr(wanted, f.name)
        if f.name == "unet":    # fields added later take their defaults in older checkpoints' configs
            a, b = UNetConfig.from_dict(a).to_dict(), UNetConfig.from_dict(b).to_dict()
        if a != b:
            raise ValueError(f"{path}: checkpoint has {f.name}={a!r} but this run asks for {b!r}; use a new --out "
                             f"folder or the checkpoint's settings")


# ------------------------------------------------------------------------------------------- training
def train(config: TrainConfig, run_dir: str | os.PathLike, *, resume: str = "auto", init: str | None = None,
          command: str | None = None, should_stop: Callable[[], bool] | None = None,
          progress: bool | None = None, device: torch.device | str = "cpu", bf16: bool = False,
          data_workers: int = 0) -> TrainingState:
    """Train until ``config.steps`` (or ``should_stop()``), checkpointing; returns the final state.

    resume: "auto" continues from ``run_dir/checkpoint.safetensors`` when it exists, "never" refuses to
    overwrite one, "must" requires one. ``init``: an exported prior to warm-start a fresh run from.
    device / bf16: where the network trains and whether under bfloat16 autocast. Neither is part of the run's
    config: a checkpoint holds CPU tensors and float32 weights, so a run can move between CPU and GPU. Data
    and noise are drawn on the CPU either way (same seed, same stream). data_workers: processes drawing batches
    ahead (``config.data_stream`` must be "per-step"; the stream, and so the run, is the same for any count).
    """
    from invdiff.datasets.training import make_source

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT
    source = make_source(config.data, channels=config.channels, size=config.size, batch=config.batch)
    if config.unet.get("sigma_data") is None:
        config = _with_sigma_data(config, checkpoint, source)
    state = TrainingState(config, device)
    if resume not in ("auto", "never", "must"):
        raise ValueError(f"resume must be 'auto', 'never' or 'must', got {resume!r}")
    if checkpoint.exists() and resume == "never":
        raise ValueError(f"{checkpoint} exists; pass resume='auto' to continue it or choose another run folder")
    if not checkpoint.exists() and resume == "must":
        raise ValueError(f"{checkpoint} does not exist; nothing to resume")
    if checkpoint.exists():
        state.load(checkpoint)
        log.info("resumed %s at step %d", checkpoint, state.step)
    elif init:
        state.warm_start(init)
    if command:
        state.commands.append(command)
    log.info("training %s: %.2f M parameters, data %s, %d -> %d steps on %s%s", run_dir,
             state.net.num_parameters() / 1e6, config.data, state.step, config.steps, state.device,
             " (bf16 autocast)" if bf16 else "")
    from invdiff.priors.batch_stream import make_stream

    with make_stream(state, source, data_workers) as stream:
        _run_loop(state, stream, run_dir, should_stop or (lambda: False), progress, bf16)
    return state


def _run_loop(state: TrainingState, stream, run_dir: Path, should_stop, progress, bf16: bool = False) -> None:
    config = state.config
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=state.step, disable=not progress, dynamic_ncols=True)
    losses, data_seconds, step_seconds = [], 0.0, 0.0
    last_save = time.monotonic()
    state.net.train()
    while state.step < config.steps and not should_stop():
        t0 = time.perf_counter()
        x0, spacing = stream.next(state.step)
        x0 = x0.to(state.device, non_blocking=True)
        spacing = None if spacing is None else spacing.to(state.device)
        t1 = time.perf_counter()
        lr = learning_rate(config, state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        loss = edm_loss(state.net, x0, state.noise_generator, p_mean=config.p_mean, p_std=config.p_std,
                        spacing=spacing, bf16=bf16)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        update_ema(state.ema, state.net, ema_decay_at(config, state.step))
        state.step += 1
        t2 = time.perf_counter()
        data_seconds += t1 - t0
        step_seconds += t2 - t0
        state.wall_seconds += t2 - t0
        losses.append(loss.detach().item())
        bar.update(1)
        if len(losses) >= config.log_every:
            state.last_loss = sum(losses) / len(losses)
            record = {"step": state.step, "loss": state.last_loss, "lr": lr,
                      "sec_per_step": step_seconds / len(losses), "data_sec_per_step": data_seconds / len(losses),
                      "wall_seconds": round(state.wall_seconds, 1), "time": time.time()}
            with open(run_dir / LOSS_LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{state.last_loss:.4f}", s_step=f"{record['sec_per_step']:.2f}")
            log.info("step %d loss %.4f lr %.2e %.3f s/step (data %.3f)", state.step, state.last_loss, lr,
                     record["sec_per_step"], record["data_sec_per_step"])
            losses, data_seconds, step_seconds = [], 0.0, 0.0
        by_steps = config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0
        by_time = time.monotonic() - last_save >= 60 * config.checkpoint_every_minutes
        if by_steps or by_time:
            state.save(run_dir / CHECKPOINT)
            last_save = time.monotonic()
            log.info("checkpoint at step %d", state.step)
    bar.close()
    state.save(run_dir / CHECKPOINT)
    log.info("stopped at step %d; checkpoint %s", state.step, run_dir / CHECKPOINT)


# --------------------------------------------------------------------------------------------- export
def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_prior(run_dir, out_dir, name: str) -> Path:
    """Write the run's EMA weights as ``out_dir/<name>.safetensors`` and metadata as ``out_dir/<name>.json``.

    Returns the JSON path. The JSON holds the network config, data source and normalisation, steps, seed,
    final loss, training command(s), wall time, parameter count and the sha256 of the safetensors file.
    """
    from safetensors.torch import save_file

    from invdiff.datasets.training import make_source, normalisation_for

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.exists():
        raise ValueError(f"{checkpoint} does not exist; train first (python -m invdiff.priors.train ...)")
    config_peek = _checkpoint_metadata(checkpoint)
    state = TrainingState(TrainConfig.from_dict(config_peek["config"]))
    state.load(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.safetensors"
    tmp = weights.with_name(weights.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.ema.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    config = state.config
    normalisation = normalisation_for(config.data)
    net_config = state.net.config
    try:            # what the data source says about itself (real volumes used, spacing range, ...)
        source_metadata = make_source(config.data, channels=config.channels, size=config.size,
                                      batch=config.batch).metadata()
    except ValueError as err:       # e.g. a folder that has gone since training
        source_metadata = {"unavailable": str(err)}
    meta = {
        "name": name, "format": FORMAT_VERSION, "architecture": "EDMUNet",
        "unet": state.net.config.to_dict(), "data": config.data, "data_source": source_metadata,
        "channels": config.channels,
        "normalisation": normalisation, "train_size": config.size, "batch": config.batch, "lr": config.lr,
        "lr_schedule": config.lr_schedule, "lr_decay_steps": config.lr_decay_steps or config.steps,
        "lr_floor": config.lr_floor, "sigma_data": net_config.sigma_data,
        "sigma_data_source": (f"measured: std of {config.sigma_data_images} training images"
                              if config.sigma_data_images else "given"),
        "spacing_conditioning": net_config.spacing_conditioning, "default_spacing_mm": net_config.default_spacing_mm,
        "ema_decay": config.ema_decay, "seed": config.seed,
        "steps": state.step, "final_loss": state.last_loss, "training_commands": state.commands,
        "wall_seconds": round(state.wall_seconds, 1), "parameters": state.net.num_parameters(),
        "p_mean": config.p_mean, "p_std": config.p_std, "warm_start_from": state.warm_start_from,
        "total_steps": state.step + int(_chain_total(state.warm_start_from, "steps")),
        "total_wall_seconds": round(state.wall_seconds + _chain_total(state.warm_start_from, "wall_seconds"), 1),
        "torch_version": torch.__version__, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sha256": sha256_file(weights),
    }
    json_path = out_dir / f"{name}.json"
    tmp_json = json_path.with_name(json_path.name + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp_json, json_path)
    log.info("exported %s (step %d, sha256 %s)", weights, state.step, meta["sha256"][:12])
    return json_path


def _chain_total(record: dict | None, key: str) -> float:
    """Sum of ``key`` (steps, wall_seconds) over a warm-start chain (each record holds its own init's record)."""
    return 0.0 if not record else float(record.get(key, 0)) + _chain_total(record.get("warm_start_from"), key)


def _checkpoint_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["invdiff"])


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invdiff train-prior", description="Train an EDM UNet prior (resumable).")
    p.add_argument("--data", default="mni-brain",
                   help="mni-brain[:whole-head=F] | mni-brain-scales | ct-phantoms | ct-anatomy[:clean] | folder:PATH | "
                        "fastmri:PATH[:whole-slice=F]")
    p.add_argument("--channels", type=int, default=2, help="1 (magnitude / CT) or 2 (complex MR: real, imag)")
    p.add_argument("--size", type=int, default=64, help="training patch size (pixels)")
    p.add_argument("--steps", type=int, default=100_000, help="total optimisation steps (a run can be extended)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", required=True, help="run folder: checkpoint, loss.jsonl, train.log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: run parallel jobs rather than one job on many threads; "
                        "0: torch's default)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine",
                   help="cosine: from lr to lr-floor * lr at lr-decay-steps, constant after; constant: lr")
    p.add_argument("--lr-decay-steps", type=int, default=0,
                   help="length of the cosine (0: --steps); fixed for a run, so it can be extended with --steps")
    p.add_argument("--lr-floor", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    p.add_argument("--sigma-data", type=float, default=None,
                   help="EDM sigma_data (default: measured as the std of 512 training images; recorded)")
    p.add_argument("--attention", action="store_true", help="one self-attention block at the coarsest level")
    p.add_argument("--spacing-conditioning", action="store_true",
                   help="condition the network on the pixel spacing (mm/pixel) each training image has")
    p.add_argument("--default-spacing-mm", type=float, default=None,
                   help="spacing a conditioned prior uses when none is given (default: the source's nominal one)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the exported weights")
    p.add_argument("--p-mean", type=float, default=TrainConfig.p_mean,
                   help="mean of ln(sigma) in the EDM loss (larger: more weight on the coarse, global scales)")
    p.add_argument("--p-std", type=float, default=TrainConfig.p_std, help="std of ln(sigma) in the EDM loss")
    p.add_argument("--base-channels", type=int, default=UNetConfig.base_channels)
    p.add_argument("--channel-mults", default=",".join(map(str, UNetConfig.channel_mults)))
    p.add_argument("--num-res-blocks", type=int, default=UNetConfig.num_res_blocks)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every-minutes", type=float, default=5.0)
    p.add_argument("--checkpoint-every-steps", type=int, default=0)
    p.add_argument("--resume", choices=("auto", "never", "must"), default="auto",
                   help="auto: continue from the run folder's checkpoint when there is one")
    p.add_argument("--init", default=None, help="exported prior (.json/.safetensors path) to warm-start from")
    p.add_argument("--export", default=None, metavar="NAME",
                   help="after training, export the EMA weights as NAME.safetensors + NAME.json")
    p.add_argument("--export-dir", default=None, help="folder for --export (default: <out>/export)")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export the run's last checkpoint (safe while the run is going on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: only on a terminal)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu or cuda[:N]; a run can resume on another device")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast around the network (for GPUs; the loss, weights and EMA stay float32)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes drawing training batches ahead (for GPUs, which one CPU core cannot feed); "
                        "needs the per-step data stream")
    p.add_argument("--data-stream", choices=("generator", "per-step"), default=None,
                   help="generator: one seeded stream in the training process; per-step: batch k drawn from seed "
                        "(seed, k), identical for any --data-workers (default: a resumed run's own; per-step with "
                        "--data-workers, else generator)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes of this invocation (checkpoint and --export as at the end)")
    return p


def config_from_args(args) -> TrainConfig:
    try:
        mults = tuple(int(m) for m in args.channel_mults.split(","))
    except ValueError:
        raise ValueError(f"--channel-mults must be comma-separated integers, got {args.channel_mults!r}") from None
    if not args.p_std > 0:
        raise ValueError(f"--p-std must be > 0, got {args.p_std}")
    if args.sigma_data is not None and not args.sigma_data > 0:
        raise ValueError(f"--sigma-data must be > 0, got {args.sigma_data}")
    if args.data_workers < 0:
        raise ValueError(f"--data-workers must be >= 0, got {args.data_workers}")
    if not 0 <= args.lr_floor <= 1:
        raise ValueError(f"--lr-floor must be in [0, 1], got {args.lr_floor}")
    default_spacing = None
    if args.spacing_conditioning:
        from invdiff.datasets.training import nominal_spacing_mm

        default_spacing = args.default_spacing_mm or nominal_spacing_mm(args.data)
    unet = UNetConfig(channels=args.channels, base_channels=args.base_channels, channel_mults=mults,
                      num_res_blocks=args.num_res_blocks, attention=args.attention,
                      spacing_conditioning=args.spacing_conditioning, default_spacing_mm=default_spacing)
    unet = dict(unet.to_dict(), sigma_data=args.sigma_data)      # None: measured when the run starts
    return TrainConfig(data=args.data, channels=args.channels, size=args.size, batch=args.batch, lr=args.lr,
                       data_stream=args.data_stream or ("per-step" if args.data_workers > 0 else "generator"),
                       warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule,
                       lr_decay_steps=args.lr_decay_steps, lr_floor=args.lr_floor, ema_decay=args.ema,
                       p_mean=args.p_mean, p_std=args.p_std,
                       seed=args.seed, unet=unet, steps=args.steps, log_every=args.log_every,
                       checkpoint_every_minutes=args.checkpoint_every_minutes,
                       checkpoint_every_steps=args.checkpoint_every_steps)


def _training_device(name: str) -> torch.device:
    """``--device`` as every other command reads it, but a bad value is a ValueError here (main's bad-input path
    turns it into one line and removes the run folder it made)."""
    from invdiff.errors import InputError
    from invdiff.tasks.base import resolve_device

    try:
        return resolve_device(name)
    except InputError as err:
        raise ValueError(str(err)) from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    run_dir = Path(args.out)
    created = not run_dir.exists()        # a refused run removes what it made, and nothing else
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if not root.level or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    stop = {"flag": False}

    def request_stop(signum, _frame):
        # SIGTERM / Ctrl-C: finish the current step, write a checkpoint, exit cleanly.
        log.warning("signal %d: stopping after this step", signum)
        stop["flag"] = True

    if args.export_only and not args.export:
        log.error("--export-only needs --export NAME")
        return 2
    export_dir = Path(args.export_dir) if args.export_dir else run_dir / "export"
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.export_only:
            export_prior(run_dir, export_dir, args.export)
            return 0
        if (run_dir / CHECKPOINT).exists():          # a resumed run keeps its stream
            saved_stream = TrainConfig.from_dict(_checkpoint_metadata(run_dir / CHECKPOINT)["config"]).data_stream
            if args.data_workers > 0 and saved_stream != "per-step":
                raise ValueError(f"{run_dir / CHECKPOINT}: data_stream={saved_stream!r}, but --data-workers needs "
                                 f"'per-step'; resume without --data-workers or start a new --out folder")
            args.data_stream = args.data_stream or saved_stream
        config = config_from_args(args)
        device = _training_device(args.device)
        command = "python -m invdiff.priors.train " + " ".join(shlex.quote(a) for a in argv)
        if args.max_minutes is not None and not args.max_minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {args.max_minutes}")
        deadline = math.inf if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes

        def should_stop() -> bool:
            return stop["flag"] or time.monotonic() >= deadline

        train(config, run_dir, resume=args.resume, init=args.init, command=command, should_stop=should_stop,
              progress=args.progress, device=device, bf16=args.bf16, data_workers=args.data_workers)
        if args.export:
            export_prior(run_dir, export_dir, args.export)
    except ValueError as err:
        # Bad input (an empty data folder, a bad --init, ...): one line from the CLI (exit 2), no run folder left.
        failed = err
    else:
        failed = None
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        root.removeHandler(handler)
        handler.close()
    if failed is not None:
        if created and {p.name for p in run_dir.iterdir()} <= {"train.log"}:
            shutil.rmtree(run_dir)
        from invdiff.errors import InputError
        raise InputError(str(failed).splitlines()[0]) from failed
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from invdiff.errors import InputError
    try:
        sys.exit(main())
    except InputError as err:                      # bad input: one line, exit 2 (as `invdiff train-prior`)
        print(f"invdiff train-prior: error: {err}", file=sys.stderr)
        sys.exit(2)
