"""A trained model as one self-describing, safely loadable object.

The file holds the validated model parameters, the image pre-processing it was trained with and
the EMA weights, so sampling and inference rebuild exactly the network that was trained without
reading the project's current configuration (which may have changed since).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimd_pipeline.config import ModelParams, Variant
from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.models.phiseg import PHiSeg
from cimd_pipeline.models.prob_unet import ProbUNet
from cimd_pipeline.io.torch_files import load_checkpoint, load_state_strict, save_checkpoint

FORMAT_VERSION = 1


def build_model(params: ModelParams, image_channels: int) -> nn.Module:
    """The network for ``params.variant`` with freshly initialised weights."""
    if params.variant is Variant.PROB_UNET:  # baselines, docs/baselines.md
        return ProbUNet(params, image_channels)
    if params.variant is Variant.PHISEG:
        return PHiSeg(params, image_channels)
    return CIMD(params, image_channels)


@dataclass
class TrainedModel:
    """Everything needed to sample from a trained model.

    Attributes:
        model: ``model`` parameter block (plain, JSON-able dict).
        image_channels: channels C of the images it was trained on.
        image_size: (H, W) it was trained at.
        alignment: the ``alignment`` block (normalisation, resize mode) to apply to new images.
        reader: the reader's pre-processing: ``source`` and its parsed ``ingestion.reader``
            options (e.g. ``reorient`` of the NIfTI readers), applied again by inference.
        state_dict: EMA weights.
        info: training facts (steps, seconds, device, fingerprint).
        source: where it was loaded from (named in errors; not saved).
    """

    model: dict[str, Any]
    image_channels: int
    image_size: tuple[int, int]
    alignment: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    reader: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="trained model", compare=False)

    @property
    def params(self) -> ModelParams:
        return ModelParams.model_validate(self.model)

    def build(self, source: object | None = None) -> nn.Module:
        """Rebuild the network and load the EMA weights strictly; returns it in eval mode.

        ``source`` names the weights in errors (default: the file it was loaded from).
        """
        net = build_model(self.params, self.image_channels)
        load_state_strict(net, self.state_dict, source or self.source)
        return net.eval()

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "image_channels": self.image_channels,
            "image_size": list(self.image_size),
            "alignment": self.alignment,
            "state_dict": self.state_dict,
            "info": self.info,
            "reader": self.reader,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "trained model") -> "TrainedModel":
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported model file format {data.get('format')!r}, expected {FORMAT_VERSION}")
        return cls(
            model=data["model"],
            image_channels=int(data["image_channels"]),
            image_size=tuple(data["image_size"]),
            alignment=data["alignment"],
            state_dict=data["state_dict"],
            info=data.get("info", {}),
            reader=data.get("reader", {}),  # files written before it was stored: RAS+, the old default
            source=source,
        )

    @classmethod
    def load(cls, path: str | Path) -> TrainedModel:
        """A model.pt file, read with ``weights_only=True`` onto the CPU (Kedro's dataset and scripts alike)."""
        return cls.from_dict(load_checkpoint(path, map_location=torch.device("cpu")), source=str(path))

    def save(self, path: str | Path) -> None:
        """Written atomically: a failed write leaves the previous file intact."""
        save_checkpoint(self.to_dict(), path)
