"""Project hooks."""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from kedro.io import MemoryDataset
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cimd_pipeline.config import EvaluationParams, validate_parameters
from cimd_pipeline.data.aligned import AlignedSet
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.io.external_samples_dataset import ExternalSamplesDataset
from cimd_pipeline.mlflow_runs import KILLED, close_dead_runs, owner_tags
from cimd_pipeline.run_labels import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    AlignedDatasetInput,
    dataset_label,
    mark_model_training,
    run_name,
)
from cimd_pipeline.system_metrics import FlushingMonitor, start_monitor
from cimd_pipeline.tracking_server import check_reachable, ensure_experiment, is_remote

logger = logging.getLogger(__name__)

#: The catalog entry whose data every model stage reads (conf/base/catalog.yml).
ALIGNED_DATASET = "aligned_dataset"
#: The catalog entries of the samples the evaluation pipeline scores and of the model that drew them.
TEST_SAMPLES = "test_samples"
TRAINED_MODEL = "trained_model"


def _fail_run() -> None:
    """Kedro calls no on_pipeline_error for an error raised in before_pipeline_run, and MLflow's
    exit handler would then close kedro-mlflow's run as FINISHED."""
    if mlflow.active_run() is not None:
        mlflow.end_run("FAILED")


class ParameterValidationHook:
    """Validate every parameter block before the first node runs.

    A bad value (negative steps, an unknown variant, an image size the UNet cannot halve) must stop
    the run before any data is read or written, with every problem listed at once.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        params = catalog.load("parameters")
        running = {name.removeprefix("params:").split(".")[0] for name in pipeline.inputs() if name.startswith("params:")}
        try:
            validate_parameters(params, running)
        except ConfigError:
            _fail_run()
            raise
        logger.info("parameters validated: %s", ", ".join(sorted(params)))


class ExternalSamplesHook:
    """``evaluation.samples`` set: the evaluation pipeline scores samples drawn elsewhere.

    ``test_samples`` becomes a read-only `ExternalSamplesDataset` of that path, and
    ``trained_model`` an empty input (no model of this run drew them). A run that would draw or
    train itself is refused: its samples would be silently replaced. Registered before
    `ParameterValidationHook` in settings.HOOKS, so it runs after the parameters are validated.
    """

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        block = catalog.load("parameters").get("evaluation")
        if not block or not block.get("samples"):
            return
        params = EvaluationParams.model_validate(block)
        made_here = sorted({TEST_SAMPLES, TRAINED_MODEL} & set(pipeline.all_outputs()))
        if made_here:
            _fail_run()
            raise ConfigError(
                f"evaluation.samples scores samples drawn elsewhere, but this run makes {made_here}: "
                'run the evaluation alone (kedro run --pipelines evaluation --params "evaluation.samples=...")'
            )
        catalog[TEST_SAMPLES] = ExternalSamplesDataset(params.samples, threshold=params.binarise_threshold)
        catalog[TRAINED_MODEL] = MemoryDataset(None)
        logger.info("evaluation scores the samples at %s", params.samples)


class SystemMetricsHook:
    """CPU, memory and (when present) GPU use of each ``kedro run`` as MLflow system metrics
    (`cimd_pipeline.system_metrics`), sampled from kedro-mlflow's run start to the pipeline's end."""

    def __init__(self) -> None:
        self._monitor: FlushingMonitor | None = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        run = mlflow.active_run()
        if run is not None and self._monitor is None:
            self._monitor = start_monitor(run.info.run_id)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result: Any) -> None:
        self._stop()

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any]) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


# --- MLflow run ownership: killed runs must not stay RUNNING (docs/reliability.md) ------------------------
class MlflowRunOwnerHook:
    """Tag kedro-mlflow's run with its process; close runs that dead processes left RUNNING.

    settings.HOOKS lists it after `ParameterValidationHook`, so it runs before it (pluggy calls the
    last registered first) and after kedro-mlflow's hook, which registers from its entry point
    after HOOKS and starts the run. A run still open at interpreter exit, when the pipeline neither
    finished nor failed (Ctrl-C), would be closed FINISHED by MLflow's exit handler; it is marked
    KILLED instead.
    """

    def __init__(self) -> None:
        self._open_run: str | None = None
        self._exit_handler_registered = False

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        run = mlflow.active_run()
        if run is None:
            return  # tracking is disabled for this pipeline
        mlflow.set_tags(owner_tags())
        close_dead_runs(MlflowClient(), run.info.experiment_id, run.info.run_id)
        self._open_run = run.info.run_id
        if not self._exit_handler_registered:
            atexit.register(self._close_interrupted_run)
            self._exit_handler_registered = True

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result: Any) -> None:
        self._open_run = None

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any]) -> None:
        self._open_run = None

    def _close_interrupted_run(self) -> None:
        # kedro-mlflow re-enters its run for each node, so the run can sit twice on MLflow's stack.
        closed = False
        while (active := mlflow.active_run()) is not None and active.info.run_id == self._open_run:
            mlflow.end_run(KILLED)
            closed = True
        if closed:
            logger.warning("pipeline interrupted: MLflow run %s marked %s", self._open_run, KILLED)


class MlflowRunLabelHook:
    """Name kedro-mlflow's run by what differs, mark the experiment as model training, and log
    the aligned dataset as the run's dataset input (see `run_labels`).

    Registered beside `MlflowRunOwnerHook`, so it also runs after kedro-mlflow has started the
    run. A run name set in mlflow.yml (``tracking.run.name``) or an outer run is kept: only the
    pipeline name kedro-mlflow falls back to is replaced.
    """

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}
        self._env: str | None = None
        self._aligned_path = "."
        self._logged: set[str] = set()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        run = mlflow.active_run()
        if run is None:
            return
        self._params = catalog.load("parameters")
        self._env = run_params.get("env")
        aligned = catalog.get(ALIGNED_DATASET)
        self._aligned_path = (aligned._describe().get("path") if aligned is not None else None) or "."
        pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        client = MlflowClient()
        mark_model_training(client, run.info.experiment_id)
        if run.info.run_name == "+".join(pipelines):
            client.update_run(run.info.run_id, name=run_name(self._params, self._env, pipelines))

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log_aligned(dataset_name, data)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log_aligned(dataset_name, data)

    def _log_aligned(self, dataset_name: str, data: Any) -> None:
        run = mlflow.active_run()
        if dataset_name != ALIGNED_DATASET or run is None or run.info.run_id in self._logged:
            return
        if not isinstance(data, AlignedSet):  # the stream alignment writes: logged when loaded
            return
        dataset = AlignedDatasetInput(data, self._aligned_path, f"{dataset_label(self._params, self._env)} aligned")
        try:
            mlflow.log_input(dataset, context="aligned")
        except MlflowException:
            # Two runs logging the same new dataset at once: the store refuses the second insert
            # of its record; once it exists, the link from this run goes through.
            mlflow.log_input(dataset, context="aligned")
        self._logged.add(run.info.run_id)


class TrackingServerHook:
    """Before kedro-mlflow connects (``tryfirst``): a remote tracking server must answer, and the
    experiment is created race-free, so two runs started at once on a new server both succeed.

    kedro-mlflow reads the same ``mlflow`` configuration right after; a missing
    ``MLFLOW_TRACKING_URI`` stops the run here already, through the ``required_env`` resolver.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context: Any) -> None:
        if mlflow.active_run() is not None:
            return  # an outer run decides where tracking goes
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        config = loader["mlflow"]
        uri = (config.get("server") or {}).get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not is_remote(uri):
            return
        check_reachable(uri)
        experiment = (config.get("tracking") or {}).get("experiment") or {}
        options = experiment.get("create_experiment_kwargs") or {}
        ensure_experiment(
            MlflowClient(tracking_uri=uri),
            experiment.get("name") or context._package_name,
            options.get("artifact_location"),
            {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, **(options.get("tags") or {})},
        )
