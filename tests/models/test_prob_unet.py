import pytest
import torch
from torch.distributions import kl_divergence as torch_kl

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.models.prob_unet import ProbUNet, UNetFeatures, chosen_rater


def tiny(**baselines) -> ModelParams:
    sizes = {"filters": [8, 8, 16, 16], "num_convs": 1, "latent_dim": 3, **baselines}
    return ModelParams.model_validate({"variant": "prob_unet", "baselines": sizes})


def batch(b=3, r=4, size=16, channels=2):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, channels, size, size, generator=g)
    masks = (torch.rand(b, r, size, size, generator=g) > 0.7).to(torch.uint8)
    valid = torch.ones(b, r, dtype=torch.bool)
    valid[0, 1:] = False
    return image, masks, valid


def net(**baselines) -> ProbUNet:
    torch.manual_seed(0)
    return ProbUNet(tiny(**baselines), image_channels=2)


def test_unet_features_keep_the_image_grid():
    out = UNetFeatures(2, (8, 16, 16), 2)(torch.randn(2, 2, 16, 24))
    assert out.shape == (2, 8, 16, 24)


def test_loss_terms_and_sample_shapes():
    model = net()
    terms = model.losses(*batch(), generator=torch.Generator().manual_seed(1))
    assert set(terms) == {"loss", "bce", "kl"} and all(v.ndim == 0 and torch.isfinite(v) for v in terms.values())
    out = model.eval().sample(batch()[0], SamplingParams(), torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16) and out.abs().max() <= 1.0


def test_kl_and_loss_match_torch_distributions():
    model = net(beta=0.5)
    image, masks, valid = batch(r=1)  # one rater: the target is known
    terms = model.losses(image, masks, valid[:, :1], generator=torch.Generator().manual_seed(1))
    posterior = model.posterior(torch.cat([image, 2.0 * masks.float() - 1.0], dim=1))
    expected = torch_kl(posterior, model.prior(image)).mean()
    torch.testing.assert_close(terms["kl"], expected)
    torch.testing.assert_close(terms["loss"], terms["bce"] + 0.5 * terms["kl"])


def test_chosen_rater_only_picks_valid_raters():
    _, masks, valid = batch()
    for seed in range(10):
        target = chosen_rater(masks, valid, torch.Generator().manual_seed(seed))
        assert torch.equal(target[0, 0], masks[0, 0].float())  # case 0 has one valid rater


def test_different_latents_give_different_samples():
    model = net().eval()
    image = batch()[0]
    features = model.unet(image)
    z = torch.zeros(3, 3)
    assert not torch.allclose(model.logits(features, z), model.logits(features, z + 3.0))
    params = SamplingParams()
    first = model.sample(image, params, torch.Generator().manual_seed(0))
    assert torch.equal(first, model.sample(image, params, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, model.sample(image, params, torch.Generator().manual_seed(1)))


def test_posterior_and_prior_receive_gradients():
    model = net()
    model.losses(*batch(), generator=torch.Generator().manual_seed(1))["loss"].backward()
    for part in (model.posterior, model.prior, model.unet, model.combine):
        grads = [p.grad for p in part.parameters() if p.ndim > 1]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), type(part).__name__


@pytest.mark.parametrize("seed", [0, 3])
def test_fixed_seed_gives_identical_losses(seed):
    def run():
        return net().losses(*batch(), generator=torch.Generator().manual_seed(seed))["loss"]

    assert torch.equal(run(), run())
