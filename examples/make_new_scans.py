"""Write ``examples/new_scans/``: unlabelled images for the README's inference command.

The images come from the synthetic benchmark's generator with a seed the training data never
uses (2026), so they are new to any model trained on the embedded benchmark: three PNGs (a nodule,
a bone and a lesions image, 8-bit, min-max scaled) and one NIfTI volume of three slices. The
committed files are what this script writes; rerun it only to regenerate them.

    python examples/make_new_scans.py
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from cimd_pipeline.data.synthetic import SyntheticConfig, make_case

OUT = Path(__file__).resolve().parent / "new_scans"


def to_uint8(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return np.round(255 * (image - low) / max(high - low, 1e-8)).astype(np.uint8)


def main() -> None:
    cfg = SyntheticConfig(num_cases=64)
    OUT.mkdir(exist_ok=True)
    first_of_family: dict[str, np.ndarray] = {}
    volume = []
    for index in range(cfg.num_cases):
        case, _ = make_case(cfg, index, seed=2026)
        family = case.meta["family"]
        if family not in first_of_family:
            first_of_family[family] = case.image[0]
        elif family == "nodule" and len(volume) < 3:
            volume.append(case.image[0])
    for family, image in sorted(first_of_family.items()):
        Image.fromarray(to_uint8(image)).save(OUT / f"{family}.png")
    affine = np.diag([0.7, 0.7, 2.5, 1.0])  # anisotropic voxels, as in a CT series
    nib.save(nib.Nifti1Image(np.stack(volume, axis=-1).astype(np.float32), affine), OUT / "nodules_volume.nii.gz")
    print(f"wrote {sorted(p.name for p in OUT.iterdir())} to {OUT}")


if __name__ == "__main__":
    main()
