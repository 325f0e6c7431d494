"""Checkpoints: what a training checkpoint must share with the run that resumes it.

A checkpoint holds everything needed to continue a run bit-for-bit on the same machine: model,
EMA and optimiser states, the step, the training generators' states, the loss history and the
training seconds so far, plus what it may only be resumed with: the run's fingerprint, the device
type and the precision (a generator state belongs to its device type, and bf16 autocast follows
another trajectory than fp32). The file I/O itself (atomic writes, safe loads, strict state
loading) lives in `cimd_pipeline.io.torch_files`, which model files share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Version of the checkpoint layout; a checkpoint of another layout is refused, not misread.
CHECKPOINT_FORMAT = 3


def run_settings(fingerprint: str, device: torch.device, params: Any) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it (stored in every checkpoint).

    ``params`` is the validated ``training`` block: bf16 autocast on CUDA with ``bf16``, on the CPU
    with ``cpu_bf16``, never on other devices.
    """
    bf16 = (device.type == "cuda" and params.bf16) or (device.type == "cpu" and params.cpu_bf16)
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
        f"training.{'device' if key == 'device' else 'bf16 / training.cpu_bf16'}: checkpoint written with {key} "
        f"{state.get(key)!r}, this run has {settings[key]!r}"
        for key in ("device", "precision")
        if state.get(key) != settings[key]
    ]
    if differs:
        raise ValueError(
            f"{path}: cannot resume on another device type or precision (the generator state and the "
            "numerics belong to them):\n  " + "\n  ".join(differs) + "\nrun it where it was written "
            "(training.device, training.bf16 or cpu_bf16) or set training.resume=false to train afresh"
        )
    step = int(state["step"])
    if step > max_steps:
        raise ValueError(
            f"{path}: the checkpoint is at step {step}, beyond training.max_steps={max_steps}; its weights "
            f"are not those of a {max_steps}-step run: raise training.max_steps to at least {step}, or set "
            "training.resume=false to train afresh (the checkpoint is then overwritten)"
        )
