"""Image-conditioned diffusion denoiser of CIMD, built on MONAI's ``DiffusionModelUNet``.

The denoiser sees the noisy mask ``x_t`` (N, M, H, W) concatenated with the image
(N, C, H, W) along the channel axis and the timestep ``t`` (N,). With ``learn_sigma`` it
predicts ``2 * M`` channels: the noise (or x_0) and the interpolation weights of the learned
variance (Nichol & Dhariwal, 2021), as in CIMD's guided-diffusion code; otherwise ``M``.

MONAI 1.6 behaviour worth knowing:

* H and W must be divisible by ``2 ** (len(channels) - 1)`` (one downsampling per level but
  the last), see :func:`check_image_size`;
* every entry of ``channels`` must be divisible by ``norm_num_groups`` (e.g. channels
  (16, 32, 32) need ``norm_num_groups=16``);
* the middle block always has self-attention, whatever ``attention_levels`` says, so
  ``num_head_channels`` must divide ``channels[-1]`` as well as every attended level;
* the output convolution and the second convolution of every residual block are
  zero-initialised (as in guided-diffusion): a fresh network predicts exactly zero and its
  output ignores ``t`` until the first optimiser step;
* every residual block adds its projection of the timestep embedding to the features right
  before its second GroupNorm, which removes each group's mean: where a group holds one channel
  (conf/base's first level: 16 channels, 16 groups) the embedding has no effect at all.
  ``scale_shift_norm`` applies it after that norm instead, as a per-channel scale and shift
  (improved-diffusion's ``use_scale_shift_norm``, Nichol & Dhariwal 2021; the AdaGN of Dhariwal &
  Nichol 2021), so that it reaches every block.
"""

from __future__ import annotations

import functools

import torch
from pydantic import ConfigDict, Field, PositiveInt
from pydantic.dataclasses import dataclass
from torch import Tensor, nn

__all__ = ["ConditionalDenoiser", "UNetConfig", "build_denoiser", "check_image_size"]


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class UNetConfig:
    """Architecture of the denoising U-Net (defaults give about 1.6 M parameters).

    The one definition of the ``model.unet`` parameter block: `cimd_pipeline.config` validates
    the YAML into this class, so defaults and rules cannot drift apart. A pydantic dataclass:
    construction validates (unknown keys and bad values raise pydantic's ValidationError, a
    ValueError) and turns sequences (e.g. YAML lists) into tuples, so the config stays hashable.

    Attributes:
        channels: feature channels per resolution level, from full resolution down.
        attention_levels: whether each level has self-attention (same length as channels).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head; must divide the channels of every
            attention level and of the last level (MONAI's middle block always attends).
        norm_num_groups: groups of every GroupNorm; must divide every entry of channels.
        scale_shift_norm: each residual block applies the timestep embedding as a scale and a
            shift after its second GroupNorm instead of adding it before (see the module notes).
    """

    channels: tuple[PositiveInt, ...] = Field((32, 64, 64), min_length=1)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: PositiveInt = 2
    num_head_channels: PositiveInt = 32
    norm_num_groups: PositiveInt = 32
    scale_shift_norm: bool = False

    def __post_init__(self) -> None:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"attention_levels has {len(self.attention_levels)} entries but channels has "
                f"{len(self.channels)}; give one flag per level"
            )
        bad_groups = [c for c in self.channels if c % self.norm_num_groups]
        if bad_groups:
            raise ValueError(
                f"channels {self.channels} must all be divisible by "
                f"norm_num_groups={self.norm_num_groups}; {bad_groups} are not"
            )
        attended = {c for c, a in zip(self.channels, self.attention_levels) if a}
        attended.add(self.channels[-1])  # the middle block always attends
        bad_heads = sorted(c for c in attended if c % self.num_head_channels)
        if bad_heads:
            raise ValueError(
                f"num_head_channels={self.num_head_channels} must divide the channels of every "
                f"attention level and of the last level (middle block); {bad_heads} are not"
            )

    @property
    def size_divisor(self) -> int:
        """Factor that H and W must be multiples of: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)


def check_image_size(cfg: UNetConfig, height: int, width: int) -> None:
    """Raise ValueError unless ``height`` and ``width`` are positive multiples of the divisor."""
    divisor = cfg.size_divisor
    if height < 1 or width < 1 or height % divisor or width % divisor:
        raise ValueError(
            f"image size {height}x{width} is not supported by a U-Net with "
            f"{len(cfg.channels)} levels: H and W must be positive multiples of {divisor}"
        )


def build_denoiser(
    cfg: UNetConfig,
    image_channels: int,
    mask_channels: int = 1,
    learn_sigma: bool = True,
    extra_channels: int = 0,
    embedding_dim: int = 0,
) -> nn.Module:
    """Build the MONAI U-Net taking ``mask_channels + image_channels + extra_channels`` inputs.

    It is called as ``net(x=torch.cat([x_t, image], 1), timesteps=t)`` and returns
    ``mask_channels * (2 if learn_sigma else 1)`` channels at the input resolution. With
    ``embedding_dim`` > 0 it also takes ``class_labels``, a vector (N, embedding_dim) whose linear
    map is added to the timestep embedding, which every residual block of every level reads (the
    class conditioning of Dhariwal & Nichol 2021 with a continuous code in place of the label's
    table: MONAI's ``class_embedding`` table becomes a linear layer).
    """
    if image_channels < 1 or mask_channels < 1:
        raise ValueError(
            f"image_channels and mask_channels must be >= 1, got {image_channels} and "
            f"{mask_channels}"
        )
    if extra_channels < 0 or embedding_dim < 0:
        raise ValueError(f"extra_channels and embedding_dim must be >= 0, got {extra_channels} and {embedding_dim}")
    # Imported here: MONAI takes seconds to import, and the parameter check needs only UNetConfig.
    from monai.networks.nets import DiffusionModelUNet

    net = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=mask_channels + image_channels + extra_channels,
        out_channels=mask_channels * (2 if learn_sigma else 1),
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        # torch's fused scaled_dot_product_attention instead of MONAI's matmul-softmax-matmul: same
        # parameters and result (to rounding), one kernel; sampling at 64x64 on one CPU thread
        # went 17 % faster (benchmarks/sampling_speed.py, docs/lidc.md)
        use_flash_attention=True,
        num_class_embeds=1 if embedding_dim else None,
    )
    if embedding_dim:
        net.class_embedding = nn.Linear(embedding_dim, net.class_embedding.embedding_dim)
    if cfg.scale_shift_norm:
        block_class = _scale_shift_block_class()
        for block in net.modules():
            if isinstance(block, block_class.__base__):
                block.__class__ = block_class
                projection = block.time_emb_proj
                block.time_emb_proj = nn.Linear(projection.in_features, 2 * projection.out_features)
    return net


@functools.cache
def _scale_shift_block_class() -> type[nn.Module]:
    """MONAI's residual block with the embedding as a scale and a shift after its second norm.

    Made on first use, like the MONAI import it needs. The blocks of a built U-Net take this
    class in place and a projection twice as wide; their other weights keep MONAI's names.
    """
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
        def forward(self, x: Tensor, emb: Tensor) -> Tensor:
            h = self.nonlinearity(self.norm1(x))
            if self.upsample is not None:
                x, h = self.upsample(x), self.upsample(h)
            elif self.downsample is not None:
                x, h = self.downsample(x), self.downsample(h)
            h = self.conv1(h)
            scale, shift = self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
            h = self.conv2(self.nonlinearity(h))
            return self.skip_connection(x) + h

    return ScaleShiftResnetBlock


class ConditionalDenoiser(nn.Module):
    """Denoiser ``eps_theta(x_t, image, t)`` that builds the channel concatenation itself.

    Args:
        cfg: U-Net architecture.
        image_channels: channels ``C`` of the conditioning image.
        mask_channels: channels ``M`` of the (noisy) mask.
        learn_sigma: predict the learned-variance channels as well (output ``2 * M``).
        extra_channels: channels ``E`` of a further conditioning input (self-conditioning's
            previous x0 estimate, a broadcast latent code), concatenated after the image.
        embedding_dim: length ``D`` of a code added, through a linear layer, to the timestep
            embedding of every residual block (see :func:`build_denoiser`); 0 for none.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        image_channels: int,
        mask_channels: int = 1,
        learn_sigma: bool = True,
        extra_channels: int = 0,
        embedding_dim: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_channels = image_channels
        self.mask_channels = mask_channels
        self.learn_sigma = learn_sigma
        self.extra_channels = extra_channels
        self.embedding_dim = embedding_dim
        self.out_channels = mask_channels * (2 if learn_sigma else 1)
        self.net = build_denoiser(cfg, image_channels, mask_channels, learn_sigma, extra_channels, embedding_dim)

    def forward(
        self, x_t: Tensor, image: Tensor, t: Tensor, extra: Tensor | None = None, embedding: Tensor | None = None
    ) -> Tensor:
        """Map x_t (N, M, H, W), image (N, C, H, W), t (N,) and, when the denoiser has them, the
        extra channels ``extra`` (N, E, H, W) and the code ``embedding`` (N, D) to
        (N, out_channels, H, W)."""
        if x_t.ndim != 4 or x_t.shape[1] != self.mask_channels:
            raise ValueError(
                f"x_t must have shape (N, {self.mask_channels}, H, W), got {tuple(x_t.shape)}"
            )
        n, _, height, width = x_t.shape
        if image.shape != (n, self.image_channels, height, width):
            raise ValueError(
                f"image must have shape {(n, self.image_channels, height, width)} to match x_t, "
                f"got {tuple(image.shape)}"
            )
        if t.shape != (n,):
            raise ValueError(f"t must have shape ({n},), got {tuple(t.shape)}")
        check_image_size(self.cfg, height, width)
        inputs = [x_t, image]
        if self.extra_channels:
            if extra is None or extra.shape != (n, self.extra_channels, height, width):
                got = None if extra is None else tuple(extra.shape)
                raise ValueError(f"extra must have shape {(n, self.extra_channels, height, width)}, got {got}")
            inputs.append(extra)
        elif extra is not None:
            raise ValueError("this denoiser has no extra input channels, but extra was given")
        if self.embedding_dim:
            if embedding is None or embedding.shape != (n, self.embedding_dim):
                got = None if embedding is None else tuple(embedding.shape)
                raise ValueError(f"embedding must have shape {(n, self.embedding_dim)}, got {got}")
            return self.net(x=torch.cat(inputs, dim=1), timesteps=t, class_labels=embedding.to(x_t.dtype))
        if embedding is not None:
            raise ValueError("this denoiser takes no embedding, but one was given")
        return self.net(x=torch.cat(inputs, dim=1), timesteps=t)
