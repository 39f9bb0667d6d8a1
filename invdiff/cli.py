"""The ``invdiff`` command line: a thin layer over the public API.

Every subcommand exits 0 on success and 2 with a one-line reason on bad input.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys

log = logging.getLogger("invdiff")


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit status 2."""


def _cmd_list(args) -> int:
    import invdiff
    invdiff.load_plugins(args.plugins) if args.plugins else invdiff.load_plugins()
    sections = {"operators": invdiff.list_operators(), "samplers": invdiff.list_samplers(),
                "priors": invdiff.list_priors()}
    for title, names in sections.items():
        print(f"{title}:")
        for name in names:
            print(f"  {name}")
    return 0


def _cmd_info(args) -> int:
    import invdiff
    from invdiff import registry
    from invdiff.config import hyperparameters
    invdiff.load_plugins(args.plugins) if args.plugins else invdiff.load_plugins()
    name = args.name
    if name in invdiff.list_priors():
        from invdiff.priors.loading import prior_info
        print(json.dumps(prior_info(name), indent=2, sort_keys=True))
    elif name in invdiff.list_samplers():
        fn = registry.get_sampler(name).factory
        print(f"sampler {name}: {inspect.getdoc(fn).splitlines()[0]}")
        print(json.dumps(hyperparameters(fn), indent=2, default=str))
    elif name in invdiff.list_operators():
        entry = registry.get_operator(name)
        print(f"operator {name} ({entry.source}.{entry.factory.__name__})")
        print(inspect.getdoc(entry.factory) or "")
    else:
        raise UsageError(f"no operator, sampler or prior named {name!r} (see `invdiff list`)")
    return 0


def _cmd_reconstruct(args) -> int:
    from invdiff.reconstruct import ReconstructionRequest, reconstruct_scan_to_file
    request = ReconstructionRequest(
        scan=args.scan, solver=args.solver, out=args.out, acceleration=args.accel,
        center_fraction=args.center_fraction, mask_kind=args.mask, slices=args.slices, device=args.device,
        seed=args.seed, png=args.png, prior=args.prior, overrides=args.set, progress=not args.no_progress)
    report = reconstruct_scan_to_file(request)
    for line in report.summary_lines():
        print(line)
    return 0


def _cmd_train_prior(args, rest) -> int:
    from invdiff.priors import train
    return train.main(rest) or 0


def _cmd_sample_prior(args) -> int:
    import torch

    from invdiff.priors.loading import load_prior
    from invdiff.priors.unconditional import sample_unconditional, save_sample_grid
    prior = load_prior(args.prior)
    generator = torch.Generator().manual_seed(args.seed)
    samples = sample_unconditional(prior, args.n, args.size, steps=args.steps, generator=generator)
    if args.png:
        save_sample_grid(samples, args.png)
        print(f"wrote {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invdiff", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered operators, samplers and priors")
    p.add_argument("--plugins", help="folder of operator plugins (default: $INVDIFF_PLUGINS or ./operators)")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", help="details of one operator, sampler or prior")
    p.add_argument("name")
    p.add_argument("--plugins")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("reconstruct", help="reconstruct a fastMRI scan with one solver")
    p.add_argument("scan", help="fastMRI-format .h5 file")
    p.add_argument("--solver", default="cg-sense", help="a sampler or baseline name (see `invdiff list`)")
    p.add_argument("--accel", type=int, default=4, help="acceleration for retrospective undersampling")
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fraction of fully sampled centre columns (default: 0.08 at 4x, 0.04 at 8x)")
    p.add_argument("--mask", default="random", choices=["random", "equispaced", "equispaced_fraction"],
                   help="fastMRI mask function (seeded by the file name, as fastMRI does)")
    p.add_argument("--out", required=True, help="output .h5 (fastMRI submission format)")
    p.add_argument("--slices", default=None, help="python-style slice range, e.g. 0:4")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", default=None, help="prior name or path (diffusion solvers)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="solver hyperparameter override, checked against its signature (repeatable)")
    p.add_argument("--png", action="store_true", help="also save a figure next to --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_reconstruct)

    p = sub.add_parser("train-prior", help="train a diffusion prior (all options: invdiff train-prior --help)",
                       add_help=False)
    p.set_defaults(run=None, passthrough=_cmd_train_prior)

    p = sub.add_parser("sample-prior", help="draw unconditional samples from a prior")
    p.add_argument("prior", help="prior name or exported prior path")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=None, help="write a grid of the samples to this PNG")
    p.set_defaults(run=_cmd_sample_prior)

    from invdiff.compare import add_compare_parser   # its options live next to the code they drive
    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "passthrough", None):
        runner = lambda: args.passthrough(args, rest)  # noqa: E731
    else:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        runner = lambda: args.run(args)  # noqa: E731
    try:
        return runner()
    except (UsageError, ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"invdiff: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
