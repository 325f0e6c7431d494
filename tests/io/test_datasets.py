import json

import numpy as np
import pytest

from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.ensembles import SampleSet
from cimd_pipeline.errors import DataError
from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.io.case_folder import CaseFolderDataset
from cimd_pipeline.io.sample_dataset import SampleSetDataset


def test_case_folder_round_trip_streams_a_generator(tmp_path):
    ds = CaseFolderDataset(str(tmp_path / "cases"))
    ds.save(generate(SyntheticConfig(num_cases=5)))
    loaded = ds.load()
    original = list(generate(SyntheticConfig(num_cases=5)))
    assert len(loaded) == 5 and list(loaded.manifest["family"]) == [c.meta["family"] for c in original]
    for a, b in zip(loaded, original):
        assert a.case_id == b.case_id and a.meta == b.meta
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_array_equal(a.oracle, b.oracle)


def test_case_folder_failure_keeps_previous_dataset(tmp_path):
    ds = CaseFolderDataset(str(tmp_path / "cases"))
    ds.save(generate(SyntheticConfig(num_cases=3)))

    def broken():
        yield from generate(SyntheticConfig(num_cases=2))
        bad = np.full((1, 4, 4), np.nan, np.float32)
        yield Case("nan", "g", bad, np.zeros((1, 4, 4), np.uint8), np.array([True]), meta={"source": "scan.nii"})

    with pytest.raises(Exception, match=r"scan\.nii: image contains NaN"):
        ds.save(broken())
    assert len(ds.load()) == 3  # the earlier dataset is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_case_folder_refuses_empty_dataset_and_duplicate_ids(tmp_path):
    ds = CaseFolderDataset(str(tmp_path / "cases"))
    with pytest.raises(Exception, match="empty dataset"):
        ds.save(iter([]))
    case = next(generate(SyntheticConfig(num_cases=1)))
    with pytest.raises(Exception, match="duplicate case_id"):
        ds.save([case, case])


def test_corrupt_case_file_is_named(tmp_path):
    ds = CaseFolderDataset(str(tmp_path / "cases"))
    ds.save(generate(SyntheticConfig(num_cases=2)))
    (tmp_path / "cases" / "000001.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"000001\.npz: unreadable case file"):
        ds.load()[1]


def test_aligned_dataset_round_trip_is_memory_mapped(tmp_path):
    aligned = align_cases(generate(SyntheticConfig(num_cases=6)), (16, 16), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.0, 0)
    data = stack_cases(aligned, {"train": 0.5, "val": 0.2, "test": 0.3}, 0)
    ds = AlignedDataset(str(tmp_path / "aligned"))
    ds.save(data)
    back = ds.load()
    assert isinstance(back.images, np.memmap)
    np.testing.assert_array_equal(back.masks, data.masks)
    np.testing.assert_array_equal(back.oracle, data.oracle)
    assert back.cases.equals(data.cases)
    test = back.subset("test")
    assert len(test) == (data.cases["split"] == "test").sum()


def test_sample_set_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    soft = rng.uniform(-1, 1, (3, 5, 8, 8)).astype(np.float16)
    samples = SampleSet(np.array(["a", "b", "c"]), (soft > 0).astype(np.uint8), soft, {"method": "ddim", "steps": 5})
    ds = SampleSetDataset(str(tmp_path / "s.npz"))
    ds.save(samples)
    back = ds.load()
    np.testing.assert_array_equal(back.binary, samples.binary)
    np.testing.assert_array_equal(back.soft, samples.soft)
    assert list(back.case_ids) == ["a", "b", "c"] and back.info == json.loads(json.dumps(samples.info))


def test_case_folder_stores_8_bit_scans_compactly_and_reads_back_float32(tmp_path):
    """A PNG scan (integers 0..255) is stored as uint8 and read back exactly; other images as they are."""
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 6, 6), np.uint8)
    images = {
        "png": rng.integers(0, 256, (1, 6, 6)).astype(np.float32),
        "soft": rng.random((1, 6, 6)).astype(np.float32),
        "wide": rng.integers(0, 4096, (1, 6, 6)).astype(np.float32),
        "negative": -rng.integers(0, 200, (1, 6, 6)).astype(np.float32),
    }
    cases = [Case(k, k, image, masks, np.ones(2, bool)) for k, image in images.items()]
    ds = CaseFolderDataset(str(tmp_path / "cases"))
    ds.save(iter(cases))
    for case in ds.load():
        assert case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image, images[case.case_id])
    with np.load(tmp_path / "cases/000000.npz") as stored:
        assert stored["image"].dtype == np.uint8
    with np.load(tmp_path / "cases/000001.npz") as stored:
        assert stored["image"].dtype == np.float32
