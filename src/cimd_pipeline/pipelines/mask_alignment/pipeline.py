"""The ``mask_alignment`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.mask_alignment.nodes import align_dataset, report_agreement


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(align_dataset, ["ingested_cases", "params:alignment"], "aligned_dataset", name="align_dataset"),
            node(
                report_agreement,
                "aligned_dataset",
                ["agreement_table", "agreement_metrics", "agreement_figure"],
                name="report_agreement",
            ),
        ]
    )
