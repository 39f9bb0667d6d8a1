"""The masked token prior: a few training steps at 16 px lower both losses, a run resumes from its checkpoint,
the exported prior loads and serves the token samplers through the TokenPrior protocol on any grid size."""
from __future__ import annotations

import json

import pytest
import torch

from invdiff.errors import InputError
from invdiff.operators.inpainting import Inpainting
from invdiff.priors.tokens import (MaskedTransformer, TokenizerConfig, TransformerConfig, VQTokenizer,
                                   load_token_prior, sinusoidal_grid, train_main)
from invdiff.problem import simulate
from invdiff.samplers.anchored import sample_aps, sample_masked_diffusion

TINY_TOKENIZER = ["--size", "16", "--batch", "8", "--width", "16", "--codes", "32", "--code-dim", "4",
                  "--log-every", "2", "--lr", "3e-3"]
TINY_TRANSFORMER = ["--size", "16", "--batch", "8", "--dim", "32", "--layers", "1", "--heads", "2",
                    "--log-every", "2", "--lr", "3e-3"]


def _losses(folder, stage, key):
    lines = [json.loads(line) for line in (folder / "loss.jsonl").read_text().splitlines()]
    return [(line["step"], line[key]) for line in lines if line["stage"] == stage]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    assert train_main(["--stage", "tokenizer", "--out", str(folder), "--steps", "32", *TINY_TOKENIZER]) == 0
    assert train_main(["--stage", "transformer", "--out", str(folder), "--steps", "32", *TINY_TRANSFORMER]) == 0
    return folder


def test_training_lowers_both_losses(run_folder):
    reconstruction = [v for _, v in _losses(run_folder, "tokenizer", "reconstruction")]
    cross_entropy = [v for _, v in _losses(run_folder, "transformer", "loss")]
    assert len(reconstruction) == 16 and len(cross_entropy) == 16
    # means of the last and the first three logged values (steps 2-6 against 28-32; seen: MSE 0.21 -> 0.10,
    # cross-entropy 3.38 -> 2.9, from log 32 = 3.47 at the start)
    first, last = sum(reconstruction[:3]) / 3, sum(reconstruction[-3:]) / 3
    assert last < 0.75 * first, reconstruction
    first, last = sum(cross_entropy[:3]) / 3, sum(cross_entropy[-3:]) / 3
    assert last < first - 0.2, cross_entropy


def test_a_rerun_resumes_from_the_checkpoint(run_folder):
    assert train_main(["--stage", "tokenizer", "--out", str(run_folder), "--steps", "36", *TINY_TOKENIZER]) == 0
    steps = [s for s, _ in _losses(run_folder, "tokenizer", "reconstruction")]
    assert steps[-3:] == [32, 34, 36]                                       # continued, not restarted
    with pytest.raises(InputError, match="saved with config"):
        train_main(["--stage", "tokenizer", "--out", str(run_folder), "--steps", "30", "--size", "16",
                    "--batch", "8", "--width", "16", "--codes", "64", "--code-dim", "4"])


def test_device_option_and_bad_input_are_one_line_errors(tmp_path):
    fresh = tmp_path / "fresh"
    assert train_main(["--stage", "tokenizer", "--out", str(fresh), "--steps", "2", "--device", "cpu",
                       *TINY_TOKENIZER]) == 0
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            train_main(["--stage", "tokenizer", "--out", str(fresh), "--steps", "4", "--device", "cuda",
                        *TINY_TOKENIZER])
    with pytest.raises(InputError, match="--stage"):
        train_main(["--out", str(fresh)])
    with pytest.raises(InputError, match="multiple of --downsampling"):
        train_main(["--stage", "tokenizer", "--out", str(fresh), "--size", "18"])


def test_exported_prior_serves_the_token_samplers_on_another_grid(run_folder, tmp_path):
    assert train_main(["--out", str(run_folder), "--export", str(tmp_path / "tiny")]) == 0
    prior = load_token_prior(tmp_path / "tiny.safetensors")
    meta = json.loads((tmp_path / "tiny.json").read_text())
    assert meta["tokenizer"]["step"] >= 32 and meta["transformer"]["config"]["dim"] == 32     # 36 after the resume test
    assert "invdiff.priors.tokens" in meta["tokenizer"]["command"]
    # a 12 x 20 image (3 x 5 tokens), not the 16 x 16 (4 x 4) training size
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 12, 20, generator=generator) * 0.3
    ids = prior.encode(x)
    assert ids.shape == (2, 15) and prior.grid_for(x.shape) == (3, 5)
    mask = torch.rand(2, 15, generator=generator) < 0.5
    assert prior.logits(ids, mask, (3, 5)).shape == (2, 15, 32)
    embeddings = prior.codebook[ids].clone().requires_grad_(True)
    prior.decode(embeddings, (3, 5)).square().sum().backward()                 # differentiable decode
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    truth = prior.decode(prior.codebook[ids], (3, 5))
    operator = Inpainting(torch.rand(12, 20, generator=generator) < 0.5, channels=2)
    problem = simulate(operator, truth, 0.05, generator)
    aps = sample_aps(problem, prior, steps=4, inner_steps=3, generator=generator)
    baseline = sample_masked_diffusion(problem, prior, steps=4, reweighting="linear", generator=generator)
    for result in (aps, baseline):
        assert result.x.shape == x.shape and torch.isfinite(result.x).all()
        assert result.diagnostics["tokens"].shape == (2, 15) and result.diagnostics["nfe"] == 4


def test_unconditional_samples_have_the_asked_shape_and_follow_the_seed(run_folder):
    from invdiff.priors.tokens import sample_unconditional_tokens

    prior = load_token_prior(run_folder)
    draw = lambda seed: sample_unconditional_tokens(prior, 3, (16, 24), steps=4,  # noqa: E731
                                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (3, prior.channels, 16, 24) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_prior_cli_draws_from_a_token_prior(run_folder, tmp_path):
    from invdiff.cli import main

    png = tmp_path / "samples.png"
    assert main(["sample-prior", str(run_folder), "--n", "2", "--size", "16", "--steps", "3", "--device", "cpu",
                 "--png", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["sample-prior", str(run_folder), "--n", "1", "--size", "16", "--steps", "2", "--device", "cpu",
                 "--spacing-mm", "1"]) == 2                          # not spacing-conditioned: one line, exit 2


def test_a_shipped_token_prior_is_found_by_name_listed_and_the_token_solvers_default(run_folder, tmp_path,
                                                                                      monkeypatch):
    import shutil

    from invdiff.compare import prior_for_solver
    from invdiff.priors import loading
    from invdiff.priors.tokens import is_token_prior

    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("brain-mri-complex.json", "brain-mri-complex.safetensors"):      # a diffusion prior beside it
        shutil.copy(loading.WEIGHTS_DIR / name, weights / name)
    assert train_main(["--out", str(run_folder), "--export", str(weights / "tokens-brain")]) == 0
    monkeypatch.setattr(loading, "WEIGHTS_DIR", weights)
    assert loading.shipped_token_priors() == ["tokens-brain"]
    assert loading.shipped_priors() == ["brain-mri-complex"]          # token priors are not diffusion priors
    assert is_token_prior("tokens-brain") and not is_token_prior("brain-mri-complex")
    assert loading.prior_info("tokens-brain")["format"] == "invdiff-token-prior"
    prior = prior_for_solver("aps", None, torch.device("cpu"))           # the default of the token solvers
    assert prior.num_codes == load_token_prior("tokens-brain").num_codes


def test_positional_encodings_exist_for_any_grid_and_differ_between_positions():
    encoding = sinusoidal_grid(5, 7, 32)
    assert encoding.shape == (35, 32)
    assert torch.cdist(encoding, encoding).add(torch.eye(35) * 10).min() > 0.1
    torch.testing.assert_close(sinusoidal_grid(3, 3, 32).reshape(3, 3, 32), encoding.reshape(5, 7, 32)[:3, :3])
    model = MaskedTransformer(TransformerConfig(codes=8, dim=16, layers=1, heads=2))
    assert model(torch.randint(0, 9, (1, 35)), (5, 7)).shape == (1, 35, 8)
    tokenizer = VQTokenizer(TokenizerConfig(width=16, codes=8, code_dim=4))
    assert tokenizer.encode(torch.randn(1, 2, 24, 8)).shape == (1, 6 * 2)


def test_image_benchmark_runs_tiny_on_the_exported_prior(run_folder, tmp_path):
    from benchmarks import anchored_images

    train_main(["--out", str(run_folder), "--export", str(tmp_path / "tiny")])
    stem = tmp_path / "report"
    assert anchored_images.main(["--tiny", "--token-prior", str(tmp_path / "tiny.safetensors"), "--tasks", "sr-4x",
                                 "--inner-steps", "2", "--figure-dir", str(tmp_path), "--out", str(stem)]) == 0
    report = json.loads(stem.with_suffix(".json").read_text())
    assert [row["row"] for row in report["rows"]] == list(anchored_images.ROWS)
    assert len(report["tokenizer"]) == 5 and (tmp_path / "aps_anchors-sr-4x-tiny.png").is_file()


def test_a_finer_tokenizer_has_four_times_the_tokens_and_trains_a_transformer_on_them(tmp_path):
    """--downsampling 2: one stride-2 stage, an (H/2, W/2) grid; the transformer stage takes the tokenizer's factor,
    the export keeps it, and a prior exported before the option existed (no key in its config) is read as 4."""
    coarse, fine = VQTokenizer(TokenizerConfig(width=16, codes=8)), VQTokenizer(TokenizerConfig(width=16, codes=8,
                                                                                                 downsampling=2))
    x = torch.randn(2, 2, 16, 24)
    assert coarse.encode(x).shape == (2, 4 * 6) and fine.encode(x).shape == (2, 8 * 12)
    assert fine.decode(fine.codebook[fine.encode(x)], (8, 12)).shape == x.shape
    folder = tmp_path / "fine"
    assert train_main(["--stage", "tokenizer", "--out", str(folder), "--steps", "4", "--downsampling", "2",
                       *TINY_TOKENIZER]) == 0
    assert train_main(["--stage", "transformer", "--out", str(folder), "--steps", "4", *TINY_TRANSFORMER]) == 0
    prior = load_token_prior(folder)
    assert prior.downsampling == 2 and prior.grid_for((1, 2, 16, 24)) == (8, 12)
    with pytest.raises(ValueError, match="multiples of 2"):
        prior.grid_for((1, 2, 15, 24))
    legacy = {k: v for k, v in TokenizerConfig().to_dict().items() if k != "downsampling"}
    assert TokenizerConfig(**legacy).downsampling == 4


def test_transformer_forward_is_the_torch_encoder_with_fused_attention():
    """The forward runs each ``nn.TransformerEncoderLayer``'s weights through ``scaled_dot_product_attention`` (no
    (L, L) matrix); it must compute what the layers themselves compute, in training and in eval mode, and train."""
    from invdiff.priors.tokens import sinusoidal_grid

    torch.manual_seed(0)
    model = MaskedTransformer(TransformerConfig(codes=8, dim=32, layers=2, heads=4)).double()
    ids = torch.randint(0, 9, (3, 35))
    for training in (True, False):
        model.train(training)
        h = model.embedding(ids) + sinusoidal_grid(5, 7, 32, None, torch.float64)
        reference = model.head(model.norm(model.encoder(h)))
        torch.testing.assert_close(model(ids, (5, 7)), reference, rtol=1e-12, atol=1e-12)
    model.train()
    model(ids, (5, 7)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
