"""The aligned set written case by case: same content as stacking in memory, rows grouped by split,
raters padded, oracle kept only when complete, and splits read back as views of the files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cimd_pipeline.data.aligned import SPLITS, row_blocks
from cimd_pipeline.data.aligned_files import AlignedStream, read_aligned, write_set, write_stream
from cimd_pipeline.data.alignment import Normalisation, ResizeMode, align_cases, stack_cases
from cimd_pipeline.data.cases import Case
from cimd_pipeline.data.synthetic import SyntheticConfig, generate
from cimd_pipeline.errors import DataError

FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}


def aligned(num_cases: int = 30):
    cases = generate(SyntheticConfig(num_cases=num_cases, image_size=32), seed=3)
    return align_cases(cases, (16, 16), ResizeMode.RESIZE, Normalisation.ZSCORE, None, 2, 0.0, 0)


def test_streamed_set_equals_the_stacked_one_with_each_split_in_one_block(tmp_path: Path):
    write_stream(tmp_path, AlignedStream(aligned(), FRACTIONS, seed=1))
    data = read_aligned(tmp_path)
    stacked = stack_cases(aligned(), FRACTIONS, seed=1)
    splits = data.cases["split"].to_numpy()
    ranks = [SPLITS.index(s) for s in splits]
    assert ranks == sorted(ranks) and set(splits) == set(SPLITS)  # train, then val, then test
    position = {cid: i for i, cid in enumerate(stacked.cases["case_id"])}
    order = np.array([position[cid] for cid in data.cases["case_id"]])
    assert sorted(order) == list(range(len(stacked)))
    assert (np.diff(order[splits == "train"]) > 0).all()  # stream order kept within a split
    np.testing.assert_array_equal(data.images, stacked.images[order])
    np.testing.assert_array_equal(data.masks, stacked.masks[order])
    np.testing.assert_array_equal(data.oracle, stacked.oracle[order])
    np.testing.assert_array_equal(data.rater_valid, stacked.rater_valid[order])
    assert data.cases.drop(columns="split").equals(stacked.cases.iloc[order].drop(columns="split").reset_index(drop=True))
    assert (data.cases["split"].to_numpy() == stacked.cases["split"].to_numpy()[order]).all()


def test_a_split_of_the_files_is_a_view_not_a_copy(tmp_path: Path):
    write_stream(tmp_path, AlignedStream(aligned(), FRACTIONS, seed=1))
    data = read_aligned(tmp_path)
    for split in SPLITS:
        part = data.subset(split)
        for name in ("images", "masks", "oracle"):
            array = getattr(part, name)
            assert isinstance(array, np.memmap) and np.shares_memory(array, getattr(data, name)), (split, name)
        assert len(part) == (data.cases["split"] == split).sum()
    rows = data.take(np.array([0, 2]))  # not consecutive: a copy of those rows
    assert not isinstance(rows.images, np.memmap)
    np.testing.assert_array_equal(rows.images, data.images[[0, 2]])


def case(name: str, raters: int, oracle: bool, value: int = 1) -> Case:
    masks = np.zeros((raters, 8, 8), np.uint8)
    masks[:, 2:5, 2:5] = value
    return Case(
        case_id=name,
        group_id=name,
        image=np.full((1, 8, 8), float(len(name)), np.float32),
        masks=masks,
        rater_valid=np.ones(raters, bool),
        oracle=masks[:1].copy() if oracle else None,
        meta={"source": f"{name}.png"},
    )


def test_raters_are_padded_and_an_incomplete_oracle_is_dropped(tmp_path: Path):
    cases = [case("a", 2, True), case("bb", 4, False), case("ccc", 3, True)]
    write_stream(tmp_path, AlignedStream(cases, {"test": 1.0}, seed=0))
    data = read_aligned(tmp_path)
    assert data.masks.shape == (3, 4, 8, 8) and data.oracle is None
    assert data.rater_valid.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert not data.masks[0, 2:].any() and data.masks[0, :2, 3, 3].all()
    assert not list(tmp_path.glob(".*spool"))  # the spool files are gone


def test_bad_streams_are_refused(tmp_path: Path):
    with pytest.raises(DataError, match="empty dataset after slicing"):
        write_stream(tmp_path, AlignedStream([], {"test": 1.0}, 0))
    wide = case("w", 2, False)
    wide.image = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(DataError, match=r"different channel counts \[1, 2\]"):
        write_stream(tmp_path, AlignedStream([case("a", 2, False), wide], {"test": 1.0}, 0))
    big = case("big", 2, False)
    big.masks = np.zeros((2, 9, 9), np.uint8)
    big.image = np.zeros((1, 9, 9), np.float32)
    with pytest.raises(DataError, match=r"big\.png: aligned case of spatial shape \(9, 9\)"):
        write_stream(tmp_path, AlignedStream([case("a", 2, False), big], {"test": 1.0}, 0))


def test_row_blocks_cover_every_row_once_in_order(tmp_path: Path):
    array = np.arange(7 * 3).reshape(7, 3)
    np.save(tmp_path / "a.npy", array)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    blocks = list(row_blocks(mapped, rows=3))
    assert [len(b) for b in blocks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), array)
    np.testing.assert_array_equal(mapped, array)  # pages handed back are read again on access


def resident_file_kb() -> int:
    """Pages of mapped files this process holds (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
def test_row_blocks_do_not_keep_a_mapped_file_resident(tmp_path: Path):
    array = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(256, 256, 1024))
    array[:] = 1
    array.flush()
    del array
    mapped = np.load(tmp_path / "big.npy", mmap_mode="r")  # 64 MiB
    before = resident_file_kb()
    total = sum(int(block.sum(dtype=np.int64)) for block in row_blocks(mapped, rows=16))
    assert total == 256 * 256 * 1024
    assert resident_file_kb() - before < 16 * 1024  # a 4 MiB block at a time, not 64 MiB


def test_arrays_hold_exactly_their_rows_and_ids_stay_text(tmp_path: Path):
    cases = [case("a", 2, False), case("bb", 4, False), case("ccc", 4, False)]
    for k, one in enumerate(cases):  # numeric-looking ids stay strings
        one.case_id, one.group_id = f"00{k + 7}", f"01{k}"
    write_stream(tmp_path, AlignedStream(cases, {"test": 1.0}, seed=0))
    data = read_aligned(tmp_path)
    for name in ("images", "masks"):
        array = getattr(data, name)
        assert (tmp_path / f"{name}.npy").stat().st_size == array.offset + array.nbytes, name
    assert data.cases.loc[0, "case_id"] == "007" and data.cases.loc[0, "group_id"] == "010"
    assert data.rater_valid.dtype == bool and data.masks.dtype == np.uint8
    in_memory = read_aligned(tmp_path, mmap=False)
    assert not isinstance(in_memory.images, np.memmap)
    np.testing.assert_array_equal(in_memory.masks, data.masks)


def test_collect_stacks_what_write_set_stores_as_it_is(tmp_path: Path):
    stacked = AlignedStream(aligned(12), {"train": 0.5, "test": 0.5}, seed=2).collect()
    reference = stack_cases(aligned(12), {"train": 0.5, "test": 0.5}, seed=2)
    assert stacked.cases.equals(reference.cases)
    np.testing.assert_array_equal(stacked.images, reference.images)
    write_set(tmp_path, stacked)
    back = read_aligned(tmp_path)
    assert back.cases.equals(stacked.cases)  # rows in the set's own order
    for name in ("images", "masks", "rater_valid", "oracle"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stacked, name))
    with pytest.raises(DataError, match=r"empty: no aligned dataset here: run the mask_alignment pipeline first"):
        read_aligned(tmp_path / "empty")
