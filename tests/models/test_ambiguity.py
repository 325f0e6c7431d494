"""Tests of the Gaussian ambiguity encoders (AMN/ACN) and the closed-form KL divergence."""

import pytest
import torch
from torch import distributions as D

from cimd_pipeline.models.ambiguity import Covariance, GaussianEncoder, kl_divergence

BATCH = 3
IN_CHANNELS = 2  # one image channel plus one mask channel


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("latent_dim", [1, 6])
@pytest.mark.parametrize("covariance", list(Covariance))
def test_encoder_output_shapes(covariance, latent_dim, size):
    encoder = GaussianEncoder(IN_CHANNELS, latent_dim=latent_dim, covariance=covariance)
    dist = encoder(torch.randn(BATCH, IN_CHANNELS, size, size))

    assert dist.batch_shape == (BATCH,)
    assert dist.event_shape == (latent_dim,)
    assert dist.rsample().shape == (BATCH, latent_dim)
    assert dist.log_prob(dist.sample()).shape == (BATCH,)
    if covariance is Covariance.DIAGONAL:
        assert isinstance(dist, D.Independent) and isinstance(dist.base_dist, D.Normal)
    else:
        assert isinstance(dist, D.MultivariateNormal)
        assert dist.scale_tril.shape == (BATCH, latent_dim, latent_dim)


@pytest.mark.parametrize("covariance", list(Covariance))
def test_initial_distribution_is_close_to_standard_normal(covariance):
    encoder = GaussianEncoder(IN_CHANNELS, covariance=covariance)
    dist = encoder(torch.randn(BATCH, IN_CHANNELS, 32, 32))

    assert dist.mean.abs().max() < 0.1
    assert torch.allclose(dist.variance, torch.ones_like(dist.variance), atol=0.2)


@pytest.mark.parametrize("covariance", list(Covariance))
def test_encoder_gives_a_float32_gaussian_under_bf16_autocast(covariance):
    """Training on CUDA runs under bf16 autocast; the full-covariance head used to fail there
    (an index put of float32 softplus values into a bf16 factor), found on an H200."""
    encoder = GaussianEncoder(IN_CHANNELS, covariance=covariance)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = encoder(torch.randn(BATCH, IN_CHANNELS, 32, 32))
        kl = kl_divergence(dist, encoder(torch.randn(BATCH, IN_CHANNELS, 32, 32)))
    assert dist.mean.dtype == torch.float32 and kl.dtype == torch.float32
    assert torch.isfinite(kl).all()


def test_covariance_accepts_string_value():
    assert GaussianEncoder(IN_CHANNELS, covariance="full").covariance is Covariance.FULL


def test_scale_tril_is_lower_triangular_with_positive_diagonal():
    encoder = GaussianEncoder(IN_CHANNELS, latent_dim=6, covariance=Covariance.FULL)
    with torch.no_grad():
        torch.nn.init.normal_(encoder.head.weight, std=1.0)
        encoder.head.bias.fill_(-30.0)  # drives the raw diagonal far negative
    tril = encoder(torch.randn(BATCH, IN_CHANNELS, 32, 32)).scale_tril

    assert torch.equal(tril.triu(1), torch.zeros_like(tril))
    assert (tril.tril(-1) != 0).any()
    assert (torch.diagonal(tril, dim1=-2, dim2=-1) > 0).all()


@pytest.mark.parametrize("covariance", list(Covariance))
def test_rsample_is_differentiable_wrt_encoder_parameters(covariance):
    encoder = GaussianEncoder(IN_CHANNELS, latent_dim=6, covariance=covariance)
    z = encoder(torch.randn(BATCH, IN_CHANNELS, 32, 32)).rsample()
    z.square().sum().backward()

    for name, param in encoder.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # every predicted Gaussian parameter (mean and scale entries) receives a gradient
    assert (encoder.head.weight.grad.flatten(1).abs().sum(1) > 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latent_dim": 0},
        {"filters": ()},
        {"filters": (32, 0)},
        {"covariance": "banana"},
        {"in_channels": 0},
    ],
)
def test_bad_config_raises(kwargs):
    kwargs = {"in_channels": IN_CHANNELS, **kwargs}
    with pytest.raises(ValueError):
        GaussianEncoder(**kwargs)


def test_too_small_input_raises():
    encoder = GaussianEncoder(IN_CHANNELS)  # four poolings need at least 16x16
    assert encoder(torch.randn(1, IN_CHANNELS, 16, 17)).batch_shape == (1,)
    with pytest.raises(ValueError, match="15x32.*16"):
        encoder(torch.randn(1, IN_CHANNELS, 15, 32))
    with pytest.raises(ValueError, match="16"):
        encoder(torch.randn(1, IN_CHANNELS, 32, 8))


def test_wrong_input_channels_raise():
    with pytest.raises(ValueError, match="channels|shape"):
        GaussianEncoder(IN_CHANNELS)(torch.randn(1, IN_CHANNELS + 1, 32, 32))


def _random_diagonal(n, k):
    mean = torch.randn(n, k, dtype=torch.float64)
    std = torch.rand(n, k, dtype=torch.float64) + 0.2
    return D.Independent(D.Normal(mean, std), 1)


def _random_full(n, k):
    a = torch.randn(n, k, k, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(k, dtype=torch.float64)
    return D.MultivariateNormal(torch.randn(n, k, dtype=torch.float64), covariance_matrix=cov)


@pytest.mark.parametrize("k", [1, 6])
def test_diagonal_kl_matches_torch(k):
    q, p = _random_diagonal(8, k), _random_diagonal(8, k)
    ours = kl_divergence(q, p)

    assert ours.shape == (8,)
    torch.testing.assert_close(ours, D.kl_divergence(q, p), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k", [1, 6])
def test_full_kl_matches_torch(k):
    q, p = _random_full(8, k), _random_full(8, k)
    ours = kl_divergence(q, p)

    assert ours.shape == (8,)
    torch.testing.assert_close(ours, D.kl_divergence(q, p), rtol=1e-5, atol=0)


def test_mixed_kl_matches_torch_on_equivalent_full_gaussians():
    q, p = _random_diagonal(8, 6), _random_full(8, 6)
    q_full = D.MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev))

    torch.testing.assert_close(kl_divergence(q, p), D.kl_divergence(q_full, p), rtol=1e-5, atol=0)
    torch.testing.assert_close(kl_divergence(p, q), D.kl_divergence(p, q_full), rtol=1e-5, atol=0)


@pytest.mark.parametrize("covariance", list(Covariance))
def test_kl_of_encoder_outputs_matches_torch(covariance):
    posterior = GaussianEncoder(IN_CHANNELS, covariance=covariance)
    prior = GaussianEncoder(IN_CHANNELS, covariance=covariance)
    for encoder in (posterior, prior):
        with torch.no_grad():
            torch.nn.init.normal_(encoder.head.weight, std=0.5)
    x = torch.randn(BATCH, IN_CHANNELS, 32, 32)
    q, p = posterior(x), prior(x)

    torch.testing.assert_close(kl_divergence(q, p), D.kl_divergence(q, p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [_random_diagonal, _random_full])
def test_kl_of_a_distribution_with_itself_is_zero(make):
    q = make(8, 6)
    torch.testing.assert_close(kl_divergence(q, q), torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("make", [_random_diagonal, _random_full])
def test_kl_is_non_negative(make):
    assert (kl_divergence(make(64, 6), make(64, 6)) >= 0).all()


def test_kl_rejects_mismatched_dimensions_and_other_families():
    with pytest.raises(ValueError, match="event shapes"):
        kl_divergence(_random_diagonal(2, 3), _random_diagonal(2, 4))
    laplace = D.Independent(D.Laplace(torch.zeros(2, 3), torch.ones(2, 3)), 1)
    with pytest.raises(TypeError, match=r"Independent\(Laplace, 1\)"):
        kl_divergence(laplace, _random_full(2, 3))


@pytest.mark.parametrize("covariance", list(Covariance))
def test_scales_are_floored_so_extreme_heads_keep_the_kl_finite(covariance):
    """exp(raw) would give sigma = 0 at raw = -200 and inf at raw = 100 in float32 (KL inf/NaN)."""
    posterior = GaussianEncoder(IN_CHANNELS, latent_dim=6, covariance=covariance)
    prior = GaussianEncoder(IN_CHANNELS, latent_dim=6, covariance=covariance)
    with torch.no_grad():
        for encoder, raw in ((posterior, -200.0), (prior, 100.0)):
            encoder.head.weight.zero_()
            encoder.head.bias.fill_(raw)
            encoder.head.bias[:6] = 0.0  # the means
    x = torch.randn(BATCH, IN_CHANNELS, 32, 32)
    q, p = posterior(x), prior(x)
    for dist, low, high in ((q, 1e-5, 2e-5), (p, 100.5, 100.6)):  # softplus(raw + 0.5413) + 1e-5
        scale = dist.base_dist.scale if covariance is Covariance.DIAGONAL else dist.scale_tril.diagonal(dim1=-2, dim2=-1)
        assert ((scale >= low) & (scale <= high)).all(), scale
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl).all() and (kl > 0).all()


def test_diagonal_and_full_scales_agree_for_the_same_raw_values():
    diagonal = GaussianEncoder(IN_CHANNELS, latent_dim=1, covariance=Covariance.DIAGONAL)
    full = GaussianEncoder(IN_CHANNELS, latent_dim=1, covariance=Covariance.FULL)
    with torch.no_grad():
        for encoder in (diagonal, full):
            encoder.head.weight.zero_()
            encoder.head.bias.copy_(torch.tensor([0.3, -1.5]))
    x = torch.randn(BATCH, IN_CHANNELS, 32, 32)
    torch.testing.assert_close(diagonal(x).base_dist.scale, full(x).scale_tril[:, :, 0])
