"""Errors the pipeline raises on bad input or configuration.

One exception type for data problems lets the CLI and tests tell a user's broken file apart from
a bug in our code; the message always names the file (or case) and what is wrong with it.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file or case that cannot be used as it is; the message names the source."""

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ConfigError(ValueError):
    """One or more invalid parameters, all listed in the message before any work starts."""


class SamplingError(RuntimeError):
    """A sampler produced unusable output (NaN or inf); the message names model, method and steps."""
