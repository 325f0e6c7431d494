"""Metrics: exact error messages, where the work happens (device), and the CI score's edge cases.

The messages are what a user sees when an evaluation input is wrong, so they are pinned in full.
The device tests stand in for a GPU on a CPU-only machine: inside ``with torch.device("meta")``
every tensor created without an explicit device lands on "meta", so a helper that forgets to
pass the inputs' device mixes meta and CPU tensors and fails.
"""

import re

import numpy as np
import pytest
import torch

from cimd_pipeline import metrics
from cimd_pipeline.metrics import ci_score, evaluate_batch, evaluate_case, ged, pairwise_dice, pairwise_iou


def z(*shape):
    return np.zeros(shape, bool)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize(
    ("samples", "raters", "message"),
    [
        (z(2, 3, 3), z(5, 4, 4), "samples and raters must share H, W; got (3, 3) and (4, 4)"),
        (z(0, 4, 4), z(2, 4, 4), "need at least one sample per case"),
        (z(2, 4, 4), z(0, 4, 4), "need at least one valid rater"),
        (np.full((2, 4, 4), 2), z(2, 4, 4), "samples must be binary (bool or values in {0, 1})"),
        (z(2, 4, 4), np.full((2, 4, 4), 2), "raters must be binary (bool or values in {0, 1})"),
    ],
)
def test_case_errors_say_exactly_what_is_wrong(samples, raters, message):
    with pytest.raises(ValueError, match=exactly(message)):
        evaluate_case(samples, raters)


@pytest.mark.parametrize(
    ("samples", "raters", "valid", "message"),
    [
        (z(2, 3, 4, 4), z(3, 5, 4, 4), None, "batch sizes differ: samples 2, raters 3"),
        (z(2, 3, 4, 4), z(2, 5, 4, 4), [[1] * 5], "rater_valid must have shape (2, 5), got (1, 5)"),
        (np.full((2, 3, 4, 4), 2), z(2, 2, 4, 4), None, "samples must be binary (bool or values in {0, 1})"),
        (z(2, 3, 4, 4), z(2, 2, 4, 4), [[2, 1], [1, 1]], "rater_valid must be binary (bool or values in {0, 1})"),
        (z(2, 3, 4, 3), z(2, 2, 4, 4), None, "samples and raters must share H, W; got (4, 3) and (4, 4)"),
    ],
)
def test_batch_errors_say_exactly_what_is_wrong(samples, raters, valid, message):
    with pytest.raises(ValueError, match=exactly(message)):
        evaluate_batch(samples, raters, valid)


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [
        (z(4, 4), z(2, 4, 4), "a must have shape [N, H, W], got (4, 4)"),
        (z(2, 4, 4), z(1, 2, 4, 4), "b must have shape [N, H, W], got (1, 2, 4, 4)"),
        (z(2, 3, 4), z(5, 4, 4), "a and b must share H, W; got (3, 4) and (4, 4)"),
        (np.full((2, 4, 4), 3), z(2, 4, 4), "a must be binary (bool or values in {0, 1})"),
        (z(2, 4, 4), np.full((2, 4, 4), 3), "b must be binary (bool or values in {0, 1})"),
    ],
)
def test_pairwise_errors_say_exactly_what_is_wrong(a, b, message):
    for fn in (pairwise_iou, pairwise_dice):
        with pytest.raises(ValueError, match=exactly(message)):
            fn(a, b)


def test_torch_inputs_decide_the_device_and_numpy_means_cpu():
    meta = torch.zeros(2, device="meta")
    assert metrics._device_of(np.zeros(2), meta) == torch.device("meta")
    assert metrics._device_of(np.zeros(2), [0, 1]) == torch.device("cpu")


def test_numpy_inputs_are_moved_to_the_torch_inputs_device(monkeypatch):
    """Every conversion is told the device of the torch inputs (None would leave numpy on the CPU)."""
    seen = []
    original = metrics._as_tensor

    def spy(x, device):
        seen.append(device)
        return original(x, device)

    monkeypatch.setattr(metrics, "_as_tensor", spy)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 3, 4, 4, generator=g) > 0.5
    y = (torch.rand(2, 2, 4, 4, generator=g) > 0.5).numpy()
    evaluate_batch(s, y, np.ones((2, 2), bool))
    evaluate_case(s[0], y[0])
    ged(s[0].numpy(), torch.as_tensor(y[0]))
    pairwise_iou(s[0], y[0])
    pairwise_iou(s[0].numpy(), torch.as_tensor(y[0]))
    assert len(seen) == 11 and all(d == torch.device("cpu") for d in seen)


def test_every_tensor_is_made_on_the_inputs_device():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(2, 3, 5, 5, generator=g) > 0.5
    y = torch.rand(2, 2, 5, 5, generator=g) > 0.5
    valid = torch.tensor([[True, True], [True, False]])
    expected = evaluate_batch(s, y, valid), evaluate_batch(s, y), evaluate_case(s[0], y[0])
    with torch.device("meta"):  # tensors created without the inputs' device would land here
        got = evaluate_batch(s, y, valid), evaluate_batch(s, y), evaluate_case(s[0], y[0])
        iou = pairwise_iou(s[0], y[0])
    assert repr(got) == repr(expected)  # repr: a case with one rater has a NaN floor (nan != nan)
    assert iou.device == torch.device("cpu")


def masks(shape, *pixels):
    """Masks of ``shape`` (K, H, W) with mask k holding pixel ``pixels[k]`` (None: empty)."""
    out = np.zeros(shape, bool)
    for k, p in enumerate(pixels):
        if p is not None:
            out[(k, *p)] = True
    return out


def test_ci_is_zero_not_nan_when_all_three_terms_are_zero():
    # Two disjoint samples (dissimilarity 1) vs two identical raters (0): D_a = 0; the samples
    # miss the raters: S_c = D_max = 0. The printed formula's denominator is 0.
    samples = masks((2, 3, 3), (0, 0), (2, 2))
    raters = masks((2, 3, 3), (1, 1), (1, 1))
    scores = ci_score(samples, raters)
    assert scores["s_c"] == scores["d_max"] == scores["d_a"] == 0.0
    assert scores["ci"] == 0.0 and scores["ci_hm"] == 0.0


def test_sensitivity_of_a_one_pixel_rater_union():
    raters = masks((2, 3, 3), (1, 1), (1, 1))
    assert ci_score(masks((1, 3, 3), (1, 1)), raters)["s_c"] == 1.0
    assert ci_score(masks((1, 3, 3), (0, 1)), raters)["s_c"] == 0.0


def test_empty_rater_cases_are_scored_per_case_in_a_batch():
    # Case 0: raters and samples empty (full sensitivity); case 1: samples draw, raters empty.
    samples = np.stack([masks((2, 3, 3), None, None), masks((2, 3, 3), (0, 0), None)])
    raters = np.zeros((2, 2, 3, 3), bool)
    s_c = [case["s_c"] for case in evaluate_batch(samples, raters)]
    assert s_c == [1.0, 0.0]


def test_uint8_masks_saved_as_0_255_are_refused_not_read_as_binary():
    # PNG masks are often 0/255; uint8 has its own fast check, which must still refuse them.
    masks = np.zeros((2, 4, 4), np.uint8)
    masks[0, 1, 1] = 255
    with pytest.raises(ValueError, match="samples must be binary"):
        evaluate_case(masks, masks[:1] // 255)
    twos = masks // 255 * 2  # a 2 is as wrong as 255
    with pytest.raises(ValueError, match="raters must be binary"):
        evaluate_batch(masks[None] // 255, twos[None])
    assert evaluate_case(masks // 255, masks[:1] // 255)["ged"] == pytest.approx(0.5)
