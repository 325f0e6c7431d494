"""Tests for cimd_pipeline.metrics: hand-computed cases, conventions, invariances, and agreement
of the vectorised/batched implementation with a plain per-pair numpy reference."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cimd_pipeline.metrics import (
    METRIC_KEYS,
    ci_score,
    dice_max,
    evaluate_batch,
    evaluate_case,
    ged,
    ged_floor,
    hm_iou,
    pairwise_dice,
    pairwise_iou,
)

# --------------------------------------------------------------------------- plain reference


def ref_iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def ref_dice(a, b):
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * np.logical_and(a, b).sum() / total


def ref_pair_variance(a, b):
    """The public re-implementations' V: numpy's variance of the difference image."""
    return float(np.var(a.astype(float) - b.astype(float)))


def ref_spread(masks, pair=lambda a, b: 1 - ref_dice(a, b)):
    n = len(masks)
    v = [pair(masks[i], masks[j]) for i in range(n) for j in range(i + 1, n)]
    return (max(v), min(v)) if v else (0.0, 0.0)


def ref_metrics(samples, raters):
    """Every metric straight from its definition, one pair at a time."""
    S, Y = [np.asarray(m, bool) for m in samples], [np.asarray(m, bool) for m in raters]
    n, r = len(S), len(Y)

    def mean_d(A, B):
        return sum(1 - ref_iou(a, b) for a in A for b in B) / (len(A) * len(B))

    out = {"ged": 2 * mean_d(S, Y) - mean_d(S, S) - mean_d(Y, Y), "ged_cross": mean_d(S, Y),
           "diversity_samples": mean_d(S, S), "diversity_raters": mean_d(Y, Y)}
    pairs = [1 - ref_iou(Y[i], Y[j]) for i in range(r) for j in range(r) if i != j]
    out["rater_distance"] = float(np.mean(pairs)) if pairs else math.nan
    out["ged_floor"] = out["rater_distance"] * (1 / n + 1 / r)

    size = math.lcm(n, r)
    S_rep, Y_rep = [S[k % n] for k in range(size)], [Y[k % r] for k in range(size)]
    m = np.array([[ref_iou(a, b) for b in Y_rep] for a in S_rep])
    if size <= 6:  # brute force, independent of scipy
        perms = itertools.permutations(range(size))
        best = max(sum(m[i, p[i]] for i in range(size)) for p in perms)
    else:
        rows, cols = linear_sum_assignment(m, maximize=True)
        best = m[rows, cols].sum()
    out["hm_iou"] = best / size

    out["dice_max"] = out["d_max"] = np.mean([max(ref_dice(s, y) for s in S) for y in Y])
    union_s, union_y = np.logical_or.reduce(S), np.logical_or.reduce(Y)
    if union_y.sum() == 0:
        out["s_c"] = 1.0 if union_s.sum() == 0 else 0.0
    else:
        out["s_c"] = np.logical_and(union_s, union_y).sum() / union_y.sum()
    for suffix, pair in (("", lambda a, b: 1 - ref_dice(a, b)), ("_var", ref_pair_variance)):
        (s_max, s_min), (y_max, y_min) = ref_spread(S, pair), ref_spread(Y, pair)
        out[f"d_a{suffix}"] = d_a = 1 - (abs(s_max - y_max) + abs(s_min - y_min)) / 2
        terms = (out["s_c"], out["d_max"], d_a)
        out[f"ci{suffix}"] = 3 * np.prod(terms) / sum(terms) if sum(terms) > 0 else 0.0
        out[f"ci_hm{suffix}"] = 3 / sum(1 / t for t in terms) if min(terms) > 0 else 0.0
    return out


def assert_metrics_close(got, want, tol=1e-6):
    assert set(got) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], abs=tol, nan_ok=True), key


def random_masks(rng, n, shape=(5, 6)):
    """Masks of varied density; about one in five is empty, some are duplicated."""
    p = rng.choice([0.0, 0.15, 0.4, 0.7], size=n, p=[0.2, 0.3, 0.3, 0.2])
    masks = rng.random((n, *shape)) < p[:, None, None]
    if n > 2 and rng.random() < 0.5:
        masks[-1] = masks[0]
    return masks


# --------------------------------------------------------------------------- hand-computed cases

# 2x2 masks, pixels named a b / c d.
S_HAND = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]])  # {a, b}, {a}
Y_HAND = np.array([[[1, 0], [0, 0]], [[0, 0], [1, 1]]])  # {a}, {c, d}


def test_hand_case_2x2_all_metrics():
    # IoU  S x Y = [[1/2, 0], [1, 0]]  -> mean d_sy = (1/2 + 1 + 0 + 1) / 4 = 5/8
    # d_ss = [[0, 1/2], [1/2, 0]] -> 1/4 ; d_yy = [[0, 1], [1, 0]] -> 1/2
    # GED = 2 * 5/8 - 1/4 - 1/2 = 1/2
    assert ged(S_HAND, Y_HAND) == pytest.approx(0.5)
    terms = evaluate_case(S_HAND, Y_HAND)
    assert (terms["ged_cross"], terms["diversity_samples"], terms["diversity_raters"]) == pytest.approx((5 / 8, 1 / 4, 1 / 2))
    # Best matching S1-Y2 (0) + S2-Y1 (1) -> 1/2
    assert hm_iou(S_HAND, Y_HAND) == pytest.approx(0.5)
    # Dice S x Y = [[2/3, 0], [1, 0]] -> mean(max(2/3, 1), max(0, 0)) = 1/2
    assert dice_max(S_HAND, Y_HAND) == pytest.approx(0.5)
    # S_c = |{a}| / |{a, c, d}| = 1/3 ; V_s = {1/3}, V_y = {1} -> D_a = 1 - (2/3 + 2/3)/2 = 1/3
    # CI = 3 * (1/3)(1/2)(1/3) / (1/3 + 1/2 + 1/3) = 1/7 ; harmonic = 3 / (3 + 2 + 3) = 3/8
    # Variance reading, V = var of the 4-pixel difference image:
    #   S1 - S2 = (0, 1, 0, 0): 1/4 - (1/4)^2 = 3/16 ; Y1 - Y2 = (1, 0, -1, -1): 3/4 - 1/16 = 11/16
    #   D_a_var = 1 - (1/2 + 1/2)/2 = 1/2 ; CI_var = 3 (1/3)(1/2)(1/2) / (4/3) = 3/16 ; hm 3/7
    got = ci_score(S_HAND, Y_HAND)
    want = {"ci": 1 / 7, "ci_hm": 3 / 8, "s_c": 1 / 3, "d_max": 0.5, "d_a": 1 / 3,
            "ci_var": 3 / 16, "ci_hm_var": 3 / 7, "d_a_var": 0.5}
    assert got == pytest.approx(want)


# 1x4 masks (pixels 0..3).
S_CI = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]], [[0, 0, 0, 0]]])
Y_CI = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 0]]])


def test_hand_case_ci_score():
    # S_c = |{0,1}| / |{0,1,2}| = 2/3
    # Dice S x Y = [[1, 1/2], [2/3, 0], [0, 0]] -> D_max = (1 + 1/2) / 2 = 3/4
    # V_s = {1 - 2/3, 1 - 0, 1 - 0} -> max 1, min 1/3 ; V_y = {1 - 1/2} -> max = min = 1/2
    # D_a = 1 - (|1 - 1/2| + |1/3 - 1/2|) / 2 = 1 - (1/2 + 1/6) / 2 = 2/3
    # CI = 3 * (2/3)(3/4)(2/3) / (2/3 + 3/4 + 2/3) = 1 / (25/12) = 12/25
    # harmonic = 3 / (3/2 + 4/3 + 3/2) = 9/13
    # Variance reading (P = 4): S1-S2 (0,1,0,0) 3/16 ; S1-S3 (1,1,0,0) 1/2 - 1/4 = 1/4 ;
    #   S2-S3 (1,0,0,0) 3/16 -> V_s max 1/4, min 3/16 ; Y1-Y2 (1,0,-1,0) 1/2 - 0 = 1/2
    #   D_a_var = 1 - (1/4 + 5/16)/2 = 23/32 ; CI_var = (69/64) / (205/96) = 207/410
    #   harmonic = 3 / (3/2 + 4/3 + 32/23) = 414/583
    got = ci_score(S_CI, Y_CI)
    want = {"ci": 12 / 25, "ci_hm": 9 / 13, "s_c": 2 / 3, "d_max": 0.75, "d_a": 2 / 3,
            "ci_var": 207 / 410, "ci_hm_var": 414 / 583, "d_a_var": 23 / 32}
    assert got == pytest.approx(want)


def test_ci_readings_differ_where_variance_and_dice_disagree():
    # Variance of A - B is small when A - B is nearly constant, even for disjoint masks: a full
    # and an empty mask differ everywhere by +1 (variance 0) but share nothing (1 - Dice = 1).
    raters = np.array([[[1, 1, 1, 1, 0, 0, 0, 0]], [[0, 0, 0, 0, 1, 1, 1, 1]]])  # disjoint halves
    # V = var(+1 x4, -1 x4) = 1 (its maximum); 1 - Dice = 1
    samples = np.array([[[1, 1, 1, 1, 1, 1, 1, 1]], [[0, 0, 0, 0, 0, 0, 0, 0]]])  # full vs empty
    # V = var(+1 x8) = 0 although the masks share nothing; 1 - Dice = 1
    got = ci_score(samples, raters)
    assert got["d_a"] == pytest.approx(1.0)
    assert got["d_a_var"] == pytest.approx(0.0)  # 1 - (|0 - 1| + |0 - 1|) / 2


def test_empty_masks_count_as_identical_in_ged_hm_iou_and_dice_max():
    # The CCDM / PHiSeg / MoSE convention: IoU (and Dice) of two empty masks is 1.
    samples = np.array([[[0, 0]], [[1, 0]]])  # {}, {a}
    raters = np.array([[[0, 0]]])  # {}
    # d_sy = (0, 1) -> 1/2 ; d_ss = [[0, 1], [1, 0]] -> 1/2 (i = j terms included) ; d_yy = 0
    assert ged(samples, raters) == pytest.approx(2 * 0.5 - 0.5 - 0.0)
    # L = 2: the rater twice; matching pairs {} with {} (1) and {a} with {} (0)
    assert hm_iou(samples, raters) == pytest.approx(0.5)
    assert dice_max(samples, raters) == pytest.approx(1.0)


def test_hand_case_dice_max():
    assert dice_max(S_CI, Y_CI) == pytest.approx(0.75)
    # A single sample {0} against raters {0,1} and {2}: Dice 2/3 and 0 -> 1/3
    assert dice_max([[[1, 0, 0]]], [[[1, 1, 0]], [[0, 0, 1]]]) == pytest.approx(1 / 3)


def test_identical_empty_sets():
    empty = np.zeros((3, 4, 4), bool)
    got = evaluate_case(empty, empty[:2])
    assert got == {"ged": 0.0, "ged_cross": 0.0, "diversity_samples": 0.0, "diversity_raters": 0.0,
                   "rater_distance": 0.0, "ged_floor": 0.0, "hm_iou": 1.0, "dice_max": 1.0, "ci": 1.0, "ci_hm": 1.0,
                   "ci_var": 1.0, "ci_hm_var": 1.0, "s_c": 1.0, "d_max": 1.0, "d_a": 1.0,
                   "d_a_var": 1.0}


def test_one_empty_side():
    samples = np.zeros((2, 3, 3), bool)  # predicts nothing
    raters = np.zeros((2, 3, 3), bool)
    raters[:, 1, 1] = True  # both raters mark the same pixel
    # d_sy = 1 everywhere, d_ss = 0 (empty vs empty), d_yy = 0 (identical) -> GED = 2
    got = evaluate_case(samples, raters)
    assert got["ged"] == pytest.approx(2.0)
    assert got["hm_iou"] == 0.0 and got["dice_max"] == 0.0
    assert got["s_c"] == 0.0 and got["ci"] == 0.0 and got["ci_hm"] == 0.0 and got["ci_var"] == 0.0
    # Raters see nothing but samples do: sensitivity is 0 by convention.
    assert ci_score(raters, samples)["s_c"] == 0.0


def test_identical_sets_have_zero_ged_thanks_to_diagonal():
    # Disjoint masks: off-diagonal d = 1. Dropping the diagonal would give 2*1/2 - 1 - 1 = -1.
    masks = np.eye(3, dtype=bool).reshape(3, 1, 3)
    assert ged(masks, masks) == pytest.approx(0.0, abs=1e-12)
    assert ged(masks, masks[[2, 0, 1]]) == pytest.approx(0.0, abs=1e-12)
    assert hm_iou(masks, masks[::-1]) == pytest.approx(1.0)


# --------------------------------------------------------------------------- perfect-sampler floor


def test_ged_floor_hand_case():
    # Raters {a} and {c, d} of S_HAND/Y_HAND are disjoint: d = 1 for the one pair, so d̄ = 1 and
    # the floor for N = 2 samples and m = 2 raters is 1 * (1/2 + 1/2) = 1; for N = 16, 9/16.
    got = evaluate_case(S_HAND, Y_HAND)
    assert got["rater_distance"] == pytest.approx(1.0)
    assert got["ged_floor"] == pytest.approx(1.0)
    assert ged_floor(got["rater_distance"], 16, 2) == pytest.approx(9 / 16)
    # Three raters {a}, {a}, {a, b}: pair distances 0, 1/2, 1/2 -> d̄ = 1/3 (not the diagonal-
    # including mean 2/9); one sample: floor = 1/3 * (1 + 1/3) = 4/9.
    raters = np.array([[[1, 0]], [[1, 0]], [[1, 1]]])
    got = evaluate_case(raters[:1], raters)
    assert got["rater_distance"] == pytest.approx(1 / 3)
    assert got["ged_floor"] == pytest.approx(4 / 9)
    assert ged_floor(np.array([0.3, 0.6]), np.array([4, 16]), 4) == pytest.approx([0.15, 0.1875])


def test_ged_floor_is_the_exact_expected_ged_of_a_perfect_sampler():
    # A rater distribution on two overlapping masks A = {0, 1} (prob 0.3) and B = {1, 2, 3}
    # (prob 0.7): d(A, B) = 1 - 1/4 = 3/4, so the mean distance of two independent draws is
    # d = 2 * 0.3 * 0.7 * 3/4 = 0.315. Enumerating every draw of m = 2 raters and N = 3 samples
    # (weight = product of the draws' probabilities), the expected GED is d * (1/3 + 1/2), and so
    # is the expected floor estimated from the raters alone.
    masks = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 1]]], bool)
    prob = np.array([0.3, 0.7])
    n, m = 3, 2
    combos = list(itertools.product(range(2), repeat=n + m))
    weights = np.array([np.prod(prob[list(c)]) for c in combos])
    samples = np.stack([masks[list(c[:n])] for c in combos])
    raters = np.stack([masks[list(c[n:])] for c in combos])
    got = evaluate_batch(samples, raters)
    expected_ged = sum(w * g["ged"] for w, g in zip(weights, got))
    expected_floor = sum(w * g["ged_floor"] for w, g in zip(weights, got))
    assert weights.sum() == pytest.approx(1.0)
    assert expected_ged == pytest.approx(0.315 * (1 / 3 + 1 / 2), abs=1e-12)
    assert expected_floor == pytest.approx(expected_ged, abs=1e-12)


def test_ged_floor_is_nan_below_two_raters_in_a_batch():
    rng = np.random.default_rng(5)
    samples, raters = random_masks(rng, 8).reshape(2, 4, 5, 6), random_masks(rng, 6).reshape(2, 3, 5, 6)
    valid = np.array([[True, False, False], [True, True, False]])
    one, two = evaluate_batch(samples, raters, valid)
    assert math.isnan(one["rater_distance"]) and math.isnan(one["ged_floor"])
    assert not math.isnan(one["ged"])
    assert two["ged_floor"] == pytest.approx(ref_metrics(samples[1], raters[1, :2])["ged_floor"])


def test_ged_of_the_first_k_samples_comes_from_the_same_matrices():
    rng = np.random.default_rng(8)
    samples = np.stack([random_masks(rng, 7) for _ in range(3)])
    raters = np.stack([random_masks(rng, 3) for _ in range(3)])
    valid = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0]], bool)
    got = evaluate_batch(samples, raters, valid, ged_prefixes=(2, 5, 7, 9))
    for case in range(3):
        for k in (2, 5, 7):
            want = ref_metrics(samples[case, :k], raters[case][valid[case]])["ged"]
            assert got[case][f"ged{k}"] == pytest.approx(want, abs=1e-12), (case, k)
        assert "ged9" not in got[case]  # more than the N drawn: not reported


# --------------------------------------------------------------------------- HM-IoU replication


def test_hm_iou_lcm_n2_r3():
    samples = np.array([[[1, 0, 0]], [[0, 1, 0]]])
    raters = np.array([[[1, 0, 0]], [[0, 1, 0]], [[1, 1, 0]]])
    # L = 6: three copies of each sample, two of each rater. IoU S x Y = [[1, 0, .5], [0, 1, .5]]
    # best: S1->Y1,Y1,Y3 and S2->Y2,Y2,Y3 = (4 + 1) / 6. (A 2x3 rectangular match would give 1.)
    assert hm_iou(samples, raters) == pytest.approx(5 / 6)


def test_hm_iou_lcm_n16_r3():
    raters = np.eye(3, dtype=bool).reshape(3, 1, 3)  # disjoint
    # Perfect agreement needs 3 * (#samples equal to Y_j) == 16 copies of Y_j: impossible unless
    # all raters coincide. With 5/5/6 samples per rater, 15 + 15 + 16 of the 48 matches are
    # perfect and the remaining two pair disjoint masks: score 46/48.
    samples = raters[[0] * 5 + [1] * 5 + [2] * 6]
    assert hm_iou(samples, raters) == pytest.approx(46 / 48)
    assert hm_iou(samples[::-1], raters[[2, 0, 1]]) == pytest.approx(46 / 48)
    # The consensus case does reach 1: every sample equals the (shared) rater mask.
    assert hm_iou(np.repeat(raters[:1], 16, axis=0), np.repeat(raters[:1], 3, axis=0)) == 1.0


# --------------------------------------------------------------------------- invariances/reference


@pytest.mark.parametrize("seed", range(4))
def test_permutation_invariance(seed):
    rng = np.random.default_rng(seed)
    samples, raters = random_masks(rng, 6), random_masks(rng, 4)
    base = evaluate_case(samples, raters)
    permuted = evaluate_case(samples[rng.permutation(6)], raters[rng.permutation(4)])
    assert_metrics_close(permuted, base, tol=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_case_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    n, r = rng.integers(1, 7), rng.integers(1, 5)
    samples, raters = random_masks(rng, n), random_masks(rng, r)
    want = ref_metrics(samples, raters)
    assert_metrics_close(evaluate_case(samples, raters), want)
    # The single-metric entry points agree with the shared path.
    assert ged(samples, raters) == pytest.approx(want["ged"], abs=1e-6)
    assert hm_iou(samples, raters) == pytest.approx(want["hm_iou"], abs=1e-6)
    assert dice_max(samples, raters) == pytest.approx(want["dice_max"], abs=1e-6)
    ci = ci_score(samples, raters)
    assert {k: ci[k] for k in ci} == pytest.approx({k: want[k] for k in ci}, abs=1e-6)


def test_batch_with_ragged_raters_matches_reference():
    rng = np.random.default_rng(7)
    b, n, r = 5, 4, 4
    samples = np.stack([random_masks(rng, n) for _ in range(b)])
    raters = np.stack([random_masks(rng, r) for _ in range(b)])
    samples[3] = False  # a case whose samples are all empty
    valid = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]], bool)
    raters[~valid] = rng.random((int((~valid).sum()), 5, 6)) < 0.5  # junk in padded slots
    got = evaluate_batch(samples, torch.from_numpy(raters), torch.from_numpy(valid))
    assert len(got) == b
    for case in range(b):
        assert_metrics_close(got[case], ref_metrics(samples[case], raters[case][valid[case]]))


def test_large_batches_of_mixed_sparsity_match_case_by_case():
    # More cases than one Gram group, from empty to dense, in shuffled order: compaction to the
    # used pixels and grouping by their count must give every case its own exact counts.
    rng = np.random.default_rng(12)
    density = rng.permutation(np.linspace(0, 0.9, 21))
    samples = rng.random((21, 5, 7, 9)) < density[:, None, None, None]
    raters = rng.random((21, 3, 7, 9)) < density[::-1, None, None, None]
    samples[4, :, 2:5, 3:6] = True  # a dense block in an otherwise sparse case
    got = evaluate_batch(samples.astype(np.uint8), raters, ged_prefixes=(2,))
    for case in range(21):
        want = ref_metrics(samples[case], raters[case])
        assert_metrics_close({k: got[case][k] for k in METRIC_KEYS}, want, tol=1e-12)
        assert got[case]["ged2"] == pytest.approx(ref_metrics(samples[case, :2], raters[case])["ged"], abs=1e-12)


def test_padding_content_is_ignored_even_if_not_binary():
    rng = np.random.default_rng(3)
    samples, raters = random_masks(rng, 3)[None], random_masks(rng, 2)[None].astype(np.float32)
    padded = np.concatenate([raters, np.full_like(raters, np.nan)], axis=1)
    got = evaluate_batch(samples, padded, np.array([[True, True, False, False]]))
    assert_metrics_close(got[0], evaluate_case(samples[0], raters[0]), tol=1e-12)


def test_torch_and_int_inputs_and_pairwise():
    a = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    b = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 1], [1, 1]]])
    iou, dice = pairwise_iou(a, b), pairwise_dice(a.numpy(), b.numpy())
    assert iou.dtype == torch.float64 and iou.shape == (2, 3)
    f64 = torch.float64
    torch.testing.assert_close(iou, torch.tensor([[0.5, 0.0, 0.25], [0.0, 1.0, 0.0]], dtype=f64))
    torch.testing.assert_close(dice, torch.tensor([[2 / 3, 0.0, 0.4], [0.0, 1.0, 0.0]], dtype=f64))
    got = evaluate_case(a, b.bool())
    assert all(type(v) is float for v in got.values())
    assert_metrics_close(got, ref_metrics(a.numpy(), b.numpy()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(11)
    samples = torch.from_numpy(np.stack([random_masks(rng, 6, (32, 32)) for _ in range(3)]))
    raters = torch.from_numpy(np.stack([random_masks(rng, 4, (32, 32)) for _ in range(3)]))
    valid = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    cpu = evaluate_batch(samples, raters, valid)
    gpu = evaluate_batch(samples.cuda(), raters.cuda(), valid.cuda())
    for c, g in zip(cpu, gpu):
        assert_metrics_close(g, c, tol=1e-9)


# --------------------------------------------------------------------------- validation


def z(*shape):
    return np.zeros(shape, bool)


@pytest.mark.parametrize(
    ("samples", "raters", "message"),
    [
        (z(4, 4), z(2, 4, 4), r"samples must have shape \[N, H, W\]"),
        (z(2, 4, 4), z(1, 2, 4, 4), r"raters must have shape \[R, H, W\]"),
        (z(2, 4, 4), z(2, 4, 5), "must share H, W"),
        (z(0, 4, 4), z(2, 4, 4), "at least one sample"),
        (z(2, 4, 4), z(0, 4, 4), "at least one valid rater"),
        (np.full((2, 4, 4), 2), z(2, 4, 4), "samples must be binary"),
        (np.zeros((2, 4, 4)), np.full((2, 4, 4), 0.5), "raters must be binary"),
    ],
)
def test_case_validation(samples, raters, message):
    for fn in (ged, hm_iou, dice_max, ci_score, evaluate_case):
        with pytest.raises(ValueError, match=message):
            fn(samples, raters)


@pytest.mark.parametrize(
    ("samples", "raters", "valid", "message"),
    [
        (z(2, 3, 4, 4), z(2, 2, 4, 4), [[1, 0], [0, 0]], r"cases \[1\] have none"),
        (z(2, 3, 4, 4), z(2, 2, 4, 4), [[1, 0]], r"rater_valid must have shape \(2, 2\)"),
        (z(2, 3, 4, 4), z(2, 2, 4, 4), [[1, 2], [1, 1]], "rater_valid must be binary"),
        (z(2, 3, 4, 4), z(3, 2, 4, 4), None, "batch sizes differ"),
        (z(3, 4, 4), z(2, 2, 4, 4), None, r"samples must have shape \[B, N, H, W\]"),
        (z(2, 0, 4, 4), z(2, 2, 4, 4), None, "at least one sample"),
        (z(2, 3, 4, 4), z(2, 2, 4, 3), None, "must share H, W"),
        (z(2, 3, 4, 4), np.full((2, 2, 4, 4), 3), [[1, 0], [0, 1]], "raters must be binary"),
    ],
)
def test_batch_validation(samples, raters, valid, message):
    with pytest.raises(ValueError, match=message):
        evaluate_batch(samples, raters, valid)


def test_mixed_devices_rejected():
    # The "meta" device stands in for a GPU: the check fires before any data is touched.
    with pytest.raises(ValueError, match="different devices"):
        ged(torch.zeros(2, 3, 3, device="meta"), torch.zeros(2, 3, 3))


def test_metrics_doc_names_every_metric_and_readme_links_it():
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "metrics.md").read_text()
    for key in (*METRIC_KEYS, "ged16", "ged_oracle"):
        assert f"`{key}`" in doc, key
    assert "(docs/metrics.md)" in (root / "README.md").read_text()
