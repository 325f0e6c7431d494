"""The ``evaluation`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.evaluation.nodes import (
    evaluate_samples,
    plot_metric_distribution,
    plot_samples,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                evaluate_samples,
                ["test_samples", "aligned_dataset", "trained_model"],
                ["evaluation_summary", "per_case_metrics", "evaluation_metrics"],
                name="evaluate_samples",
            ),
            node(
                plot_samples,
                ["test_samples", "aligned_dataset", "params:evaluation"],
                "sample_grid_figure",
                name="plot_samples",
            ),
            node(plot_metric_distribution, "per_case_metrics", "metric_histogram_figure", name="plot_metric_distribution"),
        ]
    )
