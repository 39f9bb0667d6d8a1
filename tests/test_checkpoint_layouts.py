"""Real checkpoint layouts: guided-diffusion (ADM) UNets in any configuration, score-SDE's NCSN++ (``all_modules.N.*``).

The references are independent of invdiff's loaders and networks: ``tests/data/checkpoint_layouts`` holds what
the ORIGINAL code produced (``make_references.py`` imported and ran openai/guided-diffusion's ``UNetModel`` and
yang-song/score_sde_pytorch's ``NCSNpp``; nothing of theirs is copied into invdiff): each case's state-dict
key/shape listing (the exact original layout), the seed of its random weights, and the original network's
raw output on stored inputs. Here the same weights are rebuilt from the listing, saved the way the original
code saves them, loaded through the public loaders with the configuration inferred from the weights, and
converted to ``D(x, sigma)``:

- ADM (VP, eps): at ``sigma = sigma_t`` and ``x = x_in sqrt(1 + sigma^2)``, ``D = x - sigma eps_ref[:, :C]``,
  where ``eps_ref`` is the original's output at ``(x_in, t)``. Fails if any key is mapped to the wrong layer,
  if the inferred configuration (levels, blocks, attention, heads, resampling by ResBlock / conv /
  parameter-free pooling, scale-shift, classes) differs,
  if the timestep embedding or the attention head order differs, or if t(sigma) is not the grid index.
- score-SDE (VE, score): ``D = x + sigma^2 s_ref`` where ``s_ref`` is the original's output at ``(x, sigma)``
  (Fourier) or at the grid index of sigma (positional). Fails as above, and if the EMA list of score-SDE's
  training checkpoint is mapped onto the wrong names: the file's 'model' weights are decoys and only the
  EMA list carries the reference weights.
- Released full-size configurations (guided-diffusion 256 uncond / 64 cond, DPS FFHQ 256, score-MRI knee
  320, DiffusionMBIR AAPM 256): the configuration read from the original's key/shape listing rebuilds that
  listing exactly, key for key, in order (on the meta device: no memory, no weights).
"""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_reference import checksum, geometric_sigmas, seeded_state
from invdiff.priors.adapters import (load_adm_checkpoint, load_edm_checkpoint, load_ncsnpp_checkpoint,
                                     load_score_sde_checkpoint)
from invdiff.priors.adm import ADMUNet, adm_config_from_flags, adm_config_from_state_dict, read_adm_flags
from invdiff.priors.ncsnpp import NCSNppConfig, NCSNppScoreSDE, fir_resample, ncsnpp_config_from_state_dict
from invdiff.schedules import linear_beta_alphas_cumprod, sigmas_from_alphas_cumprod

DATA = Path(__file__).parent / "data" / "checkpoint_layouts"


def read_reference(name: str) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    with safe_open(str(DATA / name), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
        for key in f.keys():
            case, field = key.split("/")
            tensors.setdefault(case, {})[field] = f.get_tensor(key)
    return tensors, meta


ADM_TENSORS, ADM_META = read_reference("guided_diffusion_reference.safetensors")
SDE_TENSORS, SDE_META = read_reference("score_sde_reference.safetensors")
with gzip.open(DATA / "released_layouts.json.gz", "rt") as _f:
    RELEASED = json.load(_f)


def rebuilt_weights(meta: dict, sigmas=None) -> dict[str, torch.Tensor]:
    state = seeded_state(meta["keys"], meta["seed"], sigmas)
    # A different checksum means torch's random stream changed, not that a loader broke.
    assert checksum(state) == pytest.approx(meta["checksum"], rel=1e-9), "seeded weights differ from the references'"
    return state


def listing(module: torch.nn.Module) -> list:
    return [[k, list(v.shape)] for k, v in module.state_dict().items()]


def meta_state(keys) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in keys}


def close(actual, expected, what):
    """float32 agreement relative to the largest entry (the networks' outputs reach |50| at sigma 0.05). The
    original positional NCSN++ divides by its float64 'sigmas' buffer, so its reference output is float64."""
    expected = expected.to(actual.dtype)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=what)


# ------------------------------------------------------------------------------------------------- ADM
ADM_SETTINGS = ("num_heads", "num_head_channels", "use_new_attention_order")


@pytest.mark.parametrize("case", sorted(ADM_META))
def test_adm_checkpoint_reproduces_the_original_unet(tmp_path, case):
    """D(x, sigma_t) = x - sigma_t eps_ref(x_in, t)[:, :C], x = x_in sqrt(1 + sigma_t^2), for the original
    guided-diffusion UNet's output eps_ref, from .pt (torch.save(model.state_dict())) and .safetensors.
    Only the head settings, which leave no trace in the weights, are stated."""
    meta, ref = ADM_META[case], ADM_TENSORS[case]
    state = rebuilt_weights(meta)
    torch.save(state, tmp_path / "model.pt")
    save_file(state, tmp_path / "model.safetensors")
    settings = {k: v for k, v in meta["kwargs"].items() if k in ADM_SETTINGS}
    x_in, t, out = ref["x"], ref["t"], ref["out"]
    channels = x_in.shape[1]
    sigma = sigmas_from_alphas_cumprod(linear_beta_alphas_cumprod())[t].float()
    x = x_in * (1 + sigma ** 2).sqrt().reshape(-1, 1, 1, 1)
    expected = x - sigma.reshape(-1, 1, 1, 1) * out[:, :channels]
    assert out[:, :channels].abs().mean() > 0.3                       # not a comparison between zeros
    class_label = int(ref["y"][0]) if "y" in ref else None
    for name in ("model.pt", "model.safetensors"):
        prior = load_adm_checkpoint(tmp_path / name, class_label=class_label, **settings)
        cfg = prior.eps_model.net.config
        assert (cfg.channel_mult, cfg.num_res_blocks, cfg.resblock_updown, cfg.num_classes) == (
            tuple(meta["kwargs"]["channel_mult"]), meta["kwargs"]["num_res_blocks"], meta["kwargs"]["resblock_updown"],
            meta["kwargs"].get("num_classes"))
        assert cfg.attention_ds == tuple(sorted(meta["kwargs"]["attention_resolutions"]))
        assert cfg.conv_resample == meta["kwargs"].get("conv_resample", True)
        assert prior.learned_sigma == (meta["kwargs"]["out_channels"] == 2 * channels)
        assert not any(p.requires_grad for p in prior.parameters())
        with torch.no_grad():
            close(prior(x, sigma), expected, f"{case} {name}")


def test_adm_attention_settings_matter():
    """The same weights with the other qkv order (or another head count) give a different network: the
    reference comparison above can fail on these settings, so stating them is not a formality."""
    meta, ref = ADM_META["neworder_mult3"], ADM_TENSORS["neworder_mult3"]
    state = rebuilt_weights(meta)
    outputs = []
    for settings in ({"num_heads": 2, "use_new_attention_order": True}, {"num_heads": 2},
                     {"num_heads": 1, "use_new_attention_order": True}):
        net = ADMUNet(adm_config_from_state_dict(state, **settings)).eval()
        net.load_state_dict(state)
        with torch.no_grad():
            outputs.append(net(ref["x"], ref["t"]))
    close(outputs[0], ref["out"], "stated settings")
    for other in outputs[1:]:
        assert (other - outputs[0]).abs().max() > 1e-2


def test_adm_flags_of_the_readme_and_sidecar_json(tmp_path):
    """guided-diffusion's README flag string and a <checkpoint>.json beside the file configure the network
    and the schedule: cosine over 1000 steps gives abar_0 = f(1/T)/f(0) with f(t) = cos((t + 0.008)/1.008 pi/2)^2."""
    meta, ref = ADM_META["convresample_classcond"], ADM_TENSORS["convresample_classcond"]
    state = rebuilt_weights(meta)
    save_file(state, tmp_path / "net.safetensors")
    flags = "--num_channels 32 --num_res_blocks 2 --num_head_channels 32 --class_cond True --noise_schedule cosine"
    prior = load_adm_checkpoint(tmp_path / "net.safetensors", config=flags, class_label=3)
    import math
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert prior.alphas_cumprod[0].item() == pytest.approx(f(1 / 1000) / f(0), rel=1e-12)
    # A head count alone (the README's 128x128 flags) means num_head_channels=-1, guided-diffusion's default.
    alone = adm_config_from_state_dict(state, **adm_config_from_flags(read_adm_flags("--num_heads 4 --batch_size 4")))
    assert (alone.num_heads, alone.num_head_channels) == (4, -1)
    (tmp_path / "net.json").write_text(json.dumps(read_adm_flags(flags)))
    sidecar = load_adm_checkpoint(tmp_path / "net.safetensors", class_label=3)
    torch.testing.assert_close(sidecar.alphas_cumprod, prior.alphas_cumprod)
    with torch.no_grad():
        x = ref["x"]
        torch.testing.assert_close(sidecar(x, 0.7), prior(x, 0.7))


def test_adm_errors_name_the_file_the_key_and_the_shapes(tmp_path):
    meta = ADM_META["convresample_classcond"]
    state = rebuilt_weights(meta)
    bad = dict(state)
    bad["middle_block.1.qkv.weight"] = bad["middle_block.1.qkv.weight"][:-3]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt: checkpoint does not fit ADMUNet: 1 shape mismatch.*"
                                         r"middle_block\.1\.qkv\.weight \(checkpoint \(189, 64, 1\), network \(192, 64, 1\)\)"):
        load_adm_checkpoint(tmp_path / "bad.pt", num_head_channels=32, class_label=0)
    torch.save({**state, "input_blocks.3.0.stray": torch.zeros(2)}, tmp_path / "stray.pt")
    with pytest.raises(ValueError, match=r"stray\.pt: checkpoint does not fit ADMUNet: 1 unexpected key\(s\): "
                                         r"input_blocks\.3\.0\.stray\. "):
        load_adm_checkpoint(tmp_path / "stray.pt", num_head_channels=32, class_label=0)
    torch.save(state, tmp_path / "good.pt")
    with pytest.raises(ValueError, match=r"good\.pt: the configuration says model_channels=64 but the weights say 32"):
        load_adm_checkpoint(tmp_path / "good.pt", config={"num_channels": 64}, class_label=0)
    with pytest.raises(ValueError, match=r"good\.pt: class-conditional network \(label_emb\.weight: 5 classes\)"):
        load_adm_checkpoint(tmp_path / "good.pt", num_head_channels=32)
    with pytest.raises(ValueError, match=r"good\.pt: key 'time_embed\.0\.weight' missing"):
        torch.save({k: v for k, v in state.items() if not k.startswith("time_embed")}, tmp_path / "good.pt")
        load_adm_checkpoint(tmp_path / "good.pt", class_label=0)


# ------------------------------------------------------------------------------------------------- score-SDE
def sde_schedule(meta: dict) -> torch.Tensor:
    model = meta["config"]["model"]
    return geometric_sigmas(model["sigma_min"], model["sigma_max"], model["num_scales"])


def score_sde_training_checkpoint(reference: dict[str, torch.Tensor], seed: int) -> dict:
    """score-SDE's ``save_checkpoint`` layout: {'optimizer', 'model' (DataParallel: 'module.' keys), 'ema', 'step'}.
    'model' holds decoy weights; the EMA list (parameters with requires_grad, in parameter order: all but the
    'sigmas' buffer and the fixed Fourier features) holds the reference ones."""
    generator = torch.Generator().manual_seed(seed)
    fixed = {"sigmas", "all_modules.0.W"}
    model = {f"module.{k}": (v if k in fixed else torch.randn(v.shape, generator=generator)) for k, v in reference.items()}
    shadow = [v for k, v in reference.items() if k not in fixed]
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": list(range(len(shadow)))}]},
            "model": model, "ema": {"decay": 0.999, "num_updates": 7, "shadow_params": shadow}, "step": 7}


def expected_ve_denoiser(meta, ref):
    """D = x + sigma^2 s_ref, with sigma the label itself (Fourier) or the grid sigma it indexes (positional)."""
    label = ref["label"]
    sigma = label.float() if label.is_floating_point() else sde_schedule(meta)[label]
    return sigma, ref["x"] + sigma.reshape(-1, 1, 1, 1) ** 2 * ref["out"]


@pytest.mark.parametrize("case", sorted(SDE_META))
def test_score_sde_training_checkpoint_loads_its_ema_weights(tmp_path, case):
    """score_sde_pytorch's checkpoint_N.pth (torch.load(weights_only=True)), EMA weights by default:
    D(x, sigma) = x + sigma^2 s_ref(x, sigma) for the original NCSN++'s score s_ref, configured from the
    weights plus the config's flags; with ema=False the decoy weights give something else."""
    meta, ref = SDE_META[case], SDE_TENSORS[case]
    reference = rebuilt_weights(meta, sde_schedule(meta))
    torch.save(score_sde_training_checkpoint(reference, meta["seed"] + 1000), tmp_path / "checkpoint_7.pth")
    sigma, expected = expected_ve_denoiser(meta, ref)
    assert (expected - ref["x"]).abs().mean() > 1e-3
    prior = load_score_sde_checkpoint(tmp_path / "checkpoint_7.pth", config=meta["config"])
    model = meta["config"]["model"]
    assert (prior.sigma_min, prior.sigma_max) == pytest.approx((model["sigma_min"], model["sigma_max"]))
    assert prior.channels == meta["config"]["data"]["num_channels"]
    with torch.no_grad():
        close(prior(ref["x"], sigma), expected, case)
        decoy = load_score_sde_checkpoint(tmp_path / "checkpoint_7.pth", config=meta["config"], ema=False)
        assert (decoy(ref["x"], sigma) - expected).abs().max() > 1e-2


def test_training_checkpoint_converted_to_safetensors_keeps_the_ema_weights(tmp_path):
    """save_as_safetensors writes the EMA weights under their names: the converted file gives the reference D."""
    from invdiff.priors.adapters import save_as_safetensors

    meta, ref = SDE_META["three_levels_attention"], SDE_TENSORS["three_levels_attention"]
    torch.save(score_sde_training_checkpoint(rebuilt_weights(meta, sde_schedule(meta)), 5), tmp_path / "checkpoint_3.pth")
    out = save_as_safetensors(tmp_path / "checkpoint_3.pth")
    assert out == tmp_path / "checkpoint_3.safetensors"
    prior = load_score_sde_checkpoint(out, config=meta["config"])
    sigma, expected = expected_ve_denoiser(meta, ref)
    with torch.no_grad():
        close(prior(ref["x"], sigma), expected, "converted")


@pytest.mark.parametrize("case", sorted(SDE_META))
def test_score_sde_state_dict_with_only_the_invisible_flags(tmp_path, case):
    """The bare state dict as .safetensors, through load_ncsnpp_checkpoint (which recognises the layout),
    stating only what the weights cannot show (centered, fir, skip_rescale, sigma range); everything else
    (levels, blocks, attention, embedding, pyramids) is read from the keys and shapes."""
    meta, ref = SDE_META[case], SDE_TENSORS[case]
    save_file(rebuilt_weights(meta, sde_schedule(meta)), tmp_path / "ncsnpp.safetensors")
    model, data = meta["config"]["model"], meta["config"]["data"]
    invisible = dict(centered=data["centered"], skip_rescale=model["skip_rescale"])
    if model["progressive_input"] != "residual":
        invisible["fir"] = model["fir"]                  # otherwise the FIR convolution shows it
    prior = load_ncsnpp_checkpoint(tmp_path / "ncsnpp.safetensors", **invisible)
    sigma, expected = expected_ve_denoiser(meta, ref)
    # No config: the sigma range is the checkpoint's own 'sigmas' buffer.
    assert (prior.sigma_min, prior.sigma_max) == pytest.approx((model["sigma_min"], model["sigma_max"]), rel=1e-6)
    with torch.no_grad():
        close(prior(ref["x"], sigma), expected, case)


def test_positional_network_between_grid_points_uses_the_nearest_level(tmp_path):
    """Discrete (positional) NCSN++: D(x, sigma) = x + sigma_t^2 s(x, t) at the grid index t nearest in log
    sigma, so a sigma 1 % off the grid gives the grid point's denoiser exactly."""
    meta, ref = SDE_META["ddpm_blocks_positional"], SDE_TENSORS["ddpm_blocks_positional"]
    save_file(rebuilt_weights(meta, sde_schedule(meta)), tmp_path / "p.safetensors")
    prior = load_score_sde_checkpoint(tmp_path / "p.safetensors", fir=False)
    sigma, expected = expected_ve_denoiser(meta, ref)
    with torch.no_grad():
        close(prior(ref["x"], sigma * 1.01), expected, "off-grid sigma")


def test_score_sde_errors_name_the_file_the_key_and_the_shapes(tmp_path):
    meta = SDE_META["ve_continuous"]
    reference = rebuilt_weights(meta, sde_schedule(meta))
    ckpt = score_sde_training_checkpoint(reference, 1)
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][1:]
    torch.save(ckpt, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth: the EMA holds \d+ tensors but the model has \d+ trainable"):
        load_score_sde_checkpoint(tmp_path / "short.pth")
    ckpt = score_sde_training_checkpoint(reference, 1)
    ckpt["ema"]["shadow_params"][0] = ckpt["ema"]["shadow_params"][0][:5]
    torch.save(ckpt, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth: EMA tensor for 'all_modules\.1\.weight' has shape \(5, 16\); "
                                         r"the model's 'all_modules\.1\.weight' has \(32, 16\)"):
        load_score_sde_checkpoint(tmp_path / "shape.pth")
    bad = dict(reference)
    bad["all_modules.4.Conv_1.weight"] = bad["all_modules.4.Conv_1.weight"][:, :4].contiguous()
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors: checkpoint does not fit NCSNppScoreSDE: 1 shape mismatch"
                                         r".*all_modules\.4\.Conv_1\.weight \(checkpoint \(8, 4, 3, 3\), network \(8, 8, 3, 3\)\)"):
        load_score_sde_checkpoint(tmp_path / "bad.safetensors")
    save_file(reference, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match=r"ok\.safetensors: the configuration says nf=16 but the weights say 8"):
        load_score_sde_checkpoint(tmp_path / "ok.safetensors", config={"model": {"nf": 16}})
    sampling = {"model": {"num_scales": 3, "sigma_min": 0.01, "sigma_max": 50.0}}    # a sampling config's step count
    assert load_score_sde_checkpoint(tmp_path / "ok.safetensors", config=sampling).score_model.net.sigmas.shape == (10,)
    with pytest.raises(ValueError, match=r"only VE \(vesde\)"):
        load_score_sde_checkpoint(tmp_path / "ok.safetensors", config={"training": {"sde": "vpsde"}})
    (tmp_path / "fastmri_knee_320_ncsnpp_continuous.py").write_text("import os\n")
    with pytest.raises(ValueError, match=r"written in Python are code and are not executed"):
        load_score_sde_checkpoint(tmp_path / "ok.safetensors", config=tmp_path / "fastmri_knee_320_ncsnpp_continuous.py")
    with pytest.raises(ValueError, match=r"score_sde_pytorch layout.*load_score_sde_checkpoint"):
        load_edm_checkpoint(tmp_path / "ok.safetensors", architecture="ncsnpp", image_size=16)


def test_generic_loader_skips_the_unnamed_ema_list(tmp_path, caplog):
    """load_state_dict on score-SDE's checkpoint returns the named 'model' weights (an EMA *list* has no names)."""
    from invdiff.priors.checkpoints import load_state_dict

    meta = SDE_META["ve_continuous"]
    ckpt = score_sde_training_checkpoint(rebuilt_weights(meta, sde_schedule(meta)), 1)
    torch.save(ckpt, tmp_path / "checkpoint_7.pth")
    with caplog.at_level(logging.INFO):
        state = load_state_dict(tmp_path / "checkpoint_7.pth")
    assert set(state) == {k[len("module."):] for k in ckpt["model"]}
    assert "unnamed list" in caplog.text


def test_fir_resampling_keeps_constants_and_matches_nearest_for_a_box_kernel():
    """FIR kernel [1, 3, 3, 1] (normalised): a constant image stays constant away from the zero-padded border,
    2x down then up of a constant keeps it in the interior; the box kernel [1, 1] is nearest / 2x2 mean."""
    x = torch.full((1, 1, 8, 8), 2.0)
    down = fir_resample(x, (1, 3, 3, 1), up=False)
    assert down.shape == (1, 1, 4, 4) and torch.allclose(down[..., 1:-1, 1:-1], torch.tensor(2.0))
    up = fir_resample(x, (1, 3, 3, 1), up=True)
    assert up.shape == (1, 1, 16, 16) and torch.allclose(up[..., 2:-2, 2:-2], torch.tensor(2.0))
    z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fir_resample(z, (1, 1), up=True), z.repeat_interleave(2, -2).repeat_interleave(2, -1))
    torch.testing.assert_close(fir_resample(z, (1, 1), up=False), torch.nn.functional.avg_pool2d(z, 2))


def test_unsupported_ncsnpp_variants_are_refused():
    with pytest.raises(ValueError, match="score_sde_pytorch cannot run it either"):
        NCSNppConfig(progressive="residual", fir=True)
    with pytest.raises(ValueError, match="resblock_type='resnet'"):
        NCSNppConfig(resblock_type="resnet")


# ------------------------------------------------------------------------------------------------- released layouts
@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configurations_are_rebuilt_key_for_key(name):
    """From the original's key/shape listing of a released configuration, the inferred configuration builds a
    network with the identical listing, in the same order (which is also the order score-SDE's EMA list uses)."""
    entry = RELEASED[name]
    state = meta_state(entry["keys"])
    if entry["family"] == "guided-diffusion":
        cfg = adm_config_from_state_dict(state, **adm_config_from_flags(entry["flags"]))
        with torch.device("meta"):
            net = ADMUNet(cfg)
        assert cfg.learn_sigma and (cfg.num_classes is not None) == entry["flags"]["class_cond"]
    else:
        data = entry["config"]["data"]
        cfg = ncsnpp_config_from_state_dict(state, image_size=data["image_size"])
        model = entry["config"]["model"]
        assert (cfg.nf, cfg.ch_mult, cfg.num_res_blocks, cfg.num_channels) == (
            model["nf"], tuple(model["ch_mult"]), model["num_res_blocks"], data["num_channels"])
        # attn_resolutions (16,) never equals a level's resolution (320 ... 40, 256 ... 32): middle attention only.
        assert cfg.attn_levels == ()
        assert NCSNppConfig.from_score_sde(entry["config"]).attn_levels == ()
        with torch.device("meta"):
            net = NCSNppScoreSDE(cfg)
    assert listing(net) == entry["keys"]


def test_released_guided_diffusion_256_without_flags():
    """No flags at all: the 256x256 unconditional model's settings are the defaults (64 channels per head)."""
    keys = RELEASED["guided_diffusion_256x256_uncond"]["keys"]
    cfg = adm_config_from_state_dict(meta_state(keys))
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_ds) == (256, (1, 1, 2, 2, 4, 4), 2, (8, 16, 32))
    assert (cfg.num_head_channels, cfg.resblock_updown, cfg.use_scale_shift_norm) == (64, True, True)


# ------------------------------------------------------------------------------------------------- through the suite
def test_a_score_mri_style_prior_runs_through_load_prior_and_a_sampler(tmp_path):
    """``invdiff.load_prior(description.json)`` (what ``--prior`` calls) on score-SDE's training checkpoint of a
    1-channel network, applied to the real and imaginary channels of a complex image separately (score-MRI's
    use): each channel's D equals the original network's reference denoiser; the prior records the weights'
    sha256; RED-Diff on a Cartesian MRI problem runs with it."""
    import hashlib

    import invdiff
    from invdiff.compare import resolve_prior

    meta, ref = SDE_META["ve_continuous"], SDE_TENSORS["ve_continuous"]
    torch.save(score_sde_training_checkpoint(rebuilt_weights(meta, sde_schedule(meta)), 3), tmp_path / "checkpoint_7.pth")
    spec = {"architecture": "score-sde", "checkpoint": "checkpoint_7.pth", "config": meta["config"], "channels": 2}
    (tmp_path / "score-mri-like.json").write_text(json.dumps(spec))
    prior = invdiff.load_prior(str(tmp_path / "score-mri-like.json"))
    assert resolve_prior(tmp_path / "score-mri-like.json", torch.device("cpu")).sha256 == prior.sha256
    assert prior.sha256 == hashlib.sha256((tmp_path / "checkpoint_7.pth").read_bytes()).hexdigest()
    assert (prior.channels, prior.image_size, prior.name) == (2, None, "score-mri-like")
    sigma, expected = expected_ve_denoiser(meta, ref)
    pair = torch.cat([ref["x"][:1], ref["x"][:1]], dim=1)              # (1, 2, 16, 16): real = imag = sample 0
    with torch.no_grad():
        d = prior(pair, sigma[:1])
    close(d[:, :1], expected[:1], "real channel")
    close(d[:, 1:], expected[:1], "imaginary channel")

    op = invdiff.registry.example_operator("cartesian_mri")
    x = torch.rand(1, 2, *op.img_size, generator=torch.Generator().manual_seed(0))
    problem = invdiff.InverseProblem(op, op.A(x), 0.01)
    result = invdiff.sample("reddiff", problem, prior, steps=3, generator=torch.Generator().manual_seed(1))
    assert result.x.shape == x.shape and bool(torch.isfinite(result.x).all())


def test_load_prior_takes_a_bare_guided_diffusion_checkpoint(tmp_path):
    """A bare guided-diffusion .pt is recognised by its keys; an invdiff export (.safetensors with its own JSON)
    is not taken for a foreign checkpoint."""
    import invdiff
    from invdiff.priors.adapters import is_foreign_prior

    meta = ADM_META["updown_heads4"]
    torch.save(rebuilt_weights(meta), tmp_path / "ema.pt")
    (tmp_path / "ema.json").write_text(json.dumps({"architecture": "guided-diffusion", "checkpoint": "ema.pt",
                                                   "options": {"num_heads": 4}, "scale": 2.0, "shift": -1.0}))
    prior = invdiff.load_prior(str(tmp_path / "ema.json"))
    assert (prior.channels, prior.scale, prior.shift) == (3, 2.0, -1.0)   # [0, 1] images onto the [-1, 1] network
    (tmp_path / "ema.json").unlink()
    assert invdiff.load_prior(str(tmp_path / "ema.pt")).channels == 3     # no flags: 64 channels per head
    (tmp_path / "export.safetensors").write_bytes(b"")
    (tmp_path / "export.json").write_text(json.dumps({"architecture": "EDMUNet"}))
    assert not is_foreign_prior(tmp_path / "export.safetensors")
