"""Inference cuts a volume into exactly the slices training saw: the reader's options travel in model.pt."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from cimd_pipeline.data.alignment import slice_volume
from cimd_pipeline.data.readers import read_msmri
from cimd_pipeline.inference import load_image, run_inference
from cimd_pipeline.io.model_dataset import TrainedModelDataset
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.pipelines.training.nodes import train_model
from tests.pipelines.test_inference import OBLIQUE, model, params  # noqa: F401  (fixture)
from tests.test_ensembles import CopyImageNet
from tests.training.test_resume_rules import aligned, tiny

MSMRI_OPTIONS = {"modalities": {"flair": ["flair*"]}, "masks": ["mask*"], "group_regex": None}


def msmri_subject(root, shape=(16, 16, 3)):
    """One subject with an oblique FLAIR volume (axes permuted and flipped) and two raters."""
    rng = np.random.default_rng(0)
    folder = root / "subject01"
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), OBLIQUE), folder / "flair.nii.gz")
    for rater in (1, 2):
        mask = (rng.random(shape) > 0.5).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, OBLIQUE), folder / f"mask{rater}.nii.gz")
    return folder / "flair.nii.gz"


@pytest.mark.parametrize("reorient", [True, False])
def test_inference_slices_equal_the_training_readers_slices(tmp_path, reorient):
    path = msmri_subject(tmp_path)
    (case,) = read_msmri(tmp_path, {**MSMRI_OPTIONS, "reorient": reorient}, 0)
    trained_slices = [piece.image for piece in slice_volume(case, 2, 1.0, np.random.default_rng(0))]
    loaded = load_image(path, channels=1, slice_axis=2, reorient=reorient)
    assert len(loaded.slices) == len(trained_slices)
    for mine, theirs in zip(loaded.slices, trained_slices):
        assert np.array_equal(mine, theirs)
    other = load_image(path, channels=1, slice_axis=2, reorient=not reorient)
    assert other.slices.shape != loaded.slices.shape or not np.array_equal(other.slices, loaded.slices)


def test_training_stores_the_reader_options_with_the_model(tmp_path):
    training = {"max_steps": 1, "batch_size": 2, "checkpoint_every": 1, "progress": False,
                "checkpoint_dir": str(tmp_path / "checkpoints")}
    ingestion = {"source": "msmri", "reader": {"reorient": False}}
    trained, _ = train_model(aligned(), tiny().model_dump(mode="json"), training, {}, ingestion)
    assert trained.reader["source"] == "msmri" and trained.reader["reorient"] is False
    assert trained.reader["modalities"]["flair"] == ["*flair*"]  # the reader's defaults, filled in
    dataset = TrainedModelDataset(str(tmp_path / "model.pt"))
    dataset.save(trained)
    assert dataset.load().reader == trained.reader


def test_inference_applies_the_stored_orientation(model, tmp_path, monkeypatch):
    """A model trained without reorientation samples the volume's stored slices, not RAS+ ones."""
    path = msmri_subject(tmp_path / "in")
    raw = nib.load(path).get_fdata(dtype=np.float32)  # (16, 16, 3): slices along the stored z axis
    monkeypatch.setattr(TrainedModel, "build", lambda self, source=None: CopyImageNet())
    not_reoriented = TrainedModel(model.model, 1, (16, 16), model.alignment, model.state_dict,
                                  reader={"source": "msmri", "reorient": False})
    run_inference(not_reoriented, params(path, tmp_path / "out", num_samples=2), torch.device("cpu"))
    samples = np.asanyarray(nib.load(tmp_path / "out/flair/samples.nii.gz").dataobj)  # (X, Y, Z, N)
    for z in range(raw.shape[2]):
        expected = (raw[:, :, z] > raw[:, :, z].mean()).astype(np.uint8)  # z-scored, thresholded at 0
        assert np.array_equal(samples[:, :, z, 0], expected), z
