"""Set-to-set segmentation metrics for ambiguous segmentation: GED, HM-IoU, Dice_max, CI score.

Each test image has N predicted samples and R rater annotations (boolean masks). Every metric is
a function of three pairwise similarity matrices (samples x raters, samples x samples,
raters x raters), so the module builds one Gram matrix of the flattened masks per image -- on
the pixels that some mask of the image sets, for groups of images in one batched matmul -- and
derives both IoU and Dice from it. Work stays on
the inputs' device; only the Hungarian matching of HM-IoU runs on CPU (scipy).

Conventions, and why:

* Two empty masks are identical (IoU = Dice = 1, distance 0). Otherwise an image on which all
  raters agree that there is no lesion would punish a model that correctly predicts nothing.
* GED averages over all ordered pairs *including* i = j (diagonal distance 0 counts in the
  denominators), the estimator used by the Probabilistic U-Net line of work; with it identical
  sample and rater sets score exactly 0, but a perfect sampler does not: ``ged_floor`` is its
  expected GED, d̄(1/N + 1/m) with d̄ = ``rater_distance`` (see :func:`ged_floor`).
* The CI score is reported for both readings of its diversity-agreement term D_a. The paper
  compares the largest and smallest "variance" V between two masks of the sample set with those
  of the rater set. ``ci`` reads V as 1 - Dice of the pair (our first choice: it is bounded by 1
  and scale-free, so D_a spans [0, 1]); ``ci_var`` reads V as the pixel-wise variance of
  Y_i - Y_j over the pairs i < j, as the public re-implementations compute it (comparable with
  published CI numbers; it shrinks with the lesion's share of the image, so D_a sits near 1).
  Each comes with its components (``d_a``, ``d_a_var``) and in two forms: the formula as printed
  in the paper, 3*S_c*D_max*D_a / (S_c + D_max + D_a), which is *not* a harmonic mean, and the
  true harmonic mean 3 / (1/S_c + 1/D_max + 1/D_a) (``ci_hm``, ``ci_hm_var``). docs/metrics.md
  lists every convention and what the well-known implementations do.

Batches pad the rater sets to a common R and flag the real raters in ``rater_valid``; every
reduction over raters is a masked mean or extremum, so padded slots never reach a score.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "METRIC_KEYS",
    "ci_score",
    "dice_max",
    "evaluate_batch",
    "evaluate_case",
    "ged",
    "ged_floor",
    "hm_iou",
    "pairwise_dice",
    "pairwise_iou",
]

MaskLike = np.ndarray | torch.Tensor

#: Keys of the per-case dictionaries returned by :func:`evaluate_case` / :func:`evaluate_batch`.
METRIC_KEYS = (
    "ged", "ged_cross", "diversity_samples", "diversity_raters", "rater_distance", "ged_floor",
    "hm_iou", "dice_max", "ci", "ci_hm", "ci_var", "ci_hm_var", "s_c", "d_max", "d_a", "d_a_var",
)


class _Blocks(NamedTuple):
    """The three blocks of a similarity matrix over the stacked [samples; raters] set."""

    sy: torch.Tensor  # [B, N, R]
    ss: torch.Tensor  # [B, N, N]
    yy: torch.Tensor  # [B, R, R]


# --------------------------------------------------------------------------- input handling


def _device_of(*arrays: object) -> torch.device:
    """Torch inputs fix the device (so GPU tensors are scored on the GPU); numpy means CPU."""
    devices = {a.device for a in arrays if isinstance(a, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"inputs live on different devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def _as_tensor(x: MaskLike, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.ascontiguousarray(x))
    return x.to(device)


def _as_mask(t: torch.Tensor, name: str) -> torch.Tensor:
    """Boolean view of a mask; refuses e.g. probability maps that were never thresholded."""
    if t.dtype == torch.bool:
        return t
    if t.dtype == torch.uint8:  # the common case, and ten times cheaper to check: no negatives
        binary = t.numel() == 0 or int(t.max()) <= 1
    else:
        binary = bool(((t == 0) | (t == 1)).all())
    if not binary:
        raise ValueError(f"{name} must be binary (bool or values in {{0, 1}})")
    return t.view(torch.bool) if t.dtype == torch.uint8 else t != 0


def _check_shapes(s: torch.Tensor, y: torch.Tensor, lead: str) -> None:
    for name, t, size in (("samples", s, "N"), ("raters", y, "R")):
        if t.ndim != len(lead) + 3:
            layout = ", ".join([*lead, size, "H", "W"])
            raise ValueError(f"{name} must have shape [{layout}], got {tuple(t.shape)}")
    if s.shape[-2:] != y.shape[-2:]:
        raise ValueError(
            f"samples and raters must share H, W; got {tuple(s.shape[-2:])} "
            f"and {tuple(y.shape[-2:])}"
        )
    if s.shape[-3] == 0:
        raise ValueError("need at least one sample per case")


def _prepare_case(samples: MaskLike, raters: MaskLike):
    """Validate one case and lift it to a batch of one with all raters valid."""
    device = _device_of(samples, raters)
    s, y = _as_tensor(samples, device), _as_tensor(raters, device)
    _check_shapes(s, y, lead="")
    if y.shape[0] == 0:
        raise ValueError("need at least one valid rater")
    s, y = _as_mask(s, "samples"), _as_mask(y, "raters")
    valid = torch.ones(1, y.shape[0], dtype=torch.bool, device=device)
    return s.flatten(1)[None], y.flatten(1)[None], valid


def _prepare_batch(samples: MaskLike, raters: MaskLike, rater_valid: MaskLike | None):
    """Validate a padded batch; invalid rater slots are zeroed so they cannot leak into unions."""
    device = _device_of(samples, raters, rater_valid)
    s, y = _as_tensor(samples, device), _as_tensor(raters, device)
    _check_shapes(s, y, lead="B")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: samples {s.shape[0]}, raters {y.shape[0]}")
    b, r = y.shape[:2]
    if rater_valid is None:
        valid = torch.ones(b, r, dtype=torch.bool, device=device)
    else:
        valid = _as_mask(_as_tensor(rater_valid, device), "rater_valid")
        if tuple(valid.shape) != (b, r):
            raise ValueError(f"rater_valid must have shape {(b, r)}, got {tuple(valid.shape)}")
    missing = (~valid.any(1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"need at least one valid rater per case; cases {missing} have none")
    # Padding may hold anything; only the valid raters have to be binary masks.
    if not bool(valid.all()):
        y = y.masked_fill(~valid[:, :, None, None], 0)
    y = _as_mask(y, "raters")
    return _as_mask(s, "samples").flatten(2), y.flatten(2), valid


# --------------------------------------------------------------------------- similarities


def _similarities(inter: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor):
    """IoU and Dice from intersection counts [..., N, M] and mask sizes [..., N] / [..., M].

    Counts are exact integers in float64, so a zero total means both masks are empty, which
    scores 1 by convention; clamping only guards the branch that ``where`` discards.
    """
    total = size_a[..., :, None] + size_b[..., None, :]
    empty = total == 0
    iou = torch.where(empty, 1.0, inter / (total - inter).clamp_min(1))
    dice = torch.where(empty, 1.0, 2 * inter / total.clamp_min(1))
    return iou, dice


def _pairwise(a: MaskLike, b: MaskLike):
    """Shared body of the public pairwise functions: one matmul gives every intersection."""
    device = _device_of(a, b)
    ta, tb = _as_tensor(a, device), _as_tensor(b, device)
    for name, t in (("a", ta), ("b", tb)):
        if t.ndim != 3:
            raise ValueError(f"{name} must have shape [N, H, W], got {tuple(t.shape)}")
    if ta.shape[1:] != tb.shape[1:]:
        raise ValueError(
            f"a and b must share H, W; got {tuple(ta.shape[1:])} and {tuple(tb.shape[1:])}"
        )
    fa = _as_mask(ta, "a").flatten(1).double()
    fb = _as_mask(tb, "b").flatten(1).double()
    return _similarities(fa @ fb.T, fa.sum(1), fb.sum(1))


def pairwise_iou(a: MaskLike, b: MaskLike) -> torch.Tensor:
    """IoU matrix [N, M] (float64, on the inputs' device) between masks a[N,H,W] and b[M,H,W]."""
    return _pairwise(a, b)[0]


def pairwise_dice(a: MaskLike, b: MaskLike) -> torch.Tensor:
    """Dice matrix [N, M] (float64, on the inputs' device) between masks a[N,H,W] and b[M,H,W]."""
    return _pairwise(a, b)[1]


#: Cases whose Gram matrices are computed in one bmm; they are grouped by how many pixels they
#: use, so that little of each bmm is padding.
GRAM_GROUP = 8


def _union(masks: torch.Tensor) -> torch.Tensor:
    """Pixel-wise union over dim 1 of boolean masks [B, K, P] (amax of the uint8 view: an order
    of magnitude faster on CPU than ``any``, which matters at 100 samples of 128 x 128)."""
    return masks.view(torch.uint8).amax(1).view(torch.bool)


def _gram(s: torch.Tensor, y: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Exact Gram matrix (float64 counts) of the stacked [samples; raters] masks of each case.

    A pixel that no mask of a case sets (``used`` False) adds 0 to every count of that case, so
    each case keeps only the pixels of its masks' union: ``topk`` of the flags puts them first,
    and whatever follows them within the cut are pixels the case does not use (zeros), so the cut
    is exact. Lesions cover a few per cent of an image, so this is where the speed comes from.
    Cases are then grouped by their number of used pixels so each bmm cuts close to its widest
    case. The product runs in float32, exact for counts below 2**24 (sums of 0/1 products), and
    in float64 beyond.
    """
    counts = used.sum(1)
    width = int(counts.max())
    first = torch.topk(used.view(torch.uint8), width, dim=1).indices
    # Used pixels first (the group cut below relies on it), each part in ascending pixel order
    # so that the gather reads every mask front to back: sort by (unused, pixel).
    pixels = used.shape[1]
    key = first + pixels * (~used.gather(1, first)).long()
    first = (key.sort(1).values % pixels)[:, None, :]
    x = torch.cat([m.gather(2, first.expand(-1, m.shape[1], -1)) for m in (s, y)], dim=1)
    dtype = torch.float32 if width < 2**24 else torch.float64
    gram = torch.empty(len(x), x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for group in torch.argsort(counts).split(GRAM_GROUP):
        f = x[group, :, : int(counts[group].max())].to(dtype)
        gram[group] = torch.bmm(f, f.transpose(1, 2)).double()
    return gram


def _matrices(s: torch.Tensor, y: torch.Tensor, unions=None) -> tuple[_Blocks, _Blocks, _Blocks]:
    """IoU, Dice and pair-variance blocks for s[B,N,P], y[B,R,P] from ONE batched Gram matrix.

    Stacking samples and raters lets a single bmm produce all three intersection blocks, and the
    Gram diagonal is each mask's size, so no separate reductions are needed. The variance of
    A - B over the P pixels is |A xor B| / P - ((|A| - |B|) / P)^2, also a function of the Gram.
    """
    union_s, union_y = (_union(s), _union(y)) if unions is None else unions
    gram = _gram(s, y, union_s | union_y)
    size = gram.diagonal(dim1=1, dim2=2)
    n, pixels = s.shape[1], s.shape[2]
    iou, dice = _similarities(gram, size, size)
    a, b = size[:, :, None], size[:, None, :]
    variance = (a + b - 2 * gram) / pixels - ((a - b) / pixels) ** 2
    return tuple(_Blocks(m[:, :n, n:], m[:, :n, :n], m[:, n:, n:]) for m in (iou, dice, variance))


# --------------------------------------------------------------------------- metrics (batched)


def _ged(d_sy: torch.Tensor, d_ss: torch.Tensor, d_yy: torch.Tensor, valid: torch.Tensor):
    """Squared GED per case and its three terms, with masked means over the valid raters.

    The terms say *why* a GED is high: samples far from the raters (``ged_cross``), or a sample
    set more or less diverse than the raters (``diversity_samples`` against ``diversity_raters``).
    """
    v = valid.double()
    n, r = d_ss.shape[1], v.sum(1)
    cross = (d_sy * v[:, None, :]).sum((1, 2)) / (n * r)
    within_s = d_ss.mean((1, 2))
    rater_sum = (d_yy * v[:, :, None] * v[:, None, :]).sum((1, 2))  # the diagonal is 0
    within_y = rater_sum / r**2
    # Mean distance between two *different* raters; undefined (NaN) below two raters.
    distance = torch.where(r > 1, rater_sum / (r * (r - 1)).clamp_min(1), math.nan)
    return {"ged": 2 * cross - within_s - within_y, "ged_cross": cross, "diversity_samples": within_s,
            "diversity_raters": within_y, "rater_distance": distance,
            "ged_floor": ged_floor(distance, n, r)}


def ged_floor(rater_distance, num_samples, num_raters):
    """Expected GED of a perfect sampler: ``rater_distance * (1/num_samples + 1/num_raters)``.

    A sampler that draws its N masks independently from the raters' own distribution still
    scores above 0 with the diagonal-including estimator: the i = j zeros shrink the two
    within-set terms by (N - 1)/N and (m - 1)/m while the cross term keeps the full mean distance
    d̄ between two independent draws, so E[GED] = 2d̄ - (N - 1)/N·d̄ - (m - 1)/m·d̄ = d̄(1/N + 1/m)
    for m exchangeable raters (derivation and assumptions in docs/metrics.md). ``rater_distance``
    is the per-case estimate of d̄ (the ``rater_distance`` metric: mean 1 - IoU over pairs of
    different valid raters, NaN with fewer than two, which propagates). Works elementwise on
    floats, numpy arrays and tensors, so the evaluator can rescale one case's floor to any N.
    """
    return rater_distance * (1 / num_samples + 1 / num_raters)


def _dice_max(dice_sy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per case: mean over valid raters of the best-matching sample's Dice."""
    v = valid.double()
    return (dice_sy.amax(1) * v).sum(1) / v.sum(1)


def _hm_iou(iou_sy: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Hungarian-matched IoU per case on the lcm(N, R)-replicated sets.

    Replicating both sets to a common size L lets every sample and every rater take part in a
    one-to-one matching; tiling the N x R matrix is the same as tiling the masks, since the
    replicated k-th sample is sample k mod N (likewise for raters).
    """
    scores = []
    for iou, v in zip(iou_sy.cpu().numpy(), valid.cpu().numpy()):
        iou = iou[:, v]
        n, r = iou.shape
        size = math.lcm(n, r)
        tiled = np.tile(iou, (size // n, size // r))
        rows, cols = linear_sum_assignment(tiled, maximize=True)
        scores.append(float(tiled[rows, cols].mean()))
    return scores


def _spread(dissim: torch.Tensor, pairs: torch.Tensor):
    """Max and min of ``dissim`` over the flagged pairs per case; (0, 0) when there are none."""
    has_pairs = pairs.any((1, 2))
    vmax = dissim.masked_fill(~pairs, -math.inf).amax((1, 2))
    vmin = dissim.masked_fill(~pairs, math.inf).amin((1, 2))
    return torch.where(has_pairs, vmax, 0.0), torch.where(has_pairs, vmin, 0.0)


def _agreement(v_ss: torch.Tensor, v_yy: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """D_a = 1 - (|V_max(S) - V_max(Y)| + |V_min(S) - V_min(Y)|) / 2 over the pairs i < j."""
    n, r = v_ss.shape[1], v_yy.shape[1]
    sample_pairs = torch.ones(n, n, dtype=torch.bool, device=v_ss.device).triu(1).expand(len(v_ss), n, n)
    rater_pairs = torch.ones(r, r, dtype=torch.bool, device=v_ss.device).triu(1)
    rater_pairs = rater_pairs & valid[:, :, None] & valid[:, None, :]
    s_max, s_min = _spread(v_ss, sample_pairs)
    y_max, y_min = _spread(v_yy, rater_pairs)
    return 1 - ((s_max - y_max).abs() + (s_min - y_min).abs()) / 2


def _combine(s_c: torch.Tensor, d_max: torch.Tensor, d_a: torch.Tensor):
    """The paper's printed formula and the true harmonic mean of the three CI terms."""
    # All terms are >= 0, so a zero denominator implies a zero numerator: dividing by 1 gives 0.
    product = s_c * d_max * d_a
    total = s_c + d_max + d_a
    pair_sum = s_c * d_max + d_max * d_a + d_a * s_c  # 3/(1/a+1/b+1/c) == 3abc/(ab+bc+ca)
    return 3 * product / torch.where(total > 0, total, 1.0), 3 * product / torch.where(pair_sum > 0, pair_sum, 1.0)


def _ci(unions, valid, dice: _Blocks, variance: _Blocks, d_max: torch.Tensor) -> dict[str, torch.Tensor]:
    """CI score in both readings of D_a, and its components (see the module docstring)."""
    union_s, union_y = unions  # invalid raters were zeroed by _prepare_batch
    covered = (union_s & union_y).sum(1).double()
    n_y = union_y.sum(1).double()
    # Nothing to find: full sensitivity only if the samples also found nothing.
    s_c = torch.where(n_y > 0, covered / n_y.clamp_min(1), (~union_s.any(1)).double())
    d_a = _agreement(1 - dice.ss, 1 - dice.yy, valid)
    d_a_var = _agreement(variance.ss, variance.yy, valid)
    ci, ci_hm = _combine(s_c, d_max, d_a)
    ci_var, ci_hm_var = _combine(s_c, d_max, d_a_var)
    return {
        "ci": ci,
        "ci_hm": ci_hm,
        "ci_var": ci_var,
        "ci_hm_var": ci_hm_var,
        "s_c": s_c,
        "d_max": d_max,
        "d_a": d_a,
        "d_a_var": d_a_var,
    }


def _evaluate(s: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, prefixes=()) -> list[dict[str, float]]:
    unions = _union(s), _union(y)
    iou, dice, variance = _matrices(s, y, unions)
    d_max = _dice_max(dice.sy, valid)
    values = _ged(1 - iou.sy, 1 - iou.ss, 1 - iou.yy, valid) | {"dice_max": d_max}
    # GED of the first k samples: the top-left blocks of the same matrices.
    extra = {f"ged{k}": _ged(1 - iou.sy[:, :k], 1 - iou.ss[:, :k, :k], 1 - iou.yy, valid)["ged"]
             for k in prefixes if k <= s.shape[1]}
    values |= extra
    values |= _ci(unions, valid, dice, variance, d_max)
    columns = dict(zip(values, torch.stack(list(values.values())).cpu().tolist()))
    columns["hm_iou"] = _hm_iou(iou.sy, valid)
    return [{k: columns[k][b] for k in (*METRIC_KEYS, *extra)} for b in range(len(s))]


# --------------------------------------------------------------------------- public API


def ged(samples: MaskLike, raters: MaskLike) -> float:
    """Squared generalised energy distance (d = 1 - IoU), samples[N,H,W] vs raters[R,H,W]."""
    s, y, valid = _prepare_case(samples, raters)
    iou = _matrices(s, y)[0]
    return float(_ged(1 - iou.sy, 1 - iou.ss, 1 - iou.yy, valid)["ged"][0])


def hm_iou(samples: MaskLike, raters: MaskLike) -> float:
    """Hungarian-matched IoU after replicating both sets to lcm(N, R) elements."""
    s, y, valid = _prepare_case(samples, raters)
    iou = _matrices(s, y)[0]
    return _hm_iou(iou.sy, valid)[0]


def dice_max(samples: MaskLike, raters: MaskLike) -> float:
    """Mean over raters of the maximum Dice over samples."""
    s, y, valid = _prepare_case(samples, raters)
    dice = _matrices(s, y)[1]
    return float(_dice_max(dice.sy, valid)[0])


def ci_score(samples: MaskLike, raters: MaskLike) -> dict[str, float]:
    """CIMD's CI score in both readings of D_a (``ci``/``ci_hm``: 1 - Dice; ``ci_var``/``ci_hm_var``:
    pixel-wise variance) with the components ``s_c``, ``d_max``, ``d_a``, ``d_a_var``."""
    s, y, valid = _prepare_case(samples, raters)
    unions = _union(s), _union(y)
    _, dice, variance = _matrices(s, y, unions)
    parts = _ci(unions, valid, dice, variance, _dice_max(dice.sy, valid))
    return {k: float(v[0]) for k, v in parts.items()}


def evaluate_case(samples: MaskLike, raters: MaskLike) -> dict[str, float]:
    """All metrics (keys :data:`METRIC_KEYS`) for one case, sharing one set of pairwise matrices."""
    return _evaluate(*_prepare_case(samples, raters))[0]


def evaluate_batch(
    samples: MaskLike, raters: MaskLike, rater_valid: MaskLike | None = None, ged_prefixes=()
) -> list[dict[str, float]]:
    """All metrics for a padded batch: samples[B,N,H,W], raters[B,R,H,W], rater_valid[B,R].

    Returns one dict per case (keys :data:`METRIC_KEYS`), in batch order -- a list of records
    feeds straight into ``pandas.DataFrame`` and keeps per-case bookkeeping trivial. Raters with
    ``rater_valid`` False are ignored entirely (their content need not even be binary); None
    means all raters are valid. Everything except the Hungarian matching runs batched on the
    inputs' device. For each k in ``ged_prefixes`` (at most N) the dict also holds ``ged<k>``,
    the GED of the first k samples, from the same pairwise matrices (GED16 beside GED100).
    """
    return _evaluate(*_prepare_batch(samples, raters, rater_valid), prefixes=ged_prefixes)
