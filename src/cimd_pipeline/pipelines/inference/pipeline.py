"""The ``inference`` pipeline (not part of ``__default__``: it needs ``inference.input``)."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.inference.nodes import predict_images


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                predict_images,
                ["trained_model", "params:inference"],
                "inference_summary",
                name="predict_images",
            )
        ]
    )
