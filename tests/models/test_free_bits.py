"""Free bits for ``cimd_latent`` (``model.ambiguity_nets.free_nats``)."""

import pytest
import torch
from torch import distributions as D

from cimd_pipeline.config import ModelParams
from cimd_pipeline.models.ambiguity import detached, free_bits_kl, kl_estimate
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.training.fingerprint import model_identity
from tests.models.test_cimd import batch, tiny


def gaussian(mu, log_sigma):
    return D.Independent(D.Normal(mu, log_sigma.exp()), 1)


def full(mu, log_sigma):
    return D.MultivariateNormal(mu, scale_tril=torch.diag_embed(log_sigma.exp()))


def mixture(logits, mu, log_sigma):
    return D.MixtureSameFamily(D.Categorical(logits=logits), gaussian(mu, log_sigma))


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).requires_grad_() for s in shapes]


def kl_gradients(free_nats, mixture_prior):
    """Gradients of the batch-mean KL for (posterior mean, posterior log-sigma, prior params...)."""
    q_mu, q_ls = leaves((5, 3), (5, 3))
    posterior = gaussian(q_mu, q_ls)
    if mixture_prior:
        p = leaves((5, 2), (5, 2, 3), (5, 2, 3), seed=1)
        prior = mixture(*p)
    else:
        p = leaves((5, 3), (5, 3), seed=1)
        prior = gaussian(*p)
    z = posterior.mean + posterior.stddev * 0.3  # a reparameterised draw, fixed noise
    kl = kl_estimate(posterior, prior, z) if free_nats is None else free_bits_kl(posterior, prior, z, free_nats)
    grads = torch.autograd.grad(kl.mean(), [q_mu, q_ls, *p])
    return kl.detach(), grads


@pytest.mark.parametrize("mixture_prior", [False, True])
def test_under_the_free_nats_only_the_prior_moves_and_over_them_the_gradient_is_the_kl(mixture_prior):
    plain_kl, plain = kl_gradients(None, mixture_prior)
    mean = plain_kl.mean().item()
    assert mean > 0
    kl, free = kl_gradients(mean + 1.0, mixture_prior)
    torch.testing.assert_close(kl, plain_kl)  # the value is the KL either way
    assert all(g.abs().max() == 0 for g in free[:2])  # the posterior is left alone
    assert all(g.abs().max() > 0 for g in plain[:2])
    for got, expected in zip(free[2:], plain[2:]):  # the prior fits the posterior as without free bits
        torch.testing.assert_close(got, expected)
    kl, spent = kl_gradients(mean - 1e-3, mixture_prior)
    torch.testing.assert_close(kl, plain_kl)
    for got, expected in zip(spent, plain):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make", [gaussian, full])
def test_detached_keeps_the_distribution_and_cuts_the_graph(make):
    mu, ls = leaves((4, 3), (4, 3))
    dist = make(mu, ls)
    cut = detached(dist)
    z = torch.randn(4, 3)
    torch.testing.assert_close(cut.log_prob(z), dist.log_prob(z))
    assert not cut.log_prob(z).requires_grad and dist.log_prob(z).requires_grad
    logits, m, s = leaves((4, 2), (4, 2, 3), (4, 2, 3))
    mixed = detached(mixture(logits, m, s))
    torch.testing.assert_close(mixed.log_prob(z), mixture(logits, m, s).log_prob(z))
    assert not mixed.log_prob(z).requires_grad
    with pytest.raises(TypeError, match="Gaussian"):
        detached(D.Categorical(logits=logits))


def amn_acn_gradients(kl_weight, free_nats, components=2):
    torch.manual_seed(0)
    params = tiny("cimd_latent", prior_components=components, free_nats=free_nats)
    net = CIMD(params.model_copy(update={"kl_weight": kl_weight}), image_channels=2)
    terms = net.losses(*batch(), generator=torch.Generator().manual_seed(1))
    terms["loss"].backward()
    amn = torch.cat([p.grad.flatten() for p in net.amn.parameters()])
    acn = torch.cat([p.grad.flatten() for p in net.acn.parameters() if p.grad is not None])
    return terms, amn, acn


def test_cimd_latent_with_free_nats_trains_the_posterior_by_the_denoiser_only_and_still_fits_the_prior():
    base, amn_without_kl, _ = amn_acn_gradients(0.0, 0.0)
    free, amn_free, acn_free = amn_acn_gradients(1.0, 1e6)
    plain, amn_plain, acn_plain = amn_acn_gradients(1.0, 0.0)
    torch.testing.assert_close(free["kl"], plain["kl"])
    torch.testing.assert_close(free["loss"], plain["loss"])
    torch.testing.assert_close(amn_free, amn_without_kl)  # the KL does not reach the AMN
    assert not torch.allclose(amn_plain, amn_without_kl)
    assert acn_free.abs().max() > 0
    torch.testing.assert_close(acn_free, acn_plain)  # the prior learns as before


def test_free_nats_belong_to_cimd_latent_and_keep_old_fingerprints():
    with pytest.raises(ValueError, match="free_nats=1.0 needs variant 'cimd_latent'"):
        ModelParams.model_validate({"variant": "cimd_aa", "ambiguity_nets": {"free_nats": 1.0}})
    with pytest.raises(ValueError):
        ModelParams.model_validate({"variant": "cimd_latent", "ambiguity_nets": {"free_nats": -1.0}})
    plain = model_identity({"variant": "cimd_latent"})
    assert "free_nats" not in plain["ambiguity_nets"]
    assert model_identity({"variant": "cimd_latent", "ambiguity_nets": {"free_nats": 2.0}})["ambiguity_nets"][
        "free_nats"
    ] == 2.0
