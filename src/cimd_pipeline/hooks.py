"""Project hooks."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from cimd_pipeline.config import validate_parameters

logger = logging.getLogger(__name__)


class ParameterValidationHook:
    """Validate every parameter block before the first node runs.

    A bad value (negative steps, an unknown variant, an image size the UNet cannot halve) must stop
    the run before any data is read or written, with every problem listed at once.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        params = catalog.load("parameters")
        validate_parameters(params)
        logger.info("parameters validated: %s", ", ".join(sorted(params)))
