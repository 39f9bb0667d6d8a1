"""Name -> component registries for operators, solvers and priors.

A *solver* is any reconstruction method, diffusion sampler or classical baseline: one word for users (CLI
flags, docs, tables). The code behind a diffusion solver lives in ``invdiff.samplers``. The older names
``register_sampler`` / ``get_sampler`` / ``list_samplers`` remain as aliases for plugins written against them.

Recipes, the CLI and the contract tests loop over these names, so a new component is one file and one
decorator. User operators live in a plugin folder (the repository's top-level ``operators/``) that
:func:`load_plugins` imports, or in packages that declare an ``invdiff.operators`` entry point.

    >>> from invdiff.registry import list_operators, example_operator
    >>> op = example_operator("inpainting")          # a small, ready-made instance for tests and docs
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PLUGIN_ENV = "INVDIFF_PLUGINS"
ENTRY_POINT_GROUP = "invdiff.operators"


@dataclass(frozen=True)
class Entry:
    """One registered component: the class (or factory) and a zero-argument example builder."""

    name: str
    factory: Callable[..., Any]
    example: Callable[[], Any] | None = None
    source: str = ""
    metadata: dict = field(default_factory=dict)


_OPERATORS: dict[str, Entry] = {}
_SOLVERS: dict[str, Entry] = {}
_PRIORS: dict[str, Entry] = {}


def _register(table: dict[str, Entry], kind: str, name: str, factory, example, metadata) -> None:
    previous = table.get(name)
    source = getattr(factory, "__module__", "?")
    if previous is not None and previous.factory is not factory:
        # Re-importing the same plugin file (e.g. load_plugins twice) is harmless; a *different* object
        # under the same name is a real clash.
        same_origin = getattr(previous.factory, "__qualname__", None) == getattr(factory, "__qualname__", None)
        if not same_origin:
            raise ValueError(f"{kind} name {name!r} is already registered by {previous.source}; "
                             f"choose another name for {source}")
    table[name] = Entry(name, factory, example, source, dict(metadata or {}))


def register_operator(name: str, *, example: Callable[[], Any] | None = None, **metadata):
    """Class decorator: make an operator available as ``invdiff.operator(name, ...)``.

    ``example`` builds a small instance (a few dozen pixels) that the contract tests run on; every
    operator that wants to be tested automatically must give one.
    """

    def decorate(cls):
        _register(_OPERATORS, "operator", name, cls, example, metadata)
        cls.registered_name = name
        return cls

    return decorate


def register_solver(name: str, **metadata):
    """Function decorator: make ``sample_<method>`` available as ``invdiff.sample(name, ...)``.

    ``kind="classical"`` marks a solver that takes no prior (every other solver needs one).
    """

    def decorate(fn):
        _register(_SOLVERS, "solver", name, fn, None, metadata)
        return fn

    return decorate


def register_prior(name: str, loader: Callable[[], Any], **metadata) -> None:
    """Register a named prior; ``loader()`` returns a ready denoiser (used for the shipped weights)."""
    _register(_PRIORS, "prior", name, loader, None, metadata)


def _lookup(table: dict[str, Entry], kind: str, name: str) -> Entry:
    _ensure_builtins()
    try:
        return table[name]
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        hint = ""
        if table is _OPERATORS:
            # Plugins are imported on request only: a library that ran code from the working directory by itself
            # on a name it does not know would be a surprise (and a hazard).
            folder = default_plugin_folder()
            hint = (f"; user operators are registered by invdiff.load_plugins() (it imports "
                    f"{folder if folder else '$INVDIFF_PLUGINS or ./operators'}); `invdiff list` does it for you")
        raise KeyError(f"unknown {kind} {name!r}; registered: {known}{hint}") from None


def get_operator(name: str) -> Entry:
    return _lookup(_OPERATORS, "operator", name)


def get_solver(name: str) -> Entry:
    return _lookup(_SOLVERS, "solver", name)


def needs_prior(name: str) -> bool:
    """Whether solver ``name`` runs on a diffusion prior (every solver not registered ``kind="classical"``)."""
    return get_solver(name).metadata.get("kind") != "classical"


def check_solver_names(names, *, flag: str = "--solvers") -> list[str]:
    """Registered, distinct solver names in the given order; :class:`InputError` naming the first bad one."""
    from invdiff.errors import InputError

    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise InputError(f"{flag}: expected at least one solver name (see `invdiff list`), got none")
    registered = list_solvers()
    for name in names:
        if name not in registered:
            raise InputError(f"{flag}: unknown solver {name!r}; registered: {', '.join(registered)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{flag}: {', '.join(repeated)} listed more than once")
    return names


def get_prior(name: str) -> Entry:
    return _lookup(_PRIORS, "prior", name)


def operator(name: str, *args, **kwargs):
    """Construct the operator registered under ``name``."""
    return get_operator(name).factory(*args, **kwargs)


def example_operator(name: str):
    """The small example instance the operator registered (for tests, docs and smoke runs)."""
    entry = get_operator(name)
    if entry.example is None:
        raise ValueError(f"operator {name!r} ({entry.source}) registered no example")
    return entry.example()


def list_operators() -> list[str]:
    _ensure_builtins()
    return sorted(_OPERATORS)


def list_solvers() -> list[str]:
    _ensure_builtins()
    return sorted(_SOLVERS)


# The names of the first releases (plugins may use them).
register_sampler, get_sampler, list_samplers = register_solver, get_solver, list_solvers


def list_priors() -> list[str]:
    _ensure_builtins()
    return sorted(_PRIORS)


_builtins_loaded = False


def _ensure_builtins() -> None:
    """Import the built-in modules whose decorators fill the tables (once, lazily, to keep import fast)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in ("invdiff.operators", "invdiff.samplers", "invdiff.priors"):
        importlib.import_module(module)


def default_plugin_folder() -> Path | None:
    """``$INVDIFF_PLUGINS`` if set, else ``./operators`` when it exists, else None."""
    env = os.environ.get(PLUGIN_ENV)
    if env:
        return Path(env)
    local = Path.cwd() / "operators"
    return local if local.is_dir() else None


def load_plugins(folder: str | os.PathLike | None = None, *, entry_points: bool = True) -> list[str]:
    """Import every ``*.py`` file in ``folder`` (files starting with ``_`` are skipped) and every
    ``invdiff.operators`` entry point. Returns the module names imported.

    A plugin that fails to import raises: a silently missing operator would make its contract tests
    vanish instead of fail.
    """
    _ensure_builtins()
    loaded = []
    folder = Path(folder) if folder is not None else default_plugin_folder()
    if folder is not None:
        if not folder.is_dir():
            raise FileNotFoundError(f"plugin folder {folder} does not exist")
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            module_name = f"invdiff_plugins.{path.stem}"
            if module_name in sys.modules:
                loaded.append(module_name)
                continue
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as err:
                del sys.modules[module_name]
                raise ImportError(f"plugin {path} failed to import: {err}") from err
            log.debug("loaded plugin %s", path)
            loaded.append(module_name)
    if entry_points:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
            loaded.append(ep.value)
    return loaded
