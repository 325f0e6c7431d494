"""The ``evaluation`` pipeline.

``test_samples`` are the sampling pipeline's samples, or, with ``evaluation.samples`` set, samples
drawn elsewhere (`cimd_pipeline.hooks.ExternalSamplesHook` points the catalog entry at them).
"""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.evaluation.nodes import (
    evaluate_samples,
    plot_metric_distribution,
    plot_samples,
    samples_to_score,
)


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                samples_to_score,
                ["test_samples", "aligned_dataset", "params:evaluation"],
                "scored_samples",
                name="samples_to_score",
            ),
            node(
                evaluate_samples,
                ["scored_samples", "aligned_dataset", "trained_model"],
                ["evaluation_summary", "per_case_metrics", "evaluation_metrics"],
                name="evaluate_samples",
            ),
            node(
                plot_samples,
                ["scored_samples", "aligned_dataset", "params:evaluation"],
                "sample_grid_figure",
                name="plot_samples",
            ),
            node(plot_metric_distribution, "per_case_metrics", "metric_histogram_figure", name="plot_metric_distribution"),
        ]
    )
