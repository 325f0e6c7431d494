"""The shipped LIDC model (models/lidc_cpu_64): its card's figures, inference and the MLflow pyfunc.

Six LIDC-IDRI test slices with their four reader masks (tests/fixtures/lidc_slices, NOTICE there)
stand in for the dataset, which is never committed. ``fixture_figures`` is how the card's
"fixture slices" figures were computed; the test recomputes them from the shipped file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.mlflow_model import ARTIFACT, CIMDPyfuncModel
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.pipelines.data_ingestion.nodes import ingest_cases
from cimd_pipeline.pipelines.mask_alignment.nodes import align_dataset
from cimd_pipeline.scoring import score_samples
from tests.conftest import PROJECT, make_project_copy, run_kedro

MODEL_DIR = PROJECT / "models" / "lidc_cpu_64"
MODEL = MODEL_DIR / "model.pt"
FIXTURES = PROJECT / "tests" / "fixtures" / "lidc_slices"
FIGURES = ("ged", "ged_floor", "hm_iou", "dice_max", "ci", "ci_var")
# Same machine: the same numbers. Another CPU or BLAS can flip a few pixels of a few samples near
# the threshold; over 6 slices x 16 samples that moves a mean by well under 0.03.
TOLERANCE = 0.03


def card() -> dict:
    return json.loads((MODEL_DIR / "card.json").read_text())


def sampling_block() -> dict:
    """The recipe's sampler (conf/lidc_cpu), the one the card's figures were drawn with."""
    return yaml.safe_load((PROJECT / "conf/lidc_cpu/parameters_sampling.yml").read_text())["sampling"]


def fixture_figures(model: TrainedModel, root: Path, sampling: dict) -> dict[str, float]:
    """Mean metrics of ``model`` over the labelled slices under ``root`` (the LIDC slice tree),
    read and aligned as the pipeline does with the model's own alignment block."""
    cases = list(ingest_cases({"source": "lidc", "root": str(root), "reader": {"layout": "slices"}}))
    alignment = {**model.alignment, "split": {"train": 0.0, "val": 0.0, "test": 1.0}, "empty_slice_share": 1.0}
    data = align_dataset(cases, alignment).collect()
    params = SamplingParams.model_validate({**sampling, "progress": False, "num_processes": 1})
    samples = draw_ensembles(model.build(), data.images, data.cases["case_id"].to_numpy(), params, torch.device("cpu"))
    per_case = score_samples(samples, data)
    return {"cases": len(per_case), **{k: float(per_case[k].mean()) for k in FIGURES}}


@pytest.fixture(scope="module")
def shipped() -> TrainedModel:
    return TrainedModel.load(MODEL)


def test_shipped_file_is_small_and_describes_its_training(shipped):
    assert MODEL.stat().st_size < 10 * 2**20
    assert tuple(shipped.image_size) == (64, 64) and shipped.image_channels == 1
    assert shipped.reader.get("source") == "lidc"
    assert shipped.info["steps"] == card()["training"]["steps"]


def test_card_figures_reproduce_on_the_fixture_slices(shipped):
    expected = card()["fixture_slices"]
    got = fixture_figures(shipped, FIXTURES, sampling_block())
    assert got["cases"] == expected["cases"] == 6
    for key in FIGURES:
        assert got[key] == pytest.approx(expected[key], abs=TOLERANCE), key
    # the floor depends on the raters alone: it must agree exactly
    assert got["ged_floor"] == pytest.approx(expected["ged_floor"], abs=1e-6)


def test_card_quotes_the_figures_of_card_json():
    text = (MODEL_DIR / "README.md").read_text()
    figures = card()
    for key in ("ged", "hm_iou", "dice_max"):
        assert f"{figures['fixture_slices'][key]:.3f}" in text, key
        assert f"{figures['test_split'][key]:.3f}" in text, key


def test_inference_pipeline_runs_the_shipped_model_without_training(tmp_path):
    project = make_project_copy(tmp_path / "clone")
    shutil.copytree(MODEL_DIR, project / "models" / "lidc_cpu_64")
    scans = project / "scans"
    for image in sorted(FIXTURES.glob("*/*/images/*.png"))[:2]:
        target = scans / f"{image.parts[-4]}_{image.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    overrides = ("inference.model=models/lidc_cpu_64/model.pt,inference.input=scans,inference.output=out,"
                 "inference.num_samples=4,inference.progress=false")
    run_kedro(project, "--pipelines", "inference", "--params", overrides)
    assert not (project / "data/06_models/model.pt").exists()
    outputs = sorted(p.name for p in (project / "out").iterdir())
    assert outputs == sorted(p.stem for p in scans.iterdir())
    for folder in (project / "out").iterdir():
        mean = np.asarray(Image.open(folder / "mean.png"))
        assert mean.shape == (128, 128)  # back at the input's size
        assert (folder / "entropy.png").exists() and (folder / "sample_03.png").exists()


def test_training_refuses_to_write_over_the_shipped_model(tmp_path):
    project = make_project_copy(tmp_path / "clone")
    proc = run_kedro(project, "--env", "test", "--params", "inference.model=models/lidc_cpu_64/model.pt", check=False)
    assert proc.returncode != 0
    assert "inference.model: models/lidc_cpu_64/model.pt would be overwritten" in proc.stdout + proc.stderr


def test_mlflow_pyfunc_loads_the_shipped_model(shipped, tmp_path):
    path = tmp_path / "pyfunc"
    sampling = {**sampling_block(), "num_samples": 4}
    mlflow.pyfunc.save_model(path, python_model=CIMDPyfuncModel(sampling), artifacts={ARTIFACT: str(MODEL)},
                             pip_requirements=[])
    model = mlflow.pyfunc.load_model(str(path))
    images = np.stack([np.asarray(Image.open(p), dtype=np.float32)[None]
                       for p in sorted(FIXTURES.glob("*/*/images/*.png"))[:2]])
    out = model.predict({"images": images, "names": ["a.png", "b.png"]})
    assert out["samples"].shape == (2, 4, 128, 128) and out["mean"].shape == (2, 128, 128)
    assert set(np.unique(out["samples"])) <= {0, 1}
