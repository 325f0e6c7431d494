"""Agreement with the public methods' own evaluation code, and the hand-checkable extremes.

The reference functions below transcribe, line for line in plain numpy, how two public code bases
compute their metrics (nothing is fetched at run time):

* PHiSeg (Baumgartner et al., MICCAI 2019; the GED code the Probabilistic U-Net's LIDC protocol
  is usually run with): ``utils.generalised_energy_distance`` with its per-label
  ``dist_fct`` -- 1 - Jaccard per label, a label absent from both masks counting as IoU 1 and a
  label in one mask only as 0, averaged over ``label_range``; the three means over all ordered
  pairs including i = j, 2/(NM)·Σd_sy - 1/N²·Σd_ss - 1/M²·Σd_yy.
* CCDM (Zbinden et al., ICCV 2023): ``metrics.iou`` on one-hot masks, (x & y).sum / (x | y).sum
  with NaN (0/0) set to 1; ``batched_distance`` = 1 - mean over the foreground classes [1:];
  GED = 2·cross - diversity_0 - diversity_1 with ``np.mean`` over the full pair grids; and the
  Hungarian-matched IoU on the label sets tiled to lcm(N, M) entries,
  ``(1 - cost)[linear_sum_assignment(cost)].mean()`` with cost = 1 - IoU.

docs/metrics.md lists which implementation agrees with ours to what precision.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from cimd_pipeline.metrics import evaluate_case

# --------------------------------------------------------------------------- PHiSeg


def phiseg_dist_fct(m1, m2, nlabels=1, label_range=(1,)):
    per_label_iou = []
    for lbl in label_range:
        m1_bin = (m1 == lbl) * 1
        m2_bin = (m2 == lbl) * 1
        if np.sum(m1_bin) == 0 and np.sum(m2_bin) == 0:
            per_label_iou.append(1)
        elif (np.sum(m1_bin) > 0 and np.sum(m2_bin) == 0) or (np.sum(m1_bin) == 0 and np.sum(m2_bin) > 0):
            per_label_iou.append(0)
        else:  # medpy.metric.binary.jc
            inter = np.count_nonzero(m1_bin & m2_bin)
            per_label_iou.append(inter / float(np.count_nonzero(m1_bin | m2_bin)))
    return 1 - (sum(per_label_iou) / nlabels)


def phiseg_generalised_energy_distance(sample_arr, gt_arr):
    n, m = sample_arr.shape[0], gt_arr.shape[0]
    d_sy, d_ss, d_yy = [], [], []
    for i in range(n):
        for j in range(m):
            d_sy.append(phiseg_dist_fct(sample_arr[i], gt_arr[j]))
        for j in range(n):
            d_ss.append(phiseg_dist_fct(sample_arr[i], sample_arr[j]))
    for i in range(m):
        for j in range(m):
            d_yy.append(phiseg_dist_fct(gt_arr[i], gt_arr[j]))
    return (2.0 / (n * m)) * sum(d_sy) - (1.0 / n**2) * sum(d_ss) - (1.0 / m**2) * sum(d_yy)


# --------------------------------------------------------------------------- CCDM


def ccdm_iou(x, y, axis=-1):
    with np.errstate(invalid="ignore", divide="ignore"):
        iou_ = (x & y).sum(axis) / (x | y).sum(axis)
    iou_[np.isnan(iou_)] = 1.0
    return iou_


def ccdm_batched_distance(x, y):
    per_class_iou = ccdm_iou(x[:, :, None], y[:, None, :], axis=-2)
    return 1 - per_class_iou[..., 1:].mean(-1)


def ccdm_one_hot(labels, num_classes=2):
    flat = labels.reshape((*labels.shape[:2], -1)).astype(int)
    return np.eye(num_classes)[flat].astype(bool)  # [B, N, P, C]


def ccdm_generalised_energy_distance(samples_0, samples_1):
    a, b = ccdm_one_hot(samples_0), ccdm_one_hot(samples_1)
    cross = np.mean(ccdm_batched_distance(a, b), axis=(1, 2))
    diversity_0 = np.mean(ccdm_batched_distance(a, a), axis=(1, 2))
    diversity_1 = np.mean(ccdm_batched_distance(b, b), axis=(1, 2))
    return 2 * cross - diversity_0 - diversity_1


def ccdm_hungarian_matched_iou(samples, labels):
    n, m = samples.shape[1], labels.shape[1]
    size = math.lcm(n, m)
    samples = np.tile(samples, (1, size // n, 1, 1))
    labels = np.tile(labels, (1, size // m, 1, 1))
    cost = 1 - ccdm_iou(ccdm_one_hot(samples)[:, :, None], ccdm_one_hot(labels)[:, None, :], axis=-2)[..., 1:].mean(-1)
    scores = []
    for c in cost:
        scores.append((1 - c)[linear_sum_assignment(c)].mean())
    return np.array(scores)


# --------------------------------------------------------------------------- agreement


def _sets(seed: int):
    """A sample set and a rater set of varied density; some masks empty, some duplicated."""
    rng = np.random.default_rng(seed)
    n, r = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    density = rng.choice([0.0, 0.05, 0.3, 0.6], size=n + r)
    masks = (rng.random((n + r, 8, 9)) < density[:, None, None]).astype(np.uint8)
    if rng.random() < 0.5:
        masks[n - 1] = masks[-1]  # a sample equal to a rater
    return masks[:n], masks[n:]


@pytest.mark.parametrize("seed", range(10))
def test_ged_equals_phiseg_and_ccdm_code(seed):
    samples, raters = _sets(seed)
    ours = evaluate_case(samples, raters)["ged"]
    assert ours == pytest.approx(phiseg_generalised_energy_distance(samples, raters), abs=1e-12)
    assert ours == pytest.approx(ccdm_generalised_energy_distance(samples[None], raters[None])[0], abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_hm_iou_equals_ccdm_code(seed):
    samples, raters = _sets(100 + seed)
    ours = evaluate_case(samples, raters)["hm_iou"]
    assert ours == pytest.approx(ccdm_hungarian_matched_iou(samples[None], raters[None])[0], abs=1e-12)


def _recorded_case():
    """16 disc-shaped samples and 4 disc-shaped raters of varied size and place, 32 x 32."""
    yy, xx = np.mgrid[0:32, 0:32]
    rng = np.random.default_rng(2023)

    def blob():
        cy, cx = rng.uniform(12, 20, 2)
        radius = rng.uniform(3, 8)
        return ((yy - cy) ** 2 + (xx - cx) ** 2 < radius * radius).astype(np.uint8)

    return np.stack([blob() for _ in range(16)]), np.stack([blob() for _ in range(4)])


def test_recorded_outputs_of_phiseg_and_ccdm_code():
    # Outputs of the reference transcriptions above on the fixed case (recorded when this test
    # was written; the two GED codes differ from each other only in the last bits of float64).
    samples, raters = _recorded_case()
    recorded = {"ged_phiseg": 0.21888578786382384, "ged_ccdm": 0.21888578786382407, "hm_iou_ccdm": 0.4496112255031325}
    assert phiseg_generalised_energy_distance(samples, raters) == pytest.approx(recorded["ged_phiseg"], abs=1e-15)
    assert ccdm_hungarian_matched_iou(samples[None], raters[None])[0] == pytest.approx(recorded["hm_iou_ccdm"], abs=1e-15)
    got = evaluate_case(samples, raters)
    assert got["ged"] == pytest.approx(recorded["ged_phiseg"], abs=1e-13)
    assert got["ged"] == pytest.approx(recorded["ged_ccdm"], abs=1e-13)
    assert got["hm_iou"] == pytest.approx(recorded["hm_iou_ccdm"], abs=1e-13)


# --------------------------------------------------------------------------- hand-checkable


def test_disjoint_sets():
    # Samples {0}, {1}; raters {2}, {3}: every cross pair and every off-diagonal pair is at
    # distance 1. GED = 2·1 - 1/2 - 1/2 = 1; nothing overlaps: HM-IoU = Dice_max = S_c = CI = 0.
    masks = np.eye(4, dtype=np.uint8).reshape(4, 1, 4)
    got = evaluate_case(masks[:2], masks[2:])
    assert got["ged"] == pytest.approx(1.0)
    assert (got["ged_cross"], got["diversity_samples"], got["diversity_raters"]) == pytest.approx((1, 0.5, 0.5))
    assert got["hm_iou"] == got["dice_max"] == got["s_c"] == got["ci"] == got["ci_var"] == 0.0
    assert got["rater_distance"] == 1.0 and got["ged_floor"] == pytest.approx(1.0)  # 1·(1/2 + 1/2)
    assert phiseg_generalised_energy_distance(masks[:2], masks[2:]) == pytest.approx(1.0)


def test_all_empty_raters():
    # Every rater drew nothing. Samples: two empty, one with a pixel. d_sy = (0, 0, 1) per rater
    # -> 1/3; d_ss: the full sample differs from both empty ones -> 4/9; d_yy = 0.
    # GED = 2/3 - 4/9 = 2/9. HM-IoU (L = 6): 4 of 6 matched pairs are empty-empty -> 2/3.
    # Dice_max: an empty sample matches every rater -> 1. S_c: the raters' union is empty and the
    # samples' is not -> 0, so CI = 0. The raters agree perfectly: d̄ = 0, floor 0.
    samples = np.zeros((3, 2, 2), np.uint8)
    samples[2, 0, 0] = 1
    raters = np.zeros((2, 2, 2), np.uint8)
    got = evaluate_case(samples, raters)
    assert got["ged"] == pytest.approx(2 / 9)
    assert got["hm_iou"] == pytest.approx(2 / 3)
    assert got["dice_max"] == 1.0 and got["s_c"] == 0.0 and got["ci"] == 0.0
    assert got["rater_distance"] == 0.0 and got["ged_floor"] == 0.0
    assert phiseg_generalised_energy_distance(samples, raters) == pytest.approx(2 / 9)
    assert ccdm_hungarian_matched_iou(samples[None], raters[None])[0] == pytest.approx(2 / 3)


def test_identical_sets_score_zero_ged_and_perfect_overlap():
    rng = np.random.default_rng(9)
    raters = (rng.random((4, 6, 6)) < 0.4).astype(np.uint8)
    got = evaluate_case(raters, raters[::-1])
    assert got["ged"] == pytest.approx(0.0, abs=1e-12)
    assert got["hm_iou"] == pytest.approx(1.0) and got["dice_max"] == pytest.approx(1.0)
    assert got["ci"] == pytest.approx(1.0) and got["d_a"] == pytest.approx(1.0)
