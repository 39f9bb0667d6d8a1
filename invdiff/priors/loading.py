"""Load exported EDM UNet priors: shipped names (``invdiff/priors/weights/<name>.{safetensors,json}``) or paths.

An exported prior is two files written by :func:`invdiff.priors.train.export_prior`: ``<name>.safetensors``
(EMA weights) and ``<name>.json`` (network config, data, normalisation, steps, sha256, ...). Loading
checks the sha256 and refuses missing or unexpected keys, so a prior is exactly the one described.

    >>> prior = load_prior("brain-mri-complex")        # or load_prior("runs/x/export/my-prior.json")
    >>> prior_info("brain-mri-complex")["normalisation"]
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from invdiff.priors.unet import EDMUNet, UNetConfig
from invdiff.registry import register_prior

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


# Shipped priors that were replaced: asking for one by name says what replaced it and where its weights still are,
# rather than "unknown prior" (scripts and recorded commands name them).
RETIRED_PRIORS = {
    "ct-phantom": ("ct-phantom-anatomy", "2026-12-06",
                   "git show 2f65a9c55b2da939727b0432f43307963ed93f86:invdiff/priors/weights/ct-phantom.json > ct-phantom.json (and the same "
                   "for ct-phantom.safetensors)"),
}

TOKEN_PRIOR_FORMAT = "invdiff-token-prior"      # the "format" of a token prior's JSON (invdiff.priors.tokens)


def is_token_prior_record(json_path) -> bool:
    """Whether ``json_path`` is the JSON of an exported token prior (its ``format`` says so)."""
    try:
        return json.loads(Path(json_path).read_text()).get("format") == TOKEN_PRIOR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _shipped(token: bool) -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(record.stem for record in WEIGHTS_DIR.glob("*.json")
                  if record.with_suffix(".safetensors").is_file() and is_token_prior_record(record) == token)


def shipped_priors() -> list[str]:
    """Names of the diffusion (EDM UNet) priors in ``invdiff/priors/weights`` (a ``<name>.json`` next to
    ``<name>.safetensors``); token priors are :func:`shipped_token_priors`."""
    return _shipped(token=False)


def shipped_token_priors() -> list[str]:
    """Names of the masked token priors (APS) in ``invdiff/priors/weights``."""
    return _shipped(token=True)


def retired_prior_message(name: str) -> str:
    """What to tell someone who asks for a retired shipped prior by name (``name`` in :data:`RETIRED_PRIORS`)."""
    successor, date, recover = RETIRED_PRIORS[name]
    return (f"prior {name!r} is no longer shipped: it was replaced by {successor!r} on {date} (README, 'Shipped "
            f"priors'); to rerun old results, recover its two files from the repository's history, `{recover}`, "
            f"and pass the .json path")


def resolve_prior_files(name_or_path) -> tuple[Path, Path]:
    """``(json_path, safetensors_path)`` for a shipped name or a path to either file of an exported prior."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".json", ".safetensors") and path.exists():
        return path.with_suffix(".json"), path.with_suffix(".safetensors")
    if text in shipped_priors():
        return WEIGHTS_DIR / f"{text}.json", WEIGHTS_DIR / f"{text}.safetensors"
    if path.with_suffix(".json").is_file() and path.with_suffix(".safetensors").is_file():
        return path.with_suffix(".json"), path.with_suffix(".safetensors")
    if text in RETIRED_PRIORS:
        raise ValueError(retired_prior_message(text))
    shipped = ", ".join(shipped_priors()) or "none"
    raise ValueError(f"prior {text!r} is neither a shipped prior ({shipped}) nor a path to an exported "
                     f"prior (<name>.json next to <name>.safetensors)")


def prior_info(name_or_path) -> dict:
    """The exported prior's JSON metadata (config, data, normalisation, steps, seed, sha256, ...; a token prior's:
    both networks' configs, steps and commands)."""
    if str(name_or_path) in shipped_token_priors():
        json_path = WEIGHTS_DIR / f"{name_or_path}.json"
    else:
        json_path, _ = resolve_prior_files(name_or_path)
    try:
        return json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path}: not valid JSON ({err})") from None


def trained_steps(metadata: dict):
    """Optimisation steps behind an exported prior: ``total_steps`` over a warm-start chain, else ``steps``."""
    return metadata.get("total_steps", metadata.get("steps"))


def load_prior(name_or_path, device="cpu") -> EDMUNet:
    """Rebuild an exported :class:`EDMUNet` in eval mode with frozen weights, after checking its sha256.

    The returned module carries ``.metadata`` (the JSON dict) and ``.name``. A guided-diffusion or score-SDE
    checkpoint, or a JSON describing one, loads through :func:`invdiff.priors.adapters.load_foreign_prior`.
    """
    from safetensors.torch import load_file

    from invdiff.priors.adapters import is_foreign_prior, load_foreign_prior
    from invdiff.priors.train import sha256_file

    if is_foreign_prior(name_or_path):
        return load_foreign_prior(name_or_path).to(device)
    json_path, weights_path = resolve_prior_files(name_or_path)
    meta = prior_info(json_path)
    if not weights_path.is_file():
        raise ValueError(f"{weights_path}: weights file missing (metadata {json_path} exists)")
    expected = meta.get("sha256")
    if not expected:
        raise ValueError(f"{json_path}: key 'sha256' missing; expected the sha256 of {weights_path.name}")
    actual = sha256_file(weights_path)
    if actual != expected:
        raise ValueError(f"{weights_path}: sha256 is {actual} but {json_path.name} expects {expected}; "
                         f"the weights and their metadata do not belong together")
    if meta.get("architecture", "EDMUNet") != "EDMUNet" or "unet" not in meta:
        raise ValueError(f"{json_path}: expected architecture 'EDMUNet' with a 'unet' config, got "
                         f"{meta.get('architecture')!r}")
    net = EDMUNet(UNetConfig.from_dict(meta["unet"]))
    state = load_file(str(weights_path))
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: keys do not match the network in {json_path.name}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    wrong_shape = [k for k in own if own[k].shape != state[k].shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise ValueError(f"{weights_path}: tensor {k!r} has shape {tuple(state[k].shape)}; the network in "
                         f"{json_path.name} expects {tuple(own[k].shape)}")
    net.load_state_dict(state, strict=True)
    net.metadata = meta
    net.name = meta.get("name", json_path.stem)
    log.debug("loaded prior %s from %s (step %s)", net.name, weights_path, meta.get("steps"))
    return net.eval().requires_grad_(False).to(device)


def _load_token_prior(name: str, device="cpu"):
    from invdiff.priors.tokens import load_token_prior
    return load_token_prior(name, device=device)


def _register_shipped() -> None:
    for name in shipped_priors():
        register_prior(name, functools.partial(load_prior, name), kind="edm_unet",
                       path=str(WEIGHTS_DIR / f"{name}.json"))
    for name in shipped_token_priors():
        register_prior(name, functools.partial(_load_token_prior, name), kind="tokens",
                       path=str(WEIGHTS_DIR / f"{name}.json"))


_register_shipped()
