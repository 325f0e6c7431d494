"""The recipe switches inside CIMD: scaling round trip, tanh, self-conditioning, model.pt and resume."""

import pytest
import torch

from cimd_pipeline.config import ModelParams, SamplingParams, validate_parameters
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel
from tests.models.test_cimd import TINY_UNET, batch


def recipe(**switches) -> ModelParams:
    return ModelParams.model_validate(
        {"variant": "ddpm_prob", "unet": TINY_UNET, "ambiguity_nets": {"filters": [8, 8, 8, 8]}, **switches}
    )


class OracleDenoiser(torch.nn.Module):
    """Predicts the given clean mask (x0 target, mask units) and a zero variance value."""

    def __init__(self, mask: torch.Tensor, extra_channels: int = 0) -> None:
        super().__init__()
        self.mask, self.extra_channels, self.calls = mask, extra_channels, []

    def forward(self, x_t, image, t, extra=None):
        self.calls.append(None if extra is None else extra.clone())
        return torch.cat([self.mask, torch.zeros_like(self.mask)], dim=1)


@pytest.mark.parametrize(("scale", "method", "schedule"), [
    (1.0, "ddpm", "linear"), (0.1, "ddpm", "cosine"), (0.1, "ddim", "cosine"), (0.3, "ddim", "linear")])
def test_a_perfect_x0_predictor_samples_its_mask_back_in_mask_units(scale, method, schedule):
    net = CIMD(recipe(input_scale=scale, noise_schedule=schedule), image_channels=2)
    image, masks, valid = batch()
    mask = 2.0 * masks[:, :1].float() - 1.0
    net.denoiser = OracleDenoiser(mask)
    out = net.sample(image, SamplingParams(steps=10, method=method), torch.Generator().manual_seed(0))
    assert torch.allclose(out, mask, atol=1e-5)
    # and its training loss vanishes: x0 in mask units is compared with the scaled target / b
    terms = net.losses(image, masks[:, :1], torch.ones(3, 1, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert float(terms["mse"]) < 1e-10


def test_tanh_bounds_the_x0_prediction_by_the_input_scale():
    net = CIMD(recipe(input_scale=0.1, output_activation="tanh"), image_channels=2)
    image, _, _ = batch()
    with torch.no_grad():
        net.denoiser.net.out[-1].conv.bias.fill_(50.0)
    out = net.model_output(torch.zeros(3, 1, 16, 16), image, torch.tensor([0, 5, 9]), None)
    assert torch.allclose(out[:, :1], torch.full((3, 1, 16, 16), 0.1))
    assert torch.allclose(out[:, 1:], torch.full((3, 1, 16, 16), 50.0))  # the variance channel is untouched


def test_tanh_needs_an_x0_prediction():
    with pytest.raises(ConfigError, match="output_activation"):
        validate_parameters({"model": {"prediction_type": "eps", "output_activation": "tanh"}})


def test_self_conditioning_adds_one_input_channel_and_feeds_the_previous_estimate_at_sampling():
    net = CIMD(recipe(self_condition=True), image_channels=2)
    assert net.denoiser.extra_channels == 1 and net.denoiser.net.conv_in.conv.in_channels == 1 + 2 + 1
    image, masks, _ = batch()
    mask = 0.5 * (2.0 * masks[:, :1].float() - 1.0)
    oracle = OracleDenoiser(mask, extra_channels=1)
    net.denoiser = oracle
    net.sample(image, SamplingParams(steps=4, method="ddpm"), torch.Generator().manual_seed(0))
    assert len(oracle.calls) == 4 and torch.equal(oracle.calls[0], torch.zeros(3, 1, 16, 16))
    for later in oracle.calls[1:]:  # the previous step's x0 estimate, in mask units
        assert torch.allclose(later, mask)


def test_self_conditioning_feeds_a_first_pass_estimate_in_about_half_the_training_steps():
    net = CIMD(recipe(self_condition=True), image_channels=2)
    image, masks, valid = batch()
    generator = torch.Generator().manual_seed(0)
    fed = []
    for _ in range(40):
        oracle = OracleDenoiser(torch.full((3, 1, 16, 16), 0.25), extra_channels=1)
        net.denoiser = oracle
        net.losses(image, masks, valid, generator)
        # zeros into the no-grad pass; into the trained one its estimate (heads) or zeros (tails)
        assert len(oracle.calls) == 2 and torch.equal(oracle.calls[0], torch.zeros(3, 1, 16, 16))
        estimate = torch.allclose(oracle.calls[1], torch.full((3, 1, 16, 16), 0.25))
        assert estimate or torch.equal(oracle.calls[1], torch.zeros(3, 1, 16, 16))
        fed.append(estimate)
    assert 10 <= sum(fed) <= 30


def test_the_self_conditioning_coin_comes_from_the_training_generator_alone():
    net = CIMD(recipe(self_condition=True), image_channels=2)
    image, masks, valid = batch()
    fed = {}
    for global_seed in (0, 1, 2):  # torch's global stream must not decide the coin
        torch.manual_seed(global_seed)
        generator = torch.Generator().manual_seed(5)
        seen = []
        for _ in range(12):
            oracle = OracleDenoiser(torch.full((3, 1, 16, 16), 0.25), extra_channels=1)
            net.denoiser = oracle
            net.losses(image, masks, valid, generator)
            seen.append(not torch.equal(oracle.calls[1], torch.zeros(3, 1, 16, 16)))
        fed[global_seed] = seen
    assert fed[0] == fed[1] == fed[2] and 0 < sum(fed[0]) < 12


def test_the_recipe_travels_in_model_pt_and_rebuilds_the_same_sampler():
    params = recipe(noise_schedule="cosine", input_scale=0.1, loss_weighting="snr_plus_one",
                    output_activation="tanh", self_condition=True)
    torch.manual_seed(0)
    net = CIMD(params, image_channels=2)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    trained = TrainedModel(params.model_dump(mode="json"), 2, (16, 16), {}, net.state_dict())
    rebuilt = TrainedModel.from_dict(trained.to_dict()).build()
    assert rebuilt.params == params and rebuilt.diffusion.input_scale == 0.1
    image = batch()[0]
    settings = SamplingParams(steps=5, method="ddpm")
    a = net.eval().sample(image, settings, torch.Generator().manual_seed(4))
    b = rebuilt.sample(image, settings, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.abs().max() <= 1.0


def test_self_conditioned_cosine_training_resumes_to_exactly_the_uninterrupted_weights(tmp_path):
    from cimd_pipeline.training.loop import train
    from tests.training.test_loop import data as _data_fixture
    from tests.training.test_loop import params as training

    data = _data_fixture.__wrapped__()
    model = recipe(variant="cimd_aa", noise_schedule="cosine", input_scale=0.1, loss_weighting="min_snr",
                   output_activation="tanh", self_condition=True)

    def fresh():
        torch.manual_seed(0)
        return CIMD(model, image_channels=1)

    full = train(fresh(), data, training(), tmp_path / "a" / "last.pt", "fp")
    train(fresh(), data, training(max_steps=3), tmp_path / "b" / "last.pt", "fp")
    resumed = train(fresh(), data, training(), tmp_path / "b" / "last.pt", "fp")
    assert resumed.resumed_from == 3
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
