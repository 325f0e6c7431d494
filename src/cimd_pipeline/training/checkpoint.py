"""Checkpoints: atomic writes, safe loads, and strict state loading with a readable error.

A checkpoint holds everything needed to continue a run bit-for-bit on the same machine: model,
EMA and optimiser states, the step, the training generators' states, the loss history and the
training seconds so far, plus what it may only be resumed with: the run's fingerprint, the device
type and the precision (a generator state belongs to its device type, and bf16 autocast follows
another trajectory than fp32).
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

# Version of the checkpoint layout; a checkpoint of another layout is refused, not misread.
CHECKPOINT_FORMAT = 3


def run_settings(fingerprint: str, device: torch.device, params: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (stored in every checkpoint).

    ``params`` is the validated ``training`` block; bf16 autocast applies on CUDA only.
    """
    bf16 = bool(params.bf16) and device.type == "cuda"
    return {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "device": device.type,
        "precision": "bf16" if bf16 else "fp32",
    }


def check_resumable(state: dict[str, Any], settings: dict[str, Any], max_steps: int, path: Path) -> None:
    """Refuse a checkpoint that this run cannot continue honestly, saying what differs.

    Raises ValueError for another layout, another run configuration (fingerprint), another device
    type or precision, and a step beyond ``max_steps``: the weights of a longer run are not those
    of a shorter one.
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: checkpoint layout {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}: "
            "set training.resume=false to train afresh (the checkpoint is then overwritten)"
        )
    if state.get("fingerprint") != settings["fingerprint"]:
        raise ValueError(f"{path}: checkpoint belongs to another run configuration")
    differs = [
        f"training.{'device' if key == 'device' else 'bf16'}: checkpoint written with {key} "
        f"{state.get(key)!r}, this run has {settings[key]!r}"
        for key in ("device", "precision")
        if state.get(key) != settings[key]
    ]
    if differs:
        raise ValueError(
            f"{path}: cannot resume on another device type or precision (the generator state and the "
            "numerics belong to them):\n  " + "\n  ".join(differs) + "\nrun it where it was written "
            "(training.device, training.bf16) or set training.resume=false to train afresh"
        )
    step = int(state["step"])
    if step > max_steps:
        raise ValueError(
            f"{path}: the checkpoint is at step {step}, beyond training.max_steps={max_steps}; its weights "
            f"are not those of a {max_steps}-step run: raise training.max_steps to at least {step}, or set "
            "training.resume=false to train afresh (the checkpoint is then overwritten)"
        )


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
