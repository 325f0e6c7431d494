"""``cimd_latent`` with ``ambiguity_nets.latent_conditioning: every_level``: z through the timestep
embedding that every residual block reads, instead of as input channels."""

import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.denoiser import ConditionalDenoiser, UNetConfig
from cimd_pipeline.training.fingerprint import model_identity
from tests.models.test_cimd import TINY_UNET, batch, tiny
from tests.models.test_cimd_latent import Fixed


def embedded_net(**switches) -> CIMD:
    torch.manual_seed(0)
    params = tiny("cimd_latent", latent_conditioning="every_level")
    unet = params.unet.__class__(**{**vars(params.unet), "scale_shift_norm": True})  # z reaches every block
    params = params.model_copy(update={"unet": unet, **switches})
    net = CIMD(params, image_channels=2)
    for p in net.denoiser.parameters():  # the output layer starts at zero: make z visible
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def capture(net: CIMD) -> list[tuple]:
    """The (extra, embedding) arguments of every denoiser call."""
    seen = []
    net.denoiser.register_forward_pre_hook(lambda m, args: seen.append((args[3], args[4])))
    return seen


def block_embeddings(net: CIMD) -> list[torch.Tensor]:
    """The timestep embedding each residual block of the U-Net receives, in call order."""
    seen = []
    for name, module in net.denoiser.net.named_modules():
        if type(module).__name__.endswith("ResnetBlock"):
            module.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[1]))
    return seen


def test_the_code_leaves_the_input_channels_for_the_embedding():
    net = embedded_net()
    k = net.params.latent_dim
    assert net.denoiser.extra_channels == 0 and net.denoiser.embedding_dim == k
    assert net.denoiser.net.conv_in.in_channels == 1 + 2
    assert isinstance(net.denoiser.net.class_embedding, torch.nn.Linear)
    assert net.denoiser.net.class_embedding.in_features == k


def test_training_gives_the_posterior_draw_to_every_residual_block():
    net = embedded_net()
    image, masks, valid = batch()
    k = net.params.latent_dim
    posterior_mean = torch.arange(3 * k, dtype=torch.float32).reshape(3, k) / 10
    net.amn, net.acn = Fixed(posterior_mean), Fixed(torch.zeros(3, k))
    seen, blocks = capture(net), block_embeddings(net)
    net.losses(image, masks, valid, torch.Generator().manual_seed(1))
    extra, embedding = seen[0]
    assert extra is None
    torch.testing.assert_close(embedding, posterior_mean, atol=1e-4, rtol=0)
    # every block of every level reads the same embedding, which carries z
    assert len(blocks) > 4 and all(b is blocks[0] for b in blocks)
    before = blocks[0]
    net.amn = Fixed(posterior_mean + 1.0)
    blocks.clear()
    net.losses(image, masks, valid, torch.Generator().manual_seed(1))
    assert (blocks[0] - before).abs().max() > 1e-4


def test_the_latent_changes_every_blocks_embedding_and_the_output():
    net = embedded_net()
    image = batch()[0]
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 50, 500])
    k = net.params.latent_dim
    blocks = block_embeddings(net)
    a = net.model_output(x_t, image, t, None, torch.zeros(3, k))
    first = list(blocks)
    blocks.clear()
    b = net.model_output(x_t, image, t, None, torch.ones(3, k))
    assert (a - b).abs().max() > 1e-4
    assert all((u - v).abs().max() > 1e-4 for u, v in zip(first, blocks))
    net.zero_grad()
    net.losses(*batch(), generator=torch.Generator().manual_seed(2))["loss"].backward()
    assert net.denoiser.net.class_embedding.weight.grad.abs().max() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.amn.parameters())


def test_sampling_gives_each_row_its_prior_draw_and_is_seeded():
    net = embedded_net()
    image = batch()[0]
    k = net.params.latent_dim
    prior_mean = torch.randn(3, k)
    net.acn = Fixed(prior_mean)
    seen = capture(net)
    settings = SamplingParams(steps=3, method="ddim")
    out = net.sample(image, settings, torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16) and len(seen) == 3
    for extra, embedding in seen:
        assert extra is None
        torch.testing.assert_close(embedding, prior_mean, atol=1e-4, rtol=0)
    assert torch.equal(out, net.sample(image, settings, torch.Generator().manual_seed(0)))


def test_self_conditioning_keeps_its_channel_beside_the_embedded_code():
    net = embedded_net(self_condition=True)
    assert net.denoiser.extra_channels == 1 and net.denoiser.embedding_dim == net.params.latent_dim
    terms = net.losses(*batch(), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"])


def test_the_denoiser_checks_its_embedding():
    cfg = UNetConfig(**TINY_UNET)
    x_t, image, t = torch.randn(2, 1, 16, 16), torch.randn(2, 2, 16, 16), torch.tensor([1, 2])
    with_code = ConditionalDenoiser(cfg, 2, embedding_dim=3)
    assert with_code(x_t, image, t, embedding=torch.zeros(2, 3)).shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match=r"embedding must have shape \(2, 3\), got None"):
        with_code(x_t, image, t)
    with pytest.raises(ValueError, match=r"embedding must have shape \(2, 3\), got \(2, 4\)"):
        with_code(x_t, image, t, embedding=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="takes no embedding"):
        ConditionalDenoiser(cfg, 2)(x_t, image, t, embedding=torch.zeros(2, 3))


def test_every_level_belongs_to_cimd_latent_and_keeps_old_fingerprints():
    with pytest.raises(ValueError, match="latent_conditioning='every_level' needs variant 'cimd_latent'"):
        ModelParams.model_validate({"variant": "cimd_aa", "ambiguity_nets": {"latent_conditioning": "every_level"}})
    assert "latent_conditioning" not in model_identity({"variant": "cimd_latent"})["ambiguity_nets"]
    chosen = model_identity({"variant": "cimd_latent", "ambiguity_nets": {"latent_conditioning": "every_level"}})
    assert chosen["ambiguity_nets"]["latent_conditioning"] == "every_level"
