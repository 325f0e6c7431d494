"""The training loop shared by every model variant.

Any ``nn.Module`` with the ``losses`` of `models.contract.Segmenter` trains here, so CIMD, its
ablations and the baselines share data sampling, optimiser, EMA, checkpoints, resume, device
choice and mixed precision. All randomness flows through one ``torch.Generator`` whose state is
checkpointed: a run resumed after a kill reaches exactly the weights of an uninterrupted one on
the same machine.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.training.checkpoint import (
    check_resumable,
    load_checkpoint,
    load_state_strict,
    run_settings,
    save_checkpoint,
)
from cimd_pipeline.training.ema import EMA

logger = logging.getLogger(__name__)


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


@contextmanager
def deterministic_algorithms(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """``training.deterministic``: refuse non-deterministic kernels (an error, not a warning).

    On CUDA, cuBLAS is only reproducible with a fixed workspace; torch raises without
    ``CUBLAS_WORKSPACE_CONFIG``, so it is set here unless the user chose a value. Every switch is
    put back on exit, error or not: the setting is process-wide, and sampling or a notebook that
    trains must not inherit it.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        if previous[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = previous[3]


@dataclass
class TrainResult:
    """What training leaves behind: EMA weights, loss history and timing.

    ``seconds`` is the training time of the whole run, summed over the processes that resumed it.
    """

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

    Resumes from ``checkpoint_path`` when it exists, ``params.resume`` is set and its fingerprint,
    device type and precision match; writes it atomically every ``checkpoint_every`` steps and at
    the end. A checkpoint beyond ``max_steps`` is refused: its weights are not those of a shorter
    run.
    """
    if len(data) == 0:
        raise ValueError("the train split is empty: check alignment.split and the dataset size")
    device = select_device(params.device)
    with deterministic_algorithms(device, params.deterministic):
        return _train(model, data, params, checkpoint_path, fingerprint, device)


def _train(
    model: nn.Module,
    data: AlignedSet,
    params: TrainingParams,
    checkpoint_path: Path,
    fingerprint: str,
    device: torch.device,
) -> TrainResult:
    model.to(device)
    ema = EMA(model, params.ema_decay, params.ema_warmup)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    settings = run_settings(fingerprint, device, params)
    step, history, window, seconds_before = 0, [], {}, 0.0
    if params.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        check_resumable(state, settings, params.max_steps, checkpoint_path)
        load_state_strict(model, state["model"], checkpoint_path)
        load_state_strict(ema.shadow, state["ema"], checkpoint_path)
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"].cpu())
        step, history, window = int(state["step"]), list(state["history"]), dict(state["window"])
        seconds_before = float(state["seconds"])
        logger.info("resuming training from step %d (%s)", step, checkpoint_path)
    resumed_from = step
    use_bf16 = settings["precision"] == "bf16"
    started = time.perf_counter()

    def checkpoint() -> None:
        save_checkpoint(
            {
                **settings,
                "model": model.state_dict(),
                "ema": ema.shadow.state_dict(),
                "optimiser": optimiser.state_dict(),
                "generator": generator.get_state(),
                "step": step,
                "history": history,
                "window": window,
                "seconds": seconds_before + time.perf_counter() - started,
            },
            checkpoint_path,
        )

    model.train()
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
    elapsed = time.perf_counter() - started
    seconds = seconds_before + elapsed
    logger.info(
        "trained %d steps (%d new, %.1f s) on %s; %.1f s of training in all",
        step, step - resumed_from, elapsed, device, seconds,
    )
    ema_state = {k: v.detach().cpu() for k, v in ema.shadow.state_dict().items()}
    return TrainResult(ema_state, history, step, seconds, str(device), resumed_from)
