"""SNR loss weights: the Min-SNR clamp under input scaling, and the refused eps + (1 + SNR) pair."""

import pytest
import torch

from cimd_pipeline.config import validate_parameters
from cimd_pipeline.diffusion import (
    GaussianDiffusion,
    cosine_betas,
    weighting_problems,
    x0_loss_weights,
)
from cimd_pipeline.errors import ConfigError


def test_min_snr_clamps_the_snr_of_the_scaled_mask():
    snr = torch.tensor([1.0, 100.0, 500.0, 1e4])
    # b = 0.1: the scaled mask's SNR is 0.01 * SNR(t) = [0.01, 1, 5, 100], clamped at 5
    weights = x0_loss_weights("min_snr", snr, gamma=5.0, input_scale=0.1)
    assert torch.allclose(weights, torch.tensor([0.01, 1.0, 5.0, 5.0]))
    # the (1 + SNR) weights are the v-loss of the scaled process over b^2: b does not enter
    assert torch.allclose(x0_loss_weights("snr_plus_one", snr, input_scale=0.1), 1.0 + snr)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["simple", "snr_plus_one", "min_snr"])
def test_only_eps_with_snr_plus_one_is_refused(prediction_type, weighting):
    refused = prediction_type == "eps" and weighting == "snr_plus_one"
    problems = weighting_problems(prediction_type, weighting)
    assert bool(problems) == refused
    if refused:
        assert "1 + 1/SNR" in problems[0] and "predict v or x0" in problems[0]
        with pytest.raises(ValueError, match="snr_plus_one"):
            GaussianDiffusion(cosine_betas(100), prediction_type, loss_weighting=weighting)
    else:
        GaussianDiffusion(cosine_betas(100), prediction_type, loss_weighting=weighting)


def test_the_config_refuses_eps_with_snr_plus_one_before_any_work():
    with pytest.raises(ConfigError, match=r"model: .*snr_plus_one.*prediction_type='eps'"):
        validate_parameters({"model": {"prediction_type": "eps", "loss_weighting": "snr_plus_one"}})
    validate_parameters({"model": {"prediction_type": "v", "loss_weighting": "snr_plus_one"}})
