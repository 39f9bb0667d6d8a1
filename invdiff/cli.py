"""The ``invdiff`` command line: a thin layer over the public API.

Every subcommand exits 0 on success and 2 with a one-line reason on bad input (:class:`invdiff.errors.InputError`);
any other exception is a bug in invdiff and keeps its traceback (exit 1). Building the parser imports nothing
heavy, so ``invdiff --help`` answers at once; each command imports what it needs when it runs.
"""
from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import sys
from pathlib import Path

from invdiff.errors import InputError

log = logging.getLogger("invdiff")

DEFAULT_COMPARE_SOLVERS = "reddiff,dps,diffpir,cg-sense,l1-wavelet"
DEFAULT_COMPARE_SOLVERS_3D = "dds,diffusion-mbir,tv-3d,reddiff,cg-sense"
MASK_HELP = "fastMRI mask function seeded by the file name: random, equispaced or equispaced_fraction"
SET_HELP = ("hyperparameter of a solver, SOLVER:NAME=VALUE, typed by its signature (repeatable); over the tuned "
            "settings of invdiff.settings, which `invdiff info SOLVER` lists")


# On a machine with few cores, one thread per job: measured here, a 4 M-parameter UNet ran 7x slower on torch's
# default two threads than on one while another job shared the cores (README, "Speed").
SMALL_MACHINE_CORES = 4


def default_threads() -> int | None:
    """One thread on a machine with at most SMALL_MACHINE_CORES cores, else None (torch's own choice)."""
    import os
    return 1 if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES else None


def _set_threads(args) -> None:
    """``--threads N``: torch's intra-op threads (``0``: torch's default; unset: :func:`default_threads`)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        threads = default_threads()
    elif threads < 0:
        raise InputError(f"--threads: expected 0 (torch's default) or a positive integer, got {threads}")
    if threads:
        import torch
        torch.set_num_threads(threads)


def _cmd_list(args) -> int:
    import invdiff
    invdiff.load_plugins(args.plugins) if args.plugins else invdiff.load_plugins()
    sections = {"operators": invdiff.list_operators(), "solvers": invdiff.list_solvers(),
                "priors": invdiff.list_priors()}
    for title, names in sections.items():
        print(f"{title}:")
        for name in names:
            print(f"  {name}")
    return 0


def _cmd_info(args) -> int:
    import invdiff
    from invdiff import registry, settings
    invdiff.load_plugins(args.plugins) if args.plugins else invdiff.load_plugins()
    name = args.name
    if name in invdiff.list_priors():
        from invdiff.priors.loading import prior_info
        print(json.dumps(prior_info(name), indent=2, sort_keys=True))
    elif name in invdiff.list_solvers():
        function = registry.get_solver(name).factory
        print(f"solver {name}: {inspect.getdoc(function).splitlines()[0]}")
        print("signature defaults:")
        print(json.dumps(settings.hyperparameters(name), indent=2, default=str))
        for family in settings.FAMILIES:
            tuned = settings.tuned(family, name)
            if tuned:
                sources = settings.provenance(family, name)
                print(f"tuned for {family}:")
                for key, value in tuned.items():
                    print(f"  {key} = {value!r}  ({sources[key]})")
    elif name in invdiff.list_operators():
        entry = registry.get_operator(name)
        print(f"operator {name} ({entry.source}.{entry.factory.__name__})")
        print(inspect.getdoc(entry.factory) or "")
    elif Path(name).suffix in (".json", ".safetensors", ".pt", ".pth", ".ckpt") and Path(name).is_file():
        from invdiff.compare import prior_record, resolve_prior        # a prior file that --prior would accept
        prior = resolve_prior(name, "cpu")
        print(json.dumps({**prior_record(prior), "metadata": getattr(prior, "metadata", None)}, indent=2,
                         sort_keys=True, default=str))
    else:
        from invdiff.priors.loading import RETIRED_PRIORS, retired_prior_message

        if name in RETIRED_PRIORS:
            raise InputError(retired_prior_message(name))
        raise InputError(f"no operator, solver or prior named {name!r} (see `invdiff list`)")
    return 0


def _cmd_reconstruct(args) -> int:
    from invdiff.reconstruct import ReconstructionRequest, reconstruct_scan_to_file
    from invdiff.settings import parse_set

    _set_threads(args)
    overrides = parse_set(args.set, solver=args.solver).get(args.solver, {})
    if args.budget is not None:           # sugar for --set SOLVER:budget=N (active solvers)
        overrides = {**overrides, **parse_set([f"budget={args.budget}"], solver=args.solver)[args.solver]}
    request = ReconstructionRequest(
        scan=args.scan, solver=args.solver, out=args.out, acceleration=args.accel,
        center_fraction=args.center_fraction, mask_kind=args.mask, slices=args.slices, device=args.device,
        seed=args.seed, png=args.png, prior=args.prior, overrides=overrides, steps=args.steps,
        progress=not args.no_progress, mask_file=args.mask_file, safeguard=args.safeguard, volume=args.volume,
        nifti=args.nifti)
    report = reconstruct_scan_to_file(request, overwrite=args.overwrite)
    for line in report.summary_lines():
        print(line)
    return 0


def _cmd_compare(args) -> int:
    from invdiff.compare import compare_scan, compare_volume, parse_accelerations, parse_solver_list
    from invdiff.settings import parse_set

    _set_threads(args)
    default = DEFAULT_COMPARE_SOLVERS_3D if args.volume else DEFAULT_COMPARE_SOLVERS
    solvers = parse_solver_list(args.solvers or default)
    overrides = parse_set(args.set)
    run = compare_volume if args.volume else compare_scan
    report = run(args.scan, solvers, parse_accelerations(args.accel), args.out, prior=args.prior, seed=args.seed,
                 slices=args.slices, overrides=overrides, device=args.device, progress=not args.no_progress,
                 steps=args.steps, center_fraction=args.center_fraction, mask_kind=args.mask,
                 safeguard=args.safeguard)
    print("\n".join(report.summary_lines()))
    return 0


def _cmd_batch(args) -> int:
    from invdiff.batch import run_batch   # the options below are its contract; the work list lives in batch.py

    _set_threads(args)
    return run_batch(args)


def _cmd_train_prior(args, rest) -> int:
    """``--kind tokens`` trains the tokenizer + masked token model of APS; anything else the EDM UNet prior."""
    if "--kind" in rest:
        at = rest.index("--kind")
        kind = rest[at + 1] if at + 1 < len(rest) else ""
        rest = rest[:at] + rest[at + 2:]
        if kind == "tokens":
            from invdiff.priors.tokens import train_main
            return train_main(rest) or 0
        if kind != "edm":
            raise InputError(f"--kind: expected edm (the default) or tokens, got {kind!r}")
    from invdiff.priors import train
    return train.main(rest) or 0


def _cmd_sample_prior(args) -> int:
    import torch

    from invdiff.compare import resolve_prior
    from invdiff.priors.unconditional import sample_unconditional, save_sample_grid
    from invdiff.tasks import resolve_device

    _set_threads(args)
    device = resolve_device(args.device)
    if args.bf16 and device.type != "cuda":
        log.warning("--bf16 on %s: bfloat16 autocast is meant for GPUs (slower than float32 on most CPUs)", device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    from invdiff.priors.tokens import is_token_prior
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        if is_token_prior(args.prior):        # a masked token prior (APS): ancestral unmasking, then the decoder
            from invdiff.priors.tokens import load_token_prior, sample_unconditional_tokens
            if args.spacing_mm is not None:
                raise InputError("--spacing-mm: token priors are not spacing-conditioned")
            samples = sample_unconditional_tokens(load_token_prior(args.prior, device=device), args.n, args.size,
                                                  steps=args.steps, generator=generator)
        else:
            prior = resolve_prior(args.prior, device)
            samples = sample_unconditional(prior, args.n, args.size, steps=args.steps, generator=generator,
                                           spacing_mm=args.spacing_mm)
    if args.png:
        save_sample_grid(samples, args.png)
        print(f"wrote {args.png}")
    return 0


def _add_scan_options(p: argparse.ArgumentParser, *, accel_help: str, accel_default) -> None:
    """The options ``reconstruct`` and ``compare`` share: how a scan becomes problems, and how solvers run."""
    p.add_argument("scan", help="fastMRI-format .h5 file")
    p.add_argument("--accel", default=accel_default, type=type(accel_default), help=accel_help)
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fraction of fully sampled centre columns (default: 0.08 at 4x, 0.04 at 8x)")
    p.add_argument("--mask", default="random", help=MASK_HELP)
    p.add_argument("--slices", default=None, help="python-style slice range, e.g. 0:4 (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="SOLVER:NAME=VALUE", help=SET_HELP)
    p.add_argument("--steps", type=int, default=None,
                   help="steps of every solver that takes `steps` (default: the settings table's)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (per slice: seed * 1000003 + slice)")
    p.add_argument("--prior", default=None, help="prior name or exported path (default: brain-mri-complex)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (a line per slice is still logged)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads; 0: torch's default (default: 1 on machines with <= {SMALL_MACHINE_CORES} "
                        f"cores, where one thread per job is fastest; torch's default otherwise)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every default not already spelled out in the text (and keeps descriptions' line breaks)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invdiff", description=__doc__.splitlines()[0], formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, formatter_class=_Formatter)

    p = add("list", help="registered operators, solvers and priors")
    p.add_argument("--plugins", help="folder of operator plugins (default: $INVDIFF_PLUGINS or ./operators)")
    p.set_defaults(run=_cmd_list)

    p = add("info", help="details of one operator, solver or prior (a name, or a prior file)")
    p.add_argument("name", help="an operator, solver or prior name (see `invdiff list`), or a prior file path")
    p.add_argument("--plugins", help="folder of operator plugins (default: $INVDIFF_PLUGINS or ./operators)")
    p.set_defaults(run=_cmd_info)

    p = add("reconstruct", help="reconstruct a fastMRI scan with one solver")
    _add_scan_options(p, accel_help="acceleration for retrospective undersampling (default: 4)", accel_default=4)
    p.add_argument("--solver", default="cg-sense", help="a solver name (see `invdiff list`)")
    p.add_argument("--out", required=True, help="output .h5 (fastMRI submission format)")
    p.add_argument("--png", action="store_true", help="also save a figure next to --out (same name, .png)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its figure) if they exist")
    p.add_argument("--3d", dest="volume", action="store_true",
                   help="the chosen slices as one volume (3-D solvers dds, diffusion-mbir, tv-3d; 2-D priors run slice "
                        "by slice)")
    p.add_argument("--nifti", action="store_true", help="with --3d: also write OUT.nii.gz with the voxel size")
    p.add_argument("--safeguard", action="store_true",
                   help="check a prior solver on held-out k-space columns against CG-SENSE and return CG-SENSE's "
                        "image when the prior predicts them worse (costs one more run; see invdiff.tasks.safeguard)")
    p.add_argument("--budget", type=int, default=None,
                   help="lines an active solver (ads) may measure in all, calibration block included")
    p.add_argument("--mask-file", default=None,
                   help="a column mask to use instead of fastMRI's (.npy, bool or 0/1, one entry per k-space column)")
    p.set_defaults(run=_cmd_reconstruct)

    p = add("compare", help="run several solvers on identical inputs of a fastMRI scan",
                       description="Run several solvers on identical inputs (mask, coil maps, normalisation, seed) "
                                   "of a fastMRI scan; write metrics.csv, grid-<acc>x.png and compare.json into --out.")
    _add_scan_options(p, accel_help="comma-separated accelerations, e.g. 4,8 (default: 4)", accel_default="4")
    p.add_argument("--solvers", default=None,
                   help=f"comma-separated solver names (default: {DEFAULT_COMPARE_SOLVERS}; with --3d "
                        f"{DEFAULT_COMPARE_SOLVERS_3D}); zero-filled is always added as the baseline")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--3d", dest="volume", action="store_true",
                   help="the chosen slices as one volume per acceleration, as reconstruct --3d poses it: 3-D solvers "
                        "(dds, diffusion-mbir, tv-3d) and 2-D ones (the prior slice by slice) on the same volume "
                        "problem; PSNR / SSIM per plane (axial, coronal, sagittal), time, peak memory, settings")
    p.add_argument("--safeguard", action="store_true",
                   help="each prior solver's row is its safeguarded result (held-out k-space check against "
                        "CG-SENSE, as reconstruct --safeguard); the verdict per slice goes in the table")
    p.set_defaults(run=_cmd_compare)

    p = add("batch", help="reconstruct every fastMRI file of a folder (plainly or under torchrun), resumable",
            description="Reconstruct every fastMRI .h5 file in INPUT_DIR with one solver; launched plainly or under "
                        "`torchrun --nproc_per_node=N invdiff batch ...`, each rank takes its share of the (file, "
                        "slice) work list; a manifest in --out lets a restarted job skip finished volumes.")
    p.add_argument("input_dir", help="folder of fastMRI-format .h5 files")
    p.add_argument("--solver", default="cg-sense", help="a solver name (see `invdiff list`)")
    p.add_argument("--out", required=True, help="output folder (created if missing): one .h5 per input, manifest")
    p.add_argument("--accel", type=int, default=4, help="acceleration for retrospective undersampling")
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fraction of fully sampled centre columns (default: 0.08 at 4x, 0.04 at 8x)")
    p.add_argument("--mask", default="random", help=MASK_HELP)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help=SET_HELP)
    p.add_argument("--steps", type=int, default=None, help="steps of the solver (default: the settings table's)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (per slice: seed * 1000003 + slice)")
    p.add_argument("--prior", default=None, help="prior name or exported path (default: brain-mri-complex)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (under torchrun: the rank's GPU)")
    _add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace outputs the manifest does not vouch for")
    p.set_defaults(run=_cmd_batch)

    p = add("train-prior", help="train a diffusion prior (all options: invdiff train-prior --help)", add_help=False)
    p.set_defaults(run=None, passthrough=_cmd_train_prior)

    p = add("sample-prior", help="draw unconditional samples from a prior (a diffusion prior or a token prior)")
    p.add_argument("prior", help="prior name or exported prior path (a token prior's .safetensors or run folder too)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--steps", type=int, default=40, help="sampler steps")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--spacing-mm", type=float, default=None,
                   help="pixel spacing told to a resolution-aware prior (default: the prior's own default)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast around the network (for GPUs)")
    _add_threads(p)
    p.add_argument("--png", default=None, help="write a grid of the samples to this PNG")
    p.set_defaults(run=_cmd_sample_prior)
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
    except InputError as err:
        print(f"invdiff: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
