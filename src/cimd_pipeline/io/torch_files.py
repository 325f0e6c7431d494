"""Torch files (training checkpoints and model files): atomic writes, safe loads, strict loading.

Training writes checkpoints and the model file; sampling, inference and the MLflow model read
model files. All of them go through here, so every read is ``weights_only=True`` (no arbitrary
unpickling), every write leaves the previous file intact when it fails, and a state that does not
fit its network fails loudly with every mismatching key listed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimd_pipeline.errors import DataError
from cimd_pipeline.io.atomic import atomic_write

logger = logging.getLogger(__name__)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with torch.save to a temporary file and rename it onto ``path``.

    If the disk is full or the folder unwritable, the previous checkpoint stays intact.
    """
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    logger.debug("checkpoint written to %s", path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "checkpoint not found: train a model first (kedro run --pipeline training)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise DataError(path, f"unreadable or unsafe checkpoint ({type(exc).__name__}: {exc})") from exc


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: object) -> None:
    """``load_state_dict(strict=True)`` with every missing, unexpected or mis-shaped key listed.

    A checkpoint from another model configuration must fail loudly, never load partially.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"] if missing else []
        if unexpected:
            lines.append(f"unexpected: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        lines += [f"shape mismatch {s}" for s in shapes[:20]]
        raise DataError(source, "checkpoint does not match the model configuration:\n  " + "\n  ".join(lines))
    module.load_state_dict(state, strict=True)
