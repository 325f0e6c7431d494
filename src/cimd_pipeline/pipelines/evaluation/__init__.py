"""Score every test ensemble against all raters: metrics, per-case table, figures."""

from cimd_pipeline.pipelines.evaluation.pipeline import create_pipeline

__all__ = ["create_pipeline"]
