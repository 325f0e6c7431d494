"""``torchrun ... -m kedro run --pipelines sampling`` with 2 gloo processes: rank 0 writes the
samples file, and it holds the arrays of a one-process run bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import run_kedro

SAMPLING = ["--env", "test", "--pipelines", "sampling", "--params", "sampling.batch_size=8"]


def read(path):
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.slow
def test_torchrun_sampling_writes_the_one_process_samples(kedro_project):
    run_kedro(kedro_project, "--env", "test", "--pipelines", "data_ingestion,mask_alignment,training",
              "--params", "training.max_steps=2")
    samples = kedro_project / "data" / "07_model_output" / "test_samples.npz"
    run_kedro(kedro_project, *SAMPLING)
    one = read(samples)
    samples.unlink()
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "2000"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "kedro", "run", *SAMPLING],
        cwd=kedro_project, env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "torchrun rank 1: sampling done, leaving the samples to rank 0" in log
    assert "torchrun rank 0 of 2: sampling" in log and "torchrun rank 1 of 2: sampling" in log
    two = read(samples)
    assert two.keys() == one.keys() and len(one["case_ids"]) > 1
    for name in ("case_ids", "binary_bits", "shape", "soft"):
        assert np.array_equal(two[name], one[name]), name
    one_info, two_info = (json.loads(str(run["info"])) for run in (one, two))
    for info in (one_info, two_info):
        del info["seconds"], info["masks_per_second"]
    assert two_info == {**one_info, "num_processes": 2}
