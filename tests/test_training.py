"""EDM training loop (loss, checkpoint/resume, export) and the training data sources."""
import json

import h5py
import numpy as np
import pytest
import torch

from invdiff.datasets import training as data
from invdiff.normalisation import reference_scale
from invdiff.priors import train as T
from invdiff.priors.unet import EDMUNet, UNetConfig


TINY_UNET = UNetConfig(channels=1, base_channels=8, channel_mults=(1, 2), embedding_dim=16).to_dict()


def tiny_config(**kw):
    base = dict(data="ct-phantoms", channels=1, size=16, batch=2, lr=1e-3, warmup_steps=2, seed=3,
                unet=TINY_UNET, steps=4, log_every=2, checkpoint_every_minutes=1e6)
    return T.TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------- the loss
def test_edm_loss_is_the_weighted_denoising_error():
    # lambda(sigma) ||D - x0||^2 with the same draws as edm_loss: ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2).
    net = EDMUNet(UNetConfig.from_dict(TINY_UNET))
    x0 = torch.rand(3, 1, 16, 16)
    loss = T.edm_loss(net, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (-1.2 + 1.2 * torch.randn(3, generator=g)).exp()
    noise = torch.randn(x0.shape, generator=g) * sigma[:, None, None, None]
    weight = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    expected = (weight * (net(x0 + noise, sigma) - x0).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EDMUNet(UNetConfig.from_dict(TINY_UNET))
    x0 = data.CTPhantomSource(size=16, batch=4).batch(torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def fixed_loss():   # same noise draws every time: only the weights change
        return T.edm_loss(net, x0, torch.Generator().manual_seed(1))

    before = fixed_loss().item()
    for _ in range(25):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    assert fixed_loss().item() < 0.7 * before


def test_learning_rate_warmup_and_cosine():
    c = tiny_config(lr=1.0, warmup_steps=10, steps=100)
    assert T.learning_rate(c, 0) == pytest.approx(0.1)
    assert T.learning_rate(c, 50) == pytest.approx(1.0)
    cos = tiny_config(lr=1.0, warmup_steps=1, steps=100, lr_schedule="cosine")
    assert T.learning_rate(cos, 50) == pytest.approx(0.5)
    assert T.learning_rate(cos, 100) == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------- checkpoint and resume
def _all_tensors(state):
    return state.tensors()


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = T.train(tiny_config(steps=4), tmp_path / "straight", progress=False)
    T.train(tiny_config(steps=2), tmp_path / "split", progress=False)
    resumed = T.train(tiny_config(steps=4), tmp_path / "split", progress=False)   # same command, more steps
    assert resumed.step == straight.step == 4
    a, b = _all_tensors(straight), _all_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = [json.loads(x) for x in (tmp_path / "split" / T.LOSS_LOG).read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]


def test_resume_refuses_a_different_configuration(tmp_path):
    T.train(tiny_config(steps=1, log_every=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr"):
        T.train(tiny_config(steps=2, lr=5e-4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="exists"):
        T.train(tiny_config(steps=2), tmp_path, resume="never", progress=False)


def test_checkpoint_is_written_atomically(tmp_path):
    T.train(tiny_config(steps=2, checkpoint_every_steps=1), tmp_path, progress=False)
    assert (tmp_path / T.CHECKPOINT).exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_training_does_not_touch_the_global_rng(tmp_path):
    before = torch.random.get_rng_state()
    T.train(tiny_config(steps=1, log_every=1), tmp_path, progress=False)
    assert torch.equal(before, torch.random.get_rng_state())


def test_export_then_load_reproduces_the_ema_network(tmp_path):
    from invdiff.priors.loading import load_prior, prior_info

    state = T.train(tiny_config(steps=2), tmp_path / "run", command="python -m invdiff.priors.train ...",
                    progress=False)
    json_path = T.export_prior(tmp_path / "run", tmp_path / "out", "tiny-ct")
    meta = json.loads(json_path.read_text())
    assert meta["steps"] == 2 and meta["seed"] == 3 and meta["data"] == "ct-phantoms"
    assert meta["parameters"] == state.net.num_parameters()
    assert meta["sha256"] == T.sha256_file(tmp_path / "out" / "tiny-ct.safetensors")
    assert meta["normalisation"]["kind"] == "fixed"
    assert meta["training_commands"] == ["python -m invdiff.priors.train ..."]
    prior = load_prior(json_path)
    assert prior_info(json_path) == meta
    x = torch.randn(2, 1, 20, 12)
    sigma = torch.tensor([0.2, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(prior(x, sigma), state.ema(x, sigma), rtol=0, atol=0)


def test_warm_start_from_an_exported_prior(tmp_path):
    T.train(tiny_config(steps=2), tmp_path / "a", progress=False)
    json_path = T.export_prior(tmp_path / "a", tmp_path / "out", "p")
    fresh = T.TrainingState(tiny_config(seed=99))
    fresh.warm_start(str(json_path))
    exported = T.TrainingState(tiny_config())
    exported.load(tmp_path / "a" / T.CHECKPOINT)
    for (k, v), w in zip(fresh.net.state_dict().items(), exported.ema.state_dict().values()):
        assert torch.equal(v, w), k


def test_main_cli_trains_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 32)
    out = tmp_path / "run"
    rc = T.main(["--data", "ct-phantoms", "--channels", "1", "--size", "16", "--steps", "2", "--batch", "2",
                 "--out", str(out), "--base-channels", "8", "--channel-mults", "1,2", "--log-every", "1",
                 "--export", "cli-prior", "--no-progress"])
    assert rc == 0
    assert (out / "export" / "cli-prior.json").exists() and (out / "train.log").exists()
    from invdiff.errors import InputError
    with pytest.raises(InputError, match="nonsense"):                 # the CLI turns it into one line, exit 2
        T.main(["--data", "nonsense", "--out", str(tmp_path / "bad"), "--steps", "1"])
    assert not (tmp_path / "bad").exists()                          # a refused run leaves no run folder
    # Export only (what the lead runs while a long run goes on): no training step is taken.
    rc = T.main(["--out", str(out), "--export", "again", "--export-dir", str(tmp_path / "w"), "--export-only"])
    assert rc == 0 and json.loads((tmp_path / "w" / "again.json").read_text())["steps"] == 2


def test_device_option_trains_on_the_cpu_and_refuses_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 32)
    common = ["--data", "ct-phantoms", "--channels", "1", "--size", "16", "--steps", "1", "--batch", "2",
              "--base-channels", "8", "--channel-mults", "1,2", "--log-every", "1", "--no-progress"]
    assert T.main(common + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    from invdiff.errors import InputError
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            T.main(common + ["--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert not (tmp_path / "gpu").exists()
    with pytest.raises(InputError, match="--device"):
        T.main(common + ["--out", str(tmp_path / "typo"), "--device", "gpu0"])
    assert not (tmp_path / "typo").exists()


def test_bf16_autocast_changes_only_the_network_arithmetic():
    net = EDMUNet(UNetConfig.from_dict(TINY_UNET))
    with torch.no_grad():                       # the output conv starts at zero (EDM): give it weights
        net.conv_out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    x0 = torch.rand(3, 1, 16, 16)
    full = T.edm_loss(net, x0, torch.Generator().manual_seed(5))
    half = T.edm_loss(net, x0, torch.Generator().manual_seed(5), bf16=True)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half != full                                      # autocast really ran (bf16 rounds differently)
    assert half.item() == pytest.approx(full.item(), rel=0.05)   # ... to bf16's ~3 significant digits


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_run_moves_between_cpu_and_cuda(tmp_path):
    T.train(tiny_config(steps=2), tmp_path / "run", progress=False, device="cpu")
    moved = T.train(tiny_config(steps=4), tmp_path / "run", progress=False, device="cuda", bf16=True)
    assert moved.step == 4 and all(torch.isfinite(v).all() for v in moved.tensors().values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------ data sources
def test_reference_scale_is_the_percentile_of_the_magnitude():
    x = torch.arange(1000, dtype=torch.float32).reshape(1, 10, 100) - 500
    assert reference_scale(x).item() == pytest.approx(np.percentile(np.abs(x.numpy()), 99.5), rel=1e-6)
    assert reference_scale(torch.zeros(4, 4)).item() == pytest.approx(1e-12)


def test_ct_phantoms_are_deterministic_per_seed_and_in_range():
    source = data.CTPhantomSource(size=24, batch=3)
    a = source.batch(torch.Generator().manual_seed(7))
    b = source.batch(torch.Generator().manual_seed(7))
    c = source.batch(torch.Generator().manual_seed(8))
    assert a.shape == (3, 1, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_mni_brain_is_deterministic_complex_and_normalised():
    pytest.importorskip("nilearn", reason="the MNI template ships inside the nilearn wheel")
    source = data.MNIBrainSource(channels=2, size=32, batch=4)
    a = source.batch(torch.Generator().manual_seed(0))
    b = source.batch(torch.Generator().manual_seed(0))
    assert a.shape == (4, 2, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, source.batch(torch.Generator().manual_seed(1)))
    # Full slices are scaled to a 99.5th-percentile magnitude of 1, so crops stay near [0, ~1.5].
    magnitude = a.norm(dim=1)
    assert 0.05 < magnitude.max() < 3.0
    # The phase is not constant: both real and imaginary parts carry signal.
    assert a[:, 0].abs().sum() > 0.05 * magnitude.sum() and a[:, 1].abs().sum() > 0.05 * magnitude.sum()


def test_mni_brain_never_reads_the_held_out_images(monkeypatch):
    pytest.importorskip("nilearn", reason="the MNI template ships inside the nilearn wheel")
    import nibabel

    opened = []
    real_load = nibabel.load
    monkeypatch.setattr(nibabel, "load", lambda path, *a, **k: opened.append(str(path)) or real_load(path, *a, **k))
    data.mni_template_volumes.cache_clear()
    try:
        data.MNIBrainSource(channels=1, size=16, batch=2).batch(torch.Generator().manual_seed(0))
    finally:
        data.mni_template_volumes.cache_clear()
    assert len(opened) == 3 and all("mni_icbm152" in p for p in opened)
    assert not any(name in p for p in opened for name in data.HELD_OUT_FILES)


def test_folder_source_reads_images_arrays_and_volumes(tmp_path):
    nibabel = pytest.importorskip("nibabel")
    from PIL import Image

    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(40, 30) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", rng.rand(2, 20, 20).astype(np.float32))
    np.save(tmp_path / "c.npy", (rng.randn(24, 24) + 1j * rng.randn(24, 24)).astype(np.complex64))
    nibabel.save(nibabel.Nifti1Image(rng.rand(18, 18, 3).astype(np.float32), np.eye(4)), tmp_path / "d.nii.gz")
    source = data.make_source(f"folder:{tmp_path}", channels=2, size=16, batch=5)
    assert len(source.items) == 1 + 2 + 1 + 3
    a = source.batch(torch.Generator().manual_seed(0))
    assert a.shape == (5, 2, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, source.batch(torch.Generator().manual_seed(0)))
    one = data.make_source(f"folder:{tmp_path}", channels=1, size=16, batch=2).batch(torch.Generator())
    assert one.shape == (2, 1, 16, 16) and one.min() >= 0


def test_folder_source_refuses_held_out_files(tmp_path):
    np.save(tmp_path / "t1_coronal_slice.npy", np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="held-out"):
        data.make_source(f"folder:{tmp_path}", channels=1, size=8, batch=1)


def test_fastmri_source_uses_targets_or_rss_of_kspace(tmp_path):
    rng = np.random.RandomState(0)
    target = rng.rand(2, 20, 20).astype(np.float32)
    with h5py.File(tmp_path / "with_target.h5", "w") as f:
        f["reconstruction_rss"] = target
        f["kspace"] = np.zeros((2, 3, 40, 20), np.complex64)
    coils = (rng.randn(1, 2, 24, 20) + 1j * rng.randn(1, 2, 24, 20)).astype(np.complex64)
    kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coils, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    with h5py.File(tmp_path / "kspace_only.h5", "w") as f:
        f["kspace"] = kspace
    source = data.make_source(f"fastmri:{tmp_path}", channels=1, size=16, batch=3)
    assert len(source.items) == 3
    np.testing.assert_array_equal(source.read_slice(tmp_path / "with_target.h5", 1), target[1])
    # RSS of the centred orthonormal inverse FFT recovers sqrt(sum_c |image_c|^2).
    rss = np.sqrt((np.abs(coils[0]) ** 2).sum(axis=0))
    np.testing.assert_allclose(source.read_slice(tmp_path / "kspace_only.h5", 0), rss, rtol=1e-4, atol=1e-5)
    assert source.batch(torch.Generator().manual_seed(0)).shape == (3, 1, 16, 16)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="mni-brain"):
        data.make_source("imagenet", channels=1, size=16, batch=1)


def test_mni_brain_whole_head_views_show_the_head_inside_a_dark_border():
    pytest.importorskip("nilearn", reason="the MNI template ships inside the nilearn wheel")
    generator = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    heads = data.make_source("mni-brain:whole-head=1", channels=1, size=32, batch=8).batch(generator())
    patches = data.make_source("mni-brain", channels=1, size=32, batch=8).batch(generator())
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[2:-2, 2:-2] = False

    def border_to_centre(x):    # mean brightness of the 2 px border over that of the central 16 x 16
        return x[:, 0, ring].mean(dim=1) / x[:, 0, 8:24, 8:24].mean(dim=(1, 2)).clamp_min(1e-6)

    assert (border_to_centre(heads) < 0.15).all()          # a whole head: air all round
    assert (border_to_centre(patches) > 0.3).sum() >= 3    # patches cut through tissue
    # Fraction 0 is the patch-only source, draw for draw.
    same = data.make_source("mni-brain:whole-head=0", channels=1, size=32, batch=8).batch(generator())
    assert torch.equal(same, patches)


@pytest.mark.parametrize("spec, match", [("mni-brain:whole=0.5", "unknown mni-brain option"),
                                         ("mni-brain:whole-head=lots", "expects a number"),
                                         ("mni-brain:whole-head=1.5", r"in \[0, 1\]")])
def test_mni_brain_options_are_checked(spec, match):
    with pytest.raises(ValueError, match=match):
        data.make_source(spec, channels=1, size=16, batch=1)


def test_a_warm_started_run_records_where_it_started(tmp_path):
    """The exported metadata of a warm-started run holds its init prior's record: steps and wall time add up."""
    T.train(tiny_config(steps=3), tmp_path / "a", progress=False)
    first = json.loads(T.export_prior(tmp_path / "a", tmp_path / "out", "p").read_text())
    T.train(tiny_config(steps=2, p_mean=-0.5), tmp_path / "b", init=str(tmp_path / "out" / "p.json"), progress=False)
    second = json.loads(T.export_prior(tmp_path / "b", tmp_path / "out", "q").read_text())
    assert second["warm_start_from"]["sha256"] == first["sha256"] and second["warm_start_from"]["steps"] == 3
    assert second["steps"] == 2 and second["total_steps"] == 5 and second["p_mean"] == -0.5
    assert second["total_wall_seconds"] == pytest.approx(first["wall_seconds"] + second["wall_seconds"], abs=0.2)
    assert first["warm_start_from"] is None and first["total_steps"] == 3


# ------------------------------------------------------------------------------------- the 2026-12 recipe
def test_cosine_schedule_ends_at_its_floor_and_stays_there():
    # lr (f + (1 - f) (1 + cos(pi t / T)) / 2) with T = lr_decay_steps, independent of the run length `steps`.
    c = tiny_config(lr=1.0, warmup_steps=1, steps=1000, lr_schedule="cosine", lr_decay_steps=100, lr_floor=0.1)
    assert T.learning_rate(c, 0) == pytest.approx(1.0)
    assert T.learning_rate(c, 50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert T.learning_rate(c, 100) == pytest.approx(0.1)
    assert T.learning_rate(c, 900) == pytest.approx(0.1)
    longer = tiny_config(lr=1.0, warmup_steps=1, steps=5000, lr_schedule="cosine", lr_decay_steps=100, lr_floor=0.1)
    assert [T.learning_rate(longer, s) for s in range(0, 200, 7)] == [T.learning_rate(c, s) for s in range(0, 200, 7)]


def test_sigma_data_is_measured_recorded_and_kept_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 64)
    config = tiny_config(steps=1, log_every=1, unet=dict(TINY_UNET, sigma_data=None))
    state = T.train(config, tmp_path / "run", progress=False)
    source = data.make_source("ct-phantoms", channels=1, size=16, batch=2)
    expected = T.measure_sigma_data(source, seed=3)
    assert state.net.sigma_data == pytest.approx(expected) and 0.05 < expected < 0.5
    # The std of 512 phantoms is not the EDM default: the measurement changed something.
    assert abs(expected - 0.5) > 0.05
    resumed = T.train(dataclasses_replace(config, steps=2), tmp_path / "run", progress=False)
    assert resumed.step == 2 and resumed.net.sigma_data == state.net.sigma_data
    meta = json.loads(T.export_prior(tmp_path / "run", tmp_path / "out", "p").read_text())
    assert meta["sigma_data"] == pytest.approx(expected)
    assert meta["sigma_data_source"].startswith("measured") and meta["lr_floor"] == 0.0


def dataclasses_replace(config, **kw):
    import dataclasses

    return dataclasses.replace(config, **kw)


def test_cli_defaults_follow_the_recipe():
    args = T.build_parser().parse_args(["--out", "x"])
    assert args.threads == 1 and args.lr_schedule == "cosine" and args.sigma_data is None and args.lr_floor == 0.1
    config = T.config_from_args(T.build_parser().parse_args(
        ["--out", "x", "--spacing-conditioning", "--attention", "--data", "ct-anatomy", "--channels", "1"]))
    assert config.unet["sigma_data"] is None and config.unet["attention"]
    assert config.unet["spacing_conditioning"] and config.unet["default_spacing_mm"] == 2.0


def test_spacing_conditioned_training_resumes_exactly_and_exports_a_prior_with_a_default(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 32)
    from invdiff.priors.loading import load_prior

    unet = dict(TINY_UNET, spacing_conditioning=True, default_spacing_mm=2.0, attention=True, sigma_data=None)
    config = tiny_config(data="ct-anatomy", unet=unet, steps=2)
    straight = T.train(config, tmp_path / "a", progress=False)
    T.train(dataclasses_replace(config, steps=1), tmp_path / "b", progress=False)
    resumed = T.train(config, tmp_path / "b", progress=False)
    for key, value in straight.tensors().items():
        assert torch.equal(value, resumed.tensors()[key]), key
    meta = json.loads(T.export_prior(tmp_path / "a", tmp_path / "out", "ct").read_text())
    assert meta["spacing_conditioning"] and meta["default_spacing_mm"] == 2.0
    assert meta["normalisation"]["kind"] == "fixed"
    prior = load_prior(tmp_path / "out" / "ct.json")
    x, sigma = torch.rand(1, 1, 16, 16), torch.tensor([0.3])
    torch.testing.assert_close(prior.at_spacing(None)(x, sigma), prior(x, sigma, 2.0))
    assert prior.at_spacing(1.0)(x, sigma).shape == x.shape


def test_patch_grids_never_flip_up_down():
    # With no rotation or warp, rows of a patch map to increasing canvas rows for every draw (left-right may flip).
    g = torch.Generator().manual_seed(0)
    centers = torch.full((64, 2), 50.0)
    grid = data._patch_grid(g, centers, (100, 100), 8, max_rotation_deg=0.0, elastic_px=0.0)
    assert (grid[:, 1:, :, 1] > grid[:, :-1, :, 1]).all()
    flipped = grid[:, :, 1:, 0] < grid[:, :, :-1, 0]
    assert flipped.all(dim=(1, 2)).any() and (~flipped).all(dim=(1, 2)).any()


def test_file_sources_never_flip_up_down(tmp_path):
    from PIL import Image

    ramp = np.tile(np.linspace(10, 250, 40)[:, None], (1, 40)).astype(np.uint8)     # brighter towards the bottom
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = data.make_source(f"folder:{tmp_path}", channels=1, size=16, batch=16).batch(torch.Generator().manual_seed(0))
    top, bottom = x[:, 0, 0, 4:12].mean(dim=1), x[:, 0, -1, 4:12].mean(dim=1)
    inside = (top > 0) & (bottom > 0)          # crops that do not reach into the zero padding
    assert inside.sum() >= 4 and (bottom[inside] > top[inside]).all()


def test_mni_scales_views_carry_their_spacing():
    pytest.importorskip("nilearn", reason="the MNI template ships inside the nilearn wheel")
    source = data.make_source("mni-brain-scales", channels=2, size=32, batch=16)
    x, spacing = source.batch_with_spacing(torch.Generator().manual_seed(0))
    x2, spacing2 = source.batch_with_spacing(torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(spacing, spacing2)
    assert x.shape == (16, 2, 32, 32) and spacing.shape == (16,)
    assert (spacing >= 0.8).all() and (spacing <= 8.4 + 1e-6).all()
    # A whole-head view (a 192-269 mm field of view: 6-8.4 mm at 32 px) has air at its border.
    heads = data.MNIScalesSource(channels=1, size=32, batch=8, whole_head_fraction=1.0, real_fraction=0.0,
                                 noisy_fraction=0.0)
    h, s = heads.batch_with_spacing(torch.Generator().manual_seed(1))
    assert (s >= 6.0).all()
    border = torch.cat([h[:, 0, :2].flatten(1), h[:, 0, -2:].flatten(1)], dim=1).mean(dim=1)
    assert (border < 0.15 * h[:, 0, 8:24, 8:24].mean(dim=(1, 2))).all()


def test_real_mr_training_slices_exclude_the_evaluation_images():
    pytest.importorskip("dipy")
    slices = data.real_mr_slices()
    names = {name for *_, name in slices}
    assert names and not names & set(data.HELD_OUT_FILES) and not names & set(data.RELATED_TO_HELD_OUT)
    for name in data.HELD_OUT_FILES + data.RELATED_TO_HELD_OUT:
        with pytest.raises(ValueError, match="held-out"):
            data._check_trainable_real_mr(f"/somewhere/{name}")


def test_fastmri_source_skips_other_files_with_one_warning_each_and_reads_spacing(tmp_path, caplog):
    from invdiff.datasets.synthetic import write_fake_fastmri

    rng = np.random.RandomState(0)
    write_fake_fastmri(tmp_path / "scan.h5", rng.rand(2, 24, 20).astype(np.float32), num_coils=2,
                       voxel_size_mm=(0.5, 0.5, 3.0), seed=0)
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5 at all")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.zeros(3)
    with caplog.at_level("WARNING", logger="invdiff.datasets.training"):
        source = data.make_source(f"fastmri:{tmp_path}:whole-slice=0.5", channels=2, size=16, batch=8)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3 and all(any(n in m for m in skipped) for n in ("notes.txt", "broken.h5", "other.h5"))
    assert len(source.items) == 2 and source.whole_slice_fraction == 0.5
    x, spacing = source.batch_with_spacing(torch.Generator().manual_seed(0))
    assert x.shape == (8, 2, 16, 16) and torch.isfinite(x).all()
    # Crops keep the header's 0.5 mm; whole-slice views show 24 px in ~16 px: 0.5 * 24 / (16 * zoom) mm.
    assert (spacing == 0.5).any() and (spacing > 0.6).any()
    assert ((spacing == 0.5) | ((spacing > 0.6) & (spacing < 0.9))).all()


def test_whole_slice_views_show_the_whole_slice(tmp_path):
    from PIL import Image

    image = np.zeros((64, 64), np.uint8)
    image[16:48, 16:48] = 200                     # a bright square with dark margins
    Image.fromarray(image).save(tmp_path / "square.png")
    x = data.make_source(f"folder:{tmp_path}:whole-slice=1", channels=1, size=16, batch=4).batch(
        torch.Generator().manual_seed(0))
    assert (x[:, 0, 7:9, 7:9].mean(dim=(1, 2)) > 0.5).all()          # the square's centre
    assert (x[:, 0, 0, :].mean(dim=1) < 0.1).all()                   # the dark margin all round
    with pytest.raises(ValueError, match="whole-slice"):
        data.make_source(f"folder:{tmp_path}:whole-slice=lots", channels=1, size=16, batch=1)


def test_cli_trains_on_pngs_and_on_fastmri_files_then_reconstructs_with_the_result(tmp_path, monkeypatch):
    # The user-data path of the issue: `invdiff train-prior --data folder:DIR | fastmri:DIR`, then `invdiff
    # reconstruct --prior <export>.json` on a fastMRI file. A few steps at 16 px: this checks the wiring, not quality.
    from PIL import Image

    from invdiff.cli import main
    from invdiff.datasets.synthetic import write_fake_fastmri

    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 16)
    rng = np.random.RandomState(0)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for k in range(3):
        Image.fromarray((rng.rand(24, 20) * 255).astype(np.uint8)).save(pngs / f"{k}.png")
    scans = tmp_path / "scans"
    scans.mkdir()
    for k in range(2):
        write_fake_fastmri(scans / f"file{k}.h5", rng.rand(2, 32, 32).astype(np.float32), num_coils=2, seed=k)
    (scans / "README.txt").write_text("not a scan")
    tiny = ["--size", "16", "--steps", "2", "--batch", "2", "--base-channels", "8", "--channel-mults", "1,2",
            "--log-every", "1", "--no-progress", "--channels", "2"]
    for name, data_spec in (("png", f"folder:{pngs}"), ("fastmri", f"fastmri:{scans}:whole-slice=0.5")):
        rc = main(["train-prior", "--data", data_spec, "--out", str(tmp_path / name), "--export", name,
                   "--spacing-conditioning", *tiny])
        assert rc == 0, name
        meta = json.loads((tmp_path / name / "export" / f"{name}.json").read_text())
        assert meta["steps"] == 2 and meta["data"] == data_spec and meta["spacing_conditioning"]
    out = tmp_path / "r.h5"
    rc = main(["reconstruct", str(scans / "file0.h5"), "--solver", "reddiff", "--steps", "2", "--slices", "0:1",
               "--center-fraction", "0.2",
               "--prior", str(tmp_path / "fastmri" / "export" / "fastmri.json"), "--out", str(out), "--no-progress"])
    assert rc == 0
    with h5py.File(out, "r") as f:
        assert f["reconstruction"].shape[0] == 1 and np.isfinite(f["reconstruction"][()]).all()


# ------------------------------------------------------------------------ per-step data stream and workers
def test_per_step_stream_is_the_same_with_workers_resumed_or_not(tmp_path, monkeypatch):
    # Batch k depends on (seed, k) only: two spawned workers drawing ahead, a run split in two, and the
    # in-process draw all give bit-identical weights, Adam state and EMA.
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 32)
    unet = dict(TINY_UNET, spacing_conditioning=True, default_spacing_mm=2.0, sigma_data=None)
    config = tiny_config(data="ct-anatomy", unet=unet, steps=4, data_stream="per-step")
    in_process = T.train(config, tmp_path / "a", progress=False)
    with_workers = T.train(config, tmp_path / "b", progress=False, data_workers=2)
    T.train(dataclasses_replace(config, steps=1), tmp_path / "c", progress=False)
    resumed = T.train(config, tmp_path / "c", progress=False, data_workers=2)      # prefetch starts at step 1
    for other in (with_workers, resumed):
        for key, value in in_process.tensors().items():
            if key != "rng.data":                       # unused by this stream: stays at its seed
                assert torch.equal(value, other.tensors()[key]), key
    # ... and it is a different stream from the generator's (a run cannot switch: the config differs)
    generator_run = T.train(dataclasses_replace(config, data_stream="generator"), tmp_path / "d", progress=False)
    models = [{k: v for k, v in run.tensors().items() if k.startswith("model.")} for run in (generator_run, in_process)]
    assert any(not torch.equal(v, models[1][k]) for k, v in models[0].items())
    with pytest.raises(ValueError, match="data_stream"):
        T.train(config, tmp_path / "d", progress=False)


def test_per_step_batches_are_a_function_of_seed_and_step():
    from invdiff.priors.batch_stream import BatchStream, step_seed

    source = data.CTPhantomSource(size=16, batch=2)
    stream = BatchStream(stream="per-step", source=source, seed=3, conditioned=False)
    first, again, other = stream.next(5)[0], stream.next(5)[0], stream.next(6)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)
    # torch keeps 32 bits of a seed: within a run every step's seed must differ in those bits
    for seed in (0, 3, 2**40 + 7):
        seeds = [step_seed(seed, k) for k in range(200_000)]
        assert max(seeds) < 2**32 and len(set(seeds)) == len(seeds)
    with pytest.raises(ValueError, match="per-step"):
        BatchStream(stream="generator", source=source, seed=3, conditioned=False,
                    generator=torch.Generator(), workers=2)


def test_a_dead_data_worker_is_an_error_not_a_hang():
    import os
    import signal

    from invdiff.priors.batch_stream import BatchStream

    source = data.CTPhantomSource(size=16, batch=2)
    common = dict(stream="per-step", source=source, seed=0, conditioned=False, workers=1, channels=1, size=16,
                  batch=2)
    with BatchStream(spec="no-such-source", **common) as stream:          # its source cannot be built
        with pytest.raises(RuntimeError, match="data worker"):
            stream.next(0)
    with BatchStream(spec="ct-phantoms", **common) as stream:             # killed after its first batch
        assert stream.next(0)[0].shape == (2, 1, 16, 16)
        for pid in list(stream._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="died before batch"):
            for step in range(1, 50):
                stream.next(step)


def test_cli_data_workers_pick_the_per_step_stream_and_max_minutes_stops_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SIGMA_DATA_IMAGES", 32)
    common = ["--data", "ct-phantoms", "--channels", "1", "--size", "16", "--batch", "2", "--base-channels", "8",
              "--channel-mults", "1,2", "--log-every", "1", "--no-progress"]
    out = tmp_path / "run"
    # A deadline already passed: not one step, but the checkpoint and the export are written as at the end.
    assert T.main(common + ["--steps", "5", "--out", str(out), "--data-workers", "1", "--max-minutes", "1e-9",
                            "--export", "p"]) == 0
    meta = json.loads((out / "export" / "p.json").read_text())
    assert meta["steps"] == 0
    # Resumed without --data-workers: it keeps the per-step stream its checkpoint records.
    assert T.main(common + ["--steps", "2", "--out", str(out)]) == 0
    saved = T.TrainConfig.from_dict(T._checkpoint_metadata(out / T.CHECKPOINT)["config"])
    assert saved.data_stream == "per-step"
    from invdiff.errors import InputError
    assert T.main(common + ["--steps", "1", "--out", str(tmp_path / "g")]) == 0                  # generator stream
    with pytest.raises(InputError, match="data_stream='generator'.*--data-workers needs"):
        T.main(common + ["--steps", "2", "--out", str(tmp_path / "g"), "--data-workers", "1"])
    with pytest.raises(InputError, match="max-minutes"):
        T.main(common + ["--steps", "1", "--out", str(tmp_path / "x"), "--max-minutes", "0"])


def test_package_files_come_from_the_training_files_folder_first(tmp_path, monkeypatch):
    # A GPU machine without nilearn / dipy reads copies of their data files from $INVDIFF_TRAINING_FILES.
    pytest.importorskip("nilearn")
    relative = "datasets/data/" + data.MNI_FILE.format("t1")
    installed = data.package_file("nilearn", relative)
    assert installed is not None and "site-packages" in str(installed)
    copy = tmp_path / installed.name
    copy.write_bytes(installed.read_bytes())
    monkeypatch.setenv(data.TRAINING_FILES_ENV, str(tmp_path))
    assert data.package_file("nilearn", relative) == copy
    assert data.package_file("nilearn", "datasets/data/" + data.MNI_FILE.format("gm")) != copy   # not copied
    assert data.package_file("nilearn", "datasets/data/no_such_file.nii.gz") is None
    assert data.package_file("no_such_package_here", "x.nii.gz") is None
    monkeypatch.setenv(data.TRAINING_FILES_ENV, str(tmp_path / "missing"))           # a typo is an error
    with pytest.raises(ValueError, match="INVDIFF_TRAINING_FILES.*not a folder"):
        data.package_file("nilearn", relative)
