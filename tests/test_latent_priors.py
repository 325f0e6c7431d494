"""benchmarks/latent_priors.py: the priors a ``cimd_latent`` denoiser can draw its codes from."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.distributions import Independent, MixtureSameFamily, Normal

from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.models.ambiguity import draw
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel
from tests.conftest import PROJECT
from tests.models.test_cimd import tiny
from tests.test_benchmarks import project, run_script  # noqa: F401 (project: a fixture)


@pytest.fixture
def priors(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "benchmarks"))
    import latent_priors

    return latent_priors


def small_set(cases: int = 12, size: int = 16, seed: int = 0) -> AlignedSet:
    """Random images whose four raters draw nested squares, a third of the cases per split, one
    missing rater in the first case of each split."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((cases, 4, size, size), dtype=np.uint8)
    for rater in range(4):
        masks[:, rater, 4 - rater:12 + rater, 4 - rater:12 + rater] = 1
    valid = np.ones((cases, 4), dtype=bool)
    valid[:: cases // 3, 3] = False
    split = np.repeat(["train", "val", "test"], cases // 3)
    frame = pd.DataFrame({"case_id": [f"c{i}" for i in range(cases)], "group_id": np.arange(cases), "split": split})
    return AlignedSet(rng.normal(size=(cases, 1, size, size)).astype(np.float32), masks, valid, frame)


def latent_net(components: int = 2, seed: int = 0) -> CIMD:
    torch.manual_seed(seed)
    return CIMD(tiny("cimd_latent", prior_components=components), image_channels=1).eval()


class MaskShare(torch.nn.Module):
    """A posterior whose mean is (mean of the mask channel, first image pixel) and whose σ is 0.1."""

    def forward(self, x):
        mean = torch.stack([x[:, 1].mean((1, 2)), x[:, 0, 0, 0]], dim=1)
        return Independent(Normal(mean, torch.full_like(mean, 0.1)), 1)


def test_posterior_codes_encode_every_valid_rater_s_mask_with_its_own_image(priors):
    data = small_set()
    means, stds, cases = priors.posterior_codes(MaskShare(), data, batch=5)  # batches cut across cases
    pairs = np.argwhere(data.rater_valid)
    assert len(means) == len(pairs) == data.rater_valid.sum() and np.array_equal(cases, pairs[:, 0])
    share = data.masks[pairs[:, 0], pairs[:, 1]].mean((1, 2))
    assert np.allclose(means[:, 0].numpy(), 2 * share - 1)  # the mask in [-1, 1], as in training and np.allclose(means[:, 1].numpy(), data.images[cases, 0, 0, 0])
    assert torch.all(stds == 0.1)


def test_training_codes_are_one_equal_mixture_of_the_posteriors_whatever_the_image(priors):
    codes = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-3.0, -3.0]])
    prior = priors.TrainingCodes(codes, torch.full_like(codes, 1e-3))
    first, second = prior(torch.zeros(400, 1, 4, 4)), prior(torch.randn(400, 1, 4, 4))
    at_codes = first.log_prob(codes.repeat(134, 1)[:400])
    assert torch.allclose(at_codes, second.log_prob(codes.repeat(134, 1)[:400]))
    peak = math.log(1 / 3) - 2 * math.log(1e-3 * math.sqrt(2 * math.pi))  # one component at its mean
    assert torch.allclose(at_codes, torch.full_like(at_codes, peak), atol=1e-3)
    z = draw(first, torch.Generator().manual_seed(0))
    nearest = torch.cdist(z, codes).min(dim=1)
    assert nearest.values.max() < 0.01  # every draw is one of the codes
    counts = torch.bincount(nearest.indices, minlength=3)
    assert counts.min() > 100  # and each is drawn about a third of the time


def test_the_mixture_s_fast_likelihood_is_the_generic_one(priors):
    generator = torch.Generator().manual_seed(0)
    means = 2 * torch.randn(300, 6, generator=generator)
    stds = torch.rand(300, 6, generator=generator) + 0.05
    mixture = priors.TrainingCodes(means, stds)(torch.zeros(40, 1, 4, 4))
    z = 2 * torch.randn(40, 6, generator=generator)
    generic = MixtureSameFamily.log_prob(mixture, z)
    assert torch.allclose(mixture.log_prob(z), generic, atol=1e-4) and generic.std() > 1  # distinct values


def test_code_nll_is_the_mean_negative_log_likelihood_of_the_posterior_means(priors):
    data, net = small_set(), latent_net()
    means, _, cases = priors.posterior_codes(net.amn, data)
    with torch.no_grad():
        want = -net.acn(torch.from_numpy(data.images[cases])).log_prob(means).mean()
    assert priors.code_nll(net.acn, data, (means, _, cases), batch=7) == pytest.approx(float(want), rel=1e-5)


def test_refit_fits_the_prior_to_the_training_codes_and_leaves_the_model_s_own_untouched(priors):
    data, net = small_set(), latent_net()
    train = data.subset("train")
    codes = priors.posterior_codes(net.amn, train)
    before = {k: v.clone() for k, v in net.acn.state_dict().items()}
    refit = priors.refit_prior(net.acn, train, codes, steps=60, seed=0)
    assert priors.code_nll(refit, train, codes) < priors.code_nll(net.acn, train, codes) - 0.5
    assert all(torch.equal(before[k], v) for k, v in net.acn.state_dict().items())
    assert not any(p.requires_grad for p in refit.parameters()) and not refit.training
    again = priors.refit_prior(net.acn, train, codes, steps=60, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(refit.state_dict().values(), again.state_dict().values()))


def test_refit_early_returns_the_prior_of_the_best_validation_check(priors, monkeypatch):
    data, net = small_set(), latent_net()
    checks, plain = [], priors.code_nll

    def recorded(prior, split, codes, batch=256):
        value = plain(prior, split, codes, batch)
        checks.append(value)
        return value

    monkeypatch.setattr(priors, "CHECK_EVERY", 5)
    monkeypatch.setattr(priors, "PATIENCE", 3)
    monkeypatch.setattr(priors, "code_nll", recorded)
    train, val = data.subset("train"), data.subset("val")
    val_codes = priors.posterior_codes(net.amn, val)
    refit = priors.refit_prior(net.acn, train, priors.posterior_codes(net.amn, train), steps=400, seed=1,
                               val=val, val_codes=val_codes, lr=0.05)
    best = int(np.argmin(checks))
    assert len(checks) == best + 1 + 3 < 400 // 5  # stopped three checks after the best
    assert plain(refit, val, val_codes) == pytest.approx(checks[best])


def test_latent_priors_tabulates_every_prior_for_each_seed(priors, project, tmp_path):  # noqa: F811
    for seed in (0, 1):
        net = latent_net(seed=seed)
        TrainedModel(net.params.model_dump(mode="json"), 1, (16, 16), {}, net.state_dict()).save(
            tmp_path / f"latent-{seed}.pt")
    out = tmp_path / "priors.csv"
    run_script(project, "latent_priors.py", "--env", "test", "--model", str(tmp_path / "latent-{seed}.pt"),
               "--seeds", "0", "1", "--cases", "2", "--samples", "2", "--sampler", "ddim2", "--refit-steps", "3",
               "--out", str(out))
    table = pd.read_csv(out)
    assert list(table["prior"]) == list(priors.PRIORS) * 2 and list(table["seed"]) == [0] * 5 + [1] * 5
    assert table[["ged", "hm_iou", "ged_oracle", "diversity_samples"]].notna().all().all()
    assert table.loc[table["prior"] == "posterior", ["nll_train", "nll_test"]].isna().all().all()
    assert table.loc[table["prior"] != "posterior", ["nll_train", "nll_test"]].notna().all().all()
    summary = pd.read_csv(tmp_path / "priors_summary.csv").set_index("prior")
    assert (summary["seeds"] == 2).all()
    learned = table[table["prior"] == "learned"]
    assert summary.loc["learned", "ged"] == pytest.approx(learned["ged"].mean())


def test_a_model_without_a_latent_is_refused(priors, tmp_path):
    net = CIMD(tiny("cimd_aa"), image_channels=1)
    path = tmp_path / "aa.pt"
    TrainedModel(net.params.model_dump(mode="json"), 1, (16, 16), {}, net.state_dict()).save(path)
    args = argparse.Namespace(model=str(path), cases=2, priors=["learned"])
    with pytest.raises(SystemExit, match="need a cimd_latent model, got cimd_aa"):
        priors.run_seed(args, 0, small_set())
