"""The ``training`` pipeline."""

from kedro.pipeline import Pipeline, node, pipeline

from cimd_pipeline.mlflow_model import package_mlflow_model
from cimd_pipeline.pipelines.training.nodes import train_model


def create_pipeline(**kwargs) -> Pipeline:
    return pipeline(
        [
            node(
                train_model,
                ["aligned_dataset", "params:model", "params:training", "params:alignment", "params:ingestion"],
                ["trained_model", "training_curves"],
                name="train_model",
            ),
            # Logs model.pt as an MLflow pyfunc in the same run (catalog entry `mlflow_model`).
            node(
                package_mlflow_model,
                ["trained_model", "params:sampling"],
                "mlflow_model",
                name="package_mlflow_model",
            ),
        ]
    )
