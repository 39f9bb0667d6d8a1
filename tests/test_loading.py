"""Loading exported priors: sha256 check, strict keys, shipped-name registration; unconditional sampling."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import invdiff
from invdiff import registry
from invdiff.priors import loading
from invdiff.priors import train as T
from invdiff.priors.base import Denoiser
from invdiff.priors.unconditional import sample_unconditional, save_sample_grid
from invdiff.priors.unet import EDMUNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny prior trained for 2 steps and exported: the JSON path."""
    root = tmp_path_factory.mktemp("prior")
    unet = UNetConfig(channels=1, base_channels=8, channel_mults=(1, 2), embedding_dim=16).to_dict()
    config = T.TrainConfig(data="ct-phantoms", channels=1, size=16, batch=2, steps=2, log_every=1, unet=unet)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    T.train(config, root / "run", progress=False)
    torch.set_num_threads(previous)
    return T.export_prior(root / "run", root / "export", "tiny")


def copy_prior(json_path, folder, name="copy"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json_path.read_text())
    (folder / f"{name}.safetensors").write_bytes(json_path.with_suffix(".safetensors").read_bytes())
    return folder / f"{name}.json"


def test_load_by_either_file_and_by_stem(exported):
    a = loading.load_prior(exported)
    b = loading.load_prior(exported.with_suffix(".safetensors"))
    c = loading.load_prior(str(exported.with_suffix("")))
    x = torch.randn(1, 1, 12, 12)
    for prior in (a, b, c):
        assert isinstance(prior, EDMUNet) and not prior.training
        assert all(not p.requires_grad for p in prior.parameters())
        assert prior.metadata["name"] == "tiny" and prior.name == "tiny"
        torch.testing.assert_close(prior(x, 0.5), a(x, 0.5), rtol=0, atol=0)


def test_sha256_mismatch_names_file_expected_and_actual(exported, tmp_path):
    json_path = copy_prior(exported, tmp_path)
    weights = json_path.with_suffix(".safetensors")
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(weights))
    expected = json.loads(json_path.read_text())["sha256"]
    with pytest.raises(ValueError) as err:
        loading.load_prior(json_path)
    message = str(err.value)
    assert str(weights) in message and expected in message and T.sha256_file(weights) in message


def _rewrite_weights(json_path, tensors):
    weights = json_path.with_suffix(".safetensors")
    save_file(tensors, str(weights))
    meta = json.loads(json_path.read_text())
    meta["sha256"] = T.sha256_file(weights)       # consistent hash: only the keys are wrong
    json_path.write_text(json.dumps(meta))


def test_missing_and_unexpected_keys_are_refused(exported, tmp_path):
    json_path = copy_prior(exported, tmp_path / "missing")
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    dropped = sorted(tensors)[0]
    _rewrite_weights(json_path, {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(ValueError, match="missing"):
        loading.load_prior(json_path)
    json_path = copy_prior(exported, tmp_path / "extra")
    _rewrite_weights(json_path, {**tensors, "extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected.*extra.weight"):
        loading.load_prior(json_path)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="neither a shipped prior"):
        loading.load_prior("no-such-prior")


def test_a_retired_prior_name_says_what_replaced_it_and_how_to_recover_it():
    # ct-phantom was shipped until 2026-12-06; recorded commands name it. The error must name the successor (which
    # is shipped) and a commit that still holds the old files, not just "unknown prior".
    assert "ct-phantom" in loading.RETIRED_PRIORS
    for name, (successor, _, recover) in loading.RETIRED_PRIORS.items():
        assert name not in loading.shipped_priors() and successor in loading.shipped_priors()
        with pytest.raises(ValueError, match=f"replaced by '{successor}'.*git show"):
            loading.load_prior(name)
        # In a git checkout, the commit named in the message must still hold the retired files.
        revision = recover.split()[2]                           # "git show <commit>:<path> > ..."
        if (REPO / ".git").exists() and shutil.which("git"):
            for suffix in (".json", ".safetensors"):
                found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", revision.replace(".json", suffix)])
                assert found.returncode == 0, revision


def test_shipped_priors_are_registered(exported, tmp_path, monkeypatch):
    # A prior dropped into the weights folder is listed by invdiff.list_priors() and loads by name.
    folder = tmp_path / "weights"
    copy_prior(exported, folder, name="test-shipped-tiny")
    monkeypatch.setattr(loading, "WEIGHTS_DIR", folder)
    try:
        loading._register_shipped()
        assert "test-shipped-tiny" in invdiff.list_priors()
        prior = registry.get_prior("test-shipped-tiny").factory()
        assert isinstance(prior, EDMUNet)
        assert loading.prior_info("test-shipped-tiny")["sha256"] == prior.metadata["sha256"]
    finally:
        registry._PRIORS.pop("test-shipped-tiny", None)


def test_the_real_weights_folder_is_registered():
    for name in loading.shipped_priors():
        assert name in invdiff.list_priors()
        info = loading.prior_info(name)
        assert {"sha256", "unet", "normalisation", "steps", "data"} <= set(info)


class GaussianDenoiser(Denoiser):
    """Exact denoiser of x0 ~ N(0, s0^2 I): D(x, sigma) = s0^2 / (s0^2 + sigma^2) x."""

    def __init__(self, s0):
        super().__init__()
        self.s0, self.channels = s0, 2

    def forward(self, x, sigma):
        return self.s0 ** 2 / (self.s0 ** 2 + sigma[:, None, None, None] ** 2) * x


def test_heun_sampler_transports_noise_to_the_data_distribution():
    # The probability-flow ODE maps N(0, (s0^2 + sigma_max^2) I) to N(0, s0^2 I); Heun with 40 steps on
    # Karras' grid integrates it to well under 1 % error in the standard deviation.
    s0 = 0.7
    x = sample_unconditional(GaussianDenoiser(s0), n=16, size=(16, 24), steps=40,
                             generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, 2, 16, 24) and x.dtype == torch.float32
    assert x.std().item() == pytest.approx(s0, rel=0.02)


def test_sampler_is_seeded_and_the_grid_is_written(exported, tmp_path):
    prior = loading.load_prior(exported)
    a = sample_unconditional(prior, 2, 16, steps=3, generator=torch.Generator().manual_seed(1))
    b = sample_unconditional(prior, 2, 16, steps=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    path = save_sample_grid(torch.randn(3, 2, 8, 8), tmp_path / "grid.png", title="t")
    assert path.stat().st_size > 0 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="samples"):
        save_sample_grid(torch.randn(3, 8, 8), tmp_path / "bad.png")
