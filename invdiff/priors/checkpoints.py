"""Safe loading of users' network checkpoints: tensors only, and every key must fit the network.

Two rules, both there because a wrong prior fails silently (samples look like plausible noise):

1. No code is ever executed while reading a file. ``.safetensors`` holds tensors only; ``.pt/.pth/.ckpt/.bin``
   are read with ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled classes,
   functions and lambdas. Such a file raises ``ValueError`` instead of being loaded "just this once".
2. A checkpoint must fit its network exactly (:func:`load_strict`): a missing key would leave a layer at
   its random initialisation, so missing, unexpected and mis-shaped keys all raise ``ValueError``.

    >>> state = load_state_dict("ema_0.9999_500000.pt")     # {name: tensor}, containers unwrapped
    >>> load_strict(network, state, "ema_0.9999_500000.pt")
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["load_state_dict", "read_checkpoint", "load_strict", "strip_prefix", "has_common_prefix", "is_shadow_ema",
           "state_from_shadow_params"]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

# Keys under which training code nests the weights, in order of preference: the EMA copy first, because
# released diffusion weights (ADM, EDM, score-SDE) are the EMA weights and sampling wants those.
CONTAINER_KEYS = ("ema", "state_dict", "model", "net")

# Prefixes added by wrappers rather than by the architecture: DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_SHOWN = 5  # how many offending keys an error message lists


def load_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read ``{name: tensor}`` from ``path`` on the CPU without executing any pickled code.

    ``key`` picks a container entry explicitly (e.g. ``"model"`` to skip the EMA copy); by default the
    first of ``CONTAINER_KEYS`` present is used and the choice is logged. Wrapper prefixes ``module.``
    and ``_orig_mod.`` are stripped. Raises ``ValueError`` for pickles with code, unknown suffixes and
    non-tensor entries; ``FileNotFoundError`` when ``path`` does not exist.
    """
    path = Path(path)
    state = _unwrap_containers(read_checkpoint(path), path, key)
    return _strip_wrapper_prefixes(state, path)


def read_checkpoint(path: str | os.PathLike):
    """The object stored in ``path``, read without executing code: a dict of tensors for ``.safetensors``,
    whatever tensors, numbers, strings, lists and dicts ``torch.load(weights_only=True)`` accepts otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return _safetensors_load(path)
    if suffix in TORCH_SUFFIXES:
        return _torch_load_weights_only(path)
    if suffix in (".pkl", ".pickle"):
        raise ValueError(f"{path}: plain pickle files (such as EDM's network-snapshot-*.pkl) carry executable "
                         f"code and will not be loaded; in an environment you trust, save "
                         f"`net.state_dict()` with safetensors.torch.save_file and load that file instead")
    raise ValueError(f"{path}: unsupported checkpoint suffix {path.suffix!r}; expected one of "
                     f"{(SAFETENSORS_SUFFIX,) + TORCH_SUFFIXES}")


def is_shadow_ema(obj) -> bool:
    """score-SDE's ``ExponentialMovingAverage.state_dict()``: ``{"decay", "num_updates", "shadow_params": [...]}``,
    the EMA weights as a list in the order of the model's trainable parameters, without names."""
    return isinstance(obj, Mapping) and isinstance(obj.get("shadow_params"), (list, tuple))


def state_from_shadow_params(model_state: Mapping[str, torch.Tensor], shadow_params, trainable_keys: list[str],
                             path) -> dict[str, torch.Tensor]:
    """``model_state`` with the entries ``trainable_keys`` (in parameter order) replaced by ``shadow_params``.

    Raises ``ValueError`` naming ``path``, the key, and both shapes at the first entry that does not fit, or
    when the counts differ: a shifted list would put every weight in the wrong layer.
    """
    if len(shadow_params) != len(trainable_keys):
        raise ValueError(f"{Path(path)}: the EMA holds {len(shadow_params)} tensors but the model has "
                         f"{len(trainable_keys)} trainable parameters; cannot tell which EMA tensor is which")
    state = dict(model_state)
    for key, tensor in zip(trainable_keys, shadow_params):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(state[key].shape):
            actual = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{Path(path)}: EMA tensor for {key!r} has shape {actual}; the model's {key!r} has "
                             f"{tuple(state[key].shape)}")
        state[key] = tensor
    return state


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _torch_load_weights_only(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the first object it refused ("Unsupported global: GLOBAL module.name"): quote it so
        # the user sees *what* code the file would have run.
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise ValueError(
                f"{path}: contains executable pickled objects (it references {found.group(1)}) and will not be "
                f"loaded; in an environment you trust, convert it to safetensors "
                f"(safetensors.torch.save_file(state_dict, 'weights.safetensors')) and load that file") from None
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: torch.load(weights_only=True) could not read it ({reason}); it is either "
                         f"not a PyTorch checkpoint or contains pickled objects other than tensors, and will "
                         f"not be loaded; convert it to safetensors in an environment you trust") from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({err})") from None


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_containers(obj, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    """Descend through ``{"ema": {...}, "optimizer": ...}``-style containers down to a dict of tensors."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            available = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{path}: no entry {key!r} in the checkpoint; top-level entries: {available}")
        log.info("%s: using entry %r as requested", path, key)
        obj = obj[key]
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        candidates = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
        if candidates and is_shadow_ema(obj[candidates[0]]):
            # score-SDE keeps its EMA as an unnamed list; load_score_sde_checkpoint maps it onto the names.
            log.info("%s: the 'ema' entry is an unnamed list of tensors (score-SDE); skipping it", path)
            candidates = candidates[1:]
        if not candidates:
            non_tensor = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise ValueError(f"{path}: expected a dict of tensors or a container with one of the entries "
                             f"{CONTAINER_KEYS}; found non-tensor entries {non_tensor[:_SHOWN]} and no such "
                             f"entry; pass key=... to choose one")
        chosen = candidates[0]
        others = sorted(k for k in obj if k != chosen)
        log.info("%s: using the weights under %r (other entries ignored: %s)", path, chosen, others)
        obj = obj[chosen]
    if not _is_tensor_dict(obj):
        raise ValueError(f"{path}: expected a non-empty dict of tensors, found {type(obj).__name__}")
    return dict(obj)


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                log.info("%s: stripping the wrapper prefix %r from every key", path, prefix)
                state = strip_prefix(state, prefix)
                changed = True
    return state


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix + name: t} -> {name: t}``; keys without the prefix are kept unchanged."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def has_common_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """True when every key starts with ``prefix`` (e.g. ``"model."`` for EDM's ``EDMPrecond`` layout)."""
    return len(state) > 0 and all(k.startswith(prefix) for k in state)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                optional_keys: Iterable[str] = ()) -> nn.Module:
    """Load ``state_dict`` into ``module`` only if every key and shape matches; returns ``module``.

    ``optional_keys`` are entries of ``module.state_dict()`` that the module recomputes itself (such as a
    noise schedule buffer) and that a checkpoint may omit. Anything else missing, any unexpected key and
    any shape mismatch raises ``ValueError`` naming ``path`` and the first few keys, before a single
    weight is copied, so a failed load never leaves a half-initialised network behind.
    """
    expected = module.state_dict()
    optional = set(optional_keys)
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, network {tuple(v.shape)})"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    if problems:
        raise ValueError(f"{Path(path)}: checkpoint does not fit {type(module).__name__}: " + "; ".join(problems)
                         + ". Check the architecture arguments against the checkpoint; refusing to continue "
                           "with randomly initialised weights")
    module.load_state_dict(dict(state_dict), strict=False)
    return module
