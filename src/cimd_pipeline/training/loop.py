"""The training loop shared by every model variant.

Any ``nn.Module`` with the ``losses`` of `models.contract.Segmenter` trains here, so CIMD, its
ablations and the baselines share data sampling, optimiser, EMA, checkpoints, resume, device
choice and mixed precision. All randomness flows through two checkpointed generators, a CPU one
for the batch indices and one on the device for the model's draws: a run resumed after a kill
reaches exactly the weights of an uninterrupted one on the same machine.

The step never waits for the device: indices come from the CPU generator, batches are copied
asynchronously from pinned memory, and the loss terms are summed on the device and read (and
checked for NaN/inf) only every ``log_every`` steps and before each checkpoint. On a GPU the host
can then queue the next step's kernels while the current ones run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from cimd_pipeline.config import TrainingParams
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.models import draws
from cimd_pipeline.processes import Workers
from cimd_pipeline.training.augment import (
    apply_affine,
    apply_flips,
    apply_intensity,
    draw_affine,
    draw_flips,
    draw_intensity,
)
from cimd_pipeline.io.torch_files import load_checkpoint, load_state_strict, save_checkpoint
from cimd_pipeline.training.checkpoint import check_resumable, run_settings
from cimd_pipeline.training.dropout import add_dropout
from cimd_pipeline.training.ema import EMA
from cimd_pipeline.training.rater_rows import draw_rater_rows, one_rater
from cimd_pipeline.training.schedule import learning_rate

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


class _Losses(nn.Module):
    """``model.losses`` as ``forward``: DistributedDataParallel all-reduces the gradients of what
    its forward computed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self.model.losses(*args)


def _batch(data: AlignedSet, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    order = np.sort(index)  # sorted reads are kind to memory-mapped arrays; order is irrelevant
    tensors = (
        torch.from_numpy(np.asarray(data.images[order], dtype=np.float32)),
        torch.from_numpy(np.asarray(data.masks[order])),
        torch.from_numpy(np.asarray(data.rater_valid[order], dtype=bool)),
    )
    if device.type == "cuda":  # a copy from pageable memory would wait for the device
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


def index_seed(seed: int) -> int:
    """Seed of the CPU generator of batch indices: another stream than the model's draws."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, dtype=np.uint64)[0] >> 1)


class LossWindow:
    """Sums of the loss terms since the last logged step, kept on the device.

    Adding is a device operation; `read` is the one host synchronisation, made every
    ``log_every`` steps and before each checkpoint, and it refuses a non-finite loss.
    """

    def __init__(self, device: torch.device, saved: dict[str, float] | None = None, processes: int = 1) -> None:
        self.device = device
        self.processes = processes
        saved = dict(saved or {})
        self.count = int(saved.pop("count", 0))
        self.names = list(saved)
        self.sums = torch.tensor(list(saved.values()), device=device) if saved else None

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        stacked = torch.stack([value.detach().float() for value in terms.values()])
        if self.sums is None:
            self.names, self.sums = list(terms), stacked
        else:
            self.sums.add_(stacked)
        self.count += 1

    def read(self, first_step: int, step: int, kept: str) -> dict[str, float]:
        """The sums as floats (with ``count``); FloatingPointError naming the steps if the loss is not finite."""
        sums = self.sums
        if sums is not None and self.processes > 1:  # the mean over the ranks' shares
            sums = sums.clone()
            dist.all_reduce(sums)
            sums /= self.processes
        values = dict(zip(self.names, sums.tolist())) if sums is not None else {}
        if "loss" in values and not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"training loss became {values['loss']} (summed) between steps {first_step} and {step}; {kept}"
            )
        return {**values, "count": float(self.count)}

    def clear(self) -> None:
        self.sums, self.count = None, 0


def train(
    model: nn.Module,
    data: AlignedSet,
    params: TrainingParams,
    checkpoint_path: Path,
    fingerprint: str,
    workers: Workers = Workers(),
) -> TrainResult:
    """Train ``model`` on ``data`` (the train split) for ``params.max_steps`` optimiser steps.

    Resumes from ``checkpoint_path`` when it exists, ``params.resume`` is set and its fingerprint,
    device type and precision match; writes it atomically every ``checkpoint_every`` steps and at
    the end. A checkpoint beyond ``max_steps`` is refused: its weights are not those of a shorter
    run. With ``workers.size > 1`` the torch.distributed process group must be initialised (see
    `cimd_pipeline.training.distributed`); each rank returns the same result.
    """
    if len(data) == 0:
        raise ValueError("the train split is empty: check alignment.split and the dataset size")
    workers.share(params.batch_size)
    device = select_device(params.device)
    if device.type == "cuda" and workers.size > 1:
        device = torch.device("cuda", workers.local_rank)
        torch.cuda.set_device(device)
    with deterministic_algorithms(device, params.deterministic):
        return _train(model, data, params, checkpoint_path, fingerprint, device, workers)


def _same_everywhere(value: int, workers: Workers, device: torch.device) -> bool:
    if workers.size == 1:
        return True
    low_high = torch.tensor([-value, value], device=device)
    dist.all_reduce(low_high, op=dist.ReduceOp.MAX)
    return -int(low_high[0]) == int(low_high[1])


def _train(
    model: nn.Module,
    data: AlignedSet,
    params: TrainingParams,
    checkpoint_path: Path,
    fingerprint: str,
    device: torch.device,
    workers: Workers,
) -> TrainResult:
    model.to(device)
    ema = EMA(model, params.ema_decay, params.ema_warmup)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    indices = torch.Generator().manual_seed(index_seed(params.seed))
    generator = torch.Generator(device=device).manual_seed(params.seed)
    settings = run_settings(fingerprint, device, params)
    step, history, saved_window, seconds_before = 0, [], {}, 0.0
    if params.resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        check_resumable(state, settings, params.max_steps, checkpoint_path)
        load_state_strict(model, state["model"], checkpoint_path)
        load_state_strict(ema.shadow, state["ema"], checkpoint_path)
        optimiser.load_state_dict(state["optimiser"])
        indices.set_state(state["index_generator"].cpu())
        generator.set_state(state["generator"].cpu())
        step, history, saved_window = int(state["step"]), list(state["history"]), dict(state["window"])
        seconds_before = float(state["seconds"])
        logger.info("resuming training from step %d (%s)", step, checkpoint_path)
    if not _same_everywhere(step, workers, device):
        raise RuntimeError(
            f"the training processes found different checkpoints at {checkpoint_path} (rank {workers.rank}: "
            f"step {step}): put training.checkpoint_dir on a file system every machine shares"
        )
    resumed_from = saved_at = read_at = step
    window = LossWindow(device, saved_window, workers.size)
    start, stop = workers.share(params.batch_size)
    losses = model.losses
    if workers.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        losses = DistributedDataParallel(_Losses(model), device_ids=ids)
    use_bf16 = settings["precision"] == "bf16"
    started = time.perf_counter()

    def checkpoint(window_values: dict[str, float], seconds: float) -> None:
        save_checkpoint(
            {
                **settings,
                "model": model.state_dict(),
                "ema": ema.shadow.state_dict(),
                "optimiser": optimiser.state_dict(),
                "index_generator": indices.get_state(),
                "generator": generator.get_state(),
                "step": step,
                "history": history,
                "window": window_values,
                "seconds": seconds,
            },
            checkpoint_path,
        )

    rater_table = np.asarray(data.rater_valid, dtype=bool) if params.all_raters else None
    # after the EMA copy, so the shadow that sampling uses has no hooks
    dropout_hooks = add_dropout(model, params.dropout, generator) if params.dropout else []
    try:
        model.train()
        bar = tqdm(total=params.max_steps, initial=step, disable=not params.progress or workers.rank > 0, desc="training", unit="step")
        while step < params.max_steps:
            if rater_table is None:
                index = torch.randint(0, len(data), (params.batch_size,), generator=indices)
                image, masks, valid = _batch(data, np.sort(index.numpy())[start:stop], device)
            else:
                cases, raters = draw_rater_rows(rater_table, params.batch_size, indices)
                image, masks, _ = _batch(data, cases[start:stop], device)
                masks, valid = one_rater(masks, torch.from_numpy(raters[start:stop]).to(device))
            if params.flip_axes:
                flips = draw_flips(params.flip_axes, params.batch_size, indices)[start:stop]
                image, masks = apply_flips(image, masks, flips, params.flip_axes)
            if params.intensity_scale or params.intensity_shift:
                changes = draw_intensity(params.intensity_scale, params.intensity_shift, params.batch_size, indices)
                image = apply_intensity(image, changes[start:stop])
            if params.affine_rotation or params.affine_translation or params.affine_scaling:
                moves = draw_affine(params.affine_rotation, params.affine_translation, params.affine_scaling, params.batch_size, indices)
                image, masks = apply_affine(image, masks, moves[start:stop])
            with (
                torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16),
                draws.batch_share(start, stop, params.batch_size),
            ):
                terms = losses(image, masks, valid, generator)
            optimiser.zero_grad(set_to_none=True)
            terms["loss"].backward()
            rate = learning_rate(step, params)
            for group in optimiser.param_groups:
                group["lr"] = rate
            optimiser.step()
            ema.update(model, step)
            step += 1
            window.add(terms)
            log_due = step % params.log_every == 0 or step == params.max_steps
            save_due = step % params.checkpoint_every == 0 or step == params.max_steps
            if log_due or save_due:
                kept = f"last checkpoint (step {saved_at}) kept" if saved_at else "no checkpoint written by this run"
                values = window.read(read_at + 1, step, kept)
                read_at = step
                if log_due:
                    count = values.pop("count")
                    history.append({"step": step, **{k: v / count for k, v in values.items()}})
                    window.clear()
                    values = {}
                    bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
                if save_due:
                    # one clock reading for the checkpoint and, at the last step, the result: a resumed
                    # run then continues from exactly the training time this run reports
                    seconds = seconds_before + time.perf_counter() - started
                    if workers.rank == 0:
                        checkpoint(values, seconds)
                    saved_at = step
            bar.update(1)
        bar.close()
        if step == resumed_from:  # nothing left to train: only the time of this call
            seconds = seconds_before + time.perf_counter() - started
        elapsed = seconds - seconds_before
        logger.info(
            "trained %d steps (%d new, %.1f s) on %s; %.1f s of training in all",
            step, step - resumed_from, elapsed, device, seconds,
        )
        ema_state = {k: v.detach().cpu() for k, v in ema.shadow.state_dict().items()}
        return TrainResult(ema_state, history, step, seconds, str(device), resumed_from)
    finally:
        for hook in dropout_hooks:
            hook.remove()
