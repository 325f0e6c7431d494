"""Read a raw multi-rater dataset (or generate the synthetic one) into a folder of cases."""

from cimd_pipeline.pipelines.data_ingestion.pipeline import create_pipeline

__all__ = ["create_pipeline"]
