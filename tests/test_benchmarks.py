"""The benchmark scripts a user runs directly: ablation (and its --summarise), step sweep, probe, method comparison."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from cimd_pipeline.diffusion.noise import RowGenerators
from cimd_pipeline.models.trained import TrainedModel
from tests.conftest import PROJECT, load_benchmark, make_project_copy


def run_script(project: Path, name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a benchmark script on ``project``; its stdout and stderr (the scripts log to stderr)."""
    env = {**os.environ, "CIMD_PROJECT_DIR": str(project), "KEDRO_DISABLE_TELEMETRY": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / name), *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project_copy(tmp_path_factory.mktemp("bench") / "project")


def test_ablation_runs_each_variant_and_combines_streams(project):
    run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "ddpm_det", "cimd_aa",
               "--extra", "sampling.max_cases=2")
    report = project / "data/08_reporting"
    table = pd.read_csv(report / "ablation.csv")
    assert list(table["variant"]) == ["ddpm_det", "cimd_aa"] and set(table["seed"]) == {0}
    assert table[["ged", "hm_iou", "ged_oracle", "train_seconds"]].notna().all().all()
    assert (report / "ablation.png").stat().st_size > 0
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"], filter_string="tags.ablation LIKE 'ablation-%'")
    assert sorted(runs["tags.variant"]) == ["cimd_aa", "ddpm_det"]
    assert set(runs["run_id"]) == set(table["run_id"])

    # a second stream's rows (another seed) combined without training
    other = table.assign(seed=1, ged=table["ged"] + 0.1)
    first, second = project / "a.csv", project / "b.csv"
    table.to_csv(first, index=False)
    other.to_csv(second, index=False)
    run_script(project, "ablation.py", "--summarise", str(second), str(first))
    combined = pd.read_csv(report / "ablation.csv")
    assert list(combined["variant"]) == ["cimd_aa", "cimd_aa", "ddpm_det", "ddpm_det"]  # VARIANTS order
    assert list(combined["seed"]) == [0, 1, 0, 1]
    markdown = (report / "ablation.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ddpm_det |"))
    mean = table.loc[table["variant"] == "ddpm_det", "ged"].iloc[0] + 0.05
    assert row.startswith(f"| ddpm_det | 2 | {mean:.3f} ± 0.071 |")  # std of {g, g + 0.1}


def test_step_sweep_tabulates_and_logs(project):
    if not (project / "data/06_models/model.pt").exists():
        run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "cimd_aa")
    run_script(project, "step_sweep.py", "--env", "test", "--steps", "4", "2", "--methods", "ddim",
               "--max-cases", "2")
    sweep = pd.read_csv(project / "data/08_reporting/step_sweep.csv")
    assert list(sweep["steps"]) == [4, 2] and (sweep["masks_per_second"] > 0).all()
    assert (sweep["test_cases"] == 2).all()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["cimd_pipeline"], filter_string="tags.sweep = 'sampling_steps'"
                             " and attributes.run_name = 'step_sweep'")
    assert len(run) == 1
    history = mlflow.MlflowClient().get_metric_history(run["run_id"].iloc[0], "sweep.ddim.ged")
    assert sorted(m.step for m in history) == [2, 4]


def test_ambiguity_probe_measures_the_encoders(project):
    """The probe reads the last (cimd_aa) model; larger initial heads must show a larger KL."""
    model = project / "data/06_models/model.pt"
    if not model.exists():
        run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "cimd_aa")
    out = run_script(project, "ambiguity_probe.py", "--cases", "8")
    assert "cimd_aa model" in out
    table = pd.read_csv(project / "data/08_reporting/ambiguity_probe.csv").set_index("encoders")
    assert list(table.columns) == ["kl", "amn_spread", "rater_shift", "grad_share", "amn_kl_fraction", "z_flip",
                                   "rater_disagreement"]
    measured = table.drop(columns=["z_flip", "rater_disagreement"])  # cimd_aa's denoiser has no z to read
    assert (measured >= 0).all().all() and measured.notna().all().all() and table["z_flip"].isna().all()
    assert (table["amn_kl_fraction"] == 1.0).all()  # in cimd_aa only the KL trains the AMN
    small, default = table.loc["fresh, head N(0, 0.01^2)"], table.loc["fresh, PyTorch default init"]
    assert default["kl"] > small["kl"] and default["grad_share"] > small["grad_share"]


def test_method_comparison_runs_the_kedro_chain_without_kedro(project, tmp_path):
    """Both budgets for every seed, equal-time steps from the measured costs, a resumable run,
    and with Kedro and MLflow unimportable (a GPU node's torch-only Python) the same metrics as
    ``kedro run`` for the same variant and seed."""
    hidden = tmp_path / "hidden"
    for package in ("kedro", "kedro_datasets", "kedro_mlflow", "mlflow"):
        (hidden / package).mkdir(parents=True)
        (hidden / package / "__init__.py").write_text(f"raise ImportError('{package} hidden by the test')")
    out = tmp_path / "comparison"
    args = ("--env", "test", "--steps", "3", "--cost-steps", "1", "3", "--seeds", "0", "1", "--variants",
            "ddpm_det", "prob_unet", "--reference", "ddpm_det", "--jobs", "2", "--params",
            "sampling.max_cases=2", "--out", str(out))
    log = run_script(project, "method_comparison.py", *args, env={"PYTHONPATH": str(hidden)})
    assert "6 runs to do" in log
    table = pd.read_csv(out / "method_comparison.csv")
    assert list(zip(table["budget"], table["variant"], table["seed"])) == [
        ("steps", "ddpm_det", 0), ("steps", "ddpm_det", 1), ("steps", "prob_unet", 0), ("steps", "prob_unet", 1),
        ("time", "prob_unet", 0), ("time", "prob_unet", 1)]
    costs = pd.read_csv(out / "costs.csv").set_index("variant")["step_seconds"]
    equal_time = max(1, round(3 * costs["ddpm_det"] / costs["prob_unet"]))
    assert list(table.loc[table["budget"] == "time", "steps"]) == [equal_time, equal_time]
    assert table[["ged", "hm_iou", "dice_max", "ci", "ged_oracle", "train_seconds"]].notna().all().all()
    assert "| steps | ddpm_det | 2 | 3 |" in (out / "method_comparison.md").read_text()
    assert (out / "method_comparison.png").stat().st_size > 0

    assert "0 runs to do" in run_script(project, "method_comparison.py", *args)  # resumes: nothing left

    run_script(project, "ablation.py", "--env", "test", "--steps", "3", "--variants", "ddpm_det",
               "--extra", "sampling.max_cases=2")
    kedro = pd.read_csv(project / "data/08_reporting/ablation.csv").iloc[0]
    direct = table.iloc[0]
    for metric in ("ged", "hm_iou", "dice_max", "ci", "ged_oracle"):
        assert direct[metric] == pytest.approx(kedro[metric], rel=1e-6), metric


def test_lidc_scale_measures_both_data_stages_on_a_written_tree(tmp_path: Path):
    out = run_script(PROJECT, "lidc_scale.py", "--sizes", "30", "--work", str(tmp_path))
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 30 |")]
    assert [r[1].strip() for r in rows] == ["data_ingestion", "mask_alignment"], out
    for row in rows:
        wall, rss = float(row[2]), float(row[3])
        assert 0 < wall < 600 and 0.05 < rss < 1.5, row
    aligned = np.load(tmp_path / "run_30/project/data/03_primary/aligned/masks.npy", mmap_mode="r")
    assert aligned.shape == (30, 4, 128, 128)


def test_sampling_speed_prints_each_change_and_the_profile(project):
    out = run_script(project, "sampling_speed.py", "--size", "16", "--images", "1", "--rounds", "1", "--steps", "2")
    assert "AMN/ACN forward calls while sampling: 0" in out
    rows = [line for line in out.splitlines() if line.startswith(("before:", "+ "))]
    assert [r.split("  ")[0] for r in rows] == [
        "before: 256 rows/batch, MONAI attention, DDIM-10", "+ 16 rows/batch", "+ fused attention (SDPA)",
        "+ channels_last weights", "+ DDIM-2", "+ bfloat16 autocast (sampling.bf16)",
    ]
    rates = [float(r.split()[-4]) for r in rows]
    assert all(rate > 0 for rate in rates)
    assert rates[-2] > rates[-3]  # 2 steps instead of 10 cost less per mask
    assert "convolution" in out and "other (sampler maths, noise, Python)" in out


def test_speed_times_training_of_a_conf_environment_in_fp32_and_bf16_only_when_asked(project):
    out = run_script(project, "speed.py", "--env", "lidc_cpu", "--parts", "b", env={"OMP_NUM_THREADS": "1"})
    assert "UNet [16, 32, 32], image 64x64" in out  # conf/lidc_cpu's size over conf/base's network
    assert "(b) training step, batch 16 at 64x64 on cpu (CPU: training.cpu_bf16)" in out
    cpu = [float(v) for v in re.findall(r"\(([0-9.]+) CPU-s a step", out)]
    assert len(cpu) == 2 and all(v > 0 for v in cpu)
    assert "(a)" not in out and "(c)" not in out and "(d)" not in out


def lidc_fixture_aligned(folder: Path):
    """The LIDC slice fixture ingested and aligned at 64 x 64, every slice a test case, saved to
    ``folder``; returns the aligned set."""
    from cimd_pipeline.io.aligned_dataset import AlignedDataset
    from cimd_pipeline.pipelines.data_ingestion.nodes import ingest_cases
    from cimd_pipeline.pipelines.mask_alignment.nodes import align_dataset

    cases = ingest_cases({"source": "lidc", "root": str(PROJECT / "tests/fixtures/lidc_slices"), "reader": {"layout": "slices"}})
    split = {"train": 0.0, "val": 0.0, "test": 1.0}
    AlignedDataset(str(folder)).save(align_dataset(cases, {"image_size": 64, "split": split}).collect())
    return AlignedDataset(str(folder)).load()


def test_sampler_quality_scores_the_shipped_model_on_an_aligned_tree(project, tmp_path):
    lidc_fixture_aligned(tmp_path / "aligned")
    out = run_script(project, "sampler_quality.py", "--model", str(PROJECT / "models/lidc_cpu_64/model.pt"),
                     "--aligned", str(tmp_path / "aligned"), "--split", "test", "--max-cases", "2",
                     "--samplers", "ddim2", "ddpm2", "ddim2+bf16", "ddim2+t1", "ddim2+t0.1", "--samples", "4",
                     "--out", str(tmp_path / "q.csv"))
    table = pd.read_csv(tmp_path / "q.csv")
    assert list(table["sampler"]) == ["ddim2", "ddpm2", "ddim2+bf16", "ddim2+t1", "ddim2+t0.1"] and set(table["cases"]) == {2}
    assert abs(table["ged"][2] - table["ged"][0]) < 0.05  # bfloat16 draws the float32 masks to rounding
    quality = ["ged", "hm_iou", "ged_cross", "diversity_samples"]
    assert table.loc[3, quality].tolist() == table.loc[0, quality].tolist()  # temperature 1 is the plain sampler
    # at a tenth of the noise the four samples of a slice start from nearly one x_T: closer together
    assert table["diversity_samples"][4] < table["diversity_samples"][0]
    assert np.allclose(table["ged_minus_floor"], table["ged"] - table["ged_floor"], rtol=0, atol=1e-12)
    assert table[["hm_iou", "dice_max", "ci", "ci_var", "masks_per_cpu_s"]].notna().all().all()
    terms = 2 * table["ged_cross"] - table["diversity_samples"] - table["diversity_raters"]
    assert np.allclose(terms, table["ged"], atol=1e-9) and (table["diversity_raters"] > 0).all()
    assert "on the first 2 test cases, N = 4" in out


def test_a_sampling_temperature_scales_every_noise_draw_of_each_row_s_own_stream():
    module = load_benchmark("sampler_quality.py", "sampler_quality")
    assert module.parse_sampler("ddim50+t0.8") == ("ddim", 50, False, 0.8, False)
    assert module.parse_sampler("ddim5+bf16+t.5") == ("ddim", 5, True, 0.5, False)
    for bad in ("ddim5+t0", "ddim5+t", "ddim5+t0.8+bf16"):
        with pytest.raises(argparse.ArgumentTypeError, match="temperature"):
            module.parse_sampler(bad)
    plain, tempered = RowGenerators([3, 4], "cpu"), module.TemperedRows(RowGenerators([3, 4], "cpu"), 0.25)
    for _ in range(2):  # x_T, then a step's noise: the streams advance as the plain ones do
        assert torch.allclose(tempered.randn((2, 1, 4, 4)), 0.25 * plain.randn((2, 1, 4, 4)))
    assert isinstance(tempered, RowGenerators) and len(tempered) == 2


def test_posterior_codes_cycle_each_case_s_rows_through_its_valid_raters_in_row_order():
    module = load_benchmark("sampler_quality.py", "sampler_quality")
    assert module.parse_sampler("ddim50+posterior") == ("ddim", 50, False, 1.0, True)
    assert module.parse_sampler("ddim5+bf16+t0.5+posterior")[3:] == (0.5, True)
    with pytest.raises(argparse.ArgumentTypeError):
        module.parse_sampler("ddim50+posterior+t0.5")
    masks = np.zeros((2, 4, 2, 2), dtype=np.uint8)
    for case in range(2):
        for rater in range(4):
            masks[case, rater].flat[:rater + 1] = 1  # rater r marks r + 1 pixels
    masks[0, 1].flat[3] = 1  # case 0's second rater: one more, so the cases differ
    valid = np.array([[True, False, True, False], [True, True, True, True]])
    seen = []
    codes = module.PosteriorCodes(lambda x: seen.append(x) or x, masks, valid, samples=3)
    image = torch.full((4, 1, 2, 2), 7.0)
    codes(image)
    codes(image[:2])  # the next batch continues the rows
    fed = torch.cat(seen)
    assert fed.shape == (6, 2, 2, 2) and torch.equal(fed[:, 0], torch.full((6, 2, 2), 7.0))
    # case 0 (valid raters 0 and 2): members 0, 1, 2 -> raters 0, 2, 0; case 1: raters 0, 1, 2
    expected = [masks[0, 0], masks[0, 2], masks[0, 0], masks[1, 0], masks[1, 1], masks[1, 2]]
    assert torch.equal(fed[:, 1], 2.0 * torch.from_numpy(np.stack(expected)).float() - 1.0)
    shipped = TrainedModel.load(PROJECT / "models/lidc_cpu_64/model.pt")  # cimd_aa: no prior to replace
    with pytest.raises(SystemExit, match="needs a cimd_latent model, got cimd_aa"):
        module.evaluate(shipped, None, "ddim2+posterior", 4, 4, 0)


def test_step_cost_times_each_configuration_s_training_step_against_the_first(project):
    out = run_script(project, "step_cost.py", "--env", "test", "--configs", "default", "self_cond",
                     "--steps", "2", "--rounds", "3", env={"OMP_NUM_THREADS": "1"})
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in out.splitlines() if line.startswith("| ")}
    assert set(rows) == {"config", "default", "self_cond"}
    assert float(rows["default"][1]) == 1.0 and float(rows["default"][0]) > 0
    rounds = [float(v) for v in rows["self_cond"][2].split(",")]
    assert len(rounds) == 3 and float(rows["self_cond"][0]) == pytest.approx(sorted(rounds)[1], abs=1e-3)
    assert "1 thread(s), 3 rounds of 2 steps" in out
    with pytest.raises(AssertionError, match="invalid choice"):
        run_script(project, "step_cost.py", "--configs", "no_such_config")


def test_readers_drawn_groups_the_per_case_figures_by_how_many_raters_drew(project, tmp_path):
    data = lidc_fixture_aligned(tmp_path / "aligned")
    drew = [sum(bool(m.any()) for m, v in zip(masks, valid) if v) for masks, valid in zip(data.masks, data.rater_valid)]
    assert len(set(drew)) > 1  # the fixture has slices that some readers left empty
    figures = ["ged", "ged_floor", "ged_cross", "diversity_samples", "diversity_raters", "hm_iou"]
    per_case = pd.DataFrame({"case_id": data.cases["case_id"][::-1].to_numpy()})  # any order
    for i, name in enumerate(figures):
        per_case[name] = np.arange(len(per_case)) * 0.01 + i
    per_case.to_csv(tmp_path / "per_case.csv", index=False)
    out = run_script(project, "readers_drawn.py", "--per-case", str(tmp_path / "per_case.csv"),
                     "--aligned", str(tmp_path / "aligned"), "--out", str(tmp_path / "groups.csv"))
    table = pd.read_csv(tmp_path / "groups.csv", dtype={"raters": str, "drew": str})
    expected = per_case.assign(drew=pd.Series(drew, index=data.cases["case_id"]).loc[per_case["case_id"]].to_numpy())
    for count, part in expected.groupby("drew"):
        row = table[(table["drew"] == str(count)) & (table["raters"] == "4")].iloc[0]
        assert row["cases"] == len(part) and row["ged"] == pytest.approx(part["ged"].mean())
        assert row["hm_iou"] == pytest.approx(part["hm_iou"].mean())
    total = table[table["drew"] == "all"].iloc[0]
    assert total["cases"] == len(per_case) and total["diversity_raters"] == pytest.approx(per_case["diversity_raters"].mean())
    assert "| raters | drew | cases | ged |" in out
    per_case.drop(columns=["ged_cross"]).to_csv(tmp_path / "bad.csv", index=False)
    proc = subprocess.run([sys.executable, str(PROJECT / "benchmarks/readers_drawn.py"), "--per-case", str(tmp_path / "bad.csv"),
                           "--aligned", str(tmp_path / "aligned")], capture_output=True, text=True)
    assert proc.returncode != 0 and "bad.csv: lacks ged_cross" in proc.stderr


def _metrics(ged: float, hm_iou: float, floor: float = 0.16) -> dict[str, float]:
    """An evaluation metrics.json's figures (the keys the evaluation pipeline writes)."""
    return {"ged": ged, "ged_floor": floor, "ged_floor_100": 0.13, "hm_iou": hm_iou, "dice_max": 0.8, "ci": 0.6,
            "ci_var": 0.65, "diversity_samples": 0.5, "diversity_raters": 0.4, "train_steps": 3000,
            "train_seconds": 2500.0, "sampling_seconds": 1800.0, "test_cases": 3107, "num_samples": 16,
            "ged_low95": ged - 0.01, "ged_high95": ged + 0.01}


def test_lidc_seeds_tabulates_each_run_and_the_spread_between_them(project, tmp_path):
    import json

    paths = []
    for seed, (ged, hm_iou) in enumerate([(0.30, 0.50), (0.32, 0.52), (0.34, 0.57)]):
        path = tmp_path / f"seed{seed}" / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_metrics(ged, hm_iou)))
        paths.append(str(path))
    out = run_script(project, "lidc_seeds.py", *paths, "--out", str(tmp_path / "seeds.csv"))
    table = pd.read_csv(tmp_path / "seeds.csv").set_index("run")
    assert list(table.index) == [*paths, "mean", "sd"]
    assert table.loc["mean", "GED"] == pytest.approx(0.32) and table.loc["sd", "GED"] == pytest.approx(0.02)
    assert table.loc["mean", "GED − floor"] == pytest.approx(0.16) and table.loc[paths[2], "GED − floor"] == pytest.approx(0.18)
    assert table.loc["sd", "HM-IoU"] == pytest.approx(np.std([0.50, 0.52, 0.57], ddof=1))
    assert "| mean | 3107 | 16 | 0.320 | 0.160 | 0.160 |" in out
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"ged": 0.3}))
    proc = subprocess.run([sys.executable, str(PROJECT / "benchmarks/lidc_seeds.py"), paths[0], str(broken)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and f"{broken}: lacks ged_floor" in proc.stderr


@pytest.mark.parametrize("mode", ["crop_pad", "resize"])
def test_source_grid_puts_samples_back_on_the_raters_grid_by_the_model_s_alignment(project, tmp_path, mode):
    """Samples that are the readers' own masks, taken to 64 x 64 by the model's alignment rule, score
    as the readers on the tree's 128 x 128 grid once put back: exactly (crop_pad; the fixture's
    nodules lie inside the centre) or up to resampling (resize)."""
    from dataclasses import replace

    from cimd_pipeline.data.alignment import ResizeMode, fit_to_size
    from cimd_pipeline.data.rater_sets import load_raters
    from cimd_pipeline.ensembles import SampleSet
    from cimd_pipeline.evaluate import evaluate
    from cimd_pipeline.io.sample_dataset import SampleSetDataset

    tree = PROJECT / "tests/fixtures/lidc_slices"
    raters = load_raters(tree)
    assert raters.masks.shape[2:] == (128, 128)
    masks = raters.masks.astype(np.float32)  # (B, 4, 128, 128) in {0, 1}
    small = np.stack([fit_to_size(m * 2 - 1, (64, 64), ResizeMode(mode), is_mask=False) for m in masks])
    if mode == "crop_pad":
        small[small == 0] = -1  # nothing of a nodule lies outside the centre: the crop is the whole mask
    SampleSetDataset(str(tmp_path / "test_samples.npz")).save(
        SampleSet(case_ids=raters.cases["case_id"].to_numpy(), binary=(small > 0).astype(np.uint8),
                  soft=small.astype(np.float16), info={}))
    model = TrainedModel.load(PROJECT / "models/lidc_cpu_64/model.pt")
    replace(model, alignment={**model.alignment, "resize_mode": mode}).save(tmp_path / "model.pt")
    out = run_script(project, "source_grid.py", "--samples", str(tmp_path / "test_samples.npz"), "--model",
                     str(tmp_path / "model.pt"), "--size", "128", "128", "--out", str(tmp_path / "native.npz"))
    assert f"{mode} back to (128, 128)" in out
    with np.load(tmp_path / "native.npz") as native:
        assert native["samples"].shape == masks.shape and list(native["case_ids"]) == list(raters.cases["case_id"])
        back = native["samples"]
    result = evaluate(tmp_path / "native.npz", tree, only_sampled=True, figure_cases=0)
    if mode == "crop_pad":
        assert np.array_equal(back, raters.masks)
        assert result.summary["ged"] == pytest.approx(0.0, abs=1e-12) and result.summary["hm_iou"] == pytest.approx(1.0)
    else:
        got, want = back.reshape(-1, 128 * 128), raters.masks.reshape(-1, 128 * 128)
        drawn = want.any(1)
        # masks of a few pixels vanish at 64 x 64 whatever the way back; the rest keep their place
        assert (got & want)[drawn].sum() / (got | want)[drawn].sum() > 0.9 and not got[~drawn].any()
        assert 0 < result.summary["ged"] < 0.12 and result.summary["hm_iou"] > 0.8
