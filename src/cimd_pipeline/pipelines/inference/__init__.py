"""Apply a trained model to new, unlabelled images: samples, mean and uncertainty maps."""

from cimd_pipeline.pipelines.inference.pipeline import create_pipeline

__all__ = ["create_pipeline"]
