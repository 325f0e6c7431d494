"""``cimd_latent``: the AMN/ACN latent conditions the denoiser; the prior sees the image only."""

import json

import pytest
import torch
from torch.distributions import Independent, Normal

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.models.ambiguity import kl_divergence
from cimd_pipeline.models.cimd import CIMD
from tests.conftest import PROJECT, run_kedro
from tests.models.test_cimd import batch, tiny


def latent_net(**switches) -> CIMD:
    torch.manual_seed(0)
    params = tiny("cimd_latent").model_copy(update=switches)
    net = CIMD(params, image_channels=2)
    for p in net.denoiser.parameters():  # the output layer starts at zero: make z visible
        p.data.add_(0.05 * torch.randn_like(p))
    return net


class Fixed(torch.nn.Module):
    """An encoder stand-in returning N(mean, (1e-6)^2) and recording its input."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.inputs = mean, []

    def forward(self, x):
        self.inputs.append(x)
        return Independent(Normal(self.mean[: len(x)], torch.full_like(self.mean[: len(x)], 1e-6)), 1)


def capture_extra(net: CIMD) -> list[torch.Tensor]:
    seen = []
    net.denoiser.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
    return seen


def test_the_prior_sees_the_image_only_and_the_denoiser_gets_the_latent_channels():
    net = latent_net()
    assert net.acn.in_channels == 2 and net.amn.in_channels == 3
    assert net.denoiser.extra_channels == net.params.latent_dim
    assert latent_net(self_condition=True).denoiser.extra_channels == net.params.latent_dim + 1


def test_training_feeds_the_posterior_draw_of_image_and_rater_mask_to_the_denoiser():
    net = latent_net()
    image, masks, valid = batch()
    k = net.params.latent_dim
    posterior_mean = torch.arange(3 * k, dtype=torch.float32).reshape(3, k) / 10
    net.amn, net.acn = Fixed(posterior_mean), Fixed(torch.zeros(3, k))
    seen = capture_extra(net)
    terms = net.losses(image, masks, valid, torch.Generator().manual_seed(1))
    amn_input = net.amn.inputs[0]
    assert amn_input.shape == (3, 3, 16, 16) and torch.equal(amn_input[:, :2], image)
    assert set(amn_input[:, 2].unique().tolist()) <= {-1.0, 1.0}  # one rater's mask in [-1, 1]
    assert net.acn.inputs[0].shape == (3, 2, 16, 16)
    torch.testing.assert_close(seen[0], posterior_mean[:, :, None, None].expand(3, k, 16, 16), atol=1e-4, rtol=0)
    expected_kl = kl_divergence(net.amn(amn_input), net.acn(image)).mean()
    torch.testing.assert_close(terms["kl"], expected_kl)
    hybrid = terms["mse"] + net.params.vlb_weight * net.diffusion.num_timesteps * terms["vlb"]
    torch.testing.assert_close(terms["loss"], hybrid + net.params.kl_weight * terms["kl"], rtol=1e-5, atol=1e-6)


def test_training_losses_follow_the_generator_alone():
    """Posterior draw, timestep, noise and the self-conditioning coin all come from ``generator``."""
    net = latent_net(self_condition=True)
    image, masks, valid = batch()
    runs = []
    for global_seed in (11, 12):  # torch's global stream must not matter
        torch.manual_seed(global_seed)
        runs.append(net.losses(image, masks, valid, torch.Generator().manual_seed(3)))
    for name in ("loss", "mse", "vlb", "kl"):
        assert torch.equal(runs[0][name], runs[1][name]), name
    other = net.losses(image, masks, valid, torch.Generator().manual_seed(4))
    assert not torch.equal(other["loss"], runs[0]["loss"])


def test_the_self_conditioning_pass_sees_the_same_latent_as_the_training_pass():
    net = latent_net(self_condition=True)
    image, masks, valid = batch()
    k = net.params.latent_dim
    net.amn, net.acn = Fixed(torch.arange(3 * k, dtype=torch.float32).reshape(3, k) / 10), Fixed(torch.zeros(3, k))
    seen = capture_extra(net)
    for seed in range(20):  # the coin feeds the first pass's estimate about every other step
        seen.clear()
        net.losses(image, masks, valid, torch.Generator().manual_seed(seed))
        assert len(seen) == 2  # the first pass runs every step (the coin stays on the device)
        if not torch.equal(seen[1][:, :1], torch.zeros_like(seen[1][:, :1])):
            break
    first, second = seen
    assert first.shape == second.shape == (3, 1 + k, 16, 16)
    torch.testing.assert_close(first[:, 1:], second[:, 1:], rtol=0, atol=0)  # the same z
    assert torch.equal(first[:, :1], torch.zeros_like(first[:, :1]))  # the first pass starts from zeros
    assert not torch.equal(second[:, :1], first[:, :1])  # the second gets the first's x0 estimate


def test_the_latent_changes_the_denoiser_output():
    net = latent_net()
    image = batch()[0]
    x_t, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 50, 500])
    k = net.params.latent_dim
    a = net.model_output(x_t, image, t, None, torch.zeros(3, k))
    b = net.model_output(x_t, image, t, None, torch.ones(3, k))
    assert (a - b).abs().max() > 1e-4


def test_kl_trains_both_encoders_and_the_diffusion_loss_the_posterior():
    net = latent_net()
    terms = net.losses(*batch(), generator=torch.Generator().manual_seed(2))
    (terms["loss"] - net.params.kl_weight * terms["kl"]).backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.amn.parameters())
    assert all(p.grad is None or not p.grad.any() for p in net.acn.parameters())  # the prior: KL only
    net.zero_grad()
    terms["kl"].backward()
    assert all(p.grad is not None for p in net.acn.parameters())


def test_sampling_draws_each_rows_latent_from_the_image_prior():
    net = latent_net()
    image = batch()[0]
    k = net.params.latent_dim
    prior_mean = torch.randn(3, k)
    net.acn = Fixed(prior_mean)
    seen = capture_extra(net)
    out = net.sample(image, SamplingParams(steps=3, method="ddpm"), torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 16, 16) and len(seen) == 3 and torch.equal(net.acn.inputs[0], image)
    for extra in seen:
        torch.testing.assert_close(extra, prior_mean[:, :, None, None].expand(3, k, 16, 16), atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_the_prior_spread_varies_samples():
    net = latent_net()
    image = batch()[0]
    settings = SamplingParams(steps=3, method="ddim")  # deterministic given x_T and z
    a = net.sample(image, settings, torch.Generator().manual_seed(0))
    assert torch.equal(a, net.sample(image, settings, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, net.sample(image, settings, torch.Generator().manual_seed(1)))


@pytest.mark.slow
def test_cimd_latent_with_the_literature_recipe_runs_the_kedro_chain_and_the_probe(kedro_project):
    overrides = ("model.variant=cimd_latent,model.noise_schedule=cosine,model.input_scale=0.1,"
                 "model.loss_weighting=snr_plus_one,model.output_activation=tanh,model.self_condition=true,"
                 "model.ambiguity_nets.prior_components=2,sampling.method=ddpm")
    run_kedro(kedro_project, "--env", "test", "--params", overrides)
    metrics = json.loads((kedro_project / "data/08_reporting/metrics.json").read_text())
    assert metrics["variant"] == "cimd_latent" and 0.0 <= metrics["ged"] <= 2.0
    trained = TrainedModelDataset(str(kedro_project / "data/06_models/model.pt")).load()
    params = trained.params
    assert (params.noise_schedule.value, params.input_scale, params.loss_weighting.value) == ("cosine", 0.1, "snr_plus_one")
    assert params.output_activation == "tanh" and params.self_condition
    net = trained.build()
    assert net.latent and net.denoiser.extra_channels == params.latent_dim + 1
    assert net.acn.components == 2  # the mixture prior survives model.pt

    import subprocess
    import sys

    probe = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks/ambiguity_probe.py"), "--cases", "8",
         "--aligned", str(kedro_project / "data/03_primary/aligned")],
        env={**__import__("os").environ, "CIMD_PROJECT_DIR": str(kedro_project)}, capture_output=True, text=True,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "cimd_latent model" in probe.stdout
    import pandas as pd

    table = pd.read_csv(kedro_project / "data/08_reporting/ambiguity_probe.csv").set_index("encoders")
    trained_row = table.loc["trained"]
    assert trained_row["grad_share"] == 0.0  # the KL does not depend on the UNet in this variant
    assert 0.0 < trained_row["amn_kl_fraction"] < 1.0  # both the diffusion loss and the KL train the AMN
    assert trained_row["rater_shift"] > 0.0 and trained_row["kl"] > 0.0
