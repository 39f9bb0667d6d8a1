"""What the scripts in ``recipes/`` share: a dataclass config read from the command line, and their ``main``.

A recipe is ``Config`` (a :class:`RecipeConfig` with its data fields added; one field per option,
``--field-name VALUE``), ``build_tasks(config, device)`` and ``stand_in(config, tasks)`` (its ``--tiny`` prior);
:func:`run_comparison` does the rest.
Options are typed from the defaults: bool -> ``--x / --no-x``; tuple -> comma-separated values of its first
element's type, and the option may be repeated (``--set dps:zeta=3 --set reddiff:lam=50``, the one override syntax
of :func:`invdiff.settings.parse_set`); None -> text (or ``none``); int / float / str as they are.
Hyperparameters are not config fields: they come from :mod:`invdiff.settings` and ``--set``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

REPOSITORY = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class RecipeConfig:
    """The options every comparison recipe has; a recipe's ``Config`` subclasses it (redeclaring a field gives it
    the recipe's default) and adds where its data come from."""

    out: str = "runs/recipe"
    solvers: tuple[str, ...] = ("reddiff", "dps", "diffpir", "ddrm", "cg-sense", "l1-wavelet", "tv")
    steps: int = 100
    prior: str = "brain-mri-complex"             # shipped name, exported path, or "analytic" (the --tiny stand-in)
    set: tuple[str, ...] = ()                    # SOLVER:NAME=VALUE (repeatable or comma-separated)
    seed: int = 0
    device: str = "auto"
    threads: int = 0                             # torch intra-op threads (0: torch's default)
    tiny: bool = False


class _Extend(argparse.Action):
    """A tuple option: comma-separated values, and every repetition adds to them."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest)
        start = () if previous is self.default else tuple(previous)
        setattr(namespace, self.dest, start + tuple(values))


def config_parser(config_type, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per field of the dataclass ``config_type``."""
    parser = argparse.ArgumentParser(description=description)
    for item in dataclasses.fields(config_type):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        flag = "--" + item.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=item.name, default=default, action=_Extend,
                                type=_tuple_parser(item.name, default), help=f"default: {_show(default)}")
        else:
            parser.add_argument(flag, dest=item.name, default=default, type=_field_parser(item.name, default),
                                help=f"default: {_show(default)}")
    return parser


def _tuple_parser(name: str, default: tuple) -> Callable[[str], tuple]:
    kind = type(default[0]) if default else str

    def parse(text: str) -> tuple:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = name
    return parse


def _field_parser(name: str, default) -> Callable[[str], Any]:
    def parse(text: str):
        if default is None:
            return None if text.lower() == "none" else text
        return type(default)(text)

    parse.__name__ = name
    return parse


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(config_type, argv: Sequence[str] | None = None, description: str = ""):
    """``config_type(**parsed)``; with ``--tiny``, ``config.tiny_variant()`` (the seconds-long smoke variant)."""
    args = config_parser(config_type, description).parse_args(argv)
    config = config_type(**vars(args))
    return config.tiny_variant() if getattr(config, "tiny", False) else config


def repository_path(path: str | Path) -> Path:
    """``path`` as given if it exists (or is absolute), else relative to the repository root."""
    candidate = Path(path)
    return candidate if candidate.exists() or candidate.is_absolute() else REPOSITORY / candidate


def prepare(config):
    """What every recipe does first: ``torch.set_num_threads(config.threads)`` when set, and the device."""
    import torch

    from invdiff.tasks import resolve_device

    if getattr(config, "threads", 0):
        torch.set_num_threads(config.threads)        # one thread: tiny tensors on a shared machine run faster
    return resolve_device(getattr(config, "device", "auto"))


def resolve_prior(name: str, device):
    """A shipped prior name or an exported path, loaded on ``device`` (:func:`invdiff.compare.resolve_prior`)."""
    from invdiff.compare import resolve_prior as load
    return load(name, device)


def stand_in_prior(shape, source: str | Path, *, key: str, factor: int = 1, exclude: Sequence[int] = (),
                   percentile: float | None = 99.5):
    """The ``--tiny`` prior: an exact Gaussian prior (:func:`invdiff.priors.analytic.empirical_gaussian_prior`)
    fitted on the images ``source[key]`` block-averaged by ``factor``, leaving out the indices in ``exclude`` (the
    recipe's test images). Milliseconds per call, no training, and a real model of image statistics (unlike a
    made-up smooth field), so a tiny run can show a solver beating its baseline."""
    import h5py

    from invdiff.priors.analytic import empirical_gaussian_prior
    from invdiff.tasks import block_average

    with h5py.File(repository_path(source), "r") as h5:
        images = h5[key][...]
    kept = [block_average(image, image.shape[0] // factor) for index, image in enumerate(images)
            if index not in set(exclude)]
    return empirical_gaussian_prior(kept, shape, percentile=percentile)


def run_comparison(config: RecipeConfig, build_tasks: Callable, stand_in: Callable, *, title: str, recipe: str):
    """Threads and device, ``build_tasks(config, device)``, the prior (``stand_in(config, tasks)`` for
    ``--prior analytic``, else a shipped name or exported path), then :func:`compare`."""
    device = prepare(config)
    tasks = build_tasks(config, device)
    prior = stand_in(config, tasks) if config.prior == "analytic" else resolve_prior(config.prior, device)
    return compare(config, tasks, prior, title=title, recipe=recipe)


def compare(config, tasks, prior, *, title: str, recipe: str):
    """:func:`invdiff.compare.compare_problems` with the config's solvers, seed, steps and ``--set`` overrides."""
    from invdiff.compare import compare_problems
    from invdiff.settings import parse_set

    return compare_problems(tasks, config.solvers, config.out, prior=prior, seed=config.seed, steps=config.steps,
                            overrides=parse_set(config.set), title=title,
                            info={"recipe": recipe, "config": dataclasses.asdict(config)})


def run_recipe(config_type, run: Callable, argv: Sequence[str] | None = None, description: str = "",
               stream=None):
    """A recipe's ``main``: INFO logging, the ``Config`` from the command line, ``run(config)``, the summary table
    on ``stream`` (stdout)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(parse_config(config_type, argv, description))
    (sys.stdout if stream is None else stream).write("\n".join(report.summary_lines()) + "\n")
    return report


__all__ = ["RecipeConfig", "run_comparison", "config_parser", "parse_config", "repository_path", "prepare", "resolve_prior", "stand_in_prior", "compare", "run_recipe"]
