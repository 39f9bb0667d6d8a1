"""EDMUNet: EDM preconditioning (Karras et al. 2022, Table 1) and a fully convolutional network."""
import json
import math

import pytest
import torch

from invdiff.priors.unet import EDMUNet, UNetConfig, edm_preconditioning


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


def perturbed(net):
    """Add small noise to every weight so the zero-initialised layers (conv2 of each block, conv_out) act."""
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return net


def tiny(channels=2, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return EDMUNet(UNetConfig(channels=channels, base_channels=8, channel_mults=(1, 2, 2), embedding_dim=16,
                                  **kw))


def test_preconditioning_matches_table_1():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_preconditioning(SIGMAS, sd)
    for s, a, b, c, d in zip(SIGMAS.tolist(), c_skip, c_out, c_in, c_noise):
        assert a == pytest.approx(sd ** 2 / (s ** 2 + sd ** 2), rel=1e-12)
        assert b == pytest.approx(s * sd / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert c == pytest.approx(1 / math.sqrt(s ** 2 + sd ** 2), rel=1e-12)
        assert d == pytest.approx(math.log(s) / 4, rel=1e-12)


def test_preconditioning_gives_unit_variance_input_and_target():
    # With Var(x0) = sd^2: Var(c_in (x0 + n)) = c_in^2 (sd^2 + s^2) = 1 (EDM Eq. 114), and the effective
    # training target (x0 - c_skip (x0 + n)) / c_out has variance ((1-c_skip)^2 sd^2 + c_skip^2 s^2) / c_out^2 = 1.
    sd = 0.5
    c_skip, c_out, c_in, _ = edm_preconditioning(SIGMAS, sd)
    torch.testing.assert_close(c_in ** 2 * (sd ** 2 + SIGMAS ** 2), torch.ones_like(SIGMAS))
    target_var = ((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * SIGMAS ** 2) / c_out ** 2
    torch.testing.assert_close(target_var, torch.ones_like(SIGMAS))


def test_untrained_network_is_the_skip_connection():
    # The output convolution is zero-initialised, so F = 0 and D(x, sigma) = c_skip(sigma) x exactly.
    net = tiny()
    x = torch.randn(3, 2, 16, 16)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(net(x, sigma), c_skip[:, None, None, None] * x)


@pytest.mark.parametrize("shape", [(16, 16), (24, 24), (37, 29), (5, 3)])
def test_any_size_keeps_shape(shape):
    # Sides that are not multiples of 2^(levels-1) = 4 are reflect-padded inside and cropped back.
    net = perturbed(tiny())
    x = torch.randn(2, 2, *shape)
    sigma = torch.tensor([0.3, 3.0])
    out = net(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert (out - c_skip[:, None, None, None] * x).abs().max() > 1e-3       # the network F contributes


def test_scalar_sigma_and_protocol_attributes():
    net = tiny(channels=1)
    assert net.channels == 1 and net.image_size is None and net.sigma_min == 0.002 and net.sigma_max == 80.0
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(net(x, 0.5), net(x, torch.tensor([0.5, 0.5])))
    with pytest.raises(ValueError, match="channels|shape"):
        net(torch.randn(2, 3, 16, 16), 0.5)


def test_noise_conditioning_changes_the_output():
    net = perturbed(tiny())
    x = torch.randn(1, 2, 16, 16)
    # Compare the raw network F at two noise levels on the same input: FiLM must make them differ.
    f_low = net.network(x, torch.tensor([math.log(0.1) / 4]))
    f_high = net.network(x, torch.tensor([math.log(10.0) / 4]))
    assert (f_low - f_high).abs().max() > 1e-4


def test_config_round_trips_through_json():
    config = UNetConfig(channels=2, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=2)
    again = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert EDMUNet(again).num_parameters() == EDMUNet(config).num_parameters()
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**config.to_dict(), "attention_heads": 4})
    with pytest.raises(ValueError, match="groups"):
        UNetConfig(base_channels=12, groups=8)


def test_shipped_configuration_size():
    # The shipped priors use the defaults: ~3.4 M parameters (2-4 M budget for CPU training).
    n = EDMUNet(UNetConfig(channels=2)).num_parameters()
    assert 2e6 <= n <= 4e6


def test_older_configs_load_without_the_new_fields():
    # Exported priors from before 2026-12 lack attention / spacing keys: they rebuild the same network.
    old = {k: v for k, v in UNetConfig(channels=2).to_dict().items()
           if k not in ("attention", "spacing_conditioning", "default_spacing_mm")}
    net = EDMUNet(UNetConfig.from_dict(old))
    assert not net.config.attention and not net.config.spacing_conditioning
    assert net.num_parameters() == EDMUNet(UNetConfig(channels=2)).num_parameters()


def test_attention_block_starts_as_identity_and_keeps_any_size():
    # Zero-initialised output projection: (h + 0) / sqrt(2) scales the mid features only, and once perturbed the
    # attention mixes all positions, still for any input size.
    net = perturbed(tiny(attention=True))
    assert net.mid_attention is not None
    x = torch.randn(2, 2, 21, 18)
    out = net(x, torch.tensor([0.3, 3.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unconditioned_prior_ignores_spacing():
    net = tiny()
    assert net.at_spacing(1.0) is net and net.at_spacing(None) is net


def test_spacing_conditioning_changes_the_output_and_views_bind_it():
    net = perturbed(tiny(spacing_conditioning=True, default_spacing_mm=2.0))
    x = torch.randn(2, 2, 16, 16)
    sigma = torch.tensor([0.5, 0.5])
    # F must depend on the spacing, through the embedding added to the noise embedding.
    assert (net(x, sigma, 1.0) - net(x, sigma, 4.0)).abs().max() > 1e-4
    # A view at spacing s equals the network called with s; None means the config's default spacing.
    torch.testing.assert_close(net.at_spacing(4.0)(x, sigma), net(x, sigma, 4.0))
    torch.testing.assert_close(net.at_spacing(None)(x, sigma), net(x, sigma, 2.0))
    torch.testing.assert_close(net(x, sigma), net(x, sigma, 2.0))
    # Per-image spacings: each image gets its own.
    both = net(x, sigma, torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(both[1:], net(x[1:], sigma[1:], 4.0))
    view = net.at_spacing(4.0)
    assert view.channels == 2 and view.sigma_max == net.sigma_max and view.dtype == net.dtype
    assert view.at_spacing(1.0).spacing_mm == 1.0
    with pytest.raises(ValueError, match="spacing"):
        net.at_spacing(-1.0)
    with pytest.raises(ValueError, match="default_spacing_mm"):
        UNetConfig(spacing_conditioning=True)


def test_slice_denoiser_passes_the_spacing_to_its_2d_prior():
    from invdiff.priors.base import SliceDenoiser

    net = perturbed(tiny(spacing_conditioning=True, default_spacing_mm=2.0))
    volume = torch.randn(1, 2, 3, 16, 16)
    sigma = torch.tensor([0.5])
    at4 = SliceDenoiser(net, chunk=2).at_spacing(4.0)
    expected = net(volume[0].permute(1, 0, 2, 3), sigma.expand(3), 4.0).permute(1, 0, 2, 3)[None]
    torch.testing.assert_close(at4(volume, sigma), expected)
    plain = SliceDenoiser(tiny(), chunk=2)
    assert plain.at_spacing(4.0) is plain
