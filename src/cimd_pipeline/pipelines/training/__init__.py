"""Train the diffusion segmenter (and its AMN/ACN) on the aligned train split."""

from cimd_pipeline.pipelines.training.pipeline import create_pipeline

__all__ = ["create_pipeline"]
