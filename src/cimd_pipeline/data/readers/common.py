"""Helpers every file-based reader shares: file listing, natural order, groups and given splits.

Public multi-rater releases often ship their own train/val/test split as folders (HPU-Net's LIDC
crops: ``train/ val/ test/``; the CIMD authors' example data: ``training/ testing/``). A reader
records such a folder in ``Case.meta[GIVEN_SPLIT]`` and `mask_alignment` keeps it
(``alignment.split: auto``), so published numbers stay comparable.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from cimd_pipeline.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


Regex = Annotated[str, AfterValidator(_compiles)]
"""A regular expression option, compiled when the parameters are checked."""


def natural_text_key(text: str) -> list[Any]:
    """Sort ``label2`` before ``label10`` (rater order must not depend on zero padding)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def natural_key(path: Path) -> list[Any]:
    """`natural_text_key` of a file name."""
    return natural_text_key(path.name)


def data_files(paths: Iterable[Path]) -> list[Path]:
    """Sorted regular files, without hidden ones (``._x.png`` copies that macOS leaves behind)."""
    return sorted(p for p in paths if p.is_file() and not p.name.startswith("."))


def require_root(root: Path | None, source: str) -> Path:
    """The dataset folder, or a clear error when it is not configured or missing."""
    if root is None:
        raise ConfigError(f"ingestion.root: the {source} source needs the dataset folder")
    if not root.is_dir():
        raise DataError(root, "no such folder (set ingestion.root)")
    return root


def group_of(case_id: str, regex: str | None, source: object) -> str:
    """The group (patient) of a case: the case id itself, or what ``regex`` finds in it.

    The group is the named group ``group`` if the regex has one, else the first numbered group
    that took part in the match (so alternatives such as ``a/(x)$|^(y)$`` work), else the match.
    """
    if regex is None:
        return case_id
    found = re.search(regex, case_id)
    if found is None:
        raise DataError(source, f"case id {case_id!r} does not match group_regex {regex!r}")
    if "group" in found.groupdict():
        return found.group("group")
    taken = [g for g in found.groups() if g is not None]
    return taken[0] if taken else found.group(0)


def given_split(folders: Iterable[str], source: object) -> str | None:
    """The split a path names by one of its folders (train/training, val/valid/validation,
    test/testing, any case), or None; two different split folders in one path are refused."""
    named = {SPLIT_FOLDERS[f.lower()] for f in folders if f.lower() in SPLIT_FOLDERS}
    if len(named) > 1:
        raise DataError(source, f"path names two splits ({', '.join(sorted(named))})")
    return named.pop() if named else None


def warn_dominant_group(groups: Mapping[str, str], regex: str | None, root: Path) -> None:
    """Warn when one group holds more than half of the cases: a split by group cannot follow its
    fractions then, and the cause is nearly always a ``group_regex`` that found a shared folder
    (``training``, ``images``) instead of the patient."""
    if len(groups) < 3:
        return
    group, size = Counter(groups.values()).most_common(1)[0]
    if size * 2 > len(groups):
        logger.warning(
            "%s: ingestion.reader.group_regex %r puts %d of %d cases into one group %r; a split by "
            "group cannot follow alignment.split (set group_regex to the patient part of the case "
            "id, or null to make each case its own group)",
            root,
            regex,
            size,
            len(groups),
            group,
        )
