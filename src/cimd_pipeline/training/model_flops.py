"""Model FLOPs of one training step, for throughput and model FLOP utilisation (MFU) figures.

MFU compares the arithmetic a step *needs* (forward and backward of the loss, as PyTorch's
`FlopCounterMode` counts matrix products and convolutions at 2 FLOPs per multiply-add) with what
the device could do in the measured step time, so it is comparable across batch sizes, process
counts and machines.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cimd_pipeline.data.aligned import AlignedSet


def training_step_flops(model: nn.Module, data: AlignedSet, batch_size: int, seed: int = 0) -> int:
    """FLOPs of ``model.losses`` forward plus backward on ``batch_size`` cases of ``data`` (CPU).

    The cases are the first ``batch_size`` of ``data`` (repeated when it holds fewer); the count
    does not depend on their values, only on the shapes and the model.
    """
    index = np.arange(batch_size) % len(data)
    image = torch.from_numpy(np.asarray(data.images[index], dtype=np.float32))
    masks = torch.from_numpy(np.asarray(data.masks[index]))
    valid = torch.from_numpy(np.asarray(data.rater_valid[index], dtype=bool))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model.losses(image, masks, valid, generator)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())
