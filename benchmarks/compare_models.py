"""Compare trained models on the same test cases: image, raters and 16 samples of each (Fig. 4).

Models are MLflow runs of experiment ``cimd_pipeline`` (their ``model/model.pt`` artefact): give
run ids, or ``--latest`` for the newest FINISHED run of each ``model.variant``. Each model samples
with the settings its run logged (``sampling.method``, ``steps``, ``eta``; irrelevant for the
baselines) and the same seed. Samples that are empty where every rater drew something are framed
in red. Writes ``data/08_reporting/model_comparison.png`` and logs it, with the compared run ids
as parameters, to a new MLflow run tagged ``comparison`` (the compared runs stay untouched).

    python benchmarks/compare_models.py --latest
    python benchmarks/compare_models.py 3f2a... 9c1b... --cases 6 --samples 16
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from _kedro import ROOT

from cimd_pipeline.comparison import comparison_figure, draw_for_cases, latest_runs, spread_cases
from cimd_pipeline.config import SamplingParams
from cimd_pipeline.io.aligned_dataset import AlignedDataset
from cimd_pipeline.models.trained import TrainedModel
from cimd_pipeline.io.torch_files import load_checkpoint
from cimd_pipeline.training.loop import select_device

EXPERIMENT = "cimd_pipeline"
SAMPLER_KEYS = ("method", "steps", "eta")
logger = logging.getLogger("compare_models")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_ids", nargs="*", help="MLflow run ids to compare")
    parser.add_argument("--latest", action="store_true", help="the latest FINISHED run of each variant")
    parser.add_argument("--project", type=Path, default=ROOT, help="Kedro project root (mlflow.db, data/)")
    parser.add_argument("--cases", type=int, default=4, help="test cases to show, spread over the split")
    parser.add_argument("--samples", type=int, default=16, help="samples per model and case")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    return parser.parse_args()


def choose_runs(client: mlflow.MlflowClient, args: argparse.Namespace) -> list[str]:
    run_ids = list(args.run_ids)
    if args.latest:
        runs = mlflow.search_runs(experiment_names=[EXPERIMENT], order_by=["start_time DESC"])

        def has_model(run_id: str) -> bool:
            return any(a.path == "model/model.pt" for a in client.list_artifacts(run_id, "model"))

        run_ids += [r for r in latest_runs(runs, has_model).values() if r not in run_ids]
    if not run_ids:
        raise SystemExit("no runs to compare: give run ids or --latest (after training at least one model)")
    return run_ids


def sampler_settings(run: mlflow.entities.Run, args: argparse.Namespace) -> SamplingParams:
    logged = {k: run.data.params[f"sampling.{k}"] for k in SAMPLER_KEYS if f"sampling.{k}" in run.data.params}
    return SamplingParams.model_validate(
        {**logged, "num_samples": args.samples, "seed": args.seed, "batch_size": 256, "progress": False}
    )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    project = args.project.resolve()
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_ids = choose_runs(client, args)
    data = AlignedDataset(str(project / "data/03_primary/aligned")).load()
    rows = spread_cases(data, args.cases)
    device = select_device(args.device)
    samples: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in run_ids:
            run = client.get_run(run_id)
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="model/model.pt", dst_path=tmp)
            trained = TrainedModel.from_dict(load_checkpoint(path))
            label = f"{trained.params.variant.value} {run_id[:6]}"
            samples[label] = draw_for_cases(trained, data, rows, sampler_settings(run, args), device)
            logger.info("%s: %d samples for %d cases", label, args.samples, len(rows))
    cases = []
    for row in rows:
        raters = np.asarray(data.masks[row])[np.asarray(data.rater_valid[row])]
        cases.append((np.asarray(data.images[row]), raters, str(data.cases["case_id"].iloc[row])))
    figure = comparison_figure(cases, samples)
    out = project / "data/08_reporting/model_comparison.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    experiment = mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name="model comparison",
                          tags={"comparison": "true"}) as run:
        mlflow.log_params({
            "compared_runs": ",".join(run_ids),
            "compared_variants": ",".join(label.split()[0] for label in samples),
            "cases": len(rows), "samples": args.samples, "seed": args.seed,
        })
        mlflow.log_artifact(str(out), artifact_path="figures")
    logger.info("wrote %s and logged it to MLflow run %s", out, run.info.run_id)


if __name__ == "__main__":
    main()
