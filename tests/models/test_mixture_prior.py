"""The mixture prior of ``cimd_latent`` (``model.ambiguity_nets.prior_components``)."""

import math

import pytest
import torch
from torch import distributions as D

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators
from cimd_pipeline.models.ambiguity import Covariance, GaussianEncoder, draw, kl_divergence, kl_estimate
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.training.fingerprint import model_identity
from tests.models.test_cimd import batch, tiny


def mixture(logits, means, sigma=0.1) -> D.MixtureSameFamily:
    """A diagonal mixture with batch shape (N,) from logits (N, K) and means (N, K, k)."""
    components = D.Independent(D.Normal(means, torch.full_like(means, sigma)), 1)
    return D.MixtureSameFamily(D.Categorical(logits=logits), components)


@pytest.mark.parametrize("covariance", list(Covariance))
def test_an_encoder_with_components_gives_a_mixture_whose_density_is_the_weighted_sum(covariance):
    torch.manual_seed(0)
    encoder = GaussianEncoder(2, latent_dim=3, filters=(8, 8), covariance=covariance, components=4)
    with torch.no_grad():  # weights that differ by input, so the logits are not all equal
        encoder.head.weight.normal_(std=0.5)
    dist = encoder(torch.randn(5, 2, 16, 16))
    assert isinstance(dist, D.MixtureSameFamily)
    assert dist.batch_shape == (5,) and dist.event_shape == (3,)
    weights = dist.mixture_distribution.probs
    assert weights.shape == (5, 4) and not torch.allclose(weights, torch.full_like(weights, 0.25))
    z = torch.randn(5, 3)
    components = dist.component_distribution
    by_hand = torch.log((weights * components.log_prob(z[:, None]).exp()).sum(1))
    torch.testing.assert_close(dist.log_prob(z), by_hand)
    assert dist.log_prob(z).dtype == torch.float32


def test_fresh_mixture_components_start_apart_with_equal_weights():
    torch.manual_seed(0)
    dist = GaussianEncoder(2, latent_dim=6, filters=(8, 8), components=3)(torch.randn(4, 2, 16, 16))
    means = dist.component_distribution.mean[0]  # (3, 6)
    assert torch.cdist(means, means).triu(1)[torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)].min() > 0.5
    torch.testing.assert_close(dist.mixture_distribution.probs, torch.full((4, 3), 1 / 3), atol=0.02, rtol=0)


def test_one_component_is_the_plain_gaussian_encoder():
    torch.manual_seed(0)
    plain = GaussianEncoder(2, latent_dim=3, filters=(8, 8))
    torch.manual_seed(0)
    one = GaussianEncoder(2, latent_dim=3, filters=(8, 8), components=1)
    x = torch.randn(2, 2, 16, 16)
    assert isinstance(one(x), D.Independent)
    torch.testing.assert_close(one(x).mean, plain(x).mean, rtol=0, atol=0)


@pytest.mark.parametrize("full", [False, True])
def test_draw_picks_components_by_their_weights_and_follows_the_generator(full):
    n = 20000
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(n, 3)
    means = torch.tensor([[-10.0, 0.0], [0.0, 0.0], [10.0, 0.0]]).expand(n, 3, 2)
    prior = mixture(logits, means)
    if full:  # the same mixture with full covariances, correlated in the second coordinate
        tril = torch.tensor([[0.1, 0.0], [0.3, 0.2]]).expand(n, 3, 2, 2)
        prior = D.MixtureSameFamily(prior.mixture_distribution, D.MultivariateNormal(means, scale_tril=tril))
    drawn = draw(prior, torch.Generator().manual_seed(0))
    z = drawn[:, 0]
    shares = torch.stack([(z < -5).float().mean(), (z.abs() < 5).float().mean(), (z > 5).float().mean()])
    torch.testing.assert_close(shares, torch.tensor([0.7, 0.2, 0.1]), atol=0.012, rtol=0)
    for centre, picked in ((-10.0, z < -5), (0.0, z.abs() < 5), (10.0, z > 5)):
        torch.testing.assert_close((z[picked] - centre).std(), torch.tensor(0.1), atol=0.01, rtol=0)
    correlation = torch.corrcoef(drawn[z.abs() < 5].T)[0, 1]
    assert (correlation > 0.8) if full else (correlation.abs() < 0.1)
    assert torch.equal(drawn, draw(prior, torch.Generator().manual_seed(0)))
    assert not torch.equal(drawn, draw(prior, torch.Generator().manual_seed(1)))


def test_draw_with_row_generators_gives_each_row_its_own_stream():
    logits = torch.zeros(3, 4)
    means = torch.arange(4.0).reshape(1, 4, 1).expand(3, 4, 1) * 10
    prior = mixture(logits, means)
    full = draw(prior, RowGenerators([5, 6, 7], "cpu"))
    alone = draw(mixture(logits[:1], means[:1]), RowGenerators([6], "cpu"))
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=0)


def test_kl_estimate_is_the_closed_form_for_a_gaussian_prior_and_unbiased_for_a_mixture():
    q = D.Independent(D.Normal(torch.tensor([[0.3, -0.2]]), torch.tensor([[0.5, 0.8]])), 1)
    p = D.Independent(D.Normal(torch.tensor([[-0.4, 0.1]]), torch.tensor([[1.2, 0.6]])), 1)
    z = torch.randn(1, 2)
    torch.testing.assert_close(kl_estimate(q, p, z), kl_divergence(q, p))
    # a mixture of three copies of p is p: the Monte Carlo mean must be KL(q || p)
    n = 200000
    same = D.Independent(D.Normal(p.mean[:, None].expand(n, 3, 2), p.stddev[:, None].expand(n, 3, 2)), 1)
    copies = D.MixtureSameFamily(D.Categorical(logits=torch.randn(n, 3)), same)
    wide_q = D.Independent(D.Normal(q.mean.expand(n, 2), q.stddev.expand(n, 2)), 1)
    zs = draw(wide_q, torch.Generator().manual_seed(0))
    estimate = kl_estimate(wide_q, copies, zs)
    assert abs(estimate.mean().item() - kl_divergence(q, p).item()) < 4 * estimate.std().item() / math.sqrt(n)
    with pytest.raises(ValueError, match="one latent dimension"):
        kl_estimate(wide_q, copies, zs[:, :1])


def test_the_estimates_gradient_puts_a_mixture_component_on_each_cluster_of_posterior_codes():
    """Two clusters of codes at -3 and 3; the components start at -0.5 and 0.5."""
    torch.manual_seed(0)
    n = 512
    centres = torch.where(torch.rand(n, 1) < 0.5, -3.0, 3.0)
    posterior = D.Independent(D.Normal(centres.expand(n, 1), torch.full((n, 1), 0.2)), 1)
    logits = torch.zeros(1, 2, requires_grad=True)
    means = torch.tensor([[[-0.5], [0.5]]], requires_grad=True)
    optimiser = torch.optim.Adam([logits, means], lr=0.05)
    for step in range(400):
        prior = mixture(logits.expand(n, 2), means.expand(n, 2, 1), sigma=0.3)
        z = draw(posterior, torch.Generator().manual_seed(step))
        optimiser.zero_grad()
        kl_estimate(posterior, prior, z).mean().backward()
        optimiser.step()
    torch.testing.assert_close(means.detach().flatten().sort().values, torch.tensor([-3.0, 3.0]), atol=0.15, rtol=0)


def latent_net(components: int) -> CIMD:
    torch.manual_seed(0)
    net = CIMD(tiny("cimd_latent", prior_components=components), image_channels=2)
    for p in net.denoiser.parameters():  # the output layer starts at zero: make z visible
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def test_cimd_latent_with_a_mixture_prior_trains_every_part_and_samples_from_the_mixture():
    net = latent_net(3)
    assert net.acn.components == 3 and net.amn.components == 1
    image, masks, valid = batch()
    terms = net.losses(image, masks, valid, torch.Generator().manual_seed(2))
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    logit_rows = net.acn.head.weight.grad[-3:]  # the mixture's logits are the head's last outputs
    assert logit_rows.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.amn.parameters())
    seen = []
    net.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    settings = SamplingParams(steps=2, method="ddim")
    a = net.sample(image, settings, torch.Generator().manual_seed(0))
    z = seen[0][:, :, 0, 0]
    assert torch.equal(a, net.sample(image, settings, torch.Generator().manual_seed(0)))
    expected = draw(net.acn(image), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)


def test_the_prior_component_count_is_checked_and_fingerprinted():
    with pytest.raises(ValueError, match="prior_components=2 needs variant 'cimd_latent'"):
        ModelParams.model_validate({"variant": "cimd_aa", "ambiguity_nets": {"prior_components": 2}})
    with pytest.raises(ValueError):
        ModelParams.model_validate({"variant": "cimd_latent", "ambiguity_nets": {"prior_components": 0}})
    plain = model_identity({"variant": "cimd_latent"})
    assert "prior_components" not in plain["ambiguity_nets"]  # runs from before the field keep their fingerprint
    assert model_identity({"variant": "cimd_latent", "ambiguity_nets": {"prior_components": 1}}) == plain
    mixed = model_identity({"variant": "cimd_latent", "ambiguity_nets": {"prior_components": 4}})
    assert mixed["ambiguity_nets"]["prior_components"] == 4
