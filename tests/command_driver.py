"""Run ``kedro run`` command lines one after another in one interpreter, as bash would pass them.

Used by ``tests/test_documented_commands.py`` in a subprocess: importing torch, Kedro and MLflow
once instead of once per command keeps two dozen runs within the test's time budget, and the
subprocess keeps Kedro's logging set-up and MLflow's active run out of the pytest process.

    python tests/command_driver.py PROJECT COMMANDS.json RESULTS.json

Each command is split with `shlex` (bash's quoting rules) and handed to Kedro's own CLI, so its
``--params`` string goes through the same YAML parsing as on a terminal. After each command the
aligned set's manifest and shapes are recorded, since the next command may overwrite them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from pathlib import Path


def aligned_summary(project: Path) -> dict | None:
    """Split sizes, shapes and rater validity of ``data/03_primary/aligned`` (None: not there)."""
    from cimd_pipeline.io.aligned_dataset import AlignedDataset

    folder = project / "data/03_primary/aligned"
    if not (folder / "cases.csv").is_file():
        return None
    data = AlignedDataset(str(folder)).load()
    return {
        "modified": (folder / "cases.csv").stat().st_mtime,
        "masks_shape": list(data.masks.shape),
        "images_shape": list(data.images.shape),
        "rater_valid_per_rater": data.rater_valid.sum(0).tolist(),
        "splits": data.cases["split"].value_counts().to_dict(),
        "case_split": dict(zip(data.cases["case_id"], data.cases["split"])),
        "groups": data.cases["group_id"].nunique(),
    }


def main(project: Path, commands: list[str]) -> list[dict]:
    os.chdir(project)
    import mlflow
    from kedro.framework.cli.cli import KedroCLI

    cli = KedroCLI(project)
    results = []
    for command in commands:
        args = shlex.split(command)
        start = time.perf_counter()
        error = None
        try:
            assert args[:2] == ["kedro", "run"], f"not a kedro run command: {command}"
            cli.main(args[1:], prog_name="kedro", standalone_mode=False)
        except BaseException:  # noqa: BLE001 - every failure, SystemExit included, is the result
            error = traceback.format_exc()[-6000:]
        # kedro-mlflow leaves its run on MLflow's stack once more than it ends it (it re-enters the
        # run per node); a process exit clears it, here the next command would log into it
        while mlflow.active_run() is not None:
            mlflow.end_run()
        results.append(
            {
                "command": command,
                "error": error,
                "seconds": round(time.perf_counter() - start, 1),
                "aligned": aligned_summary(project),
            }
        )
    return results


if __name__ == "__main__":
    project, commands, output = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    output.write_text(json.dumps(main(project, json.loads(commands.read_text())), indent=1))
