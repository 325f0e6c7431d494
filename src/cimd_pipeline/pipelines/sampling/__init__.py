"""Draw an ensemble of masks for every test case from the trained (EMA) model."""

from cimd_pipeline.pipelines.sampling.pipeline import create_pipeline

__all__ = ["create_pipeline"]
