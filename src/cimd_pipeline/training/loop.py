"""The training loop shared by every model variant.

Any ``nn.Module`` with the ``losses`` of `models.contract.Segmenter` trains here, so CIMD, its
ablations and the baselines share data sampling, optimiser, EMA, checkpoints, resume, device
choice and mixed precision. All randomness flows through one ``torch.Generator`` whose state is
checkpointed: a run resumed after a kill reaches exactly the weights of an uninterrupted one on
the same machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.training.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from cimd_pipeline.training.ema import EMA

logger = logging.getLogger(__name__)

# Training parameters that change the trajectory; max_steps, resume and logging do not, so a run
# with more steps continues the checkpoint of a shorter one.
TRAJECTORY_KEYS = ("seed", "batch_size", "lr", "weight_decay", "ema_decay", "ema_warmup")


def select_device(preference: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for ``auto``; an explicit choice that is unavailable is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if preference == "auto":
        return torch.device(next(name for name in ("cuda", "mps", "cpu") if available[name]))
    if not available.get(preference, False):
        raise RuntimeError(f"training.device={preference!r} requested but not available on this machine")
    return torch.device(preference)


def run_fingerprint(model_params: dict[str, Any], training: TrainingParams, data: AlignedSet) -> str:
    """A short hash of everything that must match for a checkpoint to be resumed."""
    payload = {
        "model": model_params,
        "training": {k: getattr(training, k) for k in TRAJECTORY_KEYS},
        "data": [list(data.images.shape), list(data.masks.shape), list(data.cases["case_id"])],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_deterministic(device: torch.device) -> None:
    """``training.deterministic``: refuse non-deterministic kernels (an error, not a warning).

    On CUDA, cuBLAS is only reproducible with a fixed workspace; torch raises without
    ``CUBLAS_WORKSPACE_CONFIG``, so it is set here unless the user chose a value.
    """
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False


@dataclass
class TrainResult:
    """What training leaves behind: EMA weights, loss history and timing."""

    ema_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    steps: int
    seconds: float
    device: str
    resumed_from: int


def _batch(data: AlignedSet, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    order = np.sort(index)  # sorted reads are kind to memory-mapped arrays; order is irrelevant
    image = torch.from_numpy(np.asarray(data.images[order], dtype=np.float32))
    masks = torch.from_numpy(np.asarray(data.masks[order]))
    valid = torch.from_numpy(np.asarray(data.rater_valid[order], dtype=bool))
    return image.to(device), masks.to(device), valid.to(device)


def train(
    model: nn.Module,
    data: AlignedSet,
    params: TrainingParams,
    checkpoint_path: Path,
    fingerprint: str,
) -> TrainResult:
    """Train ``model`` on ``data`` (the train split) for ``params.max_steps`` optimiser steps.

    Resumes from ``checkpoint_path`` when it exists, ``params.resume`` is set and its fingerprint
    matches; writes it atomically every ``checkpoint_every`` steps and at the end.
    """
    if len(data) == 0:
        raise ValueError("the train split is empty: check alignment.split and the dataset size")
    device = select_device(params.device)
    if params.deterministic:
        make_deterministic(device)
    model.to(device)
    ema = EMA(model, params.ema_decay, params.ema_warmup)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    step, history, window = 0, [], {}
    if params.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state.get("fingerprint") != fingerprint:
            raise ValueError(f"{checkpoint_path}: checkpoint belongs to another run configuration")
        load_state_strict(model, state["model"], checkpoint_path)
        load_state_strict(ema.shadow, state["ema"], checkpoint_path)
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"].cpu())
        step, history, window = int(state["step"]), list(state["history"]), dict(state["window"])
        logger.info("resuming training from step %d (%s)", step, checkpoint_path)
    resumed_from = step
    use_bf16 = params.bf16 and device.type == "cuda"

    def checkpoint() -> None:
        save_checkpoint(
            {
                "fingerprint": fingerprint,
                "model": model.state_dict(),
                "ema": ema.shadow.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "history": history,
                "window": window,
            },
            checkpoint_path,
        )

    model.train()
    started = time.perf_counter()
    bar = tqdm(total=params.max_steps, initial=step, disable=not params.progress, desc="training", unit="step")
    while step < params.max_steps:
        index = torch.randint(0, len(data), (params.batch_size,), generator=generator, device=device)
        image, masks, valid = _batch(data, index.cpu().numpy(), device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            terms = model.losses(image, masks, valid, generator)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step + 1}; last checkpoint kept")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        ema.update(model, step)
        step += 1
        for name, value in terms.items():
            window[name] = window.get(name, 0.0) + float(value.detach())
        window["count"] = window.get("count", 0.0) + 1
        if step % params.log_every == 0 or step == params.max_steps:
            count = window.pop("count")
            history.append({"step": step, **{k: v / count for k, v in window.items()}})
            window = {}
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if step % params.checkpoint_every == 0 or step == params.max_steps:
            checkpoint()
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - started
    logger.info("trained %d steps (%d new) in %.1f s on %s", step, step - resumed_from, seconds, device)
    ema_state = {k: v.detach().cpu() for k, v in ema.shadow.state_dict().items()}
    return TrainResult(ema_state, history, step, seconds, str(device), resumed_from)
