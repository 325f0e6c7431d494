"""Gaussian encoders and KL at their edges: defaults, boundaries, messages, NaN, batch shapes.

These complement test_ambiguity.py with what a plausible slip would change without breaking the
shapes: the supplementary's defaults (latent 6, filters 32/64/128/192, 3x3 convolutions halved by
2x2 pooling), inputs exactly at the size limit, the exact error messages, NaN passing through as
a NaN (no argument validation, so the training loop reports the step), and KL over batch shapes
with more than one dimension.
"""

import re

import pytest
import torch
from torch import distributions as D

from cimd_pipeline.models.ambiguity import Covariance, GaussianEncoder, kl_divergence


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_defaults_are_the_papers_encoder():
    encoder = GaussianEncoder(2)
    assert encoder.latent_dim == 6 and encoder.covariance is Covariance.DIAGONAL
    convs = [m for m in encoder.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 192]
    assert encoder.head.out_channels == 12  # mean and log-sigma of 6 dimensions


@pytest.mark.parametrize("size", [16, 20, 33])
def test_each_level_keeps_the_grid_then_halves_it(size):
    encoder = GaussianEncoder(3, latent_dim=2, filters=(4, 5))
    features = encoder.features(torch.randn(2, 3, size, size + 1))
    assert features.shape == (2, 5, size // 4, (size + 1) // 4)


def test_smallest_valid_sizes_and_channels_are_accepted():
    encoder = GaussianEncoder(1, latent_dim=1, filters=(1, 1))  # every lower bound at once
    for shape in [(1, 1, 4, 4), (1, 1, 5, 4), (1, 1, 4, 5)]:
        assert encoder(torch.randn(*shape)).batch_shape == (1,)
    with pytest.raises(ValueError, match=exactly("input of size 4x3 is too small: 2 2x2 poolings need H and W >= 4")):
        encoder(torch.randn(1, 1, 4, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 0}, "in_channels must be >= 1, got 0"),
        ({"latent_dim": 0}, "latent_dim must be >= 1, got 0"),
        ({"filters": ()}, "filters must name at least one convolution level"),
        ({"filters": (8, 0)}, "every entry of filters must be >= 1, got (8, 0)"),
        ({"covariance": "banana"}, "unknown covariance 'banana'; expected one of 'diagonal', 'full'"),
    ],
)
def test_bad_config_messages(kwargs, message):
    with pytest.raises(ValueError, match=exactly(message)):
        GaussianEncoder(**{"in_channels": 2, **kwargs})


def test_wrong_input_shape_message():
    with pytest.raises(ValueError, match=exactly("expected input of shape (N, 2, H, W), got (1, 3, 16, 16)")):
        GaussianEncoder(2, filters=(4,))(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("covariance", list(Covariance))
def test_nan_input_gives_a_nan_gaussian_not_an_exception(covariance):
    encoder = GaussianEncoder(2, latent_dim=3, filters=(4, 4), covariance=covariance)
    dist = encoder(torch.full((2, 2, 8, 8), float("nan")))
    assert torch.isnan(dist.mean).all()
    assert torch.isnan(dist.log_prob(torch.full((2, 3), float("nan")))).all()
    assert torch.isnan(kl_divergence(dist, dist)).all()


def test_full_covariance_factor_is_built_on_the_inputs_device():
    encoder = GaussianEncoder(2, latent_dim=3, filters=(4,), covariance="full")
    x = torch.randn(2, 2, 4, 4)
    expected = encoder(x).scale_tril
    with torch.device("meta"):  # index tensors made without the input's device would land here
        got = encoder(x).scale_tril
    torch.testing.assert_close(got, expected)


def diagonal(*batch, k=4):
    return D.Independent(D.Normal(torch.randn(*batch, k, dtype=torch.float64),
                                  torch.rand(*batch, k, dtype=torch.float64) + 0.3), 1)


def full(*batch, k=4):
    a = torch.randn(*batch, k, k, dtype=torch.float64)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(k, dtype=torch.float64)
    return D.MultivariateNormal(torch.randn(*batch, k, dtype=torch.float64), covariance_matrix=cov)


@pytest.mark.parametrize(("q", "p"), [(diagonal, diagonal), (full, full), (diagonal, full), (full, diagonal)])
def test_kl_over_a_two_dimensional_batch_matches_torch(q, p):
    torch.manual_seed(0)
    post, prior = q(2, 3), p(2, 3)
    ours = kl_divergence(post, prior)
    assert ours.shape == (2, 3)
    as_full = [D.MultivariateNormal(d.mean, scale_tril=torch.diag_embed(d.stddev)) if isinstance(d, D.Independent)
               else d for d in (post, prior)]
    torch.testing.assert_close(ours, D.kl_divergence(*as_full), rtol=1e-6, atol=1e-9)


def test_kl_broadcasts_a_shared_prior_over_the_posteriors_batch():
    torch.manual_seed(1)
    post, prior = full(2, 3), full(3)
    expected = torch.stack([D.kl_divergence(D.MultivariateNormal(post.mean[i], scale_tril=post.scale_tril[i]), prior)
                            for i in range(2)])
    torch.testing.assert_close(kl_divergence(post, prior), expected, rtol=1e-6, atol=1e-9)


def test_kl_error_messages():
    with pytest.raises(ValueError, match=exactly(
        "posterior and prior must be Gaussians over the same vector space, got event shapes (3,) and (4,)"
    )):
        kl_divergence(diagonal(2, k=3), diagonal(2, k=4))
    dirichlet = D.Dirichlet(torch.ones(2, 3))  # a vector distribution of another family
    with pytest.raises(TypeError, match=exactly(
        "kl_divergence supports Independent(Normal, 1) and MultivariateNormal, got Dirichlet"
    )):
        kl_divergence(full(2, k=3), dirichlet)
