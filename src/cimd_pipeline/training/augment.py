"""Random flips, small affine changes and intensity changes of training examples.

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

Small affine changes (``training.affine_rotation`` degrees, ``affine_translation`` as a fraction of
the image side, ``affine_scaling`` as a fraction of the size) move an image and all its masks
together: a lesion a little turned, shifted or larger is another example of the same rater
distribution wherever position and orientation carry no meaning of their own. The image is
resampled bilinearly with its border values repeated outside, the masks by their nearest pixel with
background outside, so they stay binary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

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


def draw_affine(rotation: float, translation: float, scaling: float, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Angle (radians), shift along height and width (fractions of the side) and zoom minus one per
    example, float32 (batch_size, 4), each uniform in ±its bound.

    Drawn for the whole batch from the generator of batch indices, as the flips are.
    """
    spread = torch.tensor([math.radians(rotation), translation, translation, scaling], dtype=torch.float32)
    return (torch.rand((batch_size, 4), generator=generator) * 2 - 1) * spread


def apply_affine(image: torch.Tensor, masks: torch.Tensor, changes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn, shift and zoom ``image`` (B, C, H, W) and its ``masks`` (B, R, H, W) by ``changes``
    (B, 4) from `draw_affine`; the same map for the image and every mask of an example.

    The output pixel at p shows the input at R(-angle)·(p - shift)/(1 + zoom) about the centre, in
    coordinates where the side has length 2 (`torch.nn.functional.affine_grid` with
    ``align_corners=False``, so a quarter turn or a whole-pixel shift moves pixel centres onto pixel
    centres).
    """
    changes = changes.to(device=image.device, dtype=torch.float32)
    angle, shift_h, shift_w, zoom = changes.unbind(1)
    cos, sin = torch.cos(angle) / (1 + zoom), torch.sin(angle) / (1 + zoom)
    # grid (x = width, y = height) -> input location: the inverse of the forward map
    shift = torch.stack([shift_w, shift_h], 1) * 2
    rotation = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    theta = torch.cat([rotation, -(rotation @ shift[:, :, None])], 2)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    moved = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    moved_masks = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return moved.to(image.dtype), moved_masks.round().to(masks.dtype)
