"""The ``training`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.pipelines.training.nodes import train_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                train_model,
                ["aligned_dataset", "params:model", "params:training", "params:alignment"],
                ["trained_model", "training_curves"],
                name="train_model",
            )
        ]
    )
