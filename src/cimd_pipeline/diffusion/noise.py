"""Noise streams keyed by image, so a sample does not depend on what else is in its batch.

A single generator for a whole set ties every image's noise to its position: adding a file to
an inference folder, changing the batch size or splitting the cases over processes would change
the samples of every image behind it. Instead each row of a batch (one image x one ensemble
member) draws from its own generator, seeded by a stable hash of (seed, image key, member).
The key is the case id in sampling and the input's relative path (plus the slice index of a
volume) in inference and the MLflow pyfunc, so the same image with the same seed gets the same
samples everywhere, and seed s + 1 shares no stream with seed s.

Numbers depend on the device type (CPU and CUDA generators differ), as torch's do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def stream_seed(seed: int, key: str, member: int) -> int:
    """A 63-bit generator seed for ensemble member ``member`` of the image ``key``.

    sha256 rather than Python's ``hash()``, which is salted per process for strings.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(member)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RowGenerators:
    """One `torch.Generator` per batch row; row i's noise depends on ``seeds[i]`` alone.

    Args:
        seeds: one seed per row, e.g. from `stream_seed`.
        device: where the generators (and the noise they draw) live.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Standard normal noise of ``shape`` (rows first), each row from its own generator."""
        return self._rows(torch.randn, shape, dtype)

    def rand(self, shape: Sequence[int]) -> torch.Tensor:
        """Uniform draws in [0, 1) of ``shape`` (rows first), each row from its own generator."""
        return self._rows(torch.rand, shape, None)

    def _rows(self, fill, shape: Sequence[int], dtype: torch.dtype | None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} rows requested from {len(self.generators)} row generators")
        row = (1, *shape[1:])
        draws = [fill(row, generator=g, device=self.device, dtype=dtype) for g in self.generators]
        return torch.cat(draws) if draws else torch.empty(tuple(shape), device=self.device, dtype=dtype)


Generator = torch.Generator | RowGenerators | None
"""What samplers and models accept as their source of randomness."""


def randn(
    shape: Sequence[int],
    generator: Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise from a torch generator, per-row generators or torch's global RNG."""
    if isinstance(generator, RowGenerators):
        return generator.randn(shape, dtype)
    return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)


def rand(shape: Sequence[int], generator: Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform draws in [0, 1) from a torch generator, per-row generators or torch's global RNG."""
    if isinstance(generator, RowGenerators):
        return generator.rand(shape)
    return torch.rand(tuple(shape), generator=generator, device=device)
