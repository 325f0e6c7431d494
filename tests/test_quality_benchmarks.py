"""The recipe benchmarks: quality_sweep (resumable, staged budgets) and x0_error (per-t x0_hat error)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from cimd_pipeline.models.cimd import CIMD
from tests.conftest import PROJECT, make_project_copy
from tests.models.test_cimd import batch, tiny
from tests.test_benchmarks import run_script


@pytest.fixture
def x0_error(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "benchmarks"))
    import x0_error

    return x0_error


def test_bucket_edges_cover_the_schedule_log_spaced(x0_error):
    edges = x0_error.bucket_edges(1000, 10)
    assert edges[0] == 0 and edges[-1] == 1000 and (edges[1:] > edges[:-1]).all()
    assert edges[1] - edges[0] < edges[-1] - edges[-2]  # finer at small t


class Constant(torch.nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x_t, image, t, extra=None):
        return torch.cat([self.value[: len(x_t)], torch.zeros_like(self.value[: len(x_t)])], 1)


def test_x0_error_is_zero_for_a_perfect_predictor_and_one_for_zeros(x0_error):
    image, masks, valid = batch()
    valid = torch.zeros_like(valid)
    valid[:, 0] = True  # rater 0 is the target
    net = CIMD(tiny("ddpm_prob").model_copy(update={"input_scale": 0.1}), image_channels=2)
    net.denoiser = Constant(2.0 * masks[:, :1].float() - 1.0)
    perfect = x0_error.x0_errors(net, image, masks, valid, buckets=4, per_bucket=2, seed=0)
    assert len(perfect) == 4 and (perfect["x0_mse"] < 1e-10).all() and (perfect["wrong_pixels"] == 0).all()
    net.denoiser = Constant(torch.zeros(3, 1, 16, 16))
    blind = x0_error.x0_errors(net, image, masks, valid, buckets=4, per_bucket=2, seed=0)
    assert torch.allclose(torch.tensor(blind["x0_mse"].to_numpy()), torch.ones(4, dtype=torch.float64))
    assert blind["wrong_pixels"].iloc[0] == pytest.approx(float((masks[:, 0] > 0).float().mean()))


@pytest.mark.slow
def test_quality_sweep_trains_in_stages_resumes_and_reports(tmp_path):
    project = make_project_copy(tmp_path / "project")
    out = tmp_path / "sweep"
    args = ("--env", "test", "--configs", "default", "literature", "--steps", "2", "4", "--samplers", "ddim3",
            "--final-samplers", "ddpm3@2", "--jobs", "1", "--out", str(out))
    run_script(project, "quality_sweep.py", *args)
    rows = pd.read_csv(out / "quality_sweep.csv")
    assert len(rows) == 2 * 3 and set(rows["config"]) == {"default", "literature"}
    assert sorted(rows.loc[rows["sampler"] == "ddim3", "train_steps"]) == [2, 2, 4, 4]
    assert set(rows.loc[rows["sampler"] == "ddpm3@2", "test_cases"]) == {2}
    assert rows["ged"].between(0, 2).all() and (rows["ged_oracle"] > 0).all()
    terms = 2 * rows["ged_cross"] - rows["diversity_samples"] - rows["diversity_raters"]
    assert (terms - rows["ged"]).abs().max() < 1e-9  # GED's three terms come with it
    families = [c.removeprefix("ged_oracle_") for c in rows.columns if c.startswith("ged_oracle_")]
    full = rows[rows["sampler"] == "ddim3"]  # every test case, so every family of the split
    assert families and all(full[f"ged_{f}"].between(0, 2).all() for f in families)  # where the gap is, per family
    # x0_error without --aligned rebuilds the sweep's data from the same environment's config
    run_script(project, "x0_error.py", str(out / "models" / "default-0-4.pt"), "--env", "test", "--buckets", "2",
               "--per-bucket", "1", "--out", str(tmp_path / "x0"))
    errors = pd.read_csv(tmp_path / "x0" / "x0_error.csv")
    assert len(errors) == 2 and errors["x0_mse"].between(0, 4).all()
    from cimd_pipeline.io.model_dataset import TrainedModelDataset

    later = TrainedModelDataset(str(out / "models" / "literature-0-4.pt")).load()
    assert later.info["resumed_from"] == 2 and later.params.input_scale == 0.1  # continued, not retrained
    assert (out / "quality_sweep.png").stat().st_size > 0
    before = {p: p.stat().st_mtime for p in (out / "rows").glob("*.csv")}
    log = run_script(project, "quality_sweep.py", *args)
    assert "0 runs to do" in log
    assert {p: p.stat().st_mtime for p in (out / "rows").glob("*.csv")} == before


def test_workers_run_every_job_and_a_failure_stops_after_the_others(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "benchmarks"))
    from _workers import run_workers, stop_if_failed

    done = []

    def launch(job):
        done.append(job)
        return f"FAILED {job}" if job % 2 else f"done {job}"

    failed = run_workers(range(5), launch, 2)
    assert sorted(done) == [0, 1, 2, 3, 4] and sorted(failed) == ["FAILED 1", "FAILED 3"]
    stop_if_failed([], 5)
    with pytest.raises(SystemExit, match="2 of 5 runs failed; rerun the same command to retry them"):
        stop_if_failed(failed, 5)


class ReadsZ(torch.nn.Module):
    """A denoiser whose x0 is +1 everywhere when the first latent value is positive, else -1."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, x_t, image, t, extra=None):
        first = extra[:, -self.latent_dim]
        x0 = torch.where(first > 0, 5.0, -5.0)[:, None]
        return torch.cat([x0, torch.zeros_like(x0)], 1)


@pytest.fixture
def ambiguity_probe(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT / "benchmarks"))
    import ambiguity_probe

    return ambiguity_probe


def test_z_flip_counts_the_pixels_the_latent_decides(ambiguity_probe):
    image, masks, valid = batch()
    net = CIMD(tiny("cimd_latent"), image_channels=2)
    k = net.params.latent_dim
    pairs = valid[:, 0] & valid[:, 1]
    apart = torch.zeros(len(image), masks.shape[1], k)
    apart[:, 0, 0], apart[:, 1, 0] = 1.0, -1.0  # the two raters' posterior means on either side of 0
    net.denoiser = ReadsZ(k)
    reads = ambiguity_probe.z_effect(net, image, masks, apart, pairs, seed=0)
    assert reads["z_flip"] == 1.0
    want = (masks[pairs, 0] != masks[pairs, 1]).float().mean().item()
    assert reads["rater_disagreement"] == pytest.approx(want) and 0 < want < 1
    same = ambiguity_probe.z_effect(net, image, masks, apart[:, [0, 0]], pairs, seed=0)
    assert same["z_flip"] == 0.0  # the same z for both raters: nothing to flip
    net.denoiser = Constant(torch.full((3, 1, 16, 16), 5.0))
    assert ambiguity_probe.z_effect(net, image, masks, apart, pairs, seed=0)["z_flip"] == 0.0  # blind to z
    plain = CIMD(tiny("cimd_aa"), image_channels=2)
    assert math.isnan(ambiguity_probe.z_effect(plain, image, masks, apart, pairs, seed=0)["z_flip"])
