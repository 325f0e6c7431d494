"""The ``sampling`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.sampling.nodes import sample_test_cases


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                sample_test_cases,
                ["trained_model", "aligned_dataset", "params:sampling", "params:training"],
                ["test_samples", "sampling_metrics"],
                name="sample_test_cases",
            )
        ]
    )
