"""Diffusion recipe sweep: each ``model.*`` recipe switch alone and combined, against the default.

A *configuration* is a set of dotted parameter overrides (``CONFIGS``; ``default`` is conf/base).
For every configuration and seed the script trains one model through the training budgets of
``--steps`` in turn (e.g. ``1000 3000``: the pipeline's own node code via `_direct`; one
checkpoint under ``OUT/checkpoints`` that every longer budget continues, so a killed run resumes
and the 1,000-step model is the 3,000-step run at step 1,000), saves each as
``OUT/models/<config>-<seed>-<steps>.pt``, and after each budget samples and scores the test
split once per sampler setting (``--samplers``: ``ddpmN``/``ddimN`` on every test case,
``ddpmN@K`` on the first K test cases only, the GED-vs-sampling-steps curve at a fraction of the
cost), one CSV row per (config, seed, steps, sampler) under ``OUT/rows``; ``--final-samplers``
are added after the last budget only; each run logs to ``OUT/logs/<config>-<seed>.log``.
Everything already on disk is skipped, so rerunning the same command resumes.
Writes ``OUT/quality_sweep.{csv,md,png}``.

    python benchmarks/quality_sweep.py --configs default literature --seeds 0 --jobs 2 \
        --steps 500 1000 --samplers ddpm10 ddim10 \
        --final-samplers ddpm10@16 ddim10@16 ddpm25@16 ddim25@16 ddpm50@16 ddim50@16
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from _direct import _merge, _node_module, load_parameters, prepare_data
from _kedro import ROOT, parse_params
from _workers import run_workers, stop_if_failed
from ablation import summarise

from cimd_pipeline.data.synthetic import FAMILIES

#: Plain DDPM (linear schedule, b = 1, L_simple, no activation, no self-conditioning) at the learning
#: rate of the first sweeps: every switch below is measured alone on top of it, so a label keeps its
#: meaning when conf/base changes.
PLAIN = {"model.noise_schedule": "linear", "model.input_scale": 1.0, "model.loss_weighting": "simple",
         "model.output_activation": "none", "model.self_condition": False, "training.lr": 1e-4,
         "training.flip_axes": []}
#: The literature recipe (Christensen et al. 2025, arXiv 2504.05977): cosine schedule, masks
#: scaled by b = 0.1, (1 + SNR)-weighted x0 loss, x0 through tanh.
LITERATURE = {"model.noise_schedule": "cosine", "model.input_scale": 0.1,
              "model.loss_weighting": "snr_plus_one", "model.output_activation": "tanh"}
COSINE = {**PLAIN, "model.noise_schedule": "cosine"}
COSINE_TANH = {**COSINE, "model.output_activation": "tanh"}
CONFIGS: dict[str, dict[str, object]] = {
    "default": {},  # conf/base as it is
    "linear": PLAIN,  # conf/base's recipe before the sweep
    "cosine": COSINE,
    "scale_0.1": {**PLAIN, "model.input_scale": 0.1},
    "snr_plus_one": {**PLAIN, "model.loss_weighting": "snr_plus_one"},
    "min_snr": {**PLAIN, "model.loss_weighting": "min_snr"},
    "tanh": {**PLAIN, "model.output_activation": "tanh"},
    "cosine_tanh": COSINE_TANH,
    "lr_3e-4": {**COSINE_TANH, "training.lr": 3e-4},
    "lr_1e-3": {**COSINE_TANH, "training.lr": 1e-3},
    "lr_2e-3": {**COSINE_TANH, "training.lr": 2e-3},
    "lr_1e-3_flip_x": {**COSINE_TANH, "training.lr": 1e-3, "training.flip_axes": ["width"]},
    "self_cond": {**PLAIN, "model.self_condition": True},
    "literature": {**PLAIN, **LITERATURE},
    "literature_b0.3": {**PLAIN, **LITERATURE, "model.input_scale": 0.3},
    "literature_self_cond": {**PLAIN, **LITERATURE, "model.self_condition": True},
    "literature_v": {**PLAIN, **LITERATURE, "model.prediction_type": "v", "model.output_activation": "none"},
    "cimd_latent": {**COSINE, "model.variant": "cimd_latent"},
    "cimd_latent_lr_1e-3": {**COSINE_TANH, "training.lr": 1e-3, "model.variant": "cimd_latent"},
    # the same with a prior that is a mixture of 4 Gaussians (models/ambiguity.py)
    "cimd_latent_mix4": {**COSINE_TANH, "training.lr": 1e-3, "model.variant": "cimd_latent",
                         "model.ambiguity_nets.prior_components": 4},
    # the mixture with free bits: the posterior is not pulled toward the prior under 3 nats
    # (models/ambiguity.py, free_bits_kl)
    "cimd_latent_mix4_free3": {**COSINE_TANH, "training.lr": 1e-3, "model.variant": "cimd_latent",
                               "model.ambiguity_nets.prior_components": 4, "model.ambiguity_nets.free_nats": 3.0},
    # the mixture with z through the timestep embedding of every residual block, applied after the
    # norm (models/denoiser.py): constant input channels reach the first convolution only
    "cimd_latent_mix4_every_level": {**COSINE_TANH, "training.lr": 1e-3, "model.variant": "cimd_latent",
                                     "model.ambiguity_nets.prior_components": 4,
                                     "model.ambiguity_nets.latent_conditioning": "every_level",
                                     "model.unet.scale_shift_norm": True},
    "groups_8": {**COSINE_TANH, "training.lr": 1e-3, "model.unet.norm_num_groups": 8},
    # conf/base with every valid rater of an image in one step (training/rater_rows.py)
    "all_raters": {"training.all_raters": True},
    "groups_4": {**COSINE_TANH, "training.lr": 1e-3, "model.unet.norm_num_groups": 4},
    # conf/base against overfitting (docs/quality.md, "The switches"): a learning rate that
    # warms up and decays to 0 by the last step, alone and at twice the peak; a random gain and offset
    # of each image; AdamW's decoupled weight decay
    "lr_cosine": {"training.lr_schedule": "cosine", "training.warmup_steps": 100},
    "lr_cosine_2e-3": {"training.lr_schedule": "cosine", "training.warmup_steps": 100, "training.lr": 2e-3},
    "intensity": {"training.intensity_scale": 0.1, "training.intensity_shift": 0.1},
    "weight_decay_0.05": {"training.weight_decay": 0.05},
    # dropout in every residual block of the U-Net while training (training/dropout.py, Ho et al. 2020)
    "dropout_0.1": {"training.dropout": 0.1},
    "dropout_0.3": {"training.dropout": 0.3},
    # conf/base's U-Net twice as wide at every level (2.2x the CPU-seconds of a training step on one
    # thread) and with 64 channels at the lowest level only, where the attention is (1.2x); compared
    # at equal CPU time (docs/quality.md)
    "unet_32_64_64": {"model.unet.channels": [32, 64, 64]},
    "unet_16_32_64": {"model.unet.channels": [16, 32, 64]},
    # conf/base with the timestep embedding as a scale and shift after each block's second norm,
    # which one-channel groups otherwise erase (models/denoiser.py)
    "scale_shift": {"model.unet.scale_shift_norm": True},
    # small turns, shifts and zooms of image and masks together (training/augment.py)
    "affine": {"training.affine_rotation": 15.0, "training.affine_translation": 0.05, "training.affine_scaling": 0.1},
}
QUALITY = ("ged", "hm_iou", "dice_max", "ci", "ged_oracle", "ged_cross", "diversity_samples", "diversity_raters")
_SAMPLER = re.compile(r"(ddpm|ddim)(\d+)(?:@(\d+))?")
logger = logging.getLogger("quality_sweep")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--samplers", nargs="+", default=["ddpm10", "ddim10", "ddim50"],
                        help="after every training budget")
    parser.add_argument("--final-samplers", nargs="*", default=["ddpm10@16", "ddim10@16", "ddpm25@16", "ddim25@16",
                                                                 "ddpm50@16", "ddim50@16", "ddpm250@16", "ddim250@16"],
                        help="after the last training budget only (the GED-vs-sampling-steps curve)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="training budgets, ascending (default: training.max_steps)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    parser.add_argument("--env", default=None, help="conf/<env> over conf/base")
    parser.add_argument("--params", default="", help="more parameters for every configuration, 'a.b=1,c.d=2'")
    parser.add_argument("--out", type=Path, default=ROOT / "data/08_reporting/quality_sweep")
    parser.add_argument("--report", action="store_true", help="only tabulate the rows already written")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "SEED"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parameters(args: argparse.Namespace, config: str, seed: int) -> dict:
    overrides = {**parse_params(args.params), **CONFIGS[config]}
    overrides.update({"training.seed": seed, "sampling.seed": seed, "training.progress": False,
                      "sampling.progress": False})
    return load_parameters(args.env, overrides)


def budgets(args: argparse.Namespace) -> list[int]:
    return sorted(args.steps or [int(load_parameters(args.env)["training"]["max_steps"])])


def plan(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(training steps, sampler) of every row of one (config, seed), in the order they are made."""
    steps = budgets(args)
    rows = [(budget, sampler) for budget in steps for sampler in args.samplers]
    return rows + [(steps[-1], sampler) for sampler in args.final_samplers]


def sampler_settings(name: str) -> dict[str, object]:
    match = _SAMPLER.fullmatch(name)
    if not match:
        raise SystemExit(f"sampler {name!r} is not ddpmN, ddimN, ddpmN@K or ddimN@K")
    settings: dict[str, object] = {"method": match.group(1), "steps": int(match.group(2))}
    if match.group(3):
        settings["max_cases"] = int(match.group(3))
    return settings


def row_path(out: Path, config: str, seed: int, steps: int, sampler: str) -> Path:
    return out / "rows" / f"{config}-{seed}-{steps}-{sampler}.csv"


def train_or_load(args: argparse.Namespace, config: str, seed: int, steps: int, params: dict, data):
    """The (config, seed) model after ``steps`` steps: from OUT/models, else trained on from the checkpoint."""
    from cimd_pipeline.models.trained import TrainedModel

    path = args.out / "models" / f"{config}-{seed}-{steps}.pt"
    if path.exists():
        return TrainedModel.load(path)
    folder = args.out / "checkpoints" / f"{config}-{seed}"
    training = _merge(params["training"], {"checkpoint_dir": str(folder), "resume": True, "max_steps": steps})
    trained, _ = _node_module("training").train_model(
        data, params["model"], training, params["alignment"], params["ingestion"]
    )
    trained.save(path)
    return trained


def work(args: argparse.Namespace) -> None:
    """Train (or load) one (config, seed) model budget by budget; write every missing row."""
    config, seed = args.worker[0], int(args.worker[1])
    params = parameters(args, config, seed)
    data = prepare_data(params)
    trained, trained_steps = None, None
    for steps, sampler in plan(args):
        target = row_path(args.out, config, seed, steps, sampler)
        if target.exists():
            continue
        if trained_steps != steps:
            trained, trained_steps = train_or_load(args, config, seed, steps, params, data), steps
        sampling = {**params["sampling"], **sampler_settings(sampler)}
        samples, _ = _node_module("sampling").sample_test_cases(trained, data, sampling, params["training"])
        summary, _, _ = _node_module("evaluation").evaluate_samples(samples, data, trained)
        row = {"config": config, "seed": seed, "sampler": sampler, "method": sampling["method"],
               "steps": sampling["steps"], "train_steps": trained.info["steps"], **{k: summary.get(k, float("nan")) for k in QUALITY},
               **{k: v for k, v in summary.items() if k.rsplit("_", 1)[-1] in FAMILIES and k.startswith(("ged_", "hm_iou_"))},
               "test_cases": summary["test_cases"], "train_seconds": trained.info["train_seconds"],
               "sampling_seconds": summary["sampling_seconds"]}
        partial = target.with_suffix(".part")
        pd.DataFrame([row]).to_csv(partial, index=False)
        partial.replace(target)
        logger.info("%s seed %d, %d steps, %s: GED %.3f HM-IoU %.3f", config, seed, steps, sampler, row["ged"],
                    row["hm_iou"])


def launch(args: argparse.Namespace, config: str, seed: int) -> str:
    command = [sys.executable, __file__, "--worker", config, str(seed), "--out", str(args.out),
               "--params", args.params, "--steps", *map(str, budgets(args)), "--samplers", *args.samplers,
               "--final-samplers", *args.final_samplers] + (["--env", args.env] if args.env else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KEDRO_DISABLE_TELEMETRY": "1"}
    log = args.out / "logs" / f"{config}-{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("a") as stream:  # the run's own log, to follow a long sweep (and kept after a failure)
        proc = subprocess.run(command, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        return f"FAILED {config} seed {seed}, see {log}: {log.read_text()[-2000:]}"
    return f"done {config} seed {seed} in {time.perf_counter() - started:.0f} s"


def plot_curves(rows: pd.DataFrame, path: Path) -> None:
    """Left: GED against sampling steps (the ``@K`` rows of the last budget; DDPM solid, DDIM dashed).
    Right: GED against training steps for every all-cases sampler. Means over seeds; oracle dotted."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curve = rows[rows["sampler"].str.contains("@")]
    curve = curve[curve["train_steps"] == curve.groupby("config")["train_steps"].transform("max")]
    for (config, method), group in curve.groupby(["config", "method"], sort=False):
        mean = group.groupby("steps")["ged"].mean()
        left.plot(mean.index, mean.values, marker="o", ls="-" if method == "ddpm" else "--", label=f"{config} {method}")
    for (config, sampler), group in rows[~rows["sampler"].str.contains("@")].groupby(["config", "sampler"], sort=False):
        mean = group.groupby("train_steps")["ged"].mean()
        right.plot(mean.index, mean.values, marker="o", label=f"{config} {sampler}")
    for ax, xlabel in ((left, "sampling steps"), (right, "training steps")):
        ax.axhline(rows["ged_oracle"].mean(), color="k", ls=":", lw=1, label="oracle")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GED (lower is better)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace) -> pd.DataFrame:
    paths = sorted((args.out / "rows").glob("*.csv"))
    if not paths:
        raise SystemExit(f"no finished runs under {args.out / 'rows'}")
    rows = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    order = {name: i for i, name in enumerate(CONFIGS)}
    rows = rows.sort_values(["config", "train_steps", "sampler", "seed"],
                            key=lambda c: c.map(order) if c.name == "config" else c)
    rows.to_csv(args.out / "quality_sweep.csv", index=False)
    columns = [c for c in ("test_cases", *QUALITY, "train_seconds") if rows[c].notna().all()]
    table = summarise(rows, tuple(columns), by=("config", "train_steps", "sampler"))
    text = f"# Recipe sweep (mean ± std over seeds)\n\n{table}"
    (args.out / "quality_sweep.md").write_text(text)
    plot_curves(rows, args.out / "quality_sweep.png")
    print(text)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.worker:
        work(args)
        return
    for sampler in [*args.samplers, *args.final_samplers]:
        sampler_settings(sampler)
    (args.out / "rows").mkdir(parents=True, exist_ok=True)
    if args.report:
        report(args)
        return
    jobs = [(config, seed) for seed in args.seeds for config in args.configs
            if not all(row_path(args.out, config, seed, *row).exists() for row in plan(args))]
    failed = run_workers(jobs, lambda job: launch(args, *job), args.jobs)
    report(args)
    stop_if_failed(failed, len(jobs))


if __name__ == "__main__":
    main()
