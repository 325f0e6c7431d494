"""Samples belong to their own image, keyed by case id or relative path, in every entry point.

The sampling node, the inference pipeline and the MLflow pyfunc must hand each image the samples
drawn from that image: a fake model copies each image's sign pattern into its samples, so a shifted
or reordered assignment shows. With a real model, an image's samples depend on its key and the seed
only: adding files to the folder does not change them, and the pyfunc agrees with inference.
"""

from __future__ import annotations

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import SamplingError
from cimd_pipeline.inference import load_image, run_inference
from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.mlflow_model import ARTIFACT, CIMDPyfuncModel
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.pipelines.sampling.nodes import sample_test_cases
from tests.pipelines.test_inference import OBLIQUE, model, params, png  # noqa: F401  (fixture)
from tests.test_ensembles import CopyImageNet

CPU = torch.device("cpu")


def read_samples(folder, count: int) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"sample_{k:02d}.png")) for k in range(count)]) // 255


def test_sampling_node_pins_each_case_to_its_own_image(model, monkeypatch):
    cases = align_cases(generate(SyntheticConfig(num_cases=8, image_size=32)), (16, 16), ResizeMode.RESIZE,
                        Normalisation.ZSCORE, None, 2, 0.0, 0)
    data = stack_cases(cases, {"test": 1.0}, 0)
    monkeypatch.setattr(TrainedModel, "build", lambda self, source=None: CopyImageNet())
    sampling = {"num_samples": 3, "steps": 4, "batch_size": 5, "progress": False}
    samples, _ = sample_test_cases(model, data, sampling, {"device": "cpu"})
    rows = {case_id: i for i, case_id in enumerate(data.cases["case_id"])}
    assert sorted(samples.case_ids) == sorted(rows)
    for case_id, drawn in zip(samples.case_ids, samples.binary):
        expected = (np.asarray(data.images[rows[case_id]])[0] > 0).astype(np.uint8)
        assert all(np.array_equal(member, expected) for member in drawn), case_id


def test_sampling_node_names_the_model_file_of_the_catalog(model, tmp_path):
    broken = TrainedModel(model.model, 1, (16, 16), model.alignment, dict(list(model.state_dict.items())[1:]))
    dataset = TrainedModelDataset(str(tmp_path / "elsewhere/model_v2.pt"))
    dataset.save(broken)
    cases = align_cases(generate(SyntheticConfig(num_cases=4, image_size=32)), (16, 16), ResizeMode.RESIZE,
                        Normalisation.ZSCORE, None, 2, 0.0, 0)
    with pytest.raises(Exception, match="elsewhere/model_v2.pt"):
        sample_test_cases(dataset.load(), stack_cases(cases, {"test": 1.0}, 0), {"progress": False}, {"device": "cpu"})


def test_nan_samples_stop_the_sampling_node(model):
    broken = {name: torch.full_like(value, float("nan")) for name, value in model.state_dict.items()}
    nan_model = TrainedModel(model.model, 1, (16, 16), model.alignment, broken, source="data/06_models/x.pt")
    cases = align_cases(generate(SyntheticConfig(num_cases=4, image_size=32)), (16, 16), ResizeMode.RESIZE,
                        Normalisation.ZSCORE, None, 2, 0.0, 0)
    sampling = {"num_samples": 2, "steps": 3, "method": "ddpm", "progress": False}
    with pytest.raises(SamplingError, match=r"cimd_aa model data/06_models/x.pt: .*\(ddpm, 3 steps"):
        sample_test_cases(nan_model, stack_cases(cases, {"test": 1.0}, 0), sampling, {"device": "cpu"})


def test_inference_pins_each_file_to_its_own_samples(model, tmp_path, monkeypatch):
    for i, shape in enumerate([(16, 16), (16, 16), (16, 16)]):
        png(tmp_path / f"in/{i}.png", shape, seed=i)
    monkeypatch.setattr(TrainedModel, "build", lambda self, source=None: CopyImageNet())
    run_inference(model, params(tmp_path / "in", tmp_path / "out", batch_size=7), CPU)
    for i in range(3):
        raw = load_image(tmp_path / f"in/{i}.png", 1, 2).slices[0, 0]
        expected = (raw > raw.mean()).astype(np.uint8)  # z-scored, so sign = above the mean
        assert all(np.array_equal(s, expected) for s in read_samples(tmp_path / f"out/{i}", 5)), i


def test_adding_a_file_keeps_the_other_files_samples(model, tmp_path):
    png(tmp_path / "in/a.png", (20, 24))
    setting = {"batch_size": 5}  # one image per batch: the same batches in both runs
    run_inference(model, params(tmp_path / "in", tmp_path / "first", **setting), CPU)
    png(tmp_path / "in/0_new.png", (20, 24), seed=3)  # sorts before a.png
    run_inference(model, params(tmp_path / "in", tmp_path / "second", **setting), CPU)
    assert np.array_equal(read_samples(tmp_path / "first/a", 5), read_samples(tmp_path / "second/a", 5))
    run_inference(model, params(tmp_path / "in", tmp_path / "seed1", seed=1, **setting), CPU)
    assert not np.array_equal(read_samples(tmp_path / "first/a", 5), read_samples(tmp_path / "seed1/a", 5))


def test_pyfunc_agrees_with_inference_for_the_same_image_and_seed(model, tmp_path):
    png(tmp_path / "in/scans/a.png", (20, 24))
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 3)).astype(np.float32), OBLIQUE),
             tmp_path / "in/v.nii.gz")
    run_inference(model, params(tmp_path / "in", tmp_path / "out", batch_size=5, seed=7), CPU)
    TrainedModelDataset(str(tmp_path / "model.pt")).save(model)
    pyfunc = CIMDPyfuncModel({"num_samples": 5, "method": "ddpm", "steps": 4, "batch_size": 5, "seed": 7})
    pyfunc.load_context(SimpleNamespace(artifacts={ARTIFACT: str(tmp_path / "model.pt")}))
    pyfunc.device = CPU
    image = load_image(tmp_path / "in/scans/a.png", 1, 2).slices
    out = pyfunc.predict(None, {"images": image, "names": ["scans/a.png"]})
    assert np.array_equal(out["samples"][0], read_samples(tmp_path / "out/scans/a", 5))
    volume = load_image(tmp_path / "in/v.nii.gz", 1, 2)
    out = pyfunc.predict(None, {"images": volume.slices[1:2], "names": ["v.nii.gz:1"]})
    written = load_image(tmp_path / "out/v/samples.nii.gz", 5, 2).slices  # (S, N, H, W), as read
    assert np.array_equal(written[1].astype(np.uint8), out["samples"][0])
    assert not np.array_equal(written[0].astype(np.uint8), out["samples"][0])
