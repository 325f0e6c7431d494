"""benchmarks/metric_cost.py runs end to end on a tiny split and prints both ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metric_cost_prints_wall_time_and_both_ratios():
    args = ["--cases", "5", "--samples", "4", "--raters", "2", "--size", "16", "--pool", "3",
            "--loop-cases", "1", "--previous-cases", "2", "--resamples", "20", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/metric_cost.py"), *args], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "scoring 5 cases x 4 samples x 2 raters at 16x16" in out
    assert re.search(r"previous vectorised path.*\d+\.\dx", out)
    assert re.search(r"pipeline path \(score_samples, all 5 cases\): +[\d.]+ s +[\d.]+x", out)
    assert re.search(r"wall time [\d.]+ s", out)
