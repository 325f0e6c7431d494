"""Inference on new images: in-process with a random tiny model, then once through ``kedro run``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cimd_pipeline.config import ModelParams
from cimd_pipeline.errors import ConfigError, DataError
from cimd_pipeline.inference import (
    PNG_SCALE,
    InferenceParams,
    binary_entropy,
    load_image,
    run_inference,
)
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.pipelines.inference.nodes import predict_images
from tests.conftest import make_project_copy, run_kedro

TINY = {
    "unet": {"channels": [16, 16], "attention_levels": [False, True], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 16},
    "ambiguity_nets": {"filters": [8, 8, 8, 8]},
}
# Rows, columns and slices along the RAS axes are permuted and flipped by this affine.
OBLIQUE = np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 5], [0, 3.0, 0, 1], [0, 0, 0, 1]])


def png(path: Path, shape: tuple[int, ...], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(path)


def trained_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy after ``kedro run --env test`` plus the inference pipeline on two scans.

    One Kedro process (one MLflow run) serves every test module that needs a trained project:
    inference here, the pyfunc round trip and the notebook.
    """
    project = tmp_path_factory.getbasetemp() / "trained_test_project"
    if not (project / "data/08_reporting/inference_summary.csv").exists():
        make_project_copy(project)
        png(project / "scans/a.png", (20, 24))
        volume = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, OBLIQUE), project / "scans/v.nii.gz")
        overrides = "inference.input=scans,inference.output=results,inference.num_samples=3,inference.steps=4"
        run_kedro(project, "--env", "test", "--pipelines", "__default__,inference", "--params", overrides)
    return project


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    """Random weights: enough for shapes and bookkeeping.

    The UNet's output convolution starts at zero (every sample empty), so all weights are jittered.
    """
    torch.manual_seed(0)
    params = ModelParams.model_validate(TINY)
    net = CIMD(params, image_channels=1)
    with torch.no_grad():
        for weight in net.parameters():
            weight.add_(0.05 * torch.randn_like(weight))
    alignment = {"image_size": 16, "resize_mode": "resize", "normalisation": "zscore", "slice_axis": 2}
    return TrainedModel(params.model_dump(mode="json"), 1, (16, 16), alignment, net.state_dict())


def params(source: Path, output: Path, **extra) -> InferenceParams:
    block = {"input": str(source), "output": str(output), "num_samples": 5, "method": "ddpm", "steps": 4,
             "batch_size": 16, "progress": False, **extra}
    return InferenceParams.parse(block)


def test_png_folder_outputs_match_input_size_and_samples(model, tmp_path):
    png(tmp_path / "in/a.png", (40, 28))
    png(tmp_path / "in/deeper/b.png", (12, 20), seed=1)
    settings = params(tmp_path / "in", tmp_path / "out", batch_size=8)  # both images, two batches
    summary = run_inference(model, settings, torch.device("cpu"))
    assert list(summary["slices"]) == [1, 1] and list(summary["num_samples"]) == [5, 5]
    for folder, shape in ((tmp_path / "out/a", (40, 28)), (tmp_path / "out/deeper/b", (12, 20))):
        samples = np.stack([np.asarray(Image.open(folder / f"sample_{k:02d}.png")) for k in range(5)])
        assert samples.shape == (5, *shape) and set(np.unique(samples)) <= {0, 255}
        binary = samples.astype(np.float64) / 255
        maps = {n: np.asarray(Image.open(folder / f"{n}.png"), dtype=np.float64) / PNG_SCALE
                for n in ("mean", "variance", "entropy")}
        assert maps["mean"] == pytest.approx(binary.mean(0), abs=1e-4)
        assert maps["variance"] == pytest.approx(binary.var(0), abs=1e-4)
        assert maps["entropy"] == pytest.approx(binary_entropy(binary.mean(0)), abs=1e-4)
        assert Image.open(folder / "overlay.png").size[0] > 0
    assert summary["max_variance"].max() > 0  # the samples differ


def test_nifti_volume_keeps_grid_affine_and_header(model, tmp_path):
    data = np.random.default_rng(0).normal(size=(9, 7, 5)).astype(np.float32)
    image = nib.Nifti1Image(data, OBLIQUE)
    image.header.set_xyzt_units("mm")
    nib.save(image, tmp_path / "scan.nii.gz")
    loaded = load_image(tmp_path / "scan.nii.gz", channels=1, slice_axis=2)
    assert np.array_equal(loaded.to_grid(loaded.slices[:, 0]), data)  # slicing is undone exactly

    run_inference(model, params(tmp_path / "scan.nii.gz", tmp_path / "out"), torch.device("cpu"))
    out = {n: nib.load(tmp_path / f"out/scan/{n}.nii.gz") for n in ("samples", "mean", "variance", "entropy")}
    assert out["samples"].shape == (9, 7, 5, 5) and out["mean"].shape == (9, 7, 5)
    for result in out.values():
        assert np.allclose(result.affine, OBLIQUE) and result.header.get_xyzt_units() == ("mm", "unknown")
    samples = np.asanyarray(out["samples"].dataobj)
    assert samples.dtype == np.uint8 and set(np.unique(samples)) <= {0, 1}
    assert out["mean"].get_fdata() == pytest.approx(samples.mean(-1), abs=1e-6)
    assert out["variance"].get_fdata() == pytest.approx(samples.var(-1), abs=1e-6)
    assert (tmp_path / "out/scan/overlay.png").exists()


def test_readme_example_scans(model, tmp_path):
    """The README's inference command reads ``examples/new_scans``: three PNGs and a volume."""
    examples = Path(__file__).resolve().parents[2] / "examples/new_scans"
    summary = run_inference(model, params(examples, tmp_path / "out"), torch.device("cpu"))
    assert sorted(Path(p).name for p in summary["input"]) == [
        "bone.png", "lesions.png", "nodule.png", "nodules_volume.nii.gz"]
    assert list(summary["slices"]) == [1, 1, 1, 3]
    volume = nib.load(examples / "nodules_volume.nii.gz")
    samples = nib.load(tmp_path / "out/nodules_volume/samples.nii.gz")
    assert samples.shape == (64, 64, 3, 5) and np.allclose(samples.affine, volume.affine)
    assert np.asarray(Image.open(tmp_path / "out/nodule/mean.png")).shape == (64, 64)


def test_two_d_nifti_gives_four_d_samples(model, tmp_path):
    nib.save(nib.Nifti1Image(np.ones((9, 7), np.float32), np.eye(4)), tmp_path / "flat.nii")
    run_inference(model, params(tmp_path / "flat.nii", tmp_path / "out"), torch.device("cpu"))
    assert nib.load(tmp_path / "out/flat/samples.nii.gz").shape == (9, 7, 1, 5)
    assert nib.load(tmp_path / "out/flat/mean.nii.gz").shape == (9, 7)


def test_bad_inputs_name_the_file(model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty input folder") as error:
        run_inference(model, params(tmp_path / "empty", tmp_path / "out"), torch.device("cpu"))
    assert error.value.source == str(tmp_path / "empty")

    (tmp_path / "broken").mkdir()
    png(tmp_path / "broken/fine.png", (8, 8))
    (tmp_path / "broken/corrupt.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="unreadable") as error:
        run_inference(model, params(tmp_path / "broken", tmp_path / "out"), torch.device("cpu"))
    assert error.value.source.endswith("corrupt.png")
    assert not (tmp_path / "out").exists()  # every file is checked before any sampling

    (tmp_path / "nan").mkdir()
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), np.nan, np.float32), np.eye(4)), tmp_path / "nan/x.nii.gz")
    with pytest.raises(DataError, match="NaN") as error:
        run_inference(model, params(tmp_path / "nan", tmp_path / "out"), torch.device("cpu"))
    assert error.value.source.endswith("x.nii.gz")

    with pytest.raises(DataError, match="channel"):
        load_image(tmp_path / "broken/fine.png", channels=2, slice_axis=2)
    with pytest.raises(DataError, match="no such file"):
        run_inference(model, params(tmp_path / "missing", tmp_path / "out"), torch.device("cpu"))


def test_node_validates_its_block(model, tmp_path):
    with pytest.raises(ConfigError, match="inference.input"):
        predict_images(model, {"input": None})
    with pytest.raises(ConfigError, match="inference.num_samples"):
        predict_images(model, {"input": str(tmp_path), "num_samples": 0})
    with pytest.raises(ConfigError, match="num_timesteps"):
        predict_images(model, {"input": str(tmp_path), "steps": 5000})


def test_binary_entropy_is_one_bit_at_half():
    assert binary_entropy(np.array([0.0, 0.5, 1.0])) == pytest.approx([0.0, 1.0, 0.0])


@pytest.mark.slow
def test_inference_pipeline_through_kedro(tmp_path_factory):
    project = trained_project(tmp_path_factory)
    out = project / "results"
    assert len(list((out / "a").glob("sample_*.png"))) == 3
    assert nib.load(out / "v/samples.nii.gz").shape == (8, 8, 3, 3)
    assert np.allclose(nib.load(out / "v/mean.nii.gz").affine, OBLIQUE)
    summary = pd.read_csv(project / "data/08_reporting/inference_summary.csv")
    assert list(summary["input"]) == ["scans/a.png", "scans/v.nii.gz"]
    assert list(summary["num_samples"]) == [3, 3]
