"""Wall time and peak RSS of reading and aligning the LIDC slice tree, per stage and size.

Each stage is the project's own ``kedro run --env lidc --pipelines <stage>`` in a throw-away
project copy, timed from outside; its peak RSS is the kernel's for that process (``wait4``).
Sizes are numbers of slices: the first patients of ``--root`` (the public ``LIDC-IDRI-slices``
tree, linked, not copied) whose slices reach the size, or, without ``--root``, a tree of the same
layout written here (random CT-like crops, 0/255 disks, some readers empty).

    python benchmarks/lidc_scale.py --sizes 1000 4000 all --root data/01_raw/LIDC-IDRI-slices
    python benchmarks/lidc_scale.py --sizes 300                       # a written tree
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _kedro import ROOT
from PIL import Image

STAGES = ("data_ingestion", "mask_alignment")


def project_copy(target: Path) -> Path:
    """What ``kedro run`` needs: conf (without local), pyproject, telemetry consent, data folders."""
    shutil.copytree(ROOT / "conf", target / "conf", ignore=shutil.ignore_patterns("local"))
    (target / "conf" / "local").mkdir()
    (target / "src").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(ROOT / name, target / name)
    for layer in (ROOT / "data").iterdir():
        if layer.is_dir():
            (target / "data" / layer.name).mkdir(parents=True)
    return target


def linked_subset(root: Path, size: int | None, target: Path) -> int:
    """Link the first patients of ``root`` until ``size`` slices (None: all); returns the count."""
    target.mkdir(parents=True)
    total = 0
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        if size is not None and total >= size:
            break
        (target / patient.name).symlink_to(patient.resolve(), target_is_directory=True)
        total += sum(1 for _ in patient.glob("*/images/*.png"))
    return total


def written_tree(size: int, target: Path, seed: int = 0) -> int:
    """A tree of the public layout: patients of 1-3 nodules of 2-12 slices, 128x128 PNGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:128, :128]
    total, patient = 0, 0
    while total < size:
        patient += 1
        for nodule in range(int(rng.integers(1, 4))):
            folder = target / f"LIDC-IDRI-{patient:04d}" / f"nodule-{nodule}"
            for number in range(min(int(rng.integers(2, 13)), size - total)):
                (folder / "images").mkdir(parents=True, exist_ok=True)
                image = np.clip(rng.normal(90, 40, (128, 128)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / "images" / f"slice-{number}.png")
                for reader in range(4):
                    radius = 0 if rng.random() < 0.15 else rng.uniform(4, 20)
                    mask = (((yy - 64) ** 2 + (xx - 64) ** 2) < radius**2).astype(np.uint8) * 255
                    (folder / f"mask-{reader}").mkdir(exist_ok=True)
                    Image.fromarray(mask).save(folder / f"mask-{reader}" / f"slice-{number}.png")
                total += 1
            if total >= size:
                break
    return total


def run_stage(project: Path, stage: str, tree: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one ``kedro run`` stage; raises with its log on failure."""
    command = [sys.executable, "-m", "kedro", "run", "--env", "lidc", "--pipelines", stage]
    command += ["--params", f"ingestion.root={tree}"]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    log = project / f"{stage}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-6000:]}")
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is in kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1000", "4000", "all"], help="slices per run ('all': the whole --root)")
    parser.add_argument("--root", type=Path, help="the LIDC-IDRI-slices folder (else a written tree)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lidc_scale_"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("| slices | stage | wall s | peak RSS GB | s per 1k slices |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        wanted = None if size == "all" else int(size)
        if wanted is None and args.root is None:
            raise SystemExit("--sizes all needs --root")
        folder = work / f"run_{size}"
        shutil.rmtree(folder, ignore_errors=True)
        tree = folder / "LIDC-IDRI-slices"
        count = linked_subset(args.root, wanted, tree) if args.root else written_tree(wanted, tree)
        project = project_copy(folder / "project")
        for stage in STAGES:
            wall, rss = run_stage(project, stage, tree)
            print(f"| {count} | {stage} | {wall:.1f} | {rss:.2f} | {wall / count * 1000:.1f} |", flush=True)
        if wanted is None:  # the full set's arrays are ~2 GB
            shutil.rmtree(project / "data", ignore_errors=True)


if __name__ == "__main__":
    main()
