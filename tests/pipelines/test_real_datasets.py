"""``kedro run --env <dataset> --pipelines data_ingestion,mask_alignment`` on tiny real-format sets.

Each environment (lidc, folders, msmri, qubiq) reads a six-case fixture written here in the
dataset's own format and must produce the canonical aligned set: float32 images, {0,1} uint8
masks at the environment's size, and splits that never share a group. One project copy serves
all four runs (the MLflow database is created once).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from kedro.io import DataCatalog, DatasetError, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image

from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.io.case_folder import CaseFolderDataset
from cimd_pipeline.pipelines import data_ingestion, mask_alignment
from tests.conftest import make_project_copy, run_kedro
from tests.data.readers.test_lidc_slices import write_slice_tree

pytestmark = pytest.mark.slow


def blob(shape: tuple[int, ...], radius: float, scale: int = 1) -> np.ndarray:
    grid = np.indices(shape)
    centre = np.array(shape).reshape(-1, *[1] * len(shape)) // 2
    return ((((grid - centre) ** 2).sum(0) < radius**2) * scale).astype(np.uint8)


def write_lidc(root: Path) -> None:
    rng = np.random.default_rng(0)
    entries = {
        f"LIDC-IDRI-{i // 2:04d}_slice_{i}": {
            "image": rng.random((128, 128)).astype(np.float32),
            "masks": [blob((128, 128), 4 * r) for r in range(4)],  # rater 0 saw nothing
            "series_uid": f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{i // 2}",
        }
        for i in range(6)
    }
    root.mkdir(parents=True)
    (root / "data_lidc.pickle").write_bytes(pickle.dumps(entries))


def write_folders(root: Path, mask_scale: int = 255) -> None:
    """HPU-Net crops: <split>/images/<patient>/<id>.png, <split>/gt/<patient>/<id>_l<k>.png,
    one patient of two crops in each of train/, val/ and test/ (the splits the release ships)."""
    rng = np.random.default_rng(1)
    for i in range(6):
        patient, crop = f"LIDC-IDRI-{i // 2:04d}", f"z-{i}.0_c0"
        split = ("train", "val", "test")[i // 2]
        files = [("images", crop, (rng.random((32, 32)) * 255).astype(np.uint8))]
        files += [("gt", f"{crop}_l{r}", blob((32, 32), 2 + 2 * r, mask_scale)) for r in range(4)]
        for kind, name, array in files:
            path = root / split / kind / patient / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)


def nii(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def write_msmri(root: Path) -> None:
    rng = np.random.default_rng(2)
    affine = np.array([[1.0, 0, 0, -10], [0, 1.0, 0, -12], [0, 0, 3.0, -12], [0, 0, 0, 1]])
    for i in range(6):
        folder = root / f"subject{i // 2}" / f"tp{i % 2}"
        for name in ("flair", "t1", "t2", "pd"):
            scan = rng.normal(100, 10, (20, 24, 8)).astype(np.float32)
            nii(folder / f"{name}.nii.gz", scan, affine)
        nii(folder / "mask1.nii.gz", blob((20, 24, 8), 3), affine)
        shifted = affine.copy()
        shifted[0, 3] += 1.0  # rater 2 saved on a grid one voxel along x
        nii(folder / "mask2.nii.gz", blob((20, 24, 8), 4), shifted)


def write_qubiq(root: Path) -> None:
    rng = np.random.default_rng(3)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])
    for i in range(6):
        folder = root / f"case{i:02d}"
        nii(folder / "image.nii.gz", rng.random((40, 36)).astype(np.float32), affine)
        for rater in (1, 2, 3):
            nii(folder / f"task01_seg{rater:02d}.nii.gz", blob((40, 36), 3 * rater), affine)


WRITERS = {"lidc": write_lidc, "folders": write_folders, "msmri": write_msmri, "qubiq": write_qubiq}
# env -> (channels, raters, image size, minimum number of aligned 2-D cases)
EXPECTED = {
    "lidc": (1, 4, 128, 6),
    "folders": (1, 4, 128, 6),
    "msmri": (4, 2, 128, 12),
    "qubiq": (1, 3, 64, 6),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project_copy(tmp_path_factory.mktemp("real") / "project")


@pytest.mark.parametrize("env", list(WRITERS))
def test_environment_produces_the_canonical_aligned_set(project: Path, tmp_path: Path, env: str):
    root = tmp_path / env
    WRITERS[env](root)
    pipelines = "data_ingestion,mask_alignment"
    run_kedro(project, "--env", env, "--pipelines", pipelines, "--params", f"ingestion.root={root}")
    data = AlignedDataset(str(project / "data/03_primary/aligned")).load()
    channels, raters, size, minimum = EXPECTED[env]
    assert len(data) >= minimum
    assert data.images.shape == (len(data), channels, size, size)
    assert data.images.dtype == np.float32
    assert data.masks.shape == (len(data), raters, size, size) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) == {0, 1} and data.rater_valid.all()
    assert np.isfinite(data.images).all()
    splits = data.cases.groupby("group_id")["split"].nunique()
    assert (splits == 1).all(), "a group landed in two splits"
    assert set(data.cases["split"]) == {"train", "val", "test"}
    if env == "folders":  # the release's own split folders are kept
        assert (data.cases["split"] == data.cases["case_id"].str.split("/").str[0]).all()


def test_lidc_slice_tree_in_one_command(project: Path, tmp_path: Path):
    """The public slice tree needs only ``--env lidc`` and its folder: patients from the folders."""
    root = tmp_path / "LIDC-IDRI-slices"
    ids = write_slice_tree(root, patients=10, slices=(0, 1))
    proc = run_kedro(project, "--env", "lidc", "--pipelines", "data_ingestion,mask_alignment", "--params", f"ingestion.root={root}")
    assert "reading the LIDC slice tree" in proc.stdout + proc.stderr
    data = AlignedDataset(str(project / "data/03_primary/aligned")).load()
    assert sorted(data.cases["case_id"]) == sorted(ids)
    assert data.images.shape == (len(ids), 1, 128, 128) and data.masks.shape == (len(ids), 4, 128, 128)
    assert (data.cases["group_id"] == data.cases["case_id"].str.split("/").str[0]).all()
    assert (data.cases.groupby("group_id")["split"].nunique() == 1).all()
    assert set(data.cases["split"]) == {"train", "val", "test"}
    first = np.flatnonzero(data.cases["case_id"] == ids[0])[0]
    assert not data.masks[first, 0].any() and data.masks[first, 1:].all(axis=0).any()


def run_in_process(root: Path, work: Path, reader: dict, threshold: float | None = None) -> None:
    """ingest_cases + align_dataset through Kedro's runner, without a subprocess."""
    nodes = (data_ingestion.create_pipeline() + mask_alignment.create_pipeline()).only_nodes(
        "ingest_cases", "align_dataset"
    )
    catalog = DataCatalog(
        {
            "ingested_cases": CaseFolderDataset(str(work / "cases")),
            "aligned_dataset": AlignedDataset(str(work / "aligned")),
            "params:ingestion": MemoryDataset(
                {"source": "folders", "root": str(root), "reader": reader}
            ),
            "params:alignment": MemoryDataset({"image_size": 32, "binarise_threshold": threshold}),
        }
    )
    SequentialRunner().run(nodes, catalog)


FOLDERS_READER = {"images_folder": "images", "masks_folder": "gt", "group_regex": r"([^/]+)/[^/]+$"}


def test_non_binary_masks_without_threshold_stop_alignment(tmp_path: Path):
    write_folders(tmp_path / "raw", mask_scale=128)  # soft 0/128 PNG masks
    problem = r"z-\d\.0_c0\.png: non-binary rater masks \(values 0, 128\).*binarise_threshold"
    # alignment streams into the catalog: the error surfaces while it saves, wrapped by Kedro
    with pytest.raises(DatasetError, match=problem):
        run_in_process(tmp_path / "raw", tmp_path / "work", FOLDERS_READER)
    run_in_process(tmp_path / "raw", tmp_path / "work", FOLDERS_READER, threshold=64)
    assert set(np.unique(AlignedDataset(str(tmp_path / "work/aligned")).load().masks)) == {0, 1}


def test_a_bad_file_keeps_the_previous_dataset(tmp_path: Path):
    write_folders(tmp_path / "raw")
    run_in_process(tmp_path / "raw", tmp_path / "work", FOLDERS_READER)
    broken = tmp_path / "raw/test/gt/LIDC-IDRI-0002/z-5.0_c0_l3.png"
    broken.write_bytes(broken.read_bytes()[:40])
    # the reader's error surfaces while the catalog saves the stream, wrapped by Kedro
    with pytest.raises(DatasetError, match=r"z-5\.0_c0_l3\.png: unreadable image file"):
        run_in_process(tmp_path / "raw", tmp_path / "work", FOLDERS_READER)
    assert len(CaseFolderDataset(str(tmp_path / "work/cases")).load()) == 6
