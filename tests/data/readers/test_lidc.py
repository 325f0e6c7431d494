"""The Knegt LIDC pickle reader: cases, groups, streaming, and every bad entry it refuses."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cimd_pipeline.data.readers import get_reader
from cimd_pipeline.data.readers import lidc as lidc_module
from cimd_pipeline.errors import ConfigError, DataError


def names(path: Path, problem: str) -> str:
    """The regex of a `DataError` message: the file, then the problem (itself a regex)."""
    return rf"{re.escape(str(path))}: {problem}"


def lidc_entry(rng: np.random.Generator, series: int, empty_raters: int = 0) -> dict:
    """One slice as Knegt's file stores it: float image, 4 uint8 masks (some raters saw nothing)."""
    yy, xx = np.mgrid[:128, :128]
    masks = []
    for rater in range(4):
        radius = 0 if rater < empty_raters else 8 + 2 * rater
        masks.append(((yy - 64) ** 2 + (xx - 60) ** 2 < radius**2).astype(np.uint8))
    return {
        "image": rng.random((128, 128)).astype(np.float32),
        "masks": masks,
        "series_uid": f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{series}",
        "pixel_spacing": 0.7,
    }


def write_lidc(folder: Path, entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(entries))
    return path


def six_slices() -> dict:
    rng = np.random.default_rng(0)
    return {
        f"LIDC-IDRI-{i // 2:04d}_slice_{i}": lidc_entry(rng, i // 2, empty_raters=i % 3)
        for i in range(6)
    }


def read(root: Path | None, **options) -> list:
    return list(get_reader("lidc")(root, options, 0))


def test_reads_every_slice_with_series_as_group(tmp_path: Path):
    entries = six_slices()
    path = write_lidc(tmp_path, entries)
    cases = read(tmp_path)
    assert [c.case_id for c in cases] == list(entries)
    assert [c.group_id for c in cases] == [e["series_uid"] for e in entries.values()]
    for case, entry in zip(cases, entries.values()):
        assert case.image.shape == (1, 128, 128) and case.image.dtype == np.float32
        np.testing.assert_array_equal(case.image[0], entry["image"])
        np.testing.assert_array_equal(case.masks, np.stack(entry["masks"]))
        assert case.masks.dtype == np.uint8 and case.rater_valid.all()
        meta = {"series_uid": entry["series_uid"], "pixel_spacing": 0.7, "source": str(path)}
        assert case.meta == meta
    assert not cases[2].masks[:2].any()  # all-empty masks are data, not errors


def test_absolute_file_option(tmp_path: Path):
    path = write_lidc(tmp_path / "elsewhere", six_slices())
    assert len(read(None, file=str(path))) == 6


def test_entries_are_popped_as_they_are_yielded(tmp_path: Path, monkeypatch):
    entries = six_slices()
    monkeypatch.setattr(lidc_module, "load_pickle", lambda path: entries)
    stream = get_reader("lidc")(tmp_path, {"layout": "pickle"}, 0)
    next(stream)
    assert len(entries) == 5
    list(stream)
    assert entries == {}


def test_unknown_option_and_missing_root_are_refused(tmp_path: Path):
    with pytest.raises(ValidationError, match="fle"):
        read(tmp_path, fle="x.pickle")
    with pytest.raises(ConfigError, match="ingestion.root"):
        read(None)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"data_lidc\.pickle: no such file"):
        read(tmp_path, layout="pickle")
    with pytest.raises(DataError, match=r"neither the pickle data_lidc\.pickle nor an LIDC slice tree"):
        read(tmp_path)


def test_truncated_pickle(tmp_path: Path):
    path = write_lidc(tmp_path, six_slices())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=names(path, "corrupt or truncated pickle")):
        read(tmp_path)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path: Path):
    entries = six_slices()
    marker = tmp_path / "marker"
    entries["LIDC-IDRI-0000_slice_0"]["series_uid"] = Payload(marker)
    path = write_lidc(tmp_path, entries)
    with pytest.raises(DataError, match=names(path, "refused to unpickle global .*system")):
        read(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda e: e.update(masks=[]), "case has zero raters"),
        (
            lambda e: e["masks"].__setitem__(1, np.zeros((64, 64), np.uint8)),
            "rater masks have different shapes",
        ),
        (lambda e: e["image"].__setitem__((3, 4), np.nan), "image contains NaN or infinite"),
        (lambda e: e["image"].__setitem__((3, 4), np.inf), "image contains NaN or infinite"),
        (lambda e: e.pop("series_uid"), "entry lacks series_uid"),
        (lambda e: e.update(image=np.zeros((2, 128, 128))), "image must be a 2-D numeric array"),
    ],
)
def test_bad_entry_names_file_and_case(tmp_path: Path, change, problem):
    entries = six_slices()
    change(entries["LIDC-IDRI-0001_slice_3"])
    path = write_lidc(tmp_path, entries)
    where = f"{path} [case LIDC-IDRI-0001_slice_3]"
    with pytest.raises(DataError, match=re.escape(f"{where}: {problem}")):
        read(tmp_path)


def test_not_a_dict_and_empty_pickle(tmp_path: Path):
    path = write_lidc(tmp_path, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(DataError, match=names(path, "expected a dict of cases, got list")):
        read(tmp_path)
    write_lidc(tmp_path, {})
    with pytest.raises(DataError, match=names(path, "the pickle holds no cases")):
        read(tmp_path)
