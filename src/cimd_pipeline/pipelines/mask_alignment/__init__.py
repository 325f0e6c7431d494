"""Put every rater's mask on the model grid and split the cases by group."""

from cimd_pipeline.pipelines.mask_alignment.pipeline import create_pipeline

__all__ = ["create_pipeline"]
