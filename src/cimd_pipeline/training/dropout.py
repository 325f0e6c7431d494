"""Dropout in the denoiser's residual blocks during training (``training.dropout``).

Ho et al. (2020, appendix B) regularise the DDPM U-Net with dropout between the second activation
and the second convolution of every residual block (0.1 on CIFAR-10; without it their samples
showed overfitting artefacts), and Nichol & Dhariwal (2021) keep it (0.3 on CIFAR-10). A multi-rater
set of a few hundred cases is smaller still (docs/quality.md measures the overfitting). MONAI's
``DiffusionModelUNet`` has no dropout, so it is added for the run as a forward pre-hook on each
block's ``conv2``:

* the network's parameters and ``state_dict`` keys are those of the same U-Net without dropout, so
  ``model.pt``, sampling and inference are unchanged (the hook does nothing in eval mode);
* the keep masks are drawn from the model's checkpointed training generator through `models.draws`,
  so a resumed run and a data-parallel run follow the one-process trajectory, as every other draw.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cimd_pipeline.models import draws


def add_dropout(model: nn.Module, rate: float, generator: torch.Generator) -> list[RemovableHandle]:
    """Drop each input of every residual block's second convolution with probability ``rate``
    while ``model`` trains (inverted dropout: the kept ones are scaled by 1 / (1 - rate)).

    Returns the hooks' handles; ``handle.remove()`` gives the plain network back. Raises
    ValueError when ``model`` has no diffusion U-Net residual block (the baselines).
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"dropout rate must be in (0, 1), got {rate}")
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    blocks = [module for module in model.modules() if isinstance(module, DiffusionUNetResnetBlock)]
    if not blocks:
        raise ValueError(
            f"training.dropout acts in the diffusion U-Net's residual blocks; {type(model).__name__} has none"
        )
    keep = 1.0 - rate

    def drop(conv: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        if not conv.training:
            return None
        (hidden,) = inputs
        kept = draws.rand(hidden.shape, generator, hidden.device) < keep
        return (hidden * kept.to(hidden.dtype) / keep,)

    return [block.conv2.register_forward_pre_hook(drop) for block in blocks]
