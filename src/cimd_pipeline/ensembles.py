"""Drawing ensembles of masks: every test case times N samples, batched through one sampler.

The reference code draws one ensemble member at a time; here cases x samples are flattened into
rows (row r is member r % N of image r // N) and sampled ``batch_size`` rows at a time, which is
what makes 16 samples per image affordable on a CPU. Each row draws its noise from its own
stream, seeded by (seed, image key, member) (`cimd_pipeline.diffusion.noise`), so an image's
samples do not depend on the other images, the batch size or the number of worker processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators, stream_seed
from cimd_pipeline.errors import SamplingError

logger = logging.getLogger(__name__)


@dataclass
class SampleSet:
    """Samples of a set of cases.

    Attributes:
        case_ids: (B,) ids, in the order of the arrays.
        binary: uint8 (B, N, H, W) masks (soft > 0).
        soft: float16 (B, N, H, W) pre-threshold values in [-1, 1].
        info: method, steps, seconds, masks per second, seed.
    """

    case_ids: np.ndarray
    binary: np.ndarray
    soft: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def row_batches(total: int, batch_size: int) -> list[range]:
    """The flat rows ``[0, total)`` cut into consecutive batches of at most ``batch_size``."""
    return [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def draw_rows(
    net: nn.Module,
    images: np.ndarray,
    keys: Sequence[str],
    params: SamplingParams,
    device: torch.device,
    rows: range,
    source: str,
    first_image: int = 0,
) -> np.ndarray:
    """Soft masks float16 (len(rows), H, W) of one batch of flat rows.

    Args:
        images: (B', C, H, W) images ``first_image`` onwards; ``keys`` their ids.
        rows: flat rows of the whole set (row r is member r % N of image r // N).
        source: the model, named in the error when the sampler returns NaN or inf.

    Raises:
        SamplingError: a sample is not finite (a diverged model or schedule); thresholding it
            would silently give an empty mask.
    """
    n = params.num_samples
    flat = np.arange(rows.start, rows.stop)
    index = flat // n - first_image
    seeds = [stream_seed(params.seed, str(keys[i]), int(k)) for i, k in zip(index, flat % n)]
    batch = torch.from_numpy(np.asarray(images[index], dtype=np.float32)).to(device)
    with torch.no_grad():
        out = net.sample(batch, params, RowGenerators(seeds, device))[:, 0].float()
    finite = torch.isfinite(out).flatten(1).all(1).cpu().numpy()
    if not finite.all():
        cases = sorted({str(keys[i]) for i in index[~finite]})
        raise SamplingError(
            f"{source}: {int((~finite).sum())} of {len(flat)} samples in rows {rows.start}-{rows.stop - 1} "
            f"contain NaN or inf ({params.method}, {params.steps} steps, eta {params.eta}; images "
            f"{', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''}): the model or its noise schedule "
            "diverged, and thresholding would turn these samples into empty masks"
        )
    return out.cpu().numpy().astype(np.float16)


def draw_ensembles(
    net: nn.Module,
    images: np.ndarray,
    case_ids: np.ndarray,
    params: SamplingParams,
    device: torch.device,
    source: str | None = None,
) -> SampleSet:
    """Draw ``params.num_samples`` masks for each image (B, C, H, W) with ``net.sample``.

    ``net`` keeps `models.contract.Segmenter`. ``case_ids`` key each image's noise streams, so
    the same id, image and seed give the same samples whatever else is drawn with them. With
    ``params.num_processes > 1`` the batches are shared out among worker processes
    (`cimd_pipeline.sharded_sampling`) with bit-identical results.

    Args:
        source: names the model in errors (default: its class).
    """
    source = source or type(net).__name__
    n = params.num_samples
    total = len(images) * n
    height, width = images.shape[2:]
    keys = np.asarray(case_ids, dtype=str)
    batches = row_batches(total, params.batch_size)
    started = time.perf_counter()
    if params.num_processes > 1 and len(batches) > 1:
        from cimd_pipeline.sharded_sampling import draw_sharded  # spawns processes: only when asked

        soft = draw_sharded(net, images, keys, params, device, batches, source)
    else:
        soft = np.empty((total, height, width), dtype=np.float16)
        net.to(device).eval()
        with tqdm(total=total, disable=not params.progress, desc="sampling", unit="mask") as bar:
            for rows in batches:
                soft[rows.start : rows.stop] = draw_rows(net, images, keys, params, device, rows, source)
                bar.update(len(rows))
    seconds = time.perf_counter() - started
    soft = soft.reshape(len(images), n, height, width)
    return SampleSet(
        case_ids=keys,
        binary=(soft > 0).astype(np.uint8),
        soft=soft,
        info={
            "method": params.method,
            "steps": params.steps,
            "num_samples": n,
            "seconds": seconds,
            "masks_per_second": total / max(seconds, 1e-9),
            "seed": params.seed,
            "device": str(device),
            "num_processes": params.num_processes,
        },
    )
