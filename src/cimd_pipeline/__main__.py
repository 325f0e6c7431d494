"""``python -m cimd_pipeline`` / ``cimd-pipeline``: the same as ``kedro run``, or, with
``evaluate`` first, the evaluator that needs no Kedro project (`cimd_pipeline.evaluate_cli`; not
named ``cli.py``, which Kedro would load as the project's own commands)."""

import sys
from pathlib import Path
from typing import Any


def main(*args: Any, **kwargs: Any) -> Any:
    if sys.argv[1:2] == ["evaluate"]:
        from cimd_pipeline.evaluate_cli import evaluate_main

        sys.exit(evaluate_main(sys.argv[2:]))
    from kedro.framework.cli.utils import find_run_command
    from kedro.framework.project import configure_project

    package_name = Path(__file__).parent.name
    configure_project(package_name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()
