"""The ``data_ingestion`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.data_ingestion.nodes import ingest_cases, plot_example_cases


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(ingest_cases, "params:ingestion", "ingested_cases", name="ingest_cases"),
            node(plot_example_cases, "ingested_cases", "example_cases_figure", name="plot_example_cases"),
        ]
    )
