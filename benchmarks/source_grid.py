"""A model's samples put back on the raters' own grid, for scoring at the data's resolution.

A model trained at 64 × 64 on LIDC's 128 × 128 crops draws masks on its own grid: the crop shrunk
(``alignment.resize_mode: resize``) or its centre cut out (``crop_pad``). GED, HM-IoU and the floor
depend on the grid they are computed on, so two models aligned differently, or a model and a
published figure at 128 × 128, compare only on one grid. This script undoes the model's alignment
on its samples: the soft values (pre-threshold, in [-1, 1]) are resized back bilinearly, or padded
back with 0 around the centre, by the rule alignment used (`cimd_pipeline.data.alignment.
fit_to_size`), and thresholded at 0 as the sampler does. The result is an ``.npz`` of
(cases, N, H, W) binary masks with their case ids, which the evaluator scores against the raters'
tree as stored (docs/evaluation.md):

    python benchmarks/source_grid.py --samples data/07_model_output/test_samples.npz \\
        --model data/06_models/model.pt --size 128 128 --out native_samples.npz
    python -m cimd_pipeline evaluate native_samples.npz /path/to/LIDC-IDRI-slices --only-sampled \\
        --out data/08_reporting/native --compare other_native_samples.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cimd_pipeline.data.alignment import ResizeMode, fit_to_size
from cimd_pipeline.io.atomic import atomic_write
from cimd_pipeline.io.sample_dataset import SampleSetDataset
from cimd_pipeline.models.trained import TrainedModel


def to_source_grid(soft: np.ndarray, size: tuple[int, int], mode: ResizeMode, block: int = 256) -> np.ndarray:
    """Soft samples (B, N, h, w) on the model's grid to binary uint8 (B, N, *size) on the source's.

    Resizing back interpolates the soft values, not the thresholded masks, so a border keeps the
    sub-pixel place the model gave it; padding fills 0, the threshold, which reads as background.
    ``block`` cases at a time: only the binary result is held whole (a float32 copy of LIDC's test
    split at 128 x 128 would be 3 GB).
    """
    cases, n = soft.shape[:2]
    out = np.empty((cases, n, *size), dtype=np.uint8)
    for start in range(0, cases, block):
        part = np.asarray(soft[start : start + block], dtype=np.float32)
        back = fit_to_size(part.reshape(-1, *soft.shape[2:]), size, mode, is_mask=False)
        out[start : start + block] = (back > 0).reshape(len(part), n, *size)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, required=True, help="the sampling pipeline's test_samples.npz")
    parser.add_argument("--model", type=Path, required=True, help="the model.pt that drew them (its alignment)")
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="the raters' grid")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args(argv)
    samples = SampleSetDataset(str(args.samples)).load()
    mode = ResizeMode(TrainedModel.load(args.model).alignment["resize_mode"])
    binary = to_source_grid(samples.soft, tuple(args.size), mode)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, samples=binary, case_ids=np.asarray(samples.case_ids, dtype=str))

    atomic_write(args.out, write)
    print(f"{args.out}: {binary.shape[0]} cases x {binary.shape[1]} samples, {mode.value} back to {tuple(args.size)}")


if __name__ == "__main__":
    main()
