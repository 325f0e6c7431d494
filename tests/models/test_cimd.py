import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams, Variant
from cimd_pipeline.models.cimd import CIMD, target_masks

TINY_UNET = {"channels": [16, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 16}


def tiny(variant="cimd_aa", **extra) -> ModelParams:
    return ModelParams.model_validate(
        {"variant": variant, "unet": TINY_UNET, "ambiguity_nets": {"filters": [8, 8, 8, 8], **extra}}
    )


def batch(b=3, r=4, size=16):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(b, 2, size, size, generator=g)
    masks = (torch.rand(b, r, size, size, generator=g) > 0.7).to(torch.uint8)
    valid = torch.ones(b, r, dtype=torch.bool)
    valid[0, 2:] = False
    return image, masks, valid


@pytest.mark.parametrize("variant", ["cimd_aa", "cimd_fc", "ddpm_det", "ddpm_prob"])
def test_losses_and_sample_shapes_for_every_variant(variant):
    torch.manual_seed(0)
    net = CIMD(tiny(variant), image_channels=2)
    terms = net.losses(*batch(), generator=torch.Generator().manual_seed(1))
    assert set(terms) == {"loss", "mse", "vlb", "kl"} and all(v.ndim == 0 for v in terms.values())
    assert torch.isfinite(terms["loss"])
    assert (terms["kl"] > 0) == Variant(variant).uses_ambiguity_nets
    out = net.sample(batch()[0], SamplingParams(steps=3), torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16) and out.abs().max() <= 1.0


def test_ddpm_det_target_is_the_mean_of_valid_raters():
    _, masks, valid = batch()
    x0 = target_masks(masks, valid, Variant.DDPM_DET, None)
    expected0 = masks[0, :2].float().mean(0) * 2 - 1  # raters 3 and 4 of case 0 are missing
    torch.testing.assert_close(x0[0, 0], expected0)
    torch.testing.assert_close(x0[1, 0], masks[1].float().mean(0) * 2 - 1)


def test_probabilistic_target_is_one_valid_rater():
    _, masks, valid = batch()
    for seed in range(20):
        x0 = target_masks(masks, valid, Variant.DDPM_PROB, torch.Generator().manual_seed(seed))
        chosen = [r for r in range(2) if torch.equal(x0[0, 0], masks[0, r].float() * 2 - 1)]
        assert chosen, "case 0 must use one of its two valid raters"


@pytest.mark.parametrize("variant", ["cimd_aa", "cimd_fc"])
def test_ambiguity_nets_receive_gradients_and_change(variant):
    torch.manual_seed(0)
    net = CIMD(tiny(variant), image_channels=2)
    before = [p.detach().clone() for p in (*net.amn.parameters(), *net.acn.parameters())]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.losses(*batch(), generator=torch.Generator().manual_seed(1))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.acn.parameters() if p.ndim > 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.amn.parameters() if p.ndim > 1)
    opt.step()
    after = list((*net.amn.parameters(), *net.acn.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_frozen_ambiguity_nets_stay_but_still_pass_gradient_to_the_unet():
    torch.manual_seed(0)
    net = CIMD(tiny("cimd_aa", trainable=False), image_channels=2)
    assert not any(p.requires_grad for p in (*net.amn.parameters(), *net.acn.parameters()))
    terms = net.losses(*batch(), generator=torch.Generator().manual_seed(1))
    # gradient of the KL alone must reach the UNet through the ACN's input
    terms["kl"].backward()
    grads = [p.grad for p in net.denoiser.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_acn_input_eps_switch_changes_the_kl():
    torch.manual_seed(0)
    a = CIMD(tiny("cimd_aa", acn_input="x0"), image_channels=2)
    torch.manual_seed(0)
    b = CIMD(tiny("cimd_aa", acn_input="eps"), image_channels=2)
    ka = a.losses(*batch(), generator=torch.Generator().manual_seed(1))["kl"]
    kb = b.losses(*batch(), generator=torch.Generator().manual_seed(1))["kl"]
    assert not torch.allclose(ka, kb)


def test_fixed_seed_gives_identical_losses():
    def run():
        torch.manual_seed(0)
        net = CIMD(tiny(), image_channels=2)
        return net.losses(*batch(), generator=torch.Generator().manual_seed(4))["loss"]

    assert torch.equal(run(), run())
