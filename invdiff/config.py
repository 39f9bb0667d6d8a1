"""Sampler hyperparameters: the sampler's signature is the schema (keyword-only arguments and their defaults)."""
from __future__ import annotations

import inspect
from typing import Any, Callable

# Arguments every sampler takes that are not hyperparameters a user sets from a config or the command line.
RESERVED = {"problem", "prior", "generator", "callback"}


def hyperparameters(sampler: Callable) -> dict[str, Any]:
    """The keyword-only hyperparameters of ``sampler`` with their defaults."""
    return {name: p.default for name, p in inspect.signature(sampler).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in RESERVED}


def _convert(name: str, text: str, default: Any) -> Any:
    if isinstance(default, bool):
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"hyperparameter {name}: expected true/false, got {text!r}")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"hyperparameter {name}: expected {kind.__name__}, got {text!r}") from None
    if default is None:  # untyped default: try a number, else keep the string
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
    return text


def parse_overrides(sampler: Callable, items: list[str], sampler_name: str = "") -> dict[str, Any]:
    """Turn ``["lam=0.1", "steps=50"]`` into typed keyword arguments checked against the signature."""
    schema = hyperparameters(sampler)
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"hyperparameter override {item!r}: expected NAME=VALUE")
        if name not in schema:
            known = ", ".join(sorted(schema)) or "none"
            raise ValueError(f"solver {sampler_name!r} has no hyperparameter {name!r}; it takes: {known}")
        overrides[name] = _convert(name, text, schema[name])
    return overrides
