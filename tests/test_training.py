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


def test_main_cli_trains_and_exports(tmp_path):
    out = tmp_path / "run"
    rc = T.main(["--data", "ct-phantoms", "--channels", "1", "--size", "16", "--steps", "2", "--batch", "2",
                 "--out", str(out), "--base-channels", "8", "--channel-mults", "1,2", "--log-every", "1",
                 "--export", "cli-prior", "--no-progress"])
    assert rc == 0
    assert (out / "export" / "cli-prior.json").exists() and (out / "train.log").exists()
    assert T.main(["--data", "nonsense", "--out", str(tmp_path / "bad"), "--steps", "1"]) == 2
    # Export only (what the lead runs while a long run goes on): no training step is taken.
    rc = T.main(["--out", str(out), "--export", "again", "--export-dir", str(tmp_path / "w"), "--export-only"])
    assert rc == 0 and json.loads((tmp_path / "w" / "again.json").read_text())["steps"] == 2


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
