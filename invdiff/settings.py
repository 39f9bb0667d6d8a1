"""Solver hyperparameters: the signature is the schema, one table holds the tuned values, one syntax overrides.

Three layers, later wins, and nothing else sets a hyperparameter:

1. the solver's signature (keyword-only arguments with the paper's defaults: :func:`hyperparameters`);
2. :data:`TUNED`, per task family (``mri``, ``ct``, ``inpainting``, ``sr``), each value with where it came from
   (the sweeps themselves are in ``recipes/README.md``, "Solver settings");
3. the user's overrides, written ``SOLVER:NAME=VALUE`` everywhere (``invdiff reconstruct`` also takes
   ``NAME=VALUE`` for its one solver), typed from the signature's annotation (``bool | float`` takes ``true`` or
   ``100``).

:func:`effective` merges them into the full set of values a solver runs with; outputs record that, not only the
overrides.

    >>> effective("dps", "mri")["zeta"]                             # 3.0, tuned (the signature says 1.0)
    >>> effective("smc", "ct", {"stable_likelihood": 0.0})["proposal"]
    'conditional'
    >>> parse_set(["dps:zeta=0.3", "reddiff:steps=50"])            # {"dps": {"zeta": 0.3}, "reddiff": {"steps": 50}}
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from invdiff.errors import InputError

# Arguments every solver takes that are not hyperparameters a user sets from a config or the command line.
RESERVED = {"problem", "prior", "generator", "callback"}
FAMILIES = ("mri", "ct", "inpainting", "sr")


@dataclass(frozen=True)
class Tuned:
    """A tuned value and where it came from (a sweep, a measurement, a paper)."""

    value: Any
    source: str


_SWEEP = "recipes/README.md, 'Solver settings'"
_VOLUME_SWEEP = "swept on CT phantoms, seeds 11-12; benchmarks/results/volume3d-2026-12-05-cpu-ct-sweep.md"
# The SMC conditional proposal on images: stable at any sigma_y (the explicit Euler step is not), README "Known
# limits"; its rejuvenation moves stay on (without them a 30-step inpainting run lost 1.8 dB).
_SMC_CONDITIONAL = Tuned("conditional", "stable at any sigma_y; image-task runs in benchmarks/results/smc_images-*")

# ADS on the shipped brain prior, probed on slice 1 of brain_multislice_multicoil.h5 (32 of 128 lines, 30 steps x 4
# particles, RED-Diff 100 steps on the chosen mask; recipes/active_mri.py, benchmarks/results/active_*): at sigma 80
# the prior's Tweedie estimates vary most in the outermost columns, so a window over the first quarter of the Karras
# grid chose edge lines (RED-Diff 23.9 dB); over [0.25, 0.5) (sigma ~17 -> 2.5) it chose a contiguous low-pass block
# (28.07 dB) until the estimates were made data-consistent before scoring (28.86 dB; random 28.97, equispaced 28.56,
# variable density 28.75); guidance 3 against the paper's 0.85 at 30 steps: ADS's own image 27.35 vs 26.40 dB.
# Then swept on a tuning set apart from the reported slices (EPI slices 5, 6, 17, 18 of the same volume,
# `python data/make_samples.py --tuning-set`; 4 slices x budgets 32 and 16, RED-Diff on ADS's mask, mean dB):
# [0.25, 0.5) with 5 CG steps 29.21 / 28.20; [0.4, 0.7) 29.37 / 28.31; [0.5, 0.8) 29.47 / 28.30; 20 CG steps
# 29.50 / 28.46; both 29.61 / 28.65 (random 29.57 / 23.52, variable density 29.25 / 28.77): a later window scores
# sharper Tweedie estimates, and a complete data-consistency correction stops the coil maps' neighbours of measured
# lines from looking uncertain.
_ADS_PROBE = "probed on slice 1 of the multislice sample, 32 of 128 lines; comment above TUNED"
_ADS_TUNING = ("swept on the tuning slices (EPI 5, 6, 17, 18), budgets 32 and 16; comment above TUNED; "
               "benchmarks/results/active_mri-2026-12-05-cpu-tuning-set.md")
_ADS_MRI = {
    "window_start": Tuned(0.5, _ADS_TUNING), "window_end": Tuned(0.8, _ADS_TUNING),
    "score_dc_iterations": Tuned(20, _ADS_TUNING), "guidance": Tuned(3.0, _ADS_PROBE),
}
_APS_ANCHOR = ("swept beta 0 / 3 / 10 and 15 / 1 outer steps on a 96 px copy of the T1 slice (4x, 2x token prior); "
               "full T1 26.22 dB vs zero-filled 24.99, multislice 24.25 vs 23.22; "
               "benchmarks/results/anchored_images-2026-12-05-cpu-2x-tokenizer.md")

TUNED: dict[str, dict[str, dict[str, Tuned]]] = {
    "mri": {
        "dps": {"zeta": Tuned(3.0, f"swept 0.3 / 1 / 3 / 10 at 100 steps on the MRI tuning slice; {_SWEEP}")},
        "smc": {"proposal": _SMC_CONDITIONAL},
        # DiffusionMBIR's MRI values (their code's README; our SENSE operator is normalised, as theirs is not)
        "diffusion-mbir": {"lam": Tuned(0.005, "DiffusionMBIR paper / code, MRI (REFERENCES.md)"),
                           "rho": Tuned(0.01, "DiffusionMBIR paper / code, MRI (REFERENCES.md)")},
        "dds": {"lam": Tuned(0.005, "DiffusionMBIR's MRI value taken over (DDS gives none for 3-D MRI); not swept"),
                "rho": Tuned(0.01, "DiffusionMBIR's MRI value taken over (DDS gives none for 3-D MRI); not swept")},
        "ads": _ADS_MRI,
        # APS with the paper's values stays below zero-filled on MRI (full T1 slice 24.86 dB vs 24.99); starting every
        # tilt at the tokens of the zero-filled image and committing after one inner loop passes it (ours, not the
        # paper's; picked on a 96 px copy of the T1 slice, checked on the multislice sample, which played no part)
        "aps": {"encoder_anchor": Tuned(10.0, _APS_ANCHOR), "steps": Tuned(1, _APS_ANCHOR)},
        # maps: 1 = the task's one ESPIRiT set; 2 = soft-SENSE with two sets; auto = two sets only where the second
        # set covers > 1 % of the first set's support (objects filling the phase-encoding FOV)
        "cg-sense": {"maps": Tuned("auto", "8-coil camera filling the FOV, one set -> auto: 2x 23.4 -> 33.9 dB, 4x "
                                           "19.7 -> 24.7, 8x 15.2 -> 16.1 (zero-filled 27.0, 20.8, 14.4); brain sample "
                                           "and margined camera bit-identical; "
                                           "benchmarks/results/soft_sense-2026-12-05-cpu.md")},
    },
    "ct": {
        # zeta 0.1 is 2.5 dB better in PSNR than 0.03 on the eight anatomical tuning phantoms with the shipped prior
        # (27.46 vs 24.98) but 0.15 worse in SSIM (0.602 vs 0.756): a trade, not a win; the row stays.
        "dps": {"zeta": Tuned(0.03, f"swept 0.003 / 0.01 / 0.03 / 0.1 on CT tuning phantom 1; {_SWEEP}; 0.01 / 0.03 "
                                    "/ 0.1 / 0.3 on 8 ct-anatomy phantoms (30 views): 17.72 / 24.98 / 27.46 / 19.85 "
                                    "dB, SSIM 0.333 / 0.756 / 0.602 / 0.350")},
        # DiffPIR's data step weights the denoised image by rho_t = lam sigma_y^2 / sigma^2 against ||y - A x||^2
        # (30 CG iterations from the denoised image). On 30-view CT a weaker pull than the paper's lam 7 is better,
        # down to 0.5; below that the data term's noise comes through (an empirical optimum, not derived).
        "diffpir": {"lam": Tuned(0.5, "swept 0.1 / 0.25 / 0.5 / 1 / 2 / 7 / 20 on 8 ct-anatomy phantoms seeds "
                                      "5000-5007 (30 views, shipped prior): 32.14 / 32.89 / 33.06 / 32.87 / 32.37 / "
                                      "30.88 / 29.32 dB; benchmarks/results/ct_phantom_anatomy_finetune-2026-12-06-"
                                      "cpu.md")},
        # ADMM-TV_z weights of the 3-D solvers (absolute: the CT operator is unnormalised), swept on 32 x 32 x 16
        # phantoms with tuning seeds 11 and 12 (not the reported seed 7), 30 views and checked at 8; steps stay the
        # papers' (DDS 50; DiffusionMBIR 2000, swept at 100, where its one CG step per step left it 6 dB behind).
        "dds": {"lam": Tuned(1.0, f"{_VOLUME_SWEEP}: 35.8 dB vs 32.6 at the paper's 0.04 (30 views), 29.9 vs 29.0 (8)"),
                "rho": Tuned(30.0, f"{_VOLUME_SWEEP}: rho 10 / 30 / 100 at lam 1: 35.7 / 35.8 / 34.5 dB")},
        "diffusion-mbir": {
            "lam": Tuned(1.0, f"{_VOLUME_SWEEP}, 100 steps: 35.9 dB vs 32.3 at the paper's 0.04 (both 5 CG steps)"),
            "rho": Tuned(30.0, f"{_VOLUME_SWEEP}: DDS's optimum; MBIR (1 CG step) 29.95 / 29.93 dB at rho 10 / 30"),
            "cg_steps": Tuned(5, f"{_VOLUME_SWEEP}, 100 steps: 35.9 dB with 5 CG steps vs 29.9 with the paper's 1"),
        },
        "reddiff": {
            # lam is an absolute precision; the data curvature ||A||^2 / sigma_y^2 is ~100x larger on CT than on
            # normalised MRI, so the same balance needs ~100x the registered lam.
            # 1e4 and 3e3 tie on the ellipse tuning phantom (38.06 / 38.02 dB at 60 views); on eight unseen
            # anatomical phantoms (ct-anatomy seeds 5000-5007, 30 views) 3e3 is 1.9 dB ahead (32.16 vs 30.26), and on
            # real CT (final check only, not tuned on) +1.5 dB; the piecewise-constant thorax test phantom loses 1.6 dB.
            "lam": Tuned(3e3, "swept 1e3 .. 1e5 on CT tuning phantom 1 (60 views) and on 8 ct-anatomy phantoms (30 "
                              "views); benchmarks/results/ct_reddiff_lam-2026-12-05-cpu.md"),
            "init": Tuned("fbp", "A^+ y is a slow, noise-amplifying 500-iteration CG on CT; FBP is close already"),
            "sigma_max": Tuned(1.0, f"swept 80 / 5 / 1 / 0.5 on CT tuning phantom 1 (30 and 60 views); {_SWEEP}"),
        },
        "smc": {
            "proposal": _SMC_CONDITIONAL,
            # kappa ~ tr(A A^T) / m (62 at 30 views): 27.9 vs 22.4 dB at 30 steps against the largest eigenvalue;
            # kappa 0 (the paper's likelihood) gives 34.6 dB at 100 steps for 3.8x the cost per step.
            "stable_likelihood": Tuned(100.0, "mean eigenvalue of A A^T at 30 views; smc_images-2026-12-02-csr*"),
        },
        "tv": {"lam": Tuned(3e-4, f"swept 3e-5 .. 3e-3 on CT tuning phantom 1; {_SWEEP}"),
               "init": Tuned("fbp", "TV gains up to 2.5 dB over the scaled back-projection in 200 iterations")},
        "l1-wavelet": {"lam": Tuned(3e-4, f"swept 1e-5 .. 1e-3 on CT tuning phantom 1; {_SWEEP}"),
                       "init": Tuned("fbp", "FBP is already close to the image; as for TV")},
        "cg-sense": {"lam": Tuned(1e-3, f"swept 1e-5 .. 0.1 on CT tuning phantom 1; {_SWEEP}")},
    },
    "inpainting": {
        "dps": {"zeta": Tuned(3.0, f"swept 0.3 / 1 / 3 / 10 on the multislice sample, random and box; {_SWEEP}")},
        "smc": {"proposal": _SMC_CONDITIONAL},
    },
    "sr": {
        "dps": {"zeta": Tuned(10.0, f"swept 1 / 3 / 10 / 30 on the multislice sample at 4x; {_SWEEP}")},
    },
}


# ---- the schema -----------------------------------------------------------------------------------------
def solver_function(solver: str | Callable) -> Callable:
    """The registered function of ``solver`` (a name), or ``solver`` itself when it is already a function."""
    if callable(solver):
        return solver
    from invdiff.registry import get_solver
    return get_solver(solver).factory


def hyperparameters(solver: str | Callable) -> dict[str, Any]:
    """The keyword-only hyperparameters of ``solver`` (a name or a function) with their signature defaults."""
    return {name: p.default for name, p in inspect.signature(solver_function(solver)).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in RESERVED}


def _annotation_types(solver: Callable, name: str) -> list[str]:
    """The type names of a hyperparameter's annotation, e.g. ``["bool", "float"]`` for ``bool | float``.

    Annotations are read as text (modules use ``from __future__ import annotations``), so nothing is evaluated;
    without an annotation the default's type stands in (``None`` -> any number or text).
    """
    parameter = inspect.signature(solver).parameters[name]
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        default = parameter.default
        return ["int", "float", "str"] if default is None else [type(default).__name__]
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("Optional[", "").replace("]", "")
    return [part.strip() for part in text.replace(",", "|").split("|") if part.strip()]


_TRUE, _FALSE = {"true", "yes", "on"}, {"false", "no", "off"}


def convert(solver: str | Callable, name: str, text: str) -> Any:
    """``text`` typed for hyperparameter ``name`` of ``solver`` by its annotation; :class:`InputError` if none fits.

    Tried in the order None (``none``), bool (``true/false/yes/no/on/off``, and ``1/0`` when bool is the only
    type), int, float, str.
    """
    function = solver_function(solver)
    types = _annotation_types(function, name)
    value = str(text).strip()
    lowered = value.lower()
    if "None" in types and lowered == "none":
        return None
    if "bool" in types:
        if lowered in _TRUE or (types == ["bool"] and lowered == "1"):
            return True
        if lowered in _FALSE or (types == ["bool"] and lowered == "0"):
            return False
    for kind in (int, float):
        if kind.__name__ in types:
            try:
                return kind(value)
            except ValueError:
                pass
    if "str" in types or any(t not in {"None", "bool", "int", "float"} for t in types):
        return value
    label = _solver_label(solver)
    raise InputError(f"hyperparameter {name} of {label}: expected {' or '.join(types)}, got {text!r}")


def _solver_label(solver) -> str:
    return repr(solver) if isinstance(solver, str) else getattr(solver, "__name__", str(solver))


def check(solver: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` as a dict after checking that every key is a hyperparameter of ``solver``."""
    schema = hyperparameters(solver)
    for name in values:
        if name not in schema:
            raise InputError(f"solver {solver!r} has no hyperparameter {name!r}; it takes: "
                             f"{', '.join(sorted(schema)) or 'none'}")
    return dict(values)


# ---- the one override syntax ----------------------------------------------------------------------------
def parse_set(items: Sequence[str], *, solver: str | None = None) -> dict[str, dict[str, Any]]:
    """``["dps:zeta=0.3", "reddiff:steps=50"]`` -> ``{"dps": {"zeta": 0.3}, "reddiff": {"steps": 50}}``, typed.

    ``solver``: the one solver of the run (``invdiff reconstruct``), which lets ``NAME=VALUE`` omit its prefix.
    """
    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        text = str(item)
        head, sep, value = text.partition("=")
        target, colon, name = head.rpartition(":")
        if not colon:
            target = solver
        if not sep or not name or not target:
            example = "dps:zeta=0.3" if solver is None else f"{solver}:steps=50 or steps=50"
            raise InputError(f"--set {text!r}: expected SOLVER:NAME=VALUE, e.g. {example}")
        if solver is not None and target != solver:
            raise InputError(f"--set {text!r}: this run uses solver {solver!r}, not {target!r}")
        from invdiff.registry import check_solver_names
        check_solver_names([target], flag="--set")
        check(target, {name: None})
        parsed.setdefault(target, {})[name] = convert(target, name, value)
    return parsed


# ---- the table ------------------------------------------------------------------------------------------
def tuned(family: str | None, solver: str) -> dict[str, Any]:
    """The tuned values of ``solver`` for a task family (``{}`` when none or ``family`` is None)."""
    if family is None:
        return {}
    if family not in TUNED:
        raise InputError(f"task family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return {name: entry.value for name, entry in TUNED[family].get(solver, {}).items()}


def provenance(family: str | None, solver: str) -> dict[str, str]:
    """Where each tuned value of ``solver`` on ``family`` came from."""
    if family is None or family not in TUNED:
        return {}
    return {name: entry.source for name, entry in TUNED[family].get(solver, {}).items()}


def effective(solver: str, family: str | None, overrides: Mapping[str, Any] | None = None,
              *, steps: int | None = None) -> dict[str, Any]:
    """Every hyperparameter ``solver`` runs with: signature defaults, then :data:`TUNED` for ``family``, then
    ``steps`` (for solvers that take steps), then ``overrides`` (typed values, checked against the signature)."""
    values = hyperparameters(solver)
    values.update(tuned(family, solver))
    if steps is not None:
        if int(steps) != steps or steps < 1:
            raise InputError(f"--steps must be a positive integer, got {steps!r}")
        if "steps" in values:
            values["steps"] = int(steps)
    values.update(check(solver, overrides or {}))
    return values


__all__ = ["TUNED", "Tuned", "FAMILIES", "hyperparameters", "convert", "check", "parse_set", "tuned", "provenance",
           "effective"]
