"""CPU, memory and (when present) GPU utilisation of a run, as MLflow system metrics.

MLflow's own monitor (``mlflow.start_run(log_system_metrics=True)``, psutil; pynvml for NVIDIA
GPUs, installed with the ``gpu`` extra) samples every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
seconds (10 by default) but publishes only whole intervals: a run shorter than one interval, or
the last seconds of any run, leave no trace. `FlushingMonitor` publishes the part-interval that is
left when the run ends, so every run gets ``system/cpu_utilization_percentage``,
``system/system_memory_usage_megabytes`` (and ``system/gpu_*`` on a GPU) at least once.

Switch: ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns them off; ``true`` hands them to
MLflow's own monitor (started by ``mlflow.start_run``), so they are never logged twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

logger = logging.getLogger(__name__)


class FlushingMonitor(SystemMetricsMonitor):
    """MLflow's monitor, plus the samples of the last, unfinished interval when it stops."""

    def finish(self) -> None:
        super().finish()
        self.collect_metrics()  # psutil's CPU share since the last sample (the first one reads 0)
        pending = self.aggregate_metrics()
        if pending:
            try:
                self.publish_metrics(pending)
                self.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001 - a metrics failure must not fail the run
                logger.warning("last system metrics not logged: %s", exc)


def ours_to_start() -> bool:
    """True unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is set (false: off; true: MLflow's own)."""
    return not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set()


def start_monitor(run_id: str) -> FlushingMonitor | None:
    """Start sampling for ``run_id``; None when switched off or handed to MLflow."""
    if not ours_to_start():
        return None
    try:
        monitor = FlushingMonitor(run_id)
    except Exception as exc:  # noqa: BLE001 - e.g. psutil missing: the run goes on without them
        logger.warning("system metrics not logged: %s", exc)
        return None
    monitor.start()
    return monitor


@contextmanager
def system_metrics(run_id: str) -> Iterator[None]:
    """System metrics of ``run_id`` for the duration of the block."""
    monitor = start_monitor(run_id)
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
