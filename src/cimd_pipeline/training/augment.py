"""Random flips and intensity changes of training examples.

A small multi-rater set is seen hundreds of times in a CPU budget (conf/base: 3,000 steps of 16
draws from 210 cases), so the denoiser can learn the training masks rather than the image-to-mask
map. A flip of an image and all its masks is another example of the same rater distribution
whenever the anatomy has no handedness along that axis, which the user states per axis
(``training.flip_axes``); nothing is flipped by default.

Axes are named by the array, ``width`` (mirror the columns) and ``height`` (mirror the rows),
because that is the only name true for every reader: the same array axis is left-right on an
LIDC crop and anterior-posterior on an axial NIfTI slice in RAS+ (docs/datasets.md, "Flips").

Intensity changes (a random gain and offset of each normalised image, ``training.intensity_scale``
and ``intensity_shift``) leave the masks alone: scanners and windowing differ in contrast and
brightness, not in where the raters draw. Like the flips, nothing changes by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Tensor dimension of each array axis in (batch, channel, height, width) batches.
AXIS_DIMS = {"width": -1, "height": -2}


def draw_flips(axes: Sequence[str], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A fair coin per example and axis, bool (batch_size, len(axes)).

    Drawn for the whole batch from the generator of batch indices, so that every data-parallel
    process draws the same coins and slices out its share, as it does with the indices.
    """
    return torch.rand((batch_size, len(axes)), generator=generator) < 0.5


def apply_flips(
    image: torch.Tensor, masks: torch.Tensor, flips: torch.Tensor, axes: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip ``image`` (B, C, H, W) and ``masks`` (B, R, H, W) where ``flips`` (B, len(axes)) says."""
    for column, axis in enumerate(axes):
        chosen = flips[:, column].to(image.device).view(-1, 1, 1, 1)
        dim = AXIS_DIMS[axis]
        image = torch.where(chosen, image.flip(dim), image)
        masks = torch.where(chosen, masks.flip(dim), masks)
    return image, masks


def draw_intensity(scale: float, shift: float, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Gain minus one and offset per example, float32 (batch_size, 2), uniform in ±scale and ±shift.

    Drawn for the whole batch from the generator of batch indices, as the flips are.
    """
    spread = torch.tensor([scale, shift], dtype=torch.float32)
    return (torch.rand((batch_size, 2), generator=generator) * 2 - 1) * spread


def apply_intensity(image: torch.Tensor, changes: torch.Tensor) -> torch.Tensor:
    """``(1 + gain) * image + offset`` per example; ``changes`` (B, 2) from `draw_intensity`."""
    changes = changes.to(device=image.device, dtype=image.dtype)
    return image * (1 + changes[:, :1, None, None]) + changes[:, 1:, None, None]
