"""Sampling-step sweep: GED and HM-IoU of one trained model at 1000 ... 10 sampling steps.

Runs ``kedro run --pipelines sampling,evaluation`` once per (method, steps) on the model in
``data/06_models/model.pt``, then writes ``data/08_reporting/step_sweep.{csv,md,png}`` and logs
them, with the curves as MLflow metrics (step = sampling steps), to an MLflow run named
``step_sweep``.

    python benchmarks/step_sweep.py --max-cases 12
"""

from __future__ import annotations

import argparse
import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from _kedro import ROOT, kedro_run, markdown_table, read_metrics, tag_latest_run  # noqa: E402

logger = logging.getLogger("step_sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 250, 100, 50, 25, 10])
    parser.add_argument("--methods", nargs="+", default=["ddim", "ddpm"], choices=["ddim", "ddpm"])
    parser.add_argument("--max-cases", type=int, default=None, help="sample only the first K test cases")
    parser.add_argument("--env", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for method in args.methods:
        for steps in args.steps:
            params = {"sampling.method": method, "sampling.steps": steps, "sampling.progress": "false"}
            if args.max_cases:
                params["sampling.max_cases"] = args.max_cases
            kedro_run("--pipelines", "sampling,evaluation", env=args.env, params=params)
            m = read_metrics()
            run_id = tag_latest_run({"sweep": "sampling_steps", "sampling": f"{method}-{steps}"})
            rows.append({"method": method, "steps": steps, "ged": m["ged"], "hm_iou": m["hm_iou"],
                         "dice_max": m["dice_max"], "ci": m["ci"], "ged_oracle": m.get("ged_oracle"),
                         "sampling_seconds": m["sampling_seconds"], "test_cases": m["test_cases"],
                         "masks_per_second": m["test_cases"] * m["num_samples"] / m["sampling_seconds"],
                         "run_id": run_id})
            logger.info("%s-%d: GED %.3f HM-IoU %.3f (%.1f s)", method, steps, m["ged"], m["hm_iou"], m["sampling_seconds"])
    table = pd.DataFrame(rows)
    out = ROOT / "data/08_reporting"
    table.to_csv(out / "step_sweep.csv", index=False)
    (out / "step_sweep.md").write_text(markdown_table(table.drop(columns=["run_id"])))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for method, group in table.groupby("method"):
        for ax, metric in zip(axes, ("ged", "hm_iou")):
            ax.plot(group["steps"], group[metric], marker="o", label=method)
    for ax, metric in zip(axes, ("ged (lower is better)", "hm_iou")):
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps")
        ax.set_title(metric, fontsize=9)
        ax.legend(fontsize=8)
    if table["ged_oracle"].notna().any():
        axes[0].axhline(table["ged_oracle"].mean(), color="k", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(out / "step_sweep.png", dpi=110)
    mlflow.set_tracking_uri(f"sqlite:///{ROOT / 'mlflow.db'}")
    mlflow.set_experiment("cimd_pipeline")
    with mlflow.start_run(run_name="step_sweep", tags={"sweep": "sampling_steps"}):
        for row in rows:
            for metric in ("ged", "hm_iou", "masks_per_second"):
                mlflow.log_metric(f"sweep.{row['method']}.{metric}", row[metric], step=row["steps"])
        for name in ("step_sweep.csv", "step_sweep.md", "step_sweep.png"):
            mlflow.log_artifact(str(out / name), "step_sweep")
    print(table.drop(columns=["run_id"]).to_string(index=False))


if __name__ == "__main__":
    main()
