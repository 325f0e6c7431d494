"""The trained model as an MLflow pyfunc: images in, samples and uncertainty maps out.

The model file (``model.pt``) travels as an MLflow artefact and holds the weights, the network
configuration and the training pre-processing; the sampler settings are the run's ``sampling``
block, the settings its test metrics were measured with. ``predict`` therefore needs nothing from
the project's configuration, only the installed ``cimd_pipeline`` package. It prepares images and
keys their noise as the ``inference`` pipeline does, so both give the same samples for the same
image *when the run's ``sampling`` block and the ``inference`` block agree* on ``num_samples``,
``method``, ``steps``, ``eta`` and ``seed`` (conf/base: they do; ``--env lidc`` samples with 10
DDPM steps and infers with 50 DDIM steps unless ``--params "inference.method=ddpm,inference.steps=10"``).

Logged by the training pipeline's ``package_mlflow_model`` node through kedro-mlflow's
``MlflowModelTrackingDataset`` (catalog entry ``mlflow_model``) as the MLflow 3 logged model
``cimd_model`` of the training run. Load it by its model URI, ``models:/<model_id>`` (MLflow 3
deprecates ``runs:/<run_id>/...`` for logged models)::

    (logged,) = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"name = 'cimd_model' AND source_run_id = '{run_id}'",
        output_format="list",
    )
    model = mlflow.pyfunc.load_model(logged.model_uri)
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import mlflow.pyfunc
import numpy as np

from cimd_pipeline.config import SamplingParams
from cimd_pipeline.inference import sample_maps
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.io.torch_files import load_checkpoint
from cimd_pipeline.training.loop import select_device

logger = logging.getLogger(__name__)

ARTIFACT = "trained_model"  # key of model.pt in the pyfunc's artifacts


class CIMDPyfuncModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around a `TrainedModel` and fixed sampler settings.

    Args:
        sampling: a validated ``sampling`` block (plain dict, pickled with the model).
    """

    def __init__(self, sampling: dict[str, Any]) -> None:
        self.sampling = SamplingParams.model_validate(sampling).model_dump(mode="json")

    def load_context(self, context) -> None:
        """Load ``model.pt`` safely (``weights_only``) and build the network on the best device."""
        path = context.artifacts[ARTIFACT]
        self.trained = TrainedModel.from_dict(load_checkpoint(path), source=path)
        self.net = self.trained.build()
        self.device = select_device("auto")

    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Samples and maps for a batch of images of any in-plane size.

        The type hint is ``np.ndarray``, one of the hints MLflow 3 accepts without a list wrapper
        (it then neither infers a signature nor converts the input, so variable image sizes and
        the dict form below pass unchanged; the catalog logs the model with ``signature: false``).

        Args:
            model_input: float array (B, C, H, W) of raw intensities, or a dict holding it under
                ``"images"`` and optionally one name per image under ``"names"``; normalisation
                and resizing are applied here as in training. An image's noise streams are keyed
                by its name (the ``inference`` pipeline's relative path, ``<path>:<slice>`` for a
                volume's slice), so both give the same samples for the same image and seed;
                without names, by a digest of the image's values.

        Returns:
            ``samples`` uint8 (B, N, H, W); ``mean``, ``variance`` (of the binary samples) and
            ``entropy`` (bits, of the mean) float32 (B, H, W).
        """
        images = model_input["images"] if isinstance(model_input, dict) else model_input
        images = np.asarray(images, dtype=np.float32)
        names = model_input.get("names") if isinstance(model_input, dict) else None
        channels = self.trained.image_channels
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(f"expected images of shape (B, {channels}, H, W), got {images.shape}")
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or infinite intensities")
        if names is None:
            names = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]
        names = [str(name) for name in np.asarray(names).ravel()]
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images: give one name per image")
        # one process: a served model answers each request in its own worker, and spawning
        # sampling.num_processes workers per call would cost more than the call
        sampling = SamplingParams.model_validate({**self.sampling, "progress": False, "num_processes": 1})
        maps = sample_maps(self.net, self.trained, [image[None] for image in images], names, sampling, self.device)
        names = ("samples", "mean", "variance", "entropy")
        return {name: np.stack([getattr(m, name)[0] for m in maps]) for name in names}


def package_mlflow_model(trained_model: TrainedModel, sampling: dict[str, Any]) -> CIMDPyfuncModel:
    """The pyfunc to log; ``trained_model`` is an input so that ``model.pt`` is written first.

    The catalog entry passes ``model.pt`` as the pyfunc's artefact: the weights are never pickled.
    """
    variant, steps = trained_model.model.get("variant"), trained_model.info.get("steps")
    logger.info("packaging %s (%s training steps) as an MLflow pyfunc", variant, steps)
    return CIMDPyfuncModel(sampling)
