"""Inference on new, unlabelled images: N masks per image plus mean and uncertainty maps.

A trained model is only useful on new images if they go through exactly the pre-processing it was
trained with, so every step here reuses the training code: the folder reader's PNG/JPEG decoding,
the NIfTI reader's RAS+ reorientation (when the reader options stored with the model say so) and
slicing along ``alignment.slice_axis``, and
`fit_to_size` + `normalise` with the alignment block stored in the model file. Samples are drawn
at the model's size and resized back to the input's in-plane size, and the maps are computed from
the resized binary samples so that mean and variance agree exactly with the masks written.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from cimd_pipeline.config import AlignmentParams, InferenceParams, SamplingParams
from cimd_pipeline.data.alignment import fit_to_size, normalise
from cimd_pipeline.data.readers.folders import data_files, read_image
from cimd_pipeline.ensembles import draw_ensembles
from cimd_pipeline.errors import DataError
from cimd_pipeline.io.atomic import atomic_write_dir
from cimd_pipeline.models.trained import TrainedModel

logger = logging.getLogger(__name__)

RASTER = (".png", ".jpg", ".jpeg")
NIFTI = (".nii", ".nii.gz")
PNG_SCALE = 65535  # 16-bit PNG maps hold value * PNG_SCALE
_NIFTI_ERRORS = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


@dataclass
class InputImage:
    """One input as 2-D slices, plus what is needed to put results back on its grid.

    Attributes:
        path: the file.
        slices: float32 (S, C, H, W) raw intensities (S = 1 for 2-D images).
        nifti: the input NIfTI (affine and header for the outputs); None for PNG/JPEG.
        to_grid: maps (S, H, W, *extra) back onto the input's voxel grid (NIfTI only).
    """

    path: Path
    slices: np.ndarray
    nifti: nib.Nifti1Image | None = None
    to_grid: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Maps:
    """Results of one input at its in-plane size: samples uint8 (S, N, H, W); the rest (S, H, W)."""

    samples: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    entropy: np.ndarray


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI)


def find_images(source: Path) -> list[Path]:
    """The PNG/JPEG/NIfTI files to process: ``source`` itself, or every one under the folder."""
    if source.is_file():
        if not (is_nifti(source) or source.suffix.lower() in RASTER):
            raise DataError(source, f"not an image this pipeline reads ({', '.join(RASTER + NIFTI)})")
        return [source]
    if not source.is_dir():
        raise DataError(source, "no such file or folder (set inference.input)")
    files = [p for p in data_files(source.rglob("*")) if is_nifti(p) or p.suffix.lower() in RASTER]
    if not files:
        raise DataError(source, f"empty input folder: no {', '.join(RASTER + NIFTI)} files in it")
    return files


def output_folder(path: Path, source: Path, output: Path) -> Path:
    """``output/<path relative to the input folder, without its image suffix>``."""
    relative = Path(relative_name(path, source))
    name = relative.name
    for suffix in NIFTI + RASTER:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output / relative.parent / name


def relative_name(path: Path, source: Path) -> str:
    """The input's path relative to the input folder (its file name when the input is a file)."""
    return (path.relative_to(source) if source.is_dir() else Path(path.name)).as_posix()


def load_image(path: Path, channels: int, slice_axis: int, reorient: bool = True) -> InputImage:
    """Read one file as (S, C, H, W) slices, refusing unreadable files, NaN and wrong channels.

    ``reorient``: turn 3-D NIfTI volumes RAS+ before slicing, as the training reader did (the
    ``reorient`` option stored with the model; models trained on 2-D images leave it on).
    """
    image = _load_nifti(path, slice_axis, reorient) if is_nifti(path) else _load_raster(path, channels)
    if image.slices.shape[1] != channels:
        problem = f"{image.slices.shape[1]} channel(s), but the model was trained on {channels}"
        raise DataError(path, problem)
    if not np.isfinite(image.slices).all():
        raise DataError(path, "image contains NaN or infinite intensities")
    return image


def _load_raster(path: Path, channels: int) -> InputImage:
    if channels not in (1, 3):
        raise DataError(path, f"the model takes {channels} channels; PNG/JPEG give 1 or 3")
    return InputImage(path, read_image(path, "rgb" if channels == 3 else "gray")[None])


def _load_nifti(path: Path, slice_axis: int, reorient: bool) -> InputImage:
    """(X, Y[, Z[, C]]) NIfTI → slices; 3-D volumes are turned RAS+ first when ``reorient``."""
    try:
        nifti = nib.load(path)
        data = nifti.get_fdata(dtype=np.float32)
    except _NIFTI_ERRORS as exc:
        raise DataError(path, f"unreadable NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim not in (2, 3, 4):
        problem = f"expected a 2-D or 3-D image (channels on a 4th axis), got shape {data.shape}"
        raise DataError(path, problem)
    volume = data.reshape(*data.shape[:2], *(data.shape[2:3] or (1,)), -1)  # (X, Y, Z, C)
    if volume.shape[2] == 1:  # a 2-D image: one slice, no reorientation (as the reader does)
        slices = volume[:, :, 0].transpose(2, 0, 1)[None]
        spatial = data.shape[:3] if data.ndim == 4 else data.shape

        def unflatten(maps: np.ndarray) -> np.ndarray:
            return maps[0].reshape(*spatial, *maps.shape[3:])

        return InputImage(path, slices, nifti, unflatten)
    orientation = io_orientation(nifti.affine) if reorient else None
    oriented = apply_orientation(volume, orientation) if reorient else volume  # (X', Y', Z', C)
    slices = np.moveaxis(np.moveaxis(oriented, 3, 0), slice_axis + 1, 0)  # (S, C, H, W)

    def to_grid(maps: np.ndarray) -> np.ndarray:
        maps = np.moveaxis(maps, 0, slice_axis)
        if orientation is None:
            return maps
        return apply_orientation(maps, ornt_transform(axcodes2ornt("RAS"), orientation))

    return InputImage(path, np.ascontiguousarray(slices), nifti, to_grid)


def prepare(slices: np.ndarray, alignment: AlignmentParams, size: tuple[int, int]) -> np.ndarray:
    """Training's transform per slice: `fit_to_size` to the model size, then `normalise`."""
    mode, norm = alignment.resize_mode, alignment.normalisation
    return np.stack([normalise(fit_to_size(s, size, mode, False), norm) for s in slices])


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p) per pixel (0 where p is 0 or 1, 1 at p = 0.5)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(terms, nan=0.0).astype(np.float32)


def uncertainty_maps(binary: np.ndarray, size: tuple[int, int], alignment: AlignmentParams) -> Maps:
    """Resize binary samples (S, N, h, w) back to ``size``; mean, variance and entropy from them."""
    resized = [fit_to_size(b, size, alignment.resize_mode, True) for b in binary]
    samples = np.stack(resized).astype(np.uint8)
    mean = samples.mean(axis=1, dtype=np.float64)
    return Maps(
        samples=samples,
        mean=mean.astype(np.float32),
        variance=samples.var(axis=1, dtype=np.float64).astype(np.float32),
        entropy=binary_entropy(mean),
    )


def slice_keys(name: str, count: int) -> list[str]:
    """Noise-stream keys of an input's slices: its relative path, plus ``:<slice>`` for volumes.

    Inference and the MLflow pyfunc key each image by the same name, so they draw the same
    samples for the same image and seed, whatever else is sampled with it.
    """
    return [name] if count == 1 else [f"{name}:{j}" for j in range(count)]


def sample_maps(
    net: nn.Module,
    trained: TrainedModel,
    slices: list[np.ndarray],
    names: list[str],
    sampling: SamplingParams,
    device: torch.device,
) -> list[Maps]:
    """Sample every input's slices in one batched pass; one `Maps` per entry of ``slices``.

    Args:
        slices: per input, raw (S, C, H, W) intensities; inputs may differ in S, H and W.
        names: per input, the key of its noise streams (its path relative to the input folder).
    """
    alignment = AlignmentParams.model_validate(trained.alignment)
    size = tuple(trained.image_size)
    prepared = [prepare(s, alignment, size) for s in slices]
    stacked = np.concatenate(prepared)
    keys = [key for name, p in zip(names, prepared) for key in slice_keys(name, len(p))]
    source = f"{trained.model.get('variant')} model {trained.source}"
    drawn = draw_ensembles(net, stacked, np.asarray(keys), sampling, device, source).binary
    bounds = np.cumsum([0, *(len(p) for p in prepared)])
    return [
        uncertainty_maps(drawn[start:stop], s.shape[2:], alignment)
        for s, start, stop in zip(slices, bounds[:-1], bounds[1:])
    ]


def chunks(images: Iterator[InputImage], masks_per_batch: int, samples: int) -> Iterator[list[InputImage]]:
    """Group inputs until they fill a sampler batch, so small 2-D images are sampled together."""
    chunk: list[InputImage] = []
    for image in images:
        chunk.append(image)
        if sum(len(i.slices) for i in chunk) * samples >= masks_per_batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def overlay_figure(image: np.ndarray, mean: np.ndarray, title: str) -> Figure:
    """The image's first channel in grey, the mean mask as a heatmap and its 0.5 contour."""
    fig = Figure(figsize=(4, 4))
    ax = fig.subplots()
    ax.imshow(image[0], cmap="gray", interpolation="nearest")
    heat = np.ma.masked_less_equal(mean, 0)
    ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
    if mean.min() < 0.5 <= mean.max():
        ax.contour(mean, levels=[0.5], colors="cyan", linewidths=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig


def _write_raster(folder: Path, maps: Maps) -> None:
    """Samples as 0/255 PNGs; maps as 16-bit PNGs holding ``value * 65535``."""
    for k, mask in enumerate(maps.samples[0]):
        Image.fromarray(mask * 255).save(folder / f"sample_{k:02d}.png")
    for name in ("mean", "variance", "entropy"):
        value = np.round(getattr(maps, name)[0].astype(np.float64) * PNG_SCALE).astype(np.uint16)
        Image.fromarray(value).save(folder / f"{name}.png")


def _write_nifti(folder: Path, image: InputImage, maps: Maps) -> None:
    """Samples as one 4-D uint8 volume (X, Y, Z, N); maps as float32 volumes on the input grid."""
    nifti, to_grid = image.nifti, image.to_grid

    def save(name: str, array: np.ndarray, dtype: type) -> None:
        header = nifti.header.copy()
        header.set_data_dtype(dtype)
        nib.save(type(nifti)(np.asarray(array, dtype=dtype), nifti.affine, header), folder / f"{name}.nii.gz")

    samples = to_grid(np.moveaxis(maps.samples, 1, -1))
    save("samples", samples[:, :, None] if samples.ndim == 3 else samples, np.uint8)
    for name in ("mean", "variance", "entropy"):
        save(name, to_grid(getattr(maps, name)), np.float32)


def write_outputs(image: InputImage, maps: Maps, folder: Path) -> dict[str, object]:
    """Write one input's results into ``folder`` (swapped in whole); return its summary row."""
    shown = int(np.argmax(maps.mean.reshape(len(maps.mean), -1).sum(1)))

    def write(tmp: Path) -> None:
        if image.nifti is None:
            _write_raster(tmp, maps)
        else:
            _write_nifti(tmp, image, maps)
        title = image.path.name if len(maps.mean) == 1 else f"{image.path.name}, slice {shown}"
        overlay_figure(image.slices[shown], maps.mean[shown], title).savefig(tmp / "overlay.png", dpi=100)

    atomic_write_dir(folder, write)
    return {
        "input": str(image.path),
        "output": str(folder),
        "slices": len(maps.mean),
        "height": maps.mean.shape[1],
        "width": maps.mean.shape[2],
        "num_samples": maps.samples.shape[1],
        "mean_foreground": float(maps.mean.mean()),
        "mean_entropy": float(maps.entropy.mean()),
        "max_variance": float(maps.variance.max()),
    }


def run_inference(trained: TrainedModel, params: InferenceParams, device: torch.device) -> pd.DataFrame:
    """Sample every input under ``params.input``, write its results, return one row per input.

    Every file is read once before sampling starts, so a broken file fails the run in seconds
    rather than after an hour of sampling.
    """
    source = Path(params.input)
    files = find_images(source)
    folders = {p: output_folder(p, source, Path(params.output)) for p in files}
    writers: dict[Path, Path] = {}
    for path, folder in folders.items():
        if folder in writers:
            raise DataError(path, f"{writers[folder].name} would write to the same {folder}: rename one")
        writers[folder] = path
    alignment = AlignmentParams.model_validate(trained.alignment)
    reorient = bool(trained.reader.get("reorient", True))
    for path in files:
        load_image(path, trained.image_channels, alignment.slice_axis, reorient)
    net = trained.build()
    logger.info(
        "inference on %d file(s) from %s, %d samples each, on %s", len(files), source, params.num_samples, device
    )
    images = (load_image(p, trained.image_channels, alignment.slice_axis, reorient) for p in files)
    rows = []
    with tqdm(total=len(files), desc="inference", unit="image", disable=not params.progress) as bar:
        for chunk in chunks(images, params.batch_size, params.num_samples):
            names = [relative_name(i.path, source) for i in chunk]
            results = sample_maps(net, trained, [i.slices for i in chunk], names, params.sampling(), device)
            for image, maps in zip(chunk, results):
                rows.append(write_outputs(image, maps, folders[image.path]))
            bar.update(len(chunk))
    logger.info("wrote results for %d input(s) under %s", len(rows), params.output)
    return pd.DataFrame(rows)
