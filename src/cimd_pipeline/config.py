"""Typed parameter blocks, one per pipeline, validated once before any data is touched.

Each YAML block in ``conf/*/parameters_<pipeline>.yml`` maps to one model here. Unknown keys are
refused (a typo must not silently fall back to a default) and every invalid value is reported in
one `ConfigError` by `validate_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cimd_pipeline.data.alignment import Normalisation, ResizeMode
from cimd_pipeline.data.synthetic import SyntheticConfig
from cimd_pipeline.diffusion import (
    LossWeighting,
    NoiseSchedule,
    PredictionType,
    schedule_problems,
    weighting_problems,
)
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.models.denoiser import UNetConfig

Device = Literal["auto", "cpu", "cuda", "mps"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestionParams(Strict):
    source: str = "synthetic"
    seed: int = 0
    root: str | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    reader: dict[str, Any] = Field(default_factory=dict)


class SplitFractions(Strict):
    train: float = Field(0.7, ge=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.2, gt=0)


class AlignmentParams(Strict):
    image_size: int = Field(32, ge=8)
    resize_mode: ResizeMode = ResizeMode.RESIZE
    normalisation: Normalisation = Normalisation.ZSCORE
    binarise_threshold: float | None = None
    slice_axis: int = Field(2, ge=0, le=2)
    empty_slice_share: float = Field(0.1, ge=0, le=1)
    # "auto": the train/val/test folders of the data where every case has one, else a seeded
    # split by patient at 0.7/0.1/0.2; fractions: always the seeded split (data/splits.py)
    split: Literal["auto"] | SplitFractions = "auto"
    seed: int = 0


class Variant(str, Enum):
    CIMD_AA = "cimd_aa"
    CIMD_FC = "cimd_fc"
    CIMD_LATENT = "cimd_latent"  # our extension: the latent conditions the denoiser (docs/ambiguity_nets.md)
    DDPM_DET = "ddpm_det"
    DDPM_PROB = "ddpm_prob"
    PROB_UNET = "prob_unet"  # baseline: Kohl et al. 2018 (models/prob_unet.py)
    PHISEG = "phiseg"  # baseline: Baumgartner et al. 2019 (models/phiseg.py)

    @property
    def uses_ambiguity_nets(self) -> bool:
        return self in (Variant.CIMD_AA, Variant.CIMD_FC, Variant.CIMD_LATENT)


class AmbiguityNetParams(Strict):
    trainable: bool = True
    acn_input: Literal["x0", "eps"] = "x0"
    filters: tuple[int, ...] = (32, 64, 128, 192)
    # Gaussians in the ACN prior of cimd_latent (1: one Gaussian; docs/ambiguity_nets.md)
    prior_components: int = Field(1, ge=1)
    # free bits of cimd_latent (Kingma et al. 2016): while the batch's mean KL is under this many
    # nats the posterior is not pulled toward the prior; the prior always fits the posterior's
    # codes (0: the plain KL; docs/ambiguity_nets.md)
    free_nats: float = Field(0.0, ge=0)
    # how z reaches the cimd_latent denoiser: as constant input channels, or through the timestep
    # embedding that every residual block of every level reads (models/denoiser.py)
    latent_conditioning: Literal["input_channels", "every_level"] = "input_channels"


# The ambiguity_nets fields only cimd_latent reads; any other variant must leave them at their defaults.
LATENT_ONLY_FIELDS = ("prior_components", "free_nats", "latent_conditioning")


# --- baselines: Probabilistic U-Net and PHiSeg (docs/baselines.md) --------------------------------------
class BaselineParams(Strict):
    """The ``prob_unet`` and ``phiseg`` networks; defaults are the originals' except PHiSeg's depth.

    ``filters`` are the channels per resolution level (PHiSeg repeats the last one below the
    fourth level, as its code does). PHiSeg has ``phiseg_resolution_levels`` levels, the coarsest
    ``phiseg_levels`` of which carry a latent; the original uses 7 and 5 at 128x128.
    """

    filters: tuple[int, ...] = Field((32, 64, 128, 192), min_length=1)
    num_convs: int = Field(3, ge=1)
    latent_dim: int = Field(6, ge=1)
    beta: float = Field(1.0, ge=0)
    phiseg_levels: int = Field(5, ge=1)
    phiseg_resolution_levels: int = Field(5, ge=1)
    phiseg_latent_dim: int = Field(2, ge=1)
    phiseg_aux_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _latents_fit(self) -> BaselineParams:
        if self.phiseg_levels > self.phiseg_resolution_levels:
            raise ValueError("phiseg_levels cannot exceed phiseg_resolution_levels")
        return self


def baseline_size_problems(model: ModelParams, image_size: int) -> list[str]:
    """Why ``image_size`` does not suit the ``prob_unet``/``phiseg`` networks (empty list: it does)."""
    b = model.baselines
    if model.variant is Variant.PROB_UNET:
        factor, smallest = 2 ** (len(b.filters) - 1), 2 ** len(b.filters)
        if image_size % factor or image_size < smallest:
            return [(
                f"alignment.image_size: {image_size} does not suit prob_unet: its U-Net with "
                f"{len(b.filters)} levels needs a multiple of {factor} and its prior/posterior nets "
                f"at least {smallest} pixels; use fewer model.baselines.filters or a larger image"
            )]
    if model.variant is Variant.PHISEG:
        factor = 2 ** (b.phiseg_resolution_levels - 1)
        if image_size % factor:
            return [(
                f"alignment.image_size: {image_size} does not suit phiseg: "
                f"{b.phiseg_resolution_levels} resolution levels need a multiple of {factor}; lower "
                "model.baselines.phiseg_resolution_levels (and phiseg_levels) or use a larger image"
            )]
    return []


# --- end baselines ------------------------------------------------------------------------------


class ModelParams(Strict):
    variant: Variant = Variant.CIMD_AA
    prediction_type: PredictionType = PredictionType.X0
    num_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0, lt=1)
    beta_end: float = Field(0.02, gt=0, lt=1)
    vlb_weight: float = Field(0.001, ge=0)
    kl_weight: float = Field(0.001, ge=0)
    latent_dim: int = Field(6, ge=1)
    # the diffusion recipe (docs/quality.md); the first value of each is plain DDPM
    noise_schedule: NoiseSchedule = NoiseSchedule.LINEAR
    input_scale: float = Field(1.0, gt=0, le=1)
    loss_weighting: LossWeighting = LossWeighting.SIMPLE
    min_snr_gamma: float = Field(5.0, gt=0)
    output_activation: Literal["none", "tanh"] = "none"
    self_condition: bool = False
    unet: UNetConfig = UNetConfig()
    ambiguity_nets: AmbiguityNetParams = AmbiguityNetParams()
    baselines: BaselineParams = BaselineParams()  # prob_unet / phiseg only

    @model_validator(mode="after")
    def _consistent_recipe(self) -> "ModelParams":
        if self.output_activation != "none" and self.prediction_type is not PredictionType.X0:
            raise ValueError(
                f"output_activation={self.output_activation!r} bounds an x0 prediction; "
                f"prediction_type={self.prediction_type.value!r} predicts an unbounded target"
            )
        if self.variant is not Variant.CIMD_LATENT:
            for field in LATENT_ONLY_FIELDS:
                value = getattr(self.ambiguity_nets, field)
                if value != AmbiguityNetParams.model_fields[field].default:
                    raise ValueError(
                        f"ambiguity_nets.{field}={value!r} needs variant 'cimd_latent', the only "
                        f"variant whose latent conditions the denoiser and is drawn from its prior; "
                        f"got {self.variant.value!r}"
                    )
        problems = schedule_problems(self.noise_schedule, self.num_timesteps, self.beta_start, self.beta_end)
        problems += weighting_problems(self.prediction_type, self.loss_weighting)
        if problems:  # the same function builds the model's schedule (models/cimd.py)
            raise ValueError("; ".join(problems))
        return self


class TrainingParams(Strict):
    seed: int = 0
    max_steps: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # array axes along which each training example (image and all its masks) is flipped with
    # probability 1/2: "width" mirrors the columns, "height" the rows; which anatomical direction
    # that is depends on the reader (docs/datasets.md, "Flips"); only where anatomy has no handedness
    flip_axes: list[Literal["width", "height"]] = []
    # each step's rows are (image, rater) pairs covering every valid rater of the images drawn,
    # instead of one rater drawn per image; same rows per step (training/rater_rows.py, docs/quality.md)
    all_raters: bool = False
    # the learning rate over the run (training/schedule.py): constant or cosine decay to
    # min_lr_ratio * lr at max_steps, after a linear warm-up of warmup_steps (0: none)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    # intensity augmentation of the image (not the masks): each example's image becomes
    # (1 + s) * image + o, s uniform in [-intensity_scale, intensity_scale] and o in
    # [-intensity_shift, intensity_shift], in units of the normalised image (training/augment.py)
    intensity_scale: float = Field(0.0, ge=0, lt=1)
    intensity_shift: float = Field(0.0, ge=0)
    # small affine changes of each example, image and all its masks together (training/augment.py):
    # a turn uniform in ±affine_rotation degrees, a shift along each axis uniform in
    # ±affine_translation of the image side, a zoom uniform in 1 ± affine_scaling. 0: none
    affine_rotation: float = Field(0.0, ge=0, le=180)
    affine_translation: float = Field(0.0, ge=0, lt=0.5)
    affine_scaling: float = Field(0.0, ge=0, lt=1)
    # dropout before the second convolution of every residual block of the diffusion U-Net while
    # training (Ho et al. 2020); training/dropout.py. 0: none
    dropout: float = Field(0.0, ge=0, lt=1)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = True
    checkpoint_every: int = Field(250, ge=1)
    checkpoint_dir: str = "data/06_models/checkpoints"
    log_every: int = Field(25, ge=1)
    resume: bool = True
    device: Device = "auto"
    bf16: bool = True
    # bf16 autocast on the CPU too: 1.4x the steps per CPU-second at 64x64 on a Xeon with AMX
    # (benchmarks/speed.py --parts b); off by default, since a CPU without native bf16 runs it slower
    cpu_bf16: bool = False
    deterministic: bool = False
    progress: bool = True
    # data-parallel worker processes on this machine (one per GPU; gloo on the CPU), docs/scaling.md
    num_processes: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _schedule_fits_the_run(self) -> "TrainingParams":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"training.warmup_steps={self.warmup_steps} leaves no step at the full learning rate "
                f"in max_steps={self.max_steps}: use fewer warm-up steps"
            )
        if self.min_lr_ratio > 0 and self.lr_schedule != "cosine":
            raise ValueError(
                f"training.min_lr_ratio={self.min_lr_ratio} is the end of the cosine decay; "
                f"lr_schedule={self.lr_schedule!r} never reads it: set lr_schedule: cosine or leave it at 0"
            )
        return self

    @field_validator("flip_axes", mode="before")
    @classmethod
    def _no_old_axis_names(cls, axes: Any) -> Any:
        renamed = {"x": "width", "y": "height"}
        old = [a for a in axes if a in renamed] if isinstance(axes, (list, tuple)) else []
        if old:
            raise ValueError(
                f"{old}: the axes are now named by the array, not by a direction: write "
                f"{[renamed.get(a, a) for a in axes]} for the same flips ('x' was the array's width, "
                "'y' its height). 'x' was documented as left-right, but on NIfTI slices (RAS+) the "
                "width is anterior-posterior; docs/datasets.md lists each reader's directions"
            )
        return axes

    @field_validator("flip_axes")
    @classmethod
    def _each_axis_once(cls, axes: list[str]) -> list[str]:
        if len(set(axes)) != len(axes):
            raise ValueError(f"{axes}: name each axis once (flipping twice along one axis is no flip)")
        return axes


class SamplerSettings(Strict):
    """How masks are drawn; shared by the ``sampling`` and ``inference`` blocks."""

    num_samples: int = Field(16, ge=1)
    method: Literal["ddpm", "ddim"] = "ddim"
    steps: int = 50
    eta: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    progress: bool = True
    # the networks in bfloat16 autocast while sampling (the sampler's own maths stays float32): on
    # a CPU with AMX or AVX-512 BF16 about 1.5x more masks per CPU-second at the quality measured in
    # docs/lidc.md ("Sampling speed"); slower on a CPU without them
    bf16: bool = False

    @field_validator("steps")
    @classmethod
    def _at_least_two_steps(cls, steps: int) -> int:
        if steps < 2:
            raise ValueError(
                f"{steps} sampling step(s) cannot be respaced: the respaced schedule keeps both ends "
                "of the training schedule (t = 0 and t = T - 1), so the shortest chain has 2 steps"
            )
        return steps


class SamplingParams(SamplerSettings):
    split: Literal["train", "val", "test"] = "test"
    max_cases: int | None = Field(None, ge=1)
    # worker processes sharing the batches (one per GPU on a multi-GPU machine); the samples are
    # bit-identical for any count (docs/scaling.md)
    num_processes: int = Field(1, ge=1)


class InferenceParams(SamplerSettings):
    """The ``inference`` parameter block (``conf/base/parameters_inference.yml``)."""

    input: str | None = None
    # the model file: training's output, or a shipped one such as models/lidc_cpu_64/model.pt
    model: str = "data/06_models/model.pt"
    output: str = "data/07_model_output/inference"
    batch_size: int = Field(64, ge=1)
    device: Device = "auto"

    @classmethod
    def parse(cls, block: dict | None) -> InferenceParams:
        """Validate the block into one `ConfigError` listing every problem; ``input`` is required."""
        try:
            params = cls.model_validate(block or {})
        except ValidationError as error:
            raise ConfigError("invalid parameters:\n  - " + "\n  - ".join(_describe("inference", error))) from error
        if not params.input:
            example = '--params "inference.input=scans/"'
            raise ConfigError(f"inference.input: set it to a folder or a file, e.g. {example}")
        return params

    def sampling(self) -> SamplingParams:
        """The sampler settings (``progress`` off: inference shows one bar over images)."""
        shared = self.model_dump(include=set(SamplerSettings.model_fields))
        return SamplingParams(**{**shared, "progress": False})


class EvaluationParams(Strict):
    figure_cases: int = Field(4, ge=0)
    # samples drawn elsewhere (docs/evaluation.md): a file or folder, scored instead of the
    # sampling pipeline's; every case of `split` needs samples at the raters' size
    samples: str | None = None
    split: Literal["train", "val", "test", "all"] = "test"
    resize: bool = False  # resize samples of another size by nearest neighbour (else refused)
    binarise_threshold: float | None = None  # soft samples: foreground is value > threshold


BLOCKS: dict[str, type[Strict]] = {
    "ingestion": IngestionParams,
    "alignment": AlignmentParams,
    "model": ModelParams,
    "training": TrainingParams,
    "sampling": SamplingParams,
    "evaluation": EvaluationParams,
    "inference": InferenceParams,
}


def _describe(block: str, error: ValidationError) -> list[str]:
    lines = []
    for e in error.errors():
        shown = e.get("input")
        got = "" if isinstance(shown, dict) else f" (got {shown!r})"
        lines.append(f"{'.'.join([block, *map(str, e['loc'])])}: {e['msg']}{got}")
    return lines


def _size_problems(model: ModelParams | None, alignment: AlignmentParams) -> list[str]:
    """The image size every network of the variant can down-sample."""
    unet = model.unet if model is not None else UNetConfig()
    problems = []
    if alignment.image_size % unet.size_divisor:
        problems.append(
            f"alignment.image_size: {alignment.image_size} is not divisible by {unet.size_divisor}, "
            f"which a UNet with {len(unet.channels)} levels needs"
        )
    if model is None:
        return problems
    if model.variant.uses_ambiguity_nets and alignment.image_size < 2 ** len(model.ambiguity_nets.filters):
        problems.append(
            f"alignment.image_size: {alignment.image_size} is smaller than the "
            f"{2 ** len(model.ambiguity_nets.filters)} pixels the AMN/ACN encoder down-samples"
        )
    return problems + baseline_size_problems(model, alignment.image_size)


def _ingestion_problems(ingestion: IngestionParams) -> list[str]:
    """A known source, and reader options its reader accepts (checked now, not at ingestion)."""
    from cimd_pipeline.data.readers import READERS, reader_options  # readers import config's neighbours

    if ingestion.source not in READERS:
        return [f"ingestion.source: unknown source {ingestion.source!r}; known: {sorted(READERS)}"]
    if ingestion.source == "synthetic":
        if ingestion.reader:
            return [
                f"ingestion.reader: the synthetic source takes no reader options (got "
                f"{sorted(ingestion.reader)}); its settings are ingestion.synthetic.*"
            ]
        return []
    try:
        reader_options(ingestion.source, ingestion.reader)
    except ValidationError as error:
        return _describe("ingestion.reader", error)
    return []


def _device_problem(block: str, device: str) -> list[str]:
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if available.get(device, True):
        return []
    return [f"{block}.device: {device!r} is not available on this machine (use auto or cpu)"]


def deterministic_training_problems(model: ModelParams, training: TrainingParams) -> list[str]:
    """``training.deterministic`` with a baseline on CUDA cannot run: both baselines up-sample
    bilinearly, and PyTorch has no deterministic CUDA backward for that (torch.use_deterministic_algorithms
    lists ``interpolate`` with ``bilinear`` among the operations that raise)."""
    if not (training.deterministic and model.variant in (Variant.PROB_UNET, Variant.PHISEG)):
        return []
    if training.device == "cuda" or (training.device == "auto" and torch.cuda.is_available()):
        return [
            f"training.deterministic: {model.variant.value} up-samples bilinearly, whose CUDA backward "
            "PyTorch cannot run deterministically; set training.deterministic=false or training.device=cpu"
        ]
    return []


def _inference_model_problems(inference: InferenceParams, used: set[str]) -> list[str]:
    """``inference.model`` is the file the catalog's ``trained_model`` reads and writes: a run
    that trains must keep training's own path, or it would write over a shipped model."""
    default = InferenceParams.model_fields["model"].default
    if "training" in used and inference.model != default:
        return [(
            f"inference.model: {inference.model} would be overwritten by this run's training (it "
            "writes the model to inference.model); train first, then run the inference pipeline on its own"
        )]
    if "inference" in used and "training" not in used and not Path(inference.model).is_file():
        return [(
            f"inference.model: no model file at {inference.model}; train one (`kedro run`) or point it at "
            "a model.pt, e.g. --params \"inference.model=models/lidc_cpu_64/model.pt\""
        )]
    return []


def validate_parameters(params: dict[str, Any], running: Iterable[str] = ()) -> dict[str, Strict]:
    """Validate every known block present in ``params``; raise one `ConfigError` listing all problems.

    Cross-block rules (the image size the networks can down-sample, the sampler's step count, a
    sampled split that alignment leaves empty, reader options, devices) are checked here too, so
    a run fails in the first second rather than after ingestion or training.

    Args:
        params: the parameter blocks by name (``model``, ``training``, ...).
        running: the blocks the pipeline about to run reads; rules about using a block (its device
            exists, ``inference.input`` is set) apply to these only.
    """
    problems: list[str] = []
    parsed: dict[str, Strict] = {}
    for block, schema in BLOCKS.items():
        if block in params:
            try:
                parsed[block] = schema.model_validate(params[block] or {})
            except ValidationError as error:
                problems.extend(_describe(block, error))
    used = set(running)
    model, alignment, sampling = (parsed.get(k) for k in ("model", "alignment", "sampling"))
    model = model if isinstance(model, ModelParams) else None
    if isinstance(alignment, AlignmentParams) and "model" in params:
        problems.extend(_size_problems(model, alignment))
    if model is not None and isinstance(sampling, SamplingParams):
        if sampling.steps > model.num_timesteps:
            problems.append(
                f"sampling.steps: {sampling.steps} exceeds model.num_timesteps={model.num_timesteps}"
            )
    if isinstance(sampling, SamplingParams) and isinstance(alignment, AlignmentParams):
        fractions = alignment.split  # "auto" checks at alignment, when the data's splits are known
        if isinstance(fractions, SplitFractions) and getattr(fractions, sampling.split) <= 0:
            problems.append(
                f"sampling.split: {sampling.split!r} is empty because alignment.split.{sampling.split} is 0"
            )
    training = parsed.get("training")
    if isinstance(model, ModelParams) and isinstance(training, TrainingParams):
        problems.extend(deterministic_training_problems(model, training))
        if training.dropout and model.variant in (Variant.PROB_UNET, Variant.PHISEG):
            problems.append(
                f"training.dropout: acts in the diffusion U-Net's residual blocks, which "
                f"{model.variant.value} does not have; set it to 0"
            )
        if training.all_raters and model.variant is Variant.DDPM_DET:
            problems.append(
                "training.all_raters: ddpm_det learns the mean of the raters' masks; one rater per row "
                "would make it ddpm_prob. Set it to false (or use model.variant=ddpm_prob)"
            )
    if isinstance(training, TrainingParams) and training.batch_size % training.num_processes:
        problems.append(
            f"training.batch_size: {training.batch_size} is not divisible by training.num_processes="
            f"{training.num_processes} (every process trains on an equal share of the batch)"
        )
    ingestion = parsed.get("ingestion")
    if isinstance(ingestion, IngestionParams):
        problems.extend(_ingestion_problems(ingestion))
    for block in ("training", "inference"):
        if block in used and isinstance(parsed.get(block), (TrainingParams, InferenceParams)):
            problems.extend(_device_problem(block, parsed[block].device))
    inference = parsed.get("inference")
    if "inference" in used and isinstance(inference, InferenceParams) and not inference.input:
        problems.append('inference.input: set it to a folder or a file, e.g. --params "inference.input=scans/"')
    if isinstance(inference, InferenceParams):
        problems.extend(_inference_model_problems(inference, used))
    if problems:
        raise ConfigError("invalid parameters:\n  - " + "\n  - ".join(problems))
    return parsed
