"""The two methods every model variant offers, so one training loop and one sampler serve them all.

CIMD, its ablations and the baselines (Prob. U-Net, PHiSeg) differ in what they learn, not in how
the pipeline drives them: `training.loop` only calls ``losses`` and ``ensembles``/``inference``
only call ``sample``. Keeping the contract here, documented once, is what lets a new variant join
the pipeline without touching either.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.diffusion.noise import Generator


class Segmenter(Protocol):
    def losses(
        self, image: Tensor, masks: Tensor, valid: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Scalar batch means: ``loss`` is optimised, every other term is logged as ``train.<name>``.

        Args:
            image: (B, C, H, W) normalised images.
            masks: (B, R, H, W) rater masks in {0, 1}.
            valid: (B, R) bool, at least one True per row.
            generator: the only source of randomness (rater choice, timesteps, noise, latents),
                so that a resumed run repeats an uninterrupted one.
        """
        ...

    def sample(self, image: Tensor, params: SamplingParams, generator: Generator = None) -> Tensor:
        """One soft mask (B, 1, H, W) in [-1, 1] per image row; 0 is the binary threshold.

        ``generator`` is the only source of randomness; with `RowGenerators` row i must draw
        only from generator i, so that a row's mask does not depend on the rest of the batch.
        """
        ...
