"""Which split each aligned case goes to: the split the data came with, or a seeded split by group.

``alignment.split: auto`` keeps the splits a release ships as folders (a reader records them in
``Case.meta[GIVEN_SPLIT]``) when every case has one, since published numbers are measured on
those; otherwise, and whenever fractions are given explicitly, patients (groups) are shuffled with
the seed and dealt out so that no patient lands in two splits. A split that would come out empty
stops alignment here, not training or sampling later.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from cimd_pipeline.data.aligned import SPLITS
from cimd_pipeline.data.cases import GIVEN_SPLIT
from cimd_pipeline.errors import DataError

logger = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
# splits the later stages cannot do without: training reads train, sampling/evaluation test
REQUIRED_GIVEN = ("train", "test")
WHERE = "mask_alignment"


def assign_splits(group_ids: Iterable[str], fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Split by group so no patient lands in two splits; returns one split name per case.

    Groups are shuffled with ``seed`` and dealt out until each split holds its fraction of the
    *cases*; every split with a positive fraction gets at least one group when there are enough.
    """
    groups = pd.Series(list(group_ids), dtype=str)
    sizes = groups.value_counts(sort=False)
    order = np.random.default_rng(seed).permutation(sizes.index.to_numpy())
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    total = float(sum(fractions[s] for s in names))
    targets = np.cumsum([fractions[s] / total * len(groups) for s in names])
    assignment, filled, current = {}, 0, 0
    for position, group in enumerate(order):
        remaining_groups = len(order) - position
        remaining_splits = len(names) - current - 1
        if current < len(names) - 1 and (filled >= targets[current] or remaining_groups <= remaining_splits):
            current += 1
        assignment[group] = names[current]
        filled += int(sizes[group])
    return groups.map(assignment).to_numpy()


def choose_splits(cases: pd.DataFrame, split: str | Mapping[str, float], seed: int) -> np.ndarray:
    """One split name per row of ``cases`` (columns ``group_id`` and, if a reader found split
    folders, ``given_split``), following ``alignment.split``: ``"auto"`` or fractions."""
    given = cases[GIVEN_SPLIT] if GIVEN_SPLIT in cases.columns else pd.Series(np.nan, index=cases.index)
    has_given = given.notna() & (given.astype(str) != "")
    if split == AUTO and has_given.all():
        splits = given.astype(str).to_numpy()
        _require_given(splits)
        logger.info("keeping the splits given by the data's folders: %s", _sizes(splits))
        return splits
    if split == AUTO and has_given.any():
        example = cases.loc[~has_given, "case_id"].iloc[0]
        raise DataError(
            WHERE,
            f"{int(has_given.sum())} of {len(cases)} cases lie under a train/val/test folder, the "
            f"others do not (e.g. {example!r}); put every case under one, or set alignment.split "
            "to fractions such as {train: 0.7, val: 0.1, test: 0.2} to re-split all by patient",
        )
    fractions = DEFAULT_FRACTIONS if split == AUTO else dict(split)
    if has_given.any():
        logger.info("alignment.split gives fractions: re-splitting by patient, ignoring the folders' splits")
    splits = assign_splits(cases["group_id"], fractions, seed)
    _require_filled(splits, fractions, cases["group_id"])
    logger.info("split by patient (seed %d): %s", seed, _sizes(splits))
    return splits


def _sizes(splits: np.ndarray) -> str:
    return ", ".join(f"{s} {int((splits == s).sum())}" for s in SPLITS)


def _require_given(splits: np.ndarray) -> None:
    for name in REQUIRED_GIVEN:
        if not (splits == name).any():
            folders = {"train": "train/ or training/", "test": "test/ or testing/"}[name]
            raise DataError(
                WHERE,
                f"the {name!r} split is empty: no case lies under a {folders} folder (given splits: "
                f"{_sizes(splits)}); add those cases, or set alignment.split to fractions such as "
                "{train: 0.7, val: 0.1, test: 0.2} to re-split all by patient",
            )


def _require_filled(splits: np.ndarray, fractions: Mapping[str, float], groups: pd.Series) -> None:
    for name in SPLITS:
        if fractions.get(name, 0) > 0 and not (splits == name).any():
            drop = "" if name == "test" else f", or set the {name} fraction to 0"
            raise DataError(
                WHERE,
                f"the {name!r} split is empty: {len(groups)} cases in {groups.nunique()} patient "
                f"group(s) cannot fill every split of alignment.split {dict(fractions)}; check "
                f"ingestion.reader.group_regex (null: each case its own group), add cases{drop}",
            )
