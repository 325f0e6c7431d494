"""Typed parameter blocks, one per pipeline, validated once before any data is touched.

Each YAML block in ``conf/*/parameters_<pipeline>.yml`` maps to one model here. Unknown keys are
refused (a typo must not silently fall back to a default) and every invalid value is reported in
one `ConfigError` by `validate_parameters`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cimd_pipeline.data.alignment import Normalisation, ResizeMode
from cimd_pipeline.diffusion import LossWeighting, NoiseSchedule, PredictionType
from cimd_pipeline.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(Strict):
    num_cases: int = Field(300, ge=1)
    image_size: int = Field(64, ge=16)
    family_weights: tuple[float, float, float] = (0.4, 0.35, 0.25)
    cases_per_group: int = Field(2, ge=1)
    oracle_samples: int = Field(16, ge=0)
    empty_bone_share: float = Field(0.2, ge=0, le=1)


class IngestionParams(Strict):
    source: str = "synthetic"
    seed: int = 0
    root: str | None = None
    synthetic: SyntheticParams = SyntheticParams()
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
    split: SplitFractions = SplitFractions()
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


class UNetParams(Strict):
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = Field(2, ge=1)
    num_head_channels: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _levels_match(self) -> "UNetParams":
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("unet.channels and unet.attention_levels must have the same length")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every unet channel count must be divisible by norm_num_groups={self.norm_num_groups}")
        return self


class AmbiguityNetParams(Strict):
    trainable: bool = True
    acn_input: Literal["x0", "eps"] = "x0"
    filters: tuple[int, ...] = (32, 64, 128, 192)


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
    unet: UNetParams = UNetParams()
    ambiguity_nets: AmbiguityNetParams = AmbiguityNetParams()
    baselines: BaselineParams = BaselineParams()  # prob_unet / phiseg only

    @model_validator(mode="after")
    def _activation_needs_x0(self) -> "ModelParams":
        if self.output_activation != "none" and self.prediction_type is not PredictionType.X0:
            raise ValueError(
                f"output_activation={self.output_activation!r} bounds an x0 prediction; "
                f"prediction_type={self.prediction_type.value!r} predicts an unbounded target"
            )
        return self


class TrainingParams(Strict):
    seed: int = 0
    max_steps: int = Field(3000, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = True
    checkpoint_every: int = Field(250, ge=1)
    checkpoint_dir: str = "data/06_models/checkpoints"
    log_every: int = Field(25, ge=1)
    resume: bool = True
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    bf16: bool = True
    deterministic: bool = False
    progress: bool = True


class SamplerSettings(Strict):
    """How masks are drawn; shared by the ``sampling`` and ``inference`` blocks."""

    num_samples: int = Field(16, ge=1)
    method: Literal["ddpm", "ddim"] = "ddim"
    steps: int = Field(50, ge=1)
    eta: float = Field(0.0, ge=0)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    progress: bool = True


class SamplingParams(SamplerSettings):
    split: Literal["train", "val", "test"] = "test"
    max_cases: int | None = Field(None, ge=1)


class EvaluationParams(Strict):
    figure_cases: int = Field(4, ge=0)


BLOCKS: dict[str, type[Strict]] = {
    "ingestion": IngestionParams,
    "alignment": AlignmentParams,
    "model": ModelParams,
    "training": TrainingParams,
    "sampling": SamplingParams,
    "evaluation": EvaluationParams,
}


def _describe(block: str, error: ValidationError) -> list[str]:
    return [
        f"{'.'.join([block, *map(str, e['loc'])])}: {e['msg']} (got {e.get('input')!r})"
        for e in error.errors()
    ]


def validate_parameters(params: dict[str, Any]) -> dict[str, Strict]:
    """Validate every known block present in ``params``; raise one `ConfigError` listing all problems.

    Cross-block rules (the image size the UNet can down-sample, the sampler's step count) are
    checked here too, so a run fails in the first second rather than after ingestion.
    """
    problems: list[str] = []
    parsed: dict[str, Strict] = {}
    for block, schema in BLOCKS.items():
        if block in params:
            try:
                parsed[block] = schema.model_validate(params[block] or {})
            except ValidationError as error:
                problems.extend(_describe(block, error))
    model, alignment, sampling = (parsed.get(k) for k in ("model", "alignment", "sampling"))
    if isinstance(alignment, AlignmentParams) and "model" in params:
        levels = len(model.unet.channels) if isinstance(model, ModelParams) else len(UNetParams().channels)
        factor = 2 ** (levels - 1)
        if alignment.image_size % factor:
            problems.append(
                f"alignment.image_size: {alignment.image_size} is not divisible by {factor}, "
                f"which a UNet with {levels} levels needs"
            )
    if isinstance(model, ModelParams) and isinstance(alignment, AlignmentParams):
        if model.variant.uses_ambiguity_nets and alignment.image_size < 2 ** len(model.ambiguity_nets.filters):
            problems.append(
                f"alignment.image_size: {alignment.image_size} is smaller than the "
                f"{2 ** len(model.ambiguity_nets.filters)} pixels the AMN/ACN encoder down-samples"
            )
    if isinstance(model, ModelParams) and isinstance(alignment, AlignmentParams):
        problems.extend(baseline_size_problems(model, alignment.image_size))
    if isinstance(model, ModelParams) and isinstance(sampling, SamplingParams):
        if sampling.steps > model.num_timesteps:
            problems.append(
                f"sampling.steps: {sampling.steps} exceeds model.num_timesteps={model.num_timesteps}"
            )
    ingestion = parsed.get("ingestion")
    if isinstance(ingestion, IngestionParams):
        from cimd_pipeline.data.readers import READERS  # readers import this module's neighbours

        if ingestion.source not in READERS:
            problems.append(f"ingestion.source: unknown source {ingestion.source!r}; known: {sorted(READERS)}")
    if problems:
        raise ConfigError("invalid parameters:\n  - " + "\n  - ".join(problems))
    return parsed
