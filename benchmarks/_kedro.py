"""Helpers the benchmark scripts share: run Kedro in this project and read MLflow back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The project the scripts run in: this checkout, or $CIMD_PROJECT_DIR (a copy for parallel streams,
# or the tests' throw-away project).
ROOT = Path(os.environ.get("CIMD_PROJECT_DIR") or Path(__file__).resolve().parents[1]).resolve()


def kedro_run(*args: str, env: str | None = None, params: dict | None = None) -> float:
    """Run ``kedro run`` in the project root; return its wall time, raise with its output on failure."""
    command = [sys.executable, "-m", "kedro", "run", *args]
    if env:
        command += ["--env", env]
    if params:
        command += ["--params", ",".join(f"{k}={v}" for k, v in params.items())]
    started = time.perf_counter()
    proc = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return time.perf_counter() - started


def parse_params(text: str) -> dict[str, str]:
    """Kedro's ``--params`` syntax, ``'a.b=1,c.d=2'``, as a dict of dotted keys to raw values."""
    return dict(item.split("=", 1) for item in filter(None, text.split(",")))


def read_metrics() -> dict:
    return json.loads((ROOT / "data/08_reporting/metrics.json").read_text())


def tag_latest_run(tags: dict[str, str]) -> str:
    """Tag the newest MLflow run of the experiment (the one the last ``kedro run`` made)."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"], order_by=["start_time DESC"], max_results=1)
    run_id = runs.iloc[0]["run_id"]
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return run_id


def markdown_table(table) -> str:
    """A pandas DataFrame as a GitHub markdown table (no extra dependency)."""
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|---" * len(table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
