"""The embedded synthetic multi-rater benchmark with a known rater model.

Real multi-rater sets give only a handful of masks per image, so a model's GED cannot be compared
with the best achievable one. Here each case carries a *rater model*: soft component maps and
inclusion probabilities from which unlimited true rater masks can be drawn. A rater draws a
threshold tau ~ U(tau_low, tau_high) and keeps each component k with probability pi_k; its mask is
the union of the kept components' maps above tau. Three families mimic the paper's datasets:

- ``nodule`` (LIDC-like): one textured blob; raters differ in threshold (size) and faint nodules
  are missed entirely by some raters.
- ``bone`` (Bone-US-like): a bright curvilinear band in speckle; about 20 % of cases have no band
  and every rater draws an empty mask; raters disagree on where the band ends.
- ``lesions`` (MS-like): several tiny bright spots and two raters, each keeping a spot with a
  probability that rises with its contrast.
Everything is a pure function of (seed, case index), so any case can be regenerated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydantic import ConfigDict, Field, NonNegativeFloat
from pydantic.dataclasses import dataclass as pydantic_dataclass
from scipy.ndimage import gaussian_filter

from cimd_pipeline.data.cases import Case

FAMILIES = ("nodule", "bone", "lesions")
RATERS = {"nodule": 4, "bone": 4, "lesions": 2}


@dataclass(frozen=True)
class RaterModel:
    """The true rater distribution of one case.

    Attributes:
        components: float32 (K, H, W) soft maps in [0, 1]; K may be 0 (nothing to segment).
        inclusion: float (K,) probability that a rater keeps each component.
        tau_low, tau_high: range of the per-rater threshold.
    """

    components: np.ndarray
    inclusion: np.ndarray
    tau_low: float
    tau_high: float

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Draw ``n`` independent rater masks, uint8 (n, H, W)."""
        k, h, w = self.components.shape
        out = np.zeros((n, h, w), dtype=np.uint8)
        if k == 0:
            return out
        taus = rng.uniform(self.tau_low, self.tau_high, size=n)
        keep = rng.random((n, k)) < self.inclusion[None, :]
        for i in range(n):
            kept = self.components[keep[i]]
            if len(kept):
                out[i] = (kept > taus[i]).any(axis=0)
        return out


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SyntheticConfig:
    """Size and composition of the benchmark; validated on construction.

    The one definition of the ``ingestion.synthetic`` parameter block (`cimd_pipeline.config`
    validates the YAML into it; bad values raise pydantic's ValidationError, a ValueError). The
    seed is not part of it: it is ``ingestion.seed``.
    """

    num_cases: int = Field(300, ge=1)
    image_size: int = Field(64, ge=16)
    family_weights: tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat] = (0.4, 0.35, 0.25)
    cases_per_group: int = Field(2, ge=1)
    oracle_samples: int = Field(16, ge=0)
    empty_bone_share: float = Field(0.2, ge=0, le=1)

    def __post_init__(self) -> None:
        if sum(self.family_weights) <= 0:
            raise ValueError(f"family_weights must not all be 0, got {self.family_weights}")


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal((size, size)), sigma)
    return field / (field.std() + 1e-8)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float64)


def _nodule(rng: np.random.Generator, size: int) -> tuple[np.ndarray, RaterModel]:
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    radius = rng.uniform(0.08, 0.18) * size
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.6, 1.0)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ratio
    wobble = 1.0 + 0.15 * _smooth_noise(rng, size, size / 8)
    prob = np.exp(-((np.hypot(u, v) / (radius * wobble)) ** 2))
    contrast = rng.uniform(0.3, 1.5)
    texture = 0.5 + 0.25 * _smooth_noise(rng, size, 2.0)
    image = 0.3 * _smooth_noise(rng, size, 6.0) + contrast * prob * texture
    image += 0.08 * rng.standard_normal((size, size))
    miss = float(np.clip(1.0 - contrast / 0.8, 0.0, 0.9))
    model = RaterModel(prob[None].astype(np.float32), np.array([1.0 - miss]), 0.25, 0.75)
    return image, model


def _bone(rng: np.random.Generator, size: int, empty: bool) -> tuple[np.ndarray, RaterModel]:
    yy, xx = _grid(size)
    speckle = rng.gamma(shape=2.0, scale=0.15, size=(size, size))
    image = gaussian_filter(speckle, 0.7)
    if empty:
        return image, RaterModel(np.zeros((0, size, size), np.float32), np.zeros(0), 0.3, 0.7)
    base = rng.uniform(0.35, 0.75) * size
    amp = rng.uniform(0.03, 0.12) * size
    freq = rng.uniform(0.5, 1.5) * 2 * np.pi / size
    phase = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(1.2, 2.5)
    curve = base + amp * np.sin(freq * xx + phase)
    band = np.exp(-(((yy - curve) / width) ** 2))
    start, stop = np.sort(rng.uniform(0.05, 0.95, size=2)) * size
    stop = max(stop, start + 0.35 * size)
    cuts = np.linspace(start, stop, 4)
    pieces = [band * ((xx >= a) & (xx < b)) for a, b in zip(cuts[:-1], cuts[1:])]
    image = image + rng.uniform(0.6, 1.2) * sum(pieces)
    model = RaterModel(np.stack(pieces).astype(np.float32), np.array([0.7, 0.97, 0.7]), 0.2, 0.6)
    return image, model


def _lesions(rng: np.random.Generator, size: int) -> tuple[np.ndarray, RaterModel]:
    yy, xx = _grid(size)
    count = int(rng.integers(3, 7))
    centres = rng.uniform(0.15, 0.85, size=(count, 2)) * size
    radii = rng.uniform(1.2, 2.8, size=count)
    contrasts = rng.uniform(0.2, 1.0, size=count)
    spots = np.stack(
        [np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)) for (cy, cx), r in zip(centres, radii)]
    )
    image = 0.25 * _smooth_noise(rng, size, 4.0) + (contrasts[:, None, None] * spots).sum(0)
    image += 0.1 * rng.standard_normal((size, size))
    inclusion = 1.0 / (1.0 + np.exp(-(contrasts - 0.5) * 8.0))
    return image, RaterModel(spots.astype(np.float32), inclusion, 0.3, 0.6)


def make_case(cfg: SyntheticConfig, index: int, seed: int = 0) -> tuple[Case, RaterModel]:
    """Generate case ``index`` and its rater model; a pure function of (cfg, seed, index)."""
    rng = np.random.default_rng([seed, index])
    weights = np.asarray(cfg.family_weights, dtype=float)
    group = index // cfg.cases_per_group
    family = FAMILIES[int(np.random.default_rng([seed, 10**6 + group]).choice(3, p=weights / weights.sum()))]
    size = cfg.image_size
    if family == "nodule":
        image, model = _nodule(rng, size)
    elif family == "bone":
        image, model = _bone(rng, size, empty=rng.random() < cfg.empty_bone_share)
    else:
        image, model = _lesions(rng, size)
    raters = RATERS[family]
    masks = np.zeros((max(RATERS.values()), size, size), dtype=np.uint8)
    masks[:raters] = model.draw(raters, rng)
    valid = np.arange(len(masks)) < raters
    oracle_rng = np.random.default_rng([seed, index, 1])
    case = Case(
        case_id=f"syn_{index:05d}",
        group_id=f"syn_group_{group:05d}",
        image=image[None].astype(np.float32),
        masks=masks,
        rater_valid=valid,
        oracle=model.draw(cfg.oracle_samples, oracle_rng) if cfg.oracle_samples else None,
        meta={"family": family, "source": "synthetic"},
    )
    return case.validate(), model


def generate(cfg: SyntheticConfig, seed: int = 0) -> Iterator[Case]:
    """Yield every case of the benchmark in order (a stream: nothing is held in memory)."""
    for index in range(cfg.num_cases):
        yield make_case(cfg, index, seed)[0]
