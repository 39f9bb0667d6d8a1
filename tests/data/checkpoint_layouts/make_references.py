"""Write the checkpoint-layout references by running the ORIGINAL networks (not invdiff's) on seeded weights.

    python tests/data/checkpoint_layouts/make_references.py GUIDED_DIFFUSION_DIR SCORE_SDE_DIR

GUIDED_DIFFUSION_DIR: a checkout of openai/guided-diffusion (the folder holding ``guided_diffusion/``; used at
commit 22e0df8183507e13a7813f8d38d51b072ca1e67c). SCORE_SDE_DIR: a checkout of yang-song/score_sde_pytorch
(holding ``models/`` and ``op/``; commit cb1f359f4aadf0ff9a5e122fe8fffc9451fd6e44). Nothing of either is copied:
their modules are imported and run. Two shims let the 2021 code run on current torch, on a CPU, without a
CUDA toolchain: ``op/upfirdn2d.py`` compiles a CUDA extension at import (its CPU path never uses it, so the
compiler call is replaced by a stub), and ``layerspp.Upsample`` passes 'nearest' positionally as
``scale_factor`` to ``F.interpolate`` (so that call is redirected to ``mode=``).

Writes, next to this script:
- ``guided_diffusion_reference.safetensors`` / ``score_sde_reference.safetensors``: per case the inputs and
  the original network's raw output; the metadata holds each case's constructor arguments, its state-dict
  key/shape listing (the original layout), the weight seed and the checksum of the seeded weights.
- ``released_layouts.json.gz``: key/shape listings of full-size configurations of released checkpoints
  (guided-diffusion 256x256 unconditional, ImageNet 64x64 conditional, the FFHQ 256 model of DPS; score-MRI's
  fastMRI knee 320 and DiffusionMBIR's AAPM 256 NCSN++), built by the original constructors.
"""
from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))          # tests/: checkpoint_reference
from checkpoint_reference import checksum, geometric_sigmas, seeded_state  # noqa: E402

ADM_CASES = {
    # UNetModel keyword arguments (attention_resolutions are downsampling factors there).
    "updown_heads4": dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                          attention_resolutions=[2], channel_mult=[1, 2], num_heads=4, num_head_channels=-1,
                          use_scale_shift_norm=True, resblock_updown=True),
    "convresample_classcond": dict(image_size=16, in_channels=2, model_channels=32, out_channels=2, num_res_blocks=2,
                                   attention_resolutions=[4, 2], channel_mult=[1, 1, 2], num_head_channels=32,
                                   use_scale_shift_norm=False, resblock_updown=False, num_classes=5),
    "neworder_mult3": dict(image_size=32, in_channels=1, model_channels=32, out_channels=2, num_res_blocks=1,
                           attention_resolutions=[2], channel_mult=[1, 2, 3], num_heads=2,
                           use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=True),
    "avgpool_nearest": dict(image_size=16, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=2,
                            attention_resolutions=[1], channel_mult=[1, 2], num_head_channels=16,
                            use_scale_shift_norm=True, resblock_updown=False, conv_resample=False),
}

NCSN_BASE = dict(scale_by_sigma=True, nonlinearity="swish", nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                 resamp_with_conv=True, conditional=True, fir=True, fir_kernel=[1, 3, 3, 1], skip_rescale=True,
                 resblock_type="biggan", progressive="none", progressive_input="residual", progressive_combine="sum",
                 attention_type="ddpm", init_scale=0.0, fourier_scale=16, conv_size=3, embedding_type="fourier",
                 dropout=0.0, sigma_min=0.01, sigma_max=50.0, num_scales=10)
NCSN_CASES = {
    # score-MRI / DiffusionMBIR's family (BigGAN blocks, residual input pyramid, Fourier embedding), tiny.
    "ve_continuous": dict(model={}, data=dict(image_size=16, centered=False, num_channels=1)),
    "three_levels_attention": dict(model=dict(ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[16, 4]),
                                   data=dict(image_size=16, centered=False, num_channels=2)),
    "skip_pyramids_cat": dict(model=dict(progressive="output_skip", progressive_input="input_skip",
                                         progressive_combine="cat"),
                              data=dict(image_size=16, centered=False, num_channels=2)),
    "ddpm_blocks_positional": dict(model=dict(resblock_type="ddpm", fir=False, progressive="residual",
                                              embedding_type="positional"),
                                   data=dict(image_size=16, centered=False, num_channels=1)),
    "unconditional_centered": dict(model=dict(resblock_type="ddpm", resamp_with_conv=False, progressive="output_skip",
                                              progressive_input="none", conditional=False, skip_rescale=False),
                                   data=dict(image_size=16, centered=True, num_channels=2)),
}

RELEASED_ADM = {
    # guided-diffusion README flags of the released models; DPS's FFHQ model from its configs/model_config.yaml.
    "guided_diffusion_256x256_uncond": dict(image_size=256, num_channels=256, num_res_blocks=2, learn_sigma=True,
                                            class_cond=False, attention_resolutions="32,16,8", num_head_channels=64,
                                            resblock_updown=True, use_scale_shift_norm=True),
    "guided_diffusion_64x64_cond": dict(image_size=64, num_channels=192, num_res_blocks=3, learn_sigma=True,
                                        class_cond=True, attention_resolutions="32,16,8", num_head_channels=64,
                                        resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True),
    "dps_ffhq_256": dict(image_size=256, num_channels=128, num_res_blocks=1, learn_sigma=True, class_cond=False,
                         attention_resolutions="16", num_heads=4, num_head_channels=64, resblock_updown=True,
                         use_scale_shift_norm=True),
}
RELEASED_NCSN = {
    # configs/ve/fastmri_knee_320_ncsnpp_continuous.py (score-MRI) and configs/ve/AAPM_256_ncsnpp_continuous.py
    # (DiffusionMBIR): NCSN++ as in score-SDE's VE continuous configs, 1 channel, their default_lsun sigmas.
    "score_mri_fastmri_knee_320": dict(model=dict(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4, attn_resolutions=[16],
                                                  sigma_min=0.01, sigma_max=378.0, num_scales=2000, dropout=0.0),
                                       data=dict(image_size=320, centered=False, num_channels=1)),
    "diffusionmbir_aapm_256": dict(model=dict(nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4, attn_resolutions=[16],
                                              sigma_min=0.01, sigma_max=378.0, num_scales=2000, dropout=0.0),
                                   data=dict(image_size=256, centered=False, num_channels=1)),
}


def listing(module: torch.nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def import_originals(gd_dir: str, sde_dir: str):
    sys.path.insert(0, gd_dir)
    import torch.utils.cpp_extension as cpp_extension
    cpp_extension.load = lambda *args, **kwargs: types.SimpleNamespace()      # CPU path of upfirdn2d needs no build
    sys.path.insert(0, sde_dir)
    import torch.nn.functional as F
    from guided_diffusion import script_util, unet
    from models import layerspp, ncsnpp

    class _Interpolate:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def interpolate(x, size, mode):
            return F.interpolate(x, size=size, mode=mode)

    layerspp.F = _Interpolate()
    return unet, script_util, ncsnpp


def ncsn_config(case: dict):
    ns = types.SimpleNamespace
    model = {**NCSN_BASE, **case["model"]}
    return ns(model=ns(**model), data=ns(**case["data"]), training=ns(continuous=True, sde="vesde"))


def save(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in metadata.items()})


def main(gd_dir: str, sde_dir: str) -> None:
    torch.set_num_threads(1)
    unet, script_util, ncsnpp = import_originals(gd_dir, sde_dir)
    tensors, meta = {}, {}
    for seed, (name, kwargs) in enumerate(ADM_CASES.items(), start=10):
        kw = dict(kwargs)
        kw["attention_resolutions"] = tuple(kw["attention_resolutions"])
        kw["channel_mult"] = tuple(kw["channel_mult"])
        net = unet.UNetModel(dropout=0.0, **kw).eval()
        keys = listing(net)
        state = seeded_state(keys, seed)
        net.load_state_dict(state)
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(2, kw["in_channels"], kw["image_size"], kw["image_size"], generator=g)
        t = torch.tensor([7, 911])
        y = torch.tensor([3, 3]) if kw.get("num_classes") else None
        with torch.no_grad():
            out = net(x, t, y=y) if y is not None else net(x, t)
        tensors.update({f"{name}/x": x, f"{name}/t": t, f"{name}/out": out})
        if y is not None:
            tensors[f"{name}/y"] = y
        meta[name] = dict(kwargs=kwargs, keys=keys, seed=seed, checksum=checksum(state))
    save(HERE / "guided_diffusion_reference.safetensors", tensors, meta)

    tensors, meta = {}, {}
    for seed, (name, case) in enumerate(NCSN_CASES.items(), start=20):
        config = ncsn_config(case)
        net = ncsnpp.NCSNpp(config).eval()
        keys = listing(net)
        model = config.model
        state = seeded_state(keys, seed, geometric_sigmas(model.sigma_min, model.sigma_max, model.num_scales))
        net.load_state_dict(state)
        g = torch.Generator().manual_seed(100 + seed)
        c, size = case["data"]["num_channels"], case["data"]["image_size"]
        x = torch.rand(2, c, size, size, generator=g)
        label = torch.tensor([0.05, 3.0]) if model.embedding_type == "fourier" else torch.tensor([2, 7])
        with torch.no_grad():
            out = net(x, label)
        tensors.update({f"{name}/x": x, f"{name}/label": label, f"{name}/out": out})
        meta[name] = dict(config={"model": vars(model), "data": case["data"], "training": {"sde": "vesde"}},
                          keys=keys, seed=seed, checksum=checksum(state))
    save(HERE / "score_sde_reference.safetensors", tensors, meta)

    released = {}
    for name, flags in RELEASED_ADM.items():
        args = {**script_util.model_and_diffusion_defaults(), **flags}
        wanted = {k: args[k] for k in ("image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma",
                                        "class_cond", "use_checkpoint", "attention_resolutions", "num_heads",
                                        "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "dropout",
                                        "resblock_updown", "use_fp16", "use_new_attention_order")}
        with torch.device("meta"):
            net = script_util.create_model(**wanted)
        released[name] = dict(family="guided-diffusion", flags=flags, keys=listing(net))
    for name, case in RELEASED_NCSN.items():
        config = ncsn_config(case)
        net = ncsnpp.NCSNpp(config)
        released[name] = dict(family="score-sde", config={"model": vars(config.model), "data": case["data"]},
                              keys=listing(net))
    with gzip.open(HERE / "released_layouts.json.gz", "wt") as f:
        json.dump(released, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
