import numpy as np
import pytest
import torch

from cimd_pipeline.config import TrainingParams, validate_parameters
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.loop import train
from cimd_pipeline.training.rater_rows import draw_rater_rows
from tests.training.test_loop import data, fresh, params  # noqa: F401  (fixture)


def test_each_step_holds_every_valid_rater_of_its_images_once_and_no_invalid_one(data):  # noqa: F811
    valid = np.asarray(data.rater_valid, dtype=bool)
    assert len(set(valid.sum(1))) > 1  # raters missing in some cases, as in the synthetic lesions
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        cases, raters = draw_rater_rows(valid, 8, generator)
        assert len(cases) == len(raters) == 8
        pairs = list(zip(cases.tolist(), raters.tolist()))
        assert pairs == sorted(pairs) and len(set(pairs)) == 8  # sorted, each (image, rater) once
        assert all(valid[c, r] for c, r in pairs)
        short = [c for c in set(cases.tolist()) if (cases == c).sum() < valid[c].sum()]
        assert len(short) <= 1  # only the last image taken may be cut short
        seen.update(pairs)
    assert seen == set(zip(*np.nonzero(valid)))  # every valid rater of every case is reached


def test_the_rows_are_fixed_by_the_generator():
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]], bool)
    first = draw_rater_rows(valid, 16, torch.Generator().manual_seed(4))
    again = draw_rater_rows(valid, 16, torch.Generator().manual_seed(4))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_training_sees_one_valid_rater_mask_per_row_and_resumes_exactly(data, tmp_path):  # noqa: F811
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    valid = np.asarray(data.rater_valid, dtype=bool)
    rows_per_step = []
    net = fresh()
    losses = net.losses

    def spy(image, batch_masks, batch_valid, generator):
        assert batch_masks.shape[1] == 1 and batch_valid.shape == (len(image), 1) and bool(batch_valid.all())
        pairs = []
        for one, mask in zip(image, batch_masks):
            case = next(i for i in range(len(images)) if torch.equal(one, images[i]))
            matching = [r for r in np.flatnonzero(valid[case]) if torch.equal(mask[0], masks[case, r])]
            assert matching, case  # the mask of a valid rater of this very image
            pairs.append((case, tuple(matching)))
        rows_per_step.append(pairs)
        return losses(image, batch_masks, batch_valid, generator)

    net.losses = spy
    full = train(net, data, params(all_raters=True), tmp_path / "a" / "last.pt", "fp")
    assert len(rows_per_step) == 6 and all(len(rows) == 4 for rows in rows_per_step)
    # images repeat within a step, one row per rater: fewer images than rows
    assert all(len({case for case, _ in rows}) < 4 for rows in rows_per_step)
    train(fresh(), data, params(max_steps=3, all_raters=True), tmp_path / "b" / "last.pt", "fp")
    resumed = train(fresh(), data, params(all_raters=True), tmp_path / "b" / "last.pt", "fp")
    plain = train(fresh(), data, params(), tmp_path / "c" / "last.pt", "fp")
    for key, value in full.ema_state.items():
        assert torch.equal(value, resumed.ema_state[key]), key
    assert any(not torch.equal(full.ema_state[k], plain.ema_state[k]) for k in full.ema_state)


def test_the_switch_is_off_by_default_and_retrains_when_set(data):  # noqa: F811
    assert TrainingParams().all_raters is False
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    assert run_fingerprint(model, params(all_raters=True), digest) != run_fingerprint(model, params(), digest)


def test_the_mean_target_of_ddpm_det_refuses_the_switch():
    with pytest.raises(ConfigError, match="training.all_raters: ddpm_det learns the mean"):
        validate_parameters({"model": {"variant": "ddpm_det"}, "training": {"all_raters": True}})
    validate_parameters({"model": {"variant": "ddpm_prob"}, "training": {"all_raters": True}})
