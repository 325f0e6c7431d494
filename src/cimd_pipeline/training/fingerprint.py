"""What identifies a training run: the configuration that shapes its trajectory and the data it sees.

A checkpoint is resumed (or a finished one reused) only when its fingerprint matches, so the
fingerprint must change whenever the weights would: the model fields the variant reads, the
trajectory-shaping training keys and the *content* of the aligned train arrays. Shapes and case
ids alone are not enough: another ``ingestion.seed`` or ``alignment.normalisation`` gives arrays of
the same shape and names with other values. Fields the variant never reads (the baselines' block
for CIMD, the ambiguity nets for DDPM, ``beta_end`` under the cosine schedule, ...) are left out,
so changing one does not throw a finished model away.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from cimd_pipeline.config import LATENT_ONLY_FIELDS, ModelParams, TrainingParams, Variant
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.diffusion import LossWeighting, NoiseSchedule

# Training parameters that change the trajectory; max_steps (unless the learning rate decays towards
# it), resume, logging and the process count do not, so a run with more steps (or on more processes)
# continues the checkpoint of another.
TRAJECTORY_KEYS = ("seed", "batch_size", "lr", "weight_decay", "ema_decay", "ema_warmup", "flip_axes")
# Trajectory switches added later, with their default: hashed only when set to something else, so
# that adding one leaves the fingerprints (and checkpoints) of every run without it valid.
LATER_SWITCHES = {
    "all_raters": False, "lr_schedule": "constant", "warmup_steps": 0, "intensity_scale": 0.0, "intensity_shift": 0.0,
    "dropout": 0.0, "affine_rotation": 0.0, "affine_translation": 0.0, "affine_scaling": 0.0,
}

# Bytes hashed per chunk by default: memory-mapped arrays are read piecewise instead of copied whole.
CHUNK_BYTES = 64 * 2**20

# The ``model.baselines`` fields each baseline network reads (models/prob_unet.py, models/phiseg.py).
_BASELINE_FIELDS = {
    Variant.PROB_UNET: ("filters", "num_convs", "latent_dim", "beta"),
    Variant.PHISEG: (
        "filters", "num_convs", "beta", "phiseg_levels", "phiseg_resolution_levels",
        "phiseg_latent_dim", "phiseg_aux_weight",
    ),
}
# Model fields that only the CIMD variants with AMN/ACN read.
_AMBIGUITY_FIELDS = ("ambiguity_nets", "kl_weight", "latent_dim")


def model_identity(model: ModelParams | dict[str, Any]) -> dict[str, Any]:
    """The ``model`` block as plain JSON, reduced to the fields the variant's network and loss read.

    The baselines read their own ``baselines`` fields only; the diffusion variants read everything
    but ``baselines``, less the AMN/ACN fields without ambiguity nets, ``acn_input`` for
    ``cimd_latent`` (its ACN sees the image only), ``prior_components``, ``free_nats``,
    ``latent_conditioning`` and ``unet.scale_shift_norm`` at their defaults, the linear ramp's
    ends under the cosine schedule and ``min_snr_gamma`` unless the loss is ``min_snr``.
    """
    params = ModelParams.model_validate(model)
    plain = params.model_dump(mode="json")
    if params.variant in _BASELINE_FIELDS:
        used = _BASELINE_FIELDS[params.variant]
        return {"variant": plain["variant"], "baselines": {k: plain["baselines"][k] for k in used}}
    drop = {"baselines"}
    if not params.variant.uses_ambiguity_nets:
        drop.update(_AMBIGUITY_FIELDS)
    elif params.variant is Variant.CIMD_LATENT:
        plain["ambiguity_nets"].pop("acn_input")
    # fields added later, dropped at their defaults so that runs from before keep their fingerprint
    later = [("unet", "scale_shift_norm")]
    if "ambiguity_nets" not in drop:
        later += [("ambiguity_nets", field) for field in LATENT_ONLY_FIELDS]
    defaults = ModelParams().model_dump(mode="json")
    for block, field in later:
        if plain[block][field] == defaults[block][field]:
            plain[block].pop(field)
    if params.noise_schedule is NoiseSchedule.COSINE:
        drop.update(("beta_start", "beta_end"))
    if params.loss_weighting is not LossWeighting.MIN_SNR:
        drop.add("min_snr_gamma")
    return {k: v for k, v in plain.items() if k not in drop}


def _hash_array(digest: "hashlib._Hash", name: str, array: np.ndarray, chunk_bytes: int) -> None:
    digest.update(f"{name}|{np.dtype(array.dtype).str}|{tuple(array.shape)}|".encode())
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, len(array), rows):
        digest.update(np.ascontiguousarray(array[start : start + rows]).data)


def data_digest(data: AlignedSet, chunk_bytes: int = CHUNK_BYTES) -> str:
    """BLAKE2b of the images, masks, rater flags and case ids, in order (hex, 32 characters).

    Arrays are hashed ``chunk_bytes`` at a time (whole rows, at least one per chunk); the digest
    does not depend on the chunk size. Hashes at roughly 1 GB/s, a second or two for the 1.3 GB of
    LIDC, which is small next to training on it.
    """
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    digest = hashlib.blake2b(digest_size=16)
    _hash_array(digest, "images", data.images, chunk_bytes)
    _hash_array(digest, "masks", data.masks, chunk_bytes)
    _hash_array(digest, "rater_valid", data.rater_valid, chunk_bytes)
    digest.update(json.dumps([str(c) for c in data.cases["case_id"]]).encode())
    return digest.hexdigest()


def run_fingerprint(model: ModelParams | dict[str, Any], training: TrainingParams, digest: str) -> str:
    """A short hash of everything that must match for a checkpoint to be resumed.

    ``model`` is the ``model`` block (validated or plain; hashed through `model_identity`),
    ``digest`` is `data_digest` of the train split.
    """
    switched = {k: getattr(training, k) for k, default in LATER_SWITCHES.items() if getattr(training, k) != default}
    if training.lr_schedule != "constant":  # a decay's every rate depends on where it ends
        switched.update(min_lr_ratio=training.min_lr_ratio, max_steps=training.max_steps)
    payload = {
        "model": model_identity(model),
        "training": {**{k: getattr(training, k) for k in TRAJECTORY_KEYS}, **switched},
        "data": digest,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
