"""The allow-list unpickler: data pickles load, code-running pickles are refused before they run."""

from __future__ import annotations

import builtins
import codecs
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from cimd_pipeline.data.readers.safe_pickle import load_pickle
from cimd_pipeline.errors import DataError


def names(path: Path, problem: str) -> str:
    """The regex of a `DataError` message: the file, then the problem (itself a regex)."""
    return rf"{re.escape(str(path))}: {problem}"


def lidc_like() -> dict:
    rng = np.random.default_rng(0)
    masks = [(rng.random((16, 16)) > 0.7).astype(np.uint8) for _ in range(4)]
    return {
        "LIDC-IDRI-0001_slice_7": {
            "image": rng.random((16, 16)).astype(np.float32),
            "masks": masks,
            "series_uid": "1.3.6.1.4.1.14519.5.2.1.6279.6001.1",
            "spacing": (0.7, 0.7, 2.5),
            "flags": {1, 2},
            "frozen": frozenset({"a"}),
            "pixel": np.float32(0.5),
            "count": np.int64(3),
            "valid": np.bool_(True),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            "raw": b"\x00\xff",
            "buffer": bytearray(b"ab"),
            "complex": 1 + 2j,
            "none": None,
        }
    }


def assert_same(loaded: dict, expected: dict) -> None:
    entry, want = loaded["LIDC-IDRI-0001_slice_7"], expected["LIDC-IDRI-0001_slice_7"]
    assert entry.keys() == want.keys()
    for key, value in want.items():
        got = entry[key]
        assert type(got) is type(value), key
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got, value)
            assert got.dtype == value.dtype and got.flags.f_contiguous == value.flags.f_contiguous
        elif key == "masks":
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, value))
        else:
            assert got == value, key


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL, 5])
def test_numpy_data_round_trips(tmp_path: Path, protocol: int):
    path = tmp_path / "data.pickle"
    path.write_bytes(pickle.dumps(lidc_like(), protocol=protocol))
    assert_same(load_pickle(path), lidc_like())


def test_numpy1_module_names_load(tmp_path: Path):
    # numpy 1.x wrote numpy.core.multiarray; protocol 2 stores names as text lines
    data = pickle.dumps(lidc_like(), protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in data
    path = tmp_path / "old.pickle"
    path.write_bytes(data)
    assert_same(load_pickle(path), lidc_like())


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w')",)


class Plain:
    pass


@pytest.mark.parametrize(
    ("payload", "refused"),
    [(RunsShell, f"{os.system.__module__}.system"), (RunsEval, "builtins.eval")],
)
def test_code_running_pickle_is_refused_before_it_runs(tmp_path: Path, payload, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps({"case": {"image": payload(marker)}}))
    with pytest.raises(DataError, match="refused to unpickle global") as error:
        load_pickle(path)
    assert str(error.value).startswith(f"{path}: ")
    assert refused in str(error.value)
    assert not marker.exists()


def test_arbitrary_class_is_refused(tmp_path: Path):
    path = tmp_path / "objects.pickle"
    path.write_bytes(pickle.dumps([Plain()]))
    with pytest.raises(DataError, match=names(path, "refused to unpickle global .*Plain")):
        load_pickle(path)


class OtherCodec:
    def __reduce__(self):
        return codecs.encode, ("payload", "rot13")


def test_codecs_encode_only_for_latin1(tmp_path: Path):
    path = tmp_path / "codec.pickle"
    path.write_bytes(pickle.dumps(OtherCodec()))
    problem = "refused _codecs.encode with encoding 'rot13'"
    with pytest.raises(DataError, match=names(path, problem)):
        load_pickle(path)


def test_truncated_pickle(tmp_path: Path):
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(lidc_like())[:-200])
    with pytest.raises(DataError, match=names(path, "corrupt or truncated pickle")):
        load_pickle(path)


def test_not_a_pickle(tmp_path: Path):
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a pickle at all")
    with pytest.raises(DataError, match=names(path, "corrupt or truncated pickle")):
        load_pickle(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.pickle: no such file"):
        load_pickle(tmp_path / "nope.pickle")
