"""The work of sampling itself: flat rows (image x ensemble member) drawn batch by batch.

Cases x samples are flattened into rows (row r is member r % N of image r // N) and sampled
``batch_size`` rows at a time. Each row draws its noise from its own stream, seeded by (seed,
image key, member) (`cimd_pipeline.diffusion.noise`), so a row's sample does not depend on the
other rows of its batch, the batch size or which process draws it. One process and every worker
of a sharded run (`cimd_pipeline.sharded_sampling`) draw their batches here, so both compute
every batch alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.diffusion.noise import RowGenerators, stream_seed
from cimd_pipeline.errors import SamplingError


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
    precision = torch.autocast(device.type, dtype=torch.bfloat16) if params.bf16 else nullcontext()
    with torch.no_grad(), precision:
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


def draw_batches(
    net: nn.Module,
    images: np.ndarray,
    keys: Sequence[str],
    params: SamplingParams,
    device: torch.device,
    batches: Sequence[range],
    source: str,
    first_image: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Soft masks float16 (rows, H, W) of consecutive ``batches``, in order, drawn in this process.

    ``images`` and ``keys`` start at image ``first_image`` (see `draw_rows`); ``progress`` shows
    a bar counting masks.
    """
    net.to(device).eval()
    total = sum(len(rows) for rows in batches)
    soft = np.empty((total, *images.shape[2:]), dtype=np.float16)
    done = 0
    with tqdm(total=total, disable=not progress, desc="sampling", unit="mask") as bar:
        for rows in batches:
            soft[done : done + len(rows)] = draw_rows(net, images, keys, params, device, rows, source, first_image)
            done += len(rows)
            bar.update(len(rows))
    return soft
