"""The learning rate of each optimiser step: constant or cosine decay, after an optional warm-up.

A short CPU budget ends while a constant learning rate still moves the weights by a full step; a
cosine decay (Loshchilov & Hutter 2017, SGDR) ends the run on small steps instead, and a linear
warm-up (Goyal et al. 2017) keeps Adam's first, badly estimated moments from taking full steps.
The rate is a pure function of the step count, so a resumed run needs no scheduler state and
reaches exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import math

from cimd_pipeline.config import TrainingParams


def learning_rate(step: int, params: TrainingParams) -> float:
    """The rate of the optimiser step taken after ``step`` finished steps (0 for the first).

    Warm-up rises linearly to ``lr`` over ``warmup_steps`` steps (the first at ``lr / warmup_steps``);
    then ``constant`` keeps ``lr`` and ``cosine`` falls along half a cosine to ``min_lr_ratio * lr``,
    reached by the last step of ``max_steps``.
    """
    if step < params.warmup_steps:
        return params.lr * (step + 1) / params.warmup_steps
    if params.lr_schedule == "constant":
        return params.lr
    decay_steps = params.max_steps - params.warmup_steps
    progress = min(1.0, (step - params.warmup_steps) / max(1, decay_steps - 1))
    floor = params.min_lr_ratio * params.lr
    return floor + (params.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
