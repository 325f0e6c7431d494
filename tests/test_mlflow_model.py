"""The pyfunc logged by the training run loads back from mlflow.db and predicts."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.pipelines.test_inference import trained_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    project = trained_project(tmp_path_factory)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["cimd_pipeline"])
    assert len(runs) == 1  # the pyfunc is logged in the run that trained the model
    (logged,) = mlflow.get_run(runs.iloc[0]["run_id"]).outputs.model_outputs
    return mlflow.pyfunc.load_model(f"models:/{logged.model_id}")


def _readme_python(section: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python\n", text.index(section)) + len("```python\n")
    return text[start : text.index("```", start)]


def test_the_readme_loads_the_logged_model_by_its_model_uri_without_mlflow_warnings(
    tmp_path_factory, monkeypatch
):
    """README's snippet pasted into Python at the project root: MLflow 3's model URI, no
    deprecated runs:/ path, and none of MLflow's warnings about the predict method's type hints."""
    project = trained_project(tmp_path_factory)
    snippet = _readme_python("## MLflow model")
    assert "runs:/" not in snippet
    monkeypatch.chdir(project)
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert namespace["logged"].model_uri == f"models:/{namespace['logged'].model_id}"
    assert namespace["out"]["samples"].shape == (2, 4, 64, 64)  # conf/test: N = 4
    assert namespace["model"].metadata.signature is None  # logged with signature: false
    hints = [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    assert not hints, hints


def test_pyfunc_round_trip(pyfunc):
    images = np.random.default_rng(0).normal(size=(3, 1, 20, 24)).astype(np.float32)
    out = pyfunc.predict(images)
    assert out["samples"].shape == (3, 4, 20, 24) and out["samples"].dtype == np.uint8  # conf/test: N = 4
    for name in ("mean", "variance", "entropy"):
        assert out[name].shape == (3, 20, 24) and out[name].dtype == np.float32
    assert out["mean"] == pytest.approx(out["samples"].mean(1), abs=1e-6)
    assert out["variance"] == pytest.approx(out["samples"].var(1), abs=1e-6)
    again = pyfunc.predict({"images": images})
    assert np.array_equal(again["samples"], out["samples"])  # the sampler seed is part of the model


def test_pyfunc_refuses_wrong_shapes_and_nan(pyfunc):
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        pyfunc.predict(np.zeros((2, 16, 16), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        pyfunc.predict(np.full((1, 1, 16, 16), np.nan, np.float32))


def test_pyfunc_samples_in_its_own_process_whatever_the_run_used(pyfunc, monkeypatch):
    from cimd_pipeline import mlflow_model

    seen, original = [], mlflow_model.sample_maps
    monkeypatch.setattr(mlflow_model, "sample_maps", lambda *a: seen.append(a[4].num_processes) or original(*a))
    images = np.random.default_rng(1).normal(size=(2, 1, 16, 16)).astype(np.float32)
    alone = pyfunc.predict(images)
    monkeypatch.setitem(pyfunc.unwrap_python_model().sampling, "num_processes", 2)  # a sharded run
    served = pyfunc.predict(images)
    assert seen == [1, 1]
    assert np.array_equal(alone["samples"], served["samples"])
