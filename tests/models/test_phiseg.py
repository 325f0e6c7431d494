import pytest
import torch
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.models.phiseg import PHiSeg, level_kl
from cimd_pipeline.models.prob_unet import chosen_rater


def tiny(levels=3, resolution_levels=3, **baselines) -> ModelParams:
    sizes = {"filters": [8, 16], "num_convs": 1, "phiseg_levels": levels,
             "phiseg_resolution_levels": resolution_levels, **baselines}
    return ModelParams.model_validate({"variant": "phiseg", "baselines": sizes})


def batch(b=3, r=2, size=16):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, 1, size, size, generator=g)
    masks = (torch.rand(b, r, size, size, generator=g) > 0.7).to(torch.uint8)
    return image, masks, torch.ones(b, r, dtype=torch.bool)


def net(**kw) -> PHiSeg:
    torch.manual_seed(0)
    return PHiSeg(tiny(**kw), image_channels=1)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_latent_and_output_shapes(levels):
    model = net(levels=levels)
    image, masks, _ = batch()
    z, mu, sigma = model.posterior(torch.cat([image, masks[:, :1].float()], 1), torch.Generator().manual_seed(0))
    offset = 3 - levels
    assert [tuple(t.shape) for t in z] == [(3, 2, 16 >> (i + offset), 16 >> (i + offset)) for i in range(levels)]
    assert all(m.shape == s.shape == t.shape and (s > 0).all() for m, s, t in zip(mu, sigma, z))
    outputs = model.likelihood(z, (16, 16))
    assert len(outputs) == levels and all(o.shape == (3, 1, 16, 16) for o in outputs)
    terms = model.losses(image, masks, batch()[2], torch.Generator().manual_seed(1))
    assert set(terms) == {"loss", "bce", "aux", "kl"} and all(torch.isfinite(v) for v in terms.values())
    assert (terms["aux"] == 0) == (levels == 1)
    sample = model.eval().sample(image, SamplingParams(), torch.Generator().manual_seed(0))
    assert sample.shape == (3, 1, 16, 16) and sample.abs().max() <= 1.0


def test_level_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(2, 4, 2, 3, 3, generator=g)
    s_q, s_p = torch.rand(2, 4, 2, 3, 3, generator=g) + 0.1
    expected = torch_kl(Normal(mu_q, s_q), Normal(mu_p, s_p)).sum((1, 2, 3))
    torch.testing.assert_close(level_kl(mu_q, s_q, mu_p, s_p), expected)


def test_loss_is_weighted_kl_plus_residual_cross_entropies():
    model = net(beta=0.5, phiseg_aux_weight=0.25)
    image, masks, valid = batch()
    terms = model.losses(image, masks, valid, torch.Generator().manual_seed(1))
    # replay the same generator stream: rater choice, then the posterior's draws
    g = torch.Generator().manual_seed(1)
    target = chosen_rater(masks, valid, g)
    z, mu_q, s_q = model.posterior(torch.cat([image, 2 * target - 1], 1), g)
    _, mu_p, s_p = model.prior(image, g, given=z)
    kl = sum(4**i * torch_kl(Normal(mu_q[i], s_q[i]), Normal(mu_p[i], s_p[i])).sum((1, 2, 3)) for i in range(3))
    torch.testing.assert_close(terms["kl"], kl.mean())
    torch.testing.assert_close(terms["loss"], terms["bce"] + 0.25 * terms["aux"] + 0.5 * terms["kl"])


def test_prior_finer_levels_depend_on_the_coarser_latent():
    model = net().eval()
    image = batch()[0]
    z, mu, _ = model.prior(image, torch.Generator().manual_seed(0))
    shifted = [z[0], z[1], z[2] + 1.0]
    _, mu_shifted, _ = model.prior(image, None, given=shifted)
    assert torch.equal(mu[2], mu_shifted[2]) and not torch.allclose(mu[1], mu_shifted[1])


def test_different_latents_give_different_samples():
    model = net().eval()
    image, params = batch()[0], SamplingParams()
    first = model.sample(image, params, torch.Generator().manual_seed(0))
    assert torch.equal(first, model.sample(image, params, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, model.sample(image, params, torch.Generator().manual_seed(1)))


def test_posterior_receives_gradients():
    model = net()
    model.losses(*batch(), generator=torch.Generator().manual_seed(1))["loss"].backward()
    for part in (model.posterior, model.prior, model.likelihood):
        grads = [p.grad for p in part.parameters() if p.ndim > 1]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__


def test_one_latent_level_trains_on_a_fixed_batch():
    # PHiSeg's likelihood sees only z, so the target must be something a coarse latent can carry:
    # one disc per image, visible in the image
    model = net(levels=1, resolution_levels=2)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    centres = torch.tensor([[4.0, 4.0], [11.0, 5.0], [6.0, 11.0], [10.0, 10.0]])
    discs = (yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 < 12
    masks = discs.to(torch.uint8)[:, None]
    image = masks.float() + 0.3 * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    valid = torch.ones(4, 1, dtype=torch.bool)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = model.losses(image, masks, valid, generator)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
