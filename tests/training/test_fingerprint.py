"""The run fingerprint follows exactly what the model reads; the data digest covers every chunk."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cimd_pipeline.config import ModelParams, TrainingParams, Variant
from cimd_pipeline.models.trained import build_model
from cimd_pipeline.training.fingerprint import (
    TRAJECTORY_KEYS,
    data_digest,
    model_identity,
    run_fingerprint,
)
from tests.training.test_resume_rules import aligned

# A small network of every variant for 8x8 images (every change below still fits 8 pixels).
BASE = {
    "unet": {"channels": [16, 16], "attention_levels": [False, False], "num_res_blocks": 1,
             "num_head_channels": 16, "norm_num_groups": 16},
    "ambiguity_nets": {"filters": [4, 4, 4]},
    "baselines": {"filters": [4, 4, 4], "num_convs": 1, "phiseg_levels": 2, "phiseg_resolution_levels": 3},
}
# The schedule and loss under which beta_start/beta_end and min_snr_gamma are read and those under
# which they are not; the second base is tried with the changes of the fields it switches.
BASES = {
    "linear-simple": {},
    "cosine-min_snr": {"noise_schedule": "cosine", "loss_weighting": "min_snr", "input_scale": 0.5},
}
SWITCHED = ("beta_start", "beta_end", "noise_schedule", "input_scale", "loss_weighting", "min_snr_gamma")
# Changes that the model block refuses outside these variants (tried there, checked refused elsewhere).
ONLY_FOR = {"ambiguity_nets.prior_components": ("cimd_latent",), "ambiguity_nets.free_nats": ("cimd_latent",),
           "ambiguity_nets.latent_conditioning": ("cimd_latent",)}
# One valid change of every leaf field of the model block (the test fails for a field missing here).
CHANGES = {
    "variant": None,  # compared across variants by the parametrisation itself
    "prediction_type": "v",
    "num_timesteps": 500,
    "beta_start": 2e-4,
    "beta_end": 0.03,
    "vlb_weight": 0.01,
    "kl_weight": 0.5,
    "latent_dim": 3,
    "noise_schedule": {"linear": "cosine", "cosine": "linear"},
    "input_scale": 0.3,
    "loss_weighting": {"simple": "snr_plus_one", "min_snr": "simple"},
    "min_snr_gamma": 0.05,
    "output_activation": "tanh",
    "self_condition": True,
    "unet.channels": [16, 32],
    "unet.attention_levels": [False, True],
    "unet.num_res_blocks": 2,
    "unet.num_head_channels": 8,
    "unet.norm_num_groups": 8,
    "unet.scale_shift_norm": True,
    "ambiguity_nets.trainable": False,
    "ambiguity_nets.acn_input": "eps",
    "ambiguity_nets.filters": [4, 4, 8],
    "ambiguity_nets.prior_components": 2,
    "ambiguity_nets.free_nats": 1.5,
    "ambiguity_nets.latent_conditioning": "every_level",
    "baselines.filters": [4, 4, 8],
    "baselines.num_convs": 2,
    "baselines.latent_dim": 3,
    "baselines.beta": 0.5,
    "baselines.phiseg_levels": 1,
    "baselines.phiseg_resolution_levels": 4,
    "baselines.phiseg_latent_dim": 3,
    "baselines.phiseg_aux_weight": 0.5,
}


def _leaves(plain: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in plain.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def _changed(block: dict, path: str) -> dict:
    plain = ModelParams.model_validate(block).model_dump(mode="json")
    *parents, leaf = path.split(".")
    node = plain
    for key in parents:
        node = node[key]
    change = CHANGES[path]
    node[leaf] = change[node[leaf]] if isinstance(change, dict) else change
    return plain


def _trajectory(block: dict) -> list[torch.Tensor]:
    """Initial weights, the losses of two AdamW steps on a fixed batch, and the weights after them.

    Two steps: the denoiser's output convolution starts at zero, so a change that acts on the
    network's output (tanh of 0 is 0, with slope 1) shows only once that layer has moved.
    """
    torch.manual_seed(0)
    net = build_model(ModelParams.model_validate(block), image_channels=1)
    before = [p.detach().clone() for p in net.state_dict().values()]
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 1, 8, 8, generator=g)
    masks = (torch.rand(4, 2, 8, 8, generator=g) > 0.6).to(torch.uint8)
    losses = []
    for _ in range(2):
        optimiser.zero_grad()
        terms = net.losses(image, masks, torch.ones(4, 2, dtype=torch.bool), generator=g)
        terms["loss"].backward()
        optimiser.step()
        losses.append(torch.stack([v.detach() for v in terms.values()]))
    return before + losses + list(net.state_dict().values())


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def test_every_model_field_has_a_change_to_try():
    assert sorted(_leaves(ModelParams().model_dump(mode="json"))) == sorted(CHANGES)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("variant", [v.value for v in Variant])
def test_a_field_is_fingerprinted_exactly_when_changing_it_changes_the_trajectory(variant, base):
    """Both directions, field by field: a change the fingerprint ignores must leave the initial
    weights, the losses and one optimiser step bit-identical (else a stale model is resumed), and a
    change it sees must alter them (else a finished model is retrained for nothing)."""
    block = {**BASE, **BASES[base], "variant": variant}
    training, digest = TrainingParams(), "data"
    reference = _trajectory(block)
    seen, ignored = [], []
    for path in CHANGES if base == "linear-simple" else SWITCHED:
        if path == "variant":
            continue
        if variant not in ONLY_FOR.get(path, (variant,)):
            with pytest.raises(ValueError, match="needs variant"):
                ModelParams.model_validate(_changed(block, path))
            continue
        changed = _changed(block, path)
        fingerprinted = run_fingerprint(changed, training, digest) != run_fingerprint(block, training, digest)
        (seen if fingerprinted else ignored).append(path)
        assert _same(_trajectory(changed), reference) != fingerprinted, (path, fingerprinted)
    baseline = variant in ("prob_unet", "phiseg")  # reads none of the diffusion recipe's fields
    assert ignored and (bool(seen) != (baseline and base != "linear-simple")), (seen, ignored)


def test_variants_never_share_a_fingerprint():
    prints = {run_fingerprint({**BASE, "variant": v.value}, TrainingParams(), "d") for v in Variant}
    assert len(prints) == len(Variant)


def test_identity_names_what_each_kind_of_variant_reads():
    assert set(model_identity({"variant": "phiseg"})) == {"variant", "baselines"}
    assert "latent_dim" in model_identity({"variant": "prob_unet"})["baselines"]
    assert "latent_dim" not in model_identity({"variant": "phiseg"})["baselines"]
    ddpm = model_identity({"variant": "ddpm_prob", "noise_schedule": "cosine"})
    assert not {"baselines", "ambiguity_nets", "kl_weight", "beta_end", "min_snr_gamma"} & set(ddpm)
    assert "acn_input" not in model_identity({"variant": "cimd_latent"})["ambiguity_nets"]


# --- the data digest ---------------------------------------------------------------------------


def test_digest_reads_every_chunk_and_does_not_depend_on_the_chunk_size():
    data = aligned()
    images_row = data.images[0].nbytes
    assert images_row > 2 and len(data) >= 6
    whole = data_digest(data)
    for chunk in (1, images_row, 2 * images_row + 1, 3 * images_row):  # several chunks per array
        assert data_digest(data, chunk_bytes=chunk) == whole, chunk
    for array in ("images", "masks", "rater_valid"):
        changed = aligned()
        values = getattr(changed, array)
        values[-1].flat[-1] = np.logical_not(values[-1].flat[-1]) if values.dtype == bool else values[-1].flat[-1] + 1
        # the last row sits in the last of several chunks
        assert data_digest(changed, chunk_bytes=images_row) != whole, array
    with pytest.raises(ValueError, match="chunk_bytes"):
        data_digest(data, chunk_bytes=0)


def test_digest_and_fingerprint_are_the_documented_hashes():
    """Rebuilt independently: BLAKE2b of each array's name, dtype, shape and bytes, then the case
    ids; SHA-256 of the model identity, the trajectory keys and the digest. A changed recipe
    would orphan every checkpoint, so it must change here on purpose."""
    data = aligned()
    reference = hashlib.blake2b(digest_size=16)
    for name in ("images", "masks", "rater_valid"):
        array = getattr(data, name)
        reference.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        reference.update(np.ascontiguousarray(array).tobytes())
    reference.update(json.dumps([str(c) for c in data.cases["case_id"]]).encode())
    assert data_digest(data, chunk_bytes=data.images[0].nbytes) == reference.hexdigest()
    training = TrainingParams(flip_axes=["width"], lr=3e-4)
    payload = {
        "model": model_identity({"variant": "ddpm_prob"}),
        "training": {k: getattr(training, k) for k in TRAJECTORY_KEYS},
        "data": "digest",
    }
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
    assert run_fingerprint({"variant": "ddpm_prob"}, training, "digest") == expected


def test_digest_sees_the_first_row_and_the_case_ids():
    whole = data_digest(aligned())
    for array in ("images", "masks"):
        changed = aligned()
        getattr(changed, array)[0].flat[0] += 1
        assert data_digest(changed, chunk_bytes=changed.images[0].nbytes) != whole, array
    renamed = aligned()
    renamed.cases.loc[renamed.cases.index[0], "case_id"] = "another"
    assert data_digest(renamed) != whole
