"""Closed forms, parameterisations and the hybrid loss of `GaussianDiffusion`."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cimd_pipeline.diffusion.schedule import (
    GaussianDiffusion,
    PredictionType,
    extract,
    linear_betas,
    schedule_problems,
)

BETAS = linear_betas()
SHAPE = (4, 1, 8, 8)


def _alpha_bar(t: int) -> float:
    """abar_t from the betas by an independent float64 product."""
    return math.prod(1.0 - b for b in BETAS[: t + 1])


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, 2, SHAPE, generator=gen).float() * 2 - 1
    noise = torch.randn(SHAPE, generator=gen)
    return x0, noise


def test_linear_betas_endpoints_and_scaling():
    assert BETAS.dtype == np.float64 and BETAS.shape == (1000,)
    assert BETAS[0] == pytest.approx(1e-4) and BETAS[-1] == pytest.approx(0.02)
    short = linear_betas(500)
    assert short[0] == pytest.approx(2e-4) and short[-1] == pytest.approx(0.04)


def test_extract_broadcasts_float32_per_sample():
    t = torch.tensor([0, 999, 5, 5])
    out = extract(BETAS, t, SHAPE)
    assert out.shape == SHAPE and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 3, 2], torch.tensor(BETAS[[0, 999, 5, 5]]).float())


class _TensorsMade(TorchDispatchMode):
    """Records (op, device type, dtype) of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.made.append((str(func), x.device.type, x.dtype))
        return out


def test_extract_makes_no_float64_tensor_off_the_cpu():
    """MPS has no float64: the lookup must cast on the CPU. The meta device stands in for any
    accelerator, so this runs (and fails for a device-side float64 table) on every machine."""
    t = torch.tensor([0, 999, 5], device="meta")
    with _TensorsMade() as record:
        out = extract(BETAS, t, (3, 1, 4, 4))
    assert out.device.type == "meta" and out.dtype == torch.float32
    off_cpu = [(op, dtype) for op, device, dtype in record.made if device != "cpu"]
    assert off_cpu and all(dtype != torch.float64 for _, dtype in off_cpu), off_cpu


@pytest.mark.parametrize("t", [0, 10, 500, 999])
def test_q_sample_mean_and_std_follow_alpha_bar(t):
    diffusion = GaussianDiffusion(BETAS)
    x0, noise = _data()
    tt = torch.full((SHAPE[0],), t)
    abar = _alpha_bar(t)
    torch.testing.assert_close(
        diffusion.q_sample(x0, tt, torch.zeros_like(noise)), math.sqrt(abar) * x0
    )
    torch.testing.assert_close(
        diffusion.q_sample(torch.zeros_like(x0), tt, noise), math.sqrt(1 - abar) * noise
    )


@pytest.mark.parametrize("t", [1, 2, 100, 999])
def test_posterior_matches_bayes_rule(t):
    """q(x_{t-1}|x_t,x0) from conditioning q(x_{t-1}|x0) on q(x_t|x_{t-1}), in float64."""
    diffusion = GaussianDiffusion(BETAS)
    x0, noise = _data(1)
    tt = torch.full((SHAPE[0],), t)
    x_t = diffusion.q_sample(x0, tt, noise)
    beta, abar_prev = BETAS[t], _alpha_bar(t - 1)
    precision = 1.0 / (1.0 - abar_prev) + (1.0 - beta) / beta
    var = 1.0 / precision
    mean = var * (
        math.sqrt(abar_prev) * x0.double() / (1.0 - abar_prev)
        + math.sqrt(1.0 - beta) * x_t.double() / beta
    )
    got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(x0, x_t, tt)
    torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_var, torch.full(SHAPE, var, dtype=torch.float32))
    torch.testing.assert_close(got_log_var, torch.full(SHAPE, math.log(var), dtype=torch.float32))


def test_posterior_at_t0_is_the_data():
    diffusion = GaussianDiffusion(BETAS)
    x0, noise = _data()
    t = torch.zeros(SHAPE[0], dtype=torch.long)
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, diffusion.q_sample(x0, t, noise), t)
    torch.testing.assert_close(mean, x0)
    assert torch.all(var == 0)


@pytest.mark.parametrize("prediction_type", list(PredictionType))
def test_target_predict_x0_round_trip(prediction_type):
    diffusion = GaussianDiffusion(BETAS, prediction_type=prediction_type)
    x0, noise = _data()
    t = torch.tensor([0, 3, 400, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.target(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0(x_t, t, target), x0, rtol=0, atol=2e-4)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), noise,
                               rtol=0, atol=2e-4)


def test_v_target_definition():
    diffusion = GaussianDiffusion(BETAS, prediction_type="v")
    x0, noise = _data()
    t = torch.full((SHAPE[0],), 300)
    abar = _alpha_bar(300)
    expected = math.sqrt(abar) * noise - math.sqrt(1 - abar) * x0
    torch.testing.assert_close(diffusion.target(x0, noise, t), expected)


def test_variance_interpolation_and_fixed_large():
    learned = GaussianDiffusion(BETAS)
    fixed = GaussianDiffusion(BETAS, learn_sigma=False)
    t = torch.tensor([0, 1, 500, 999])
    ones = torch.ones(SHAPE)
    post_var_1 = BETAS[1] * (1 - _alpha_bar(0)) / (1 - _alpha_bar(1))
    post_log = np.log([post_var_1] + [
        BETAS[s] * (1 - _alpha_bar(s - 1)) / (1 - _alpha_bar(s)) for s in (1, 500, 999)
    ])
    large_log = np.log([post_var_1, BETAS[1], BETAS[500], BETAS[999]])
    torch.testing.assert_close(learned.model_log_variance(-ones, t, SHAPE)[:, 0, 0, 0],
                               torch.tensor(post_log).float())
    torch.testing.assert_close(learned.model_log_variance(ones, t, SHAPE)[:, 0, 0, 0],
                               torch.tensor(np.log(BETAS[[0, 1, 500, 999]])).float())
    torch.testing.assert_close(fixed.model_log_variance(None, t, SHAPE)[:, 0, 0, 0],
                               torch.tensor(large_log).float())


def test_split_output():
    out = torch.randn(2, 4, 3, 3)
    prediction, var_values = GaussianDiffusion(BETAS).split_output(out)
    assert torch.equal(prediction, out[:, :2]) and torch.equal(var_values, out[:, 2:])
    prediction, var_values = GaussianDiffusion(BETAS, learn_sigma=False).split_output(out)
    assert prediction is out and var_values is None
    with pytest.raises(ValueError):
        GaussianDiffusion(BETAS).split_output(torch.randn(2, 3, 3, 3))


def _exact_output(diffusion, x0, x_t, t, noise, var_value=-1.0, offset=0.0):
    """Model output whose x0 estimate is x0 + offset, with a constant variance value."""
    x0_hat = x0 + offset
    if diffusion.prediction_type is PredictionType.X0:
        prediction = x0_hat
    else:
        prediction = diffusion.predict_eps_from_x0(x_t, t, x0_hat)
    return torch.cat([prediction, torch.full_like(prediction, var_value)], dim=1)


def test_vlb_is_zero_for_the_true_posterior():
    diffusion = GaussianDiffusion(BETAS)
    x0, noise = _data()
    t = torch.tensor([1, 50, 500, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.training_losses(
        _exact_output(diffusion, x0, x_t, t, noise), x0, x_t, t, noise
    )
    torch.testing.assert_close(out["vlb"], torch.zeros(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(out["mse"], torch.zeros(4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("var_value", [-1.0, 1.0])
def test_vlb_matches_closed_form_kl(var_value):
    diffusion = GaussianDiffusion(BETAS, prediction_type="x0")
    x0, noise = _data()
    steps = [1, 20, 300, 800]
    t = torch.tensor(steps)
    x_t = diffusion.q_sample(x0, t, noise)
    delta = 0.05
    model_out = _exact_output(diffusion, x0, x_t, t, noise, var_value, offset=delta)
    vlb = diffusion.training_losses(model_out, x0, x_t, t, noise)["vlb"]
    expected = []
    for s in steps:
        abar, abar_prev, beta = _alpha_bar(s), _alpha_bar(s - 1), BETAS[s]
        post_var = beta * (1 - abar_prev) / (1 - abar)
        model_var = post_var if var_value < 0 else beta
        mean_offset = math.sqrt(abar_prev) * beta / (1 - abar) * delta
        kl = 0.5 * (-1 + math.log(model_var / post_var) + post_var / model_var
                    + mean_offset**2 / model_var)
        expected.append(kl / math.log(2))
    torch.testing.assert_close(vlb.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-3, atol=1e-6)


def test_vlb_at_t0_is_discretized_decoder_nll():
    diffusion = GaussianDiffusion(BETAS, prediction_type="x0")
    x0, noise = _data()
    t = torch.zeros(SHAPE[0], dtype=torch.long)
    x_t = diffusion.q_sample(x0, t, noise)
    model_out = torch.cat([x0 * 0.99, torch.zeros_like(x0)], dim=1)
    vlb = diffusion.training_losses(model_out, x0, x_t, t, noise)["vlb"]
    post_var_1 = BETAS[1] * (1 - _alpha_bar(0)) / (1 - _alpha_bar(1))  # clipped t=0 variance
    std = math.exp(0.5 * (0.5 * math.log(BETAS[0]) + 0.5 * math.log(post_var_1)))  # v = 0
    mean = 0.99 * x0.double().numpy()
    x = x0.double().numpy()
    prob = np.where(x > 0, stats.norm.sf(1 - 1 / 255, mean, std),
                    stats.norm.cdf(-1 + 1 / 255, mean, std))
    expected = -np.log2(prob).reshape(SHAPE[0], -1).mean(axis=1)
    np.testing.assert_allclose(vlb.numpy(), expected, rtol=1e-3)


def test_vlb_trains_only_the_variance_and_pred_x0_is_differentiable():
    diffusion = GaussianDiffusion(BETAS)
    x0, noise = _data()
    t = torch.tensor([0, 1, 200, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    model_out = torch.randn(SHAPE[0], 2, *SHAPE[2:], requires_grad=True)
    out = diffusion.training_losses(model_out, x0, x_t, t, noise)
    (grad_vlb,) = torch.autograd.grad(out["vlb"].sum(), model_out, retain_graph=True)
    assert torch.all(grad_vlb[:, :1] == 0)
    assert torch.all(grad_vlb[:, 1:].abs().sum(dim=(1, 2, 3)) > 0)
    (grad_x0,) = torch.autograd.grad(out["pred_x0"].sum(), model_out, retain_graph=True)
    assert torch.all(grad_x0[:, :1] != 0) and torch.all(grad_x0[:, 1:] == 0)
    torch.testing.assert_close(out["loss"], out["mse"] + out["vlb"])  # 0.001 * T = 1


def test_pred_x0_is_unclipped_and_loss_without_learned_sigma_is_mse():
    diffusion = GaussianDiffusion(BETAS, prediction_type="x0", learn_sigma=False)
    x0, noise = _data()
    t = torch.full((SHAPE[0],), 10)
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.training_losses(3.0 * x0, x0, x_t, t, noise)
    assert out["pred_x0"].abs().max() == pytest.approx(3.0)
    torch.testing.assert_close(out["loss"], out["mse"])
    torch.testing.assert_close(out["mse"], torch.full((SHAPE[0],), 4.0))
    assert torch.all(out["vlb"] > 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"betas": np.zeros(10)},
        {"betas": np.full(10, 1.5)},
        {"betas": np.full((2, 5), 0.01)},
        {"betas": np.array([0.01])},
        {"betas": np.full(10, 0.01), "prediction_type": "score"},
        {"betas": np.full(10, 0.01), "timestep_map": np.arange(9)},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        GaussianDiffusion(**kwargs)


@pytest.mark.parametrize(
    ("args", "problems"),
    [
        (("linear", 1000), []),
        (("cosine", 1000), []),
        (("cosine", 2), []),
        (("linear", 21), []),  # beta_T = 0.02 * 1000 / 21 < 1
        (("linear", 1), ["num_timesteps=1: a schedule needs at least 2 steps"]),
        (("cosine", 0), ["num_timesteps=0: a schedule needs at least 2 steps"]),
        (("linear", 20), ["the linear schedule over 20 steps runs from beta=0.005 to beta=1; every beta must lie "
                          "in (0, 1); use more steps or beta_end below 0.02 (ends are scaled by 1000/T)"]),
        (("linear", 1000, 0.02, 0.001), ["the linear schedule must increase with t (beta_start=0.02, beta_end=0.001)"]),
        (("linear", 1000, 0.01, 0.01), ["the linear schedule must increase with t (beta_start=0.01, beta_end=0.01)"]),
        (("linear", 1000, 0.0, 0.02), ["the linear schedule over 1000 steps runs from beta=0 to beta=0.02; every "
                                       "beta must lie in (0, 1)"]),
        (("linear", 10, 0.02, 0.001), ["the linear schedule must increase with t (beta_start=0.02, beta_end=0.001)",
                                       "the linear schedule over 10 steps runs from beta=2 to beta=0.1; every beta "
                                       "must lie in (0, 1); use more steps or beta_end below 0.01 (ends are scaled by "
                                       "1000/T)"]),
    ],
)
def test_schedule_problems_say_why_a_schedule_cannot_work(args, problems):
    assert schedule_problems(*args) == problems


@pytest.mark.parametrize("weighting", ["snr_plus_one", "min_snr"])
def test_snr_weighted_losses_make_no_float64_tensor_off_the_cpu(weighting):
    """The SNR table of the weighted losses goes through the same float32 lookup as `extract`."""
    diffusion = GaussianDiffusion(BETAS, "x0", learn_sigma=True, input_scale=0.5, loss_weighting=weighting)
    t = torch.tensor([0, 999, 5, 400], device="meta")
    x0, x_t, noise = (torch.empty(SHAPE, device="meta") for _ in range(3))
    model_out = torch.empty(SHAPE[0], 2, *SHAPE[2:], device="meta")
    with _TensorsMade() as record:
        terms = diffusion.training_losses(model_out, x0, x_t, t, noise)
    assert terms["loss"].device.type == "meta" and terms["loss"].dtype == torch.float32
    off_cpu = [(op, dtype) for op, device, dtype in record.made if device != "cpu"]
    assert off_cpu and all(dtype != torch.float64 for _, dtype in off_cpu), off_cpu
