r"""Masked token prior for APS: a VQ tokenizer, a bidirectional masked transformer, their training and loading.

The protocol (:class:`TokenPrior`) is what the token samplers (``aps``, ``masked-diffusion`` in
``invdiff.samplers.anchored``) talk to; :class:`TokenModelPrior` implements it with two small networks, and
``invdiff.priors.tokens_oracle.DiscreteOracle`` with an exact enumerated joint.

Tokenizer (VQ-VAE, van den Oord et al. 2017), fully convolutional, downsampling ``f = 4`` (two stride-2 stages;
``--downsampling 2``: one, four times the tokens per image; the round trip ``Dec(Q(Enc(x)))`` is the ceiling of
every token reconstruction, and at f = 4 it sits at the level of zero-filled 4x MRI):
``z_e = Enc(x)`` (B, D, H/f, W/f); ``z_q = c_{argmin_k ||z_e - c_k||}`` per position; ``x_hat = Dec(z_q)``;
loss ``||x_hat - x||^2 + ||sg(z_e) - z_q||^2 + beta ||z_e - sg(z_q)||^2`` (beta 0.25) with the straight-through
gradient ``z_e + sg(z_q - z_e)``; codes unused for ``dead_after`` steps are restarted at random encoder outputs
of the current batch (keeps the whole codebook in use on a small model). ``Dec`` is a plain function of the
embeddings, so APS differentiates through it.

Masked model (MaskGIT, Chang et al. 2022; absorbing-state masked diffusion): token embeddings over ``K + 1``
ids (``K`` = the mask id) plus fixed 2-D sinusoidal encodings of the absolute row and column (computed for any
grid, so a model trained on 16 x 16 tokens runs on 24 x 40), a pre-norm transformer encoder without causal mask,
logits over the ``K`` codes. Training: tokens of a frozen tokenizer, a mask ratio ``cos(pi u / 2)``, u ~ U(0, 1),
masked positions drawn uniformly, cross-entropy at the masked positions.

A run folder holds ``tokenizer.safetensors`` and ``transformer.safetensors`` (weights, Adam state, RNG state
as tensors; step, config and data spec as JSON metadata; replaced atomically) and ``loss.jsonl``. Rerunning the
same command continues where the checkpoint stopped. Train the tokenizer first, then the transformer on its
tokens; ``--export`` writes both networks to one ``<name>.safetensors`` with ``<name>.json``.

The shipped ``tokens-brain`` (f = 2; tokenizer 3000 steps, transformer stopped at 4373 of 6000, ~1.6 CPU-hours):

    OMP_NUM_THREADS=1 python -m invdiff.priors.tokens --stage tokenizer --out runs/tokens2 --size 32 --batch 16 --steps 3000 --downsampling 2
    OMP_NUM_THREADS=1 python -m invdiff.priors.tokens --stage transformer --out runs/tokens2 --size 32 --batch 16 --steps 6000
    python -m invdiff.priors.tokens --out runs/tokens2 --export invdiff/priors/weights/tokens-brain
    prior = load_token_prior("invdiff/priors/weights/tokens-brain.safetensors")
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from invdiff.errors import InputError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STAGES = ("tokenizer", "transformer")
DOWNSAMPLINGS = (2, 4)


# ---- the protocol ----------------------------------------------------------------------------------------
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


# ---- configurations --------------------------------------------------------------------------------------
@dataclass
class TokenizerConfig:
    channels: int = 2
    width: int = 48
    codes: int = 256
    code_dim: int = 8
    beta: float = 0.25
    dead_after: int = 200
    downsampling: int = 4            # image pixels per token side; 2 or 4 (exports before it existed: 4)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TransformerConfig:
    codes: int = 256
    dim: int = 128
    layers: int = 4
    heads: int = 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- tokenizer -------------------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class VQTokenizer(nn.Module):
    """Fully convolutional VQ-VAE: (B, C, H, W) <-> (B, H/f, W/f) code ids, ``f = config.downsampling``; H and W
    multiples of f. The layers are built in the same order for every f (f = 4 keeps the first exports' keys)."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        if config.downsampling not in DOWNSAMPLINGS:
            raise ValueError(f"tokenizer downsampling must be one of {DOWNSAMPLINGS}, got {config.downsampling}")
        self.config = config
        w, c = config.width, config.channels
        stages = int(math.log2(config.downsampling))
        down = [layer for _ in range(stages) for layer in (nn.Conv2d(w, w, 4, stride=2, padding=1), _ResBlock(w))]
        up = [layer for _ in range(stages)
              for layer in (nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1), _ResBlock(w))]
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 3, padding=1), _ResBlock(w), *down,
            nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, config.code_dim, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(config.code_dim, w, 3, padding=1), _ResBlock(w), *up,
            nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, c, 3, padding=1))
        self.codebook = nn.Parameter(torch.randn(config.codes, config.code_dim) * 0.1)
        self.register_buffer("last_used", torch.zeros(config.codes, dtype=torch.long))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (...) ids of the nearest codes (squared L2)."""
        flat = z.reshape(-1, z.shape[-1])
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.codebook.T
                     + self.codebook.pow(2).sum(1)[None])
        return distances.argmin(dim=1).reshape(z.shape[:-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H/f * W/f) ids, row-major."""
        z = self.encoder(x).permute(0, 2, 3, 1)                                  # (B, h, w, D)
        return self.nearest(z).reshape(x.shape[0], -1)

    def decode(self, embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, L, D) embeddings on an (h, w) grid -> (B, C, f h, f w); differentiable in the embeddings."""
        h, w = grid
        return self.decoder(embeddings.reshape(embeddings.shape[0], h, w, -1).permute(0, 3, 1, 2))

    def loss(self, x: torch.Tensor, step: int, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """VQ-VAE loss on a batch; restarts dead codes (in place, no gradient) as a side effect."""
        z = self.encoder(x).permute(0, 2, 3, 1)                                  # z_e, (B, h, w, D)
        flat = z.reshape(-1, z.shape[-1])
        if not bool(self.initialised):                                           # codebook from the first batch
            with torch.no_grad():
                pick = torch.randint(len(flat), (self.config.codes,), generator=generator)
                self.codebook.copy_(flat[pick].detach())
                self.initialised.fill_(True)
        ids = self.nearest(z)
        z_q = self.codebook[ids]
        codebook_loss = F.mse_loss(z_q, z.detach())                              # ||sg(z_e) - z_q||^2
        commitment = F.mse_loss(z, z_q.detach())                                 # ||z_e - sg(z_q)||^2
        x_hat = self.decoder((z + (z_q - z).detach()).permute(0, 3, 1, 2))       # straight-through
        reconstruction = F.mse_loss(x_hat, x)
        with torch.no_grad():
            self.last_used[ids.unique()] = step
            dead = (step - self.last_used) > self.config.dead_after
            if dead.any():                                                       # restart at encoder outputs
                pick = torch.randint(len(flat), (int(dead.sum()),), generator=generator)
                self.codebook[dead] = flat[pick].detach()
                self.last_used[dead] = step
        total = reconstruction + codebook_loss + self.config.beta * commitment
        return total, {"reconstruction": reconstruction.item(), "codebook": codebook_loss.item(),
                       "codes_used": int(ids.unique().numel()), "restarted": int(dead.sum())}


# ---- masked transformer ----------------------------------------------------------------------------------
def sinusoidal_grid(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sinusoidal encodings (L, dim): half the channels encode the row, half the column (Vaswani et
    al.'s frequencies ``10000^(-2j / (dim / 2))``); defined for any grid size."""
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=dtype) / quarter)
    rows = torch.arange(h, device=device, dtype=dtype)[:, None] * frequencies
    cols = torch.arange(w, device=device, dtype=dtype)[:, None] * frequencies
    row_enc = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None].expand(h, w, 2 * quarter)
    col_enc = torch.cat([cols.sin(), cols.cos()], dim=1)[None].expand(h, w, 2 * quarter)
    encoding = torch.cat([row_enc, col_enc], dim=2).reshape(h * w, 4 * quarter)
    return F.pad(encoding, (0, dim - 4 * quarter))


def _encoder_block(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s pre-norm block (``x + MHA(LN1 x)``, then ``+ FF(LN2 x)``) with its own weights, its attention by
    ``F.scaled_dot_product_attention``: ``nn.TransformerEncoderLayer`` forms the (L, L) weights, 17 GB for the 32,768
    tokens of a 512 x 256 image at 2x downsampling; the fused kernel (flash attention on CPU and GPU) does not."""
    attention = layer.self_attn
    batch, length, dim = x.shape
    heads = attention.num_heads
    qkv = F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)        # each (B, heads, L, d_h)
    mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
    x = x + attention.out_proj(mixed)
    return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


class MaskedTransformer(nn.Module):
    """Bidirectional transformer over a token grid: ids (B, L) with ``K`` = mask -> logits (B, L, K)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.codes + 1, config.dim)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.codes)

    def forward(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h = self.embedding(ids) + sinusoidal_grid(*grid, self.config.dim, ids.device, self.embedding.weight.dtype)
        for layer in self.encoder.layers:
            h = _encoder_block(layer, h)
        return self.head(self.norm(h))

    def loss(self, ids: torch.Tensor, grid: tuple[int, int], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """MaskGIT's objective: mask ratio cos(pi u / 2), cross-entropy at the masked positions."""
        batch, length = ids.shape
        ratio = torch.cos(math.pi / 2 * torch.rand(batch, 1, generator=generator))
        count = (ratio * length).ceil().clamp(min=1)
        rank = torch.rand(batch, length, generator=generator).argsort(dim=1).argsort(dim=1)
        mask = (rank < count).to(ids.device)                                     # uniformly random positions
        logits = self(torch.where(mask, torch.full_like(ids, self.config.codes), ids), grid)
        loss = F.cross_entropy(logits[mask], ids[mask])
        accuracy = float((logits[mask].argmax(-1) == ids[mask]).float().mean())
        return loss, {"accuracy": accuracy, "mask_ratio": float(mask.float().mean())}


# ---- the prior -------------------------------------------------------------------------------------------
class TokenModelPrior(TokenPrior):
    """A :class:`VQTokenizer` and a :class:`MaskedTransformer` behind the :class:`TokenPrior` protocol.

    >>> prior = TokenModelPrior(VQTokenizer(TokenizerConfig()), MaskedTransformer(TransformerConfig()))
    >>> ids = prior.encode(x)                                  # (B, H/f * W/f), f = tokenizer's downsampling
    >>> logits = prior.logits(ids, mask, prior.grid_for(x.shape))
    """

    def __init__(self, tokenizer: VQTokenizer, transformer: MaskedTransformer, metadata: dict | None = None):
        super().__init__()
        if tokenizer.config.codes != transformer.config.codes:
            raise ValueError(f"tokenizer has {tokenizer.config.codes} codes, transformer {transformer.config.codes}")
        self.tokenizer, self.transformer = tokenizer, transformer
        self.num_codes = tokenizer.config.codes
        self.channels = tokenizer.config.channels
        self.metadata = dict(metadata or {})

    @property
    def codebook(self) -> torch.Tensor:
        return self.tokenizer.codebook

    @property
    def downsampling(self) -> int:
        return int(self.tokenizer.config.downsampling)

    def grid_for(self, image_shape) -> tuple[int, int]:
        height, width, f = int(image_shape[-2]), int(image_shape[-1]), self.downsampling
        if height % f or width % f:
            raise ValueError(f"the token prior needs H and W multiples of {f}; got {height} x {width}")
        return height // f, width // f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode(x)

    def decode(self, embeddings: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            side = math.isqrt(embeddings.shape[1])
            grid = (side, side)
        return self.tokenizer.decode(embeddings, grid)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if grid is None:
            side = math.isqrt(ids.shape[1])
            grid = (side, side)
        return self.transformer(torch.where(mask, torch.full_like(ids, self.mask_id), ids), grid)


def export_token_prior(run_dir, out_stem) -> Path:
    """Both networks of a run folder to ``<out_stem>.safetensors`` (weights only) + ``<out_stem>.json``."""
    from safetensors.torch import save_file

    run_dir, out_stem = Path(run_dir), Path(out_stem)
    from invdiff.priors.loading import TOKEN_PRIOR_FORMAT

    tensors, metadata = {}, {"format": TOKEN_PRIOR_FORMAT, "version": FORMAT_VERSION}
    for stage in STAGES:
        saved, meta = _read_checkpoint(run_dir / f"{stage}.safetensors")
        tensors.update({k: v for k, v in saved.items() if k.startswith(f"{stage}.")})
        metadata[stage] = {"config": meta["config"], "step": meta["step"], "data": meta["data"],
                           "command": meta.get("command", ""), "seconds": meta.get("seconds", 0.0)}
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    weights = out_stem.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata={"json": json.dumps(metadata)})
    out_stem.with_suffix(".json").write_text(json.dumps(metadata, indent=1))
    return weights


def resolve_token_prior_path(name_or_path) -> Path:
    """A shipped token prior's name (``invdiff/priors/weights/<name>.safetensors``) or a path, as a path."""
    from invdiff.priors.loading import WEIGHTS_DIR, shipped_token_priors

    text = str(name_or_path)
    if not Path(text).exists() and text in shipped_token_priors():
        return WEIGHTS_DIR / f"{text}.safetensors"
    return Path(text)


def is_token_prior(path) -> bool:
    """Whether ``path`` is a shipped token prior's name, an exported token prior (its JSON says so) or a token run
    folder."""
    from invdiff.priors.loading import is_token_prior_record

    path = resolve_token_prior_path(path)
    if path.is_dir():
        return all((path / f"{stage}.safetensors").exists() for stage in STAGES)
    return is_token_prior_record(path.with_suffix(".json"))


def load_token_prior(path, device="cpu") -> TokenModelPrior:
    """A :class:`TokenModelPrior` from a shipped name, an exported ``.safetensors`` (or a run folder with both
    checkpoints)."""
    path = resolve_token_prior_path(path)
    if path.is_dir():
        parts = {stage: _read_checkpoint(path / f"{stage}.safetensors") for stage in STAGES}
        tensors = {k: v for saved, _ in parts.values() for k, v in saved.items()}
        metadata = {stage: meta for stage, (_, meta) in parts.items()}
    else:
        tensors, metadata = _read_checkpoint(path)
    tokenizer = VQTokenizer(TokenizerConfig(**metadata["tokenizer"]["config"]))
    transformer = MaskedTransformer(TransformerConfig(**metadata["transformer"]["config"]))
    tokenizer.load_state_dict({k[len("tokenizer."):]: v for k, v in tensors.items() if k.startswith("tokenizer.")})
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in tensors.items()
                                 if k.startswith("transformer.")})
    prior = TokenModelPrior(tokenizer, transformer, metadata).to(device).eval()
    for p in prior.parameters():
        p.requires_grad_(False)
    return prior


def sample_unconditional_tokens(prior: TokenPrior, n: int, size, *, steps: int = 16,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` unconditional images (n, C, H, W) from a token prior: absorbing-state ancestral sampling (start all
    masked; each of ``steps`` steps unmasks a random subset of the masked positions, the cosine schedule's count,
    each drawn from the model's categorical given what is unmasked), then the decoder.

    The masked-diffusion sampler of ``invdiff.samplers.anchored`` without a likelihood (``reweighting="none"``),
    on an empty observation: one code path for the conditional and the unconditional draws.
    """
    from invdiff.operators.inpainting import Inpainting
    from invdiff.problem import InverseProblem
    from invdiff.samplers.anchored import sample_masked_diffusion

    height, width = (size, size) if isinstance(size, int) else tuple(size)
    device = prior.codebook.device
    nothing = Inpainting(torch.zeros(height, width, dtype=torch.bool, device=device), channels=prior.channels)
    y = torch.zeros(int(n), prior.channels, height, width, device=device)
    result = sample_masked_diffusion(InverseProblem(nothing, y, 1.0), prior, steps=steps, reweighting="none",
                                     generator=generator)
    return result.x


# ---- training --------------------------------------------------------------------------------------------
def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"{path}: no checkpoint (train the stage first: python -m invdiff.priors.tokens "
                                f"--stage {path.stem} --out {path.parent})")
    with safe_open(str(path), "pt") as f:
        metadata = json.loads(f.metadata()["json"])
    return load_file(str(path)), metadata


def _write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    from safetensors.torch import save_file

    temporary = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(temporary),
              metadata={"json": json.dumps(metadata)})
    os.replace(temporary, path)                                                  # a killed run keeps the old one


def _optimiser_tensors(optimiser: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in optimiser.state_dict()["state"].items():
        for key, value in state.items():
            out[f"optim.{index}.{key}"] = torch.as_tensor(value)
    return out


def _load_optimiser(optimiser: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    saved = optimiser.state_dict()
    saved["state"] = state
    optimiser.load_state_dict(saved)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="invdiff train-prior --kind tokens",
                                description="Train the masked token prior (VQ tokenizer, then masked transformer); "
                                            "resumable: rerun the same command to continue.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl)")
    p.add_argument("--stage", choices=STAGES, default=None, help="which network to train (omit with --export)")
    p.add_argument("--export", default=None, help="write the run's two networks to EXPORT.safetensors + .json")
    p.add_argument("--data", default="mni-brain", help="training data (invdiff.datasets.training.make_source)")
    p.add_argument("--channels", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="training patch side (pixels, multiple of 4)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6000, help="total steps of this stage (a resumed run stops here)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default 1e-3 tokenizer, 3e-4 transformer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=48, help="tokenizer conv width")
    p.add_argument("--codes", type=int, default=256, help="codebook size K")
    p.add_argument("--code-dim", type=int, default=8, help="code embedding dimension D")
    p.add_argument("--downsampling", type=int, default=4, choices=DOWNSAMPLINGS,
                   help="image pixels per token side (tokenizer stage; the transformer stage takes the tokenizer's)")
    p.add_argument("--dim", type=int, default=128, help="transformer width")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--log-every", type=int, default=25, help="steps between loss.jsonl lines")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present), cpu or cuda[:N]; data and masks are drawn on the CPU generator, "
                        "so a seed is one stream on every device and a stage can resume on another device")
    return p


def train_main(argv=None) -> int:
    """``invdiff train-prior --kind tokens ...``: train one stage, or export a finished run (``--export``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command = "python -m invdiff.priors.tokens " + shlex.join(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.export:
        path = export_token_prior(out, args.export)
        log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return 0
    if args.stage is None:
        raise InputError("train-prior --kind tokens: give --stage tokenizer|transformer (or --export NAME)")
    if args.size % args.downsampling:
        raise InputError(f"--size must be a multiple of --downsampling ({args.downsampling}), got {args.size}")
    out.mkdir(parents=True, exist_ok=True)
    return train_stage(args, out)


def train_stage(args, out: Path) -> int:
    from invdiff.datasets.training import make_source

    from invdiff.tasks.base import resolve_device

    checkpoint = out / f"{args.stage}.safetensors"
    device = resolve_device(getattr(args, "device", "cpu"))
    generator = torch.Generator().manual_seed(args.seed)
    tok_config = TokenizerConfig(channels=args.channels, width=args.width, codes=args.codes, code_dim=args.code_dim,
                                 downsampling=args.downsampling)
    tokenizer = VQTokenizer(tok_config)
    if args.stage == "tokenizer":
        model, config, lr = tokenizer, tok_config, args.lr or 1e-3
    else:
        saved, meta = _read_checkpoint(out / "tokenizer.safetensors")
        tokenizer = VQTokenizer(TokenizerConfig(**meta["config"]))
        tokenizer.load_state_dict({k[len("tokenizer."):]: v for k, v in saved.items() if k.startswith("tokenizer.")})
        tokenizer.to(device).eval().requires_grad_(False)
        config = TransformerConfig(codes=tokenizer.config.codes, dim=args.dim, layers=args.layers, heads=args.heads)
        model, lr = MaskedTransformer(config), args.lr or 3e-4
    model.to(device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, seconds = 0, 0.0
    command = getattr(args, "command", "")
    if checkpoint.exists():                                                      # resume
        saved, meta = _read_checkpoint(checkpoint)
        saved_config = type(config)(**meta["config"]).to_dict()          # fields added since: their defaults
        if saved_config != config.to_dict() or meta["data"] != [args.data, args.channels, args.size, args.batch]:
            raise InputError(f"{checkpoint}: saved with config {meta['config']} / data {meta['data']}; this command "
                             f"asks for {config.to_dict()} / {[args.data, args.channels, args.size, args.batch]}")
        model.load_state_dict({k[len(args.stage) + 1:]: v for k, v in saved.items() if k.startswith(args.stage + ".")})
        _load_optimiser(optimiser, saved)
        generator.set_state(saved["rng"])
        step, seconds = meta["step"], meta.get("seconds", 0.0)
        log.info("resuming %s at step %d", checkpoint, step)
    source = make_source(args.data, channels=args.channels, size=args.size, batch=args.batch)
    stop = {"now": False}

    def request_stop(signum, _frame):
        stop["now"] = True

    previous = signal.signal(signal.SIGTERM, request_stop) if _main_thread() else None

    def save():
        tensors = {f"{args.stage}.{k}": v for k, v in model.state_dict().items()}
        tensors.update(_optimiser_tensors(optimiser))
        tensors["rng"] = generator.get_state()
        _write_checkpoint(checkpoint, tensors, {"stage": args.stage, "config": config.to_dict(), "step": step,
                                                "data": [args.data, args.channels, args.size, args.batch],
                                                "lr": lr, "seed": args.seed, "seconds": seconds,
                                                "command": command, "version": FORMAT_VERSION})

    last_save, started = time.monotonic(), time.monotonic()
    with open(out / "loss.jsonl", "a") as loss_log:
        while step < args.steps and not stop["now"]:
            t0 = time.monotonic()
            x = source.batch(generator).to(device)
            model.train()
            if args.stage == "tokenizer":
                loss, record = model.loss(x, step, generator)
            else:
                with torch.no_grad():
                    ids = tokenizer.encode(x)
                loss, record = model.loss(ids, (args.size // tokenizer.config.downsampling,) * 2, generator)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            step += 1
            seconds += time.monotonic() - t0
            if step % args.log_every == 0 or step == args.steps:
                loss_log.write(json.dumps({"stage": args.stage, "step": step, "loss": loss.detach().item(), **record,
                                           "seconds": round(seconds, 1)}) + "\n")
                loss_log.flush()
                log.info("%s step %d loss %.4f %s", args.stage, step, loss.detach().item(), record)
            if time.monotonic() - last_save > args.checkpoint_every:
                save()
                last_save = time.monotonic()
    save()
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    log.info("%s: step %d, %.0f s this run", checkpoint, step, time.monotonic() - started)
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        raise SystemExit(train_main())
    except InputError as err:                      # bad input: one line, exit 2 (as `invdiff train-prior`)
        print(f"invdiff train-prior --kind tokens: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
