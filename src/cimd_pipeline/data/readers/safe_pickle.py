"""Unpickle data files with an allow-list, because a pickle is a program, not a data format.

Published multi-rater sets (the Knegt LIDC ``data_lidc.pickle``) ship as pickles. Plain
``pickle.load`` runs whatever callable the file names, so a tampered download could execute code
on the training machine. `SafeUnpickler` resolves only builtin containers, numbers, strings and
the handful of numpy globals that ndarray/dtype/scalar pickles need (protocols 0-5, numpy 1.x and
2.x module names); any other global is refused *before* it is looked up, so it is never called.
"""

from __future__ import annotations

import builtins
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cimd_pipeline.errors import DataError

_BUILTINS = frozenset(
    {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
     "complex", "bool"}
)
# (module, name) numpy writes into array/dtype/scalar pickles; `_frombuffer` is protocol 5's.
_NUMPY = frozenset(
    {
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    }
)
_LATIN1 = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1"})


def _numpy_core(submodule: str) -> Any:
    """numpy 2 renamed ``numpy.core`` to ``numpy._core``; load whichever this numpy has."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


class SafeUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` whose `find_class` only hands out allow-listed globals.

    Args:
        file: a binary file object positioned at the pickle.
        source: what to name in errors (the file path).
    """

    def __init__(self, file: io.BufferedIOBase, source: object) -> None:
        # latin1 is what numpy documents for Python 2 array pickles; Python 3 pickles ignore it.
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        parts = module.split(".")
        if len(parts) == 3 and parts[:2] in (["numpy", "core"], ["numpy", "_core"]):
            if (parts[2], name) in _NUMPY:
                return getattr(_numpy_core(parts[2]), name)
        if module == "_codecs" and name == "encode":
            return self._latin1_encode
        raise DataError(
            self.source,
            f"refused to unpickle global {module}.{name}: only builtin containers, numbers, "
            "strings and numpy arrays are allowed in a data pickle",
        )

    def _latin1_encode(self, text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        """``_codecs.encode`` as numpy's protocol 0-2 pickles use it (latin1 bytes), and no more."""
        if encoding.lower() not in _LATIN1:
            raise DataError(self.source, f"refused _codecs.encode with encoding {encoding!r}")
        return text.encode("latin1", errors)


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with `SafeUnpickler`; corrupt, truncated or unsafe files: `DataError`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return SafeUnpickler(handle, path).load()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(path, "no such file") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OverflowError, MemoryError, OSError) as exc:
        raise DataError(path, f"corrupt or truncated pickle ({type(exc).__name__}: {exc})") from exc
