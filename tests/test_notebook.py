"""``notebooks/compare_runs.ipynb`` executes top to bottom on the output of ``kedro run --env test``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pipelines.test_inference import trained_project

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "compare_runs.ipynb"


def test_compare_runs_notebook_executes(tmp_path_factory, monkeypatch):
    project = trained_project(tmp_path_factory)
    monkeypatch.delenv("CIMD_PROJECT_DIR", raising=False)  # the notebook must find the store from its cwd
    # headless servers and containers export a non-interactive backend; the figures must still show
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(project)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert str(project / "mlflow.db") in text and "1 with test metrics" in text and "cimd_aa" in text
    # runs are shown by the names the MLflow UI shows
    assert "cimd_aa · test/synthetic · seed 0 · 12 steps · __default__+inference" in text
    assert "ci_var" in text  # the literature's reading of the CI score beside ours
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the GED bar chart and one variant's sample grid
