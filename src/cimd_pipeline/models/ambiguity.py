"""Gaussian latent encoders of CIMD: the ambiguity modelling and controlling networks.

CIMD (Rahman et al., CVPR 2023) conditions its diffusion denoiser on a latent code ``z``
drawn from one of two Gaussian encoders with the same architecture:

* AMN, the posterior ``q(z | image, ground-truth mask)``, used while training;
* ACN, the prior ``p(z | image, predicted clean mask)``, used at sampling time.

The training loss includes ``KL(AMN || ACN)``. Both encoders are a :class:`GaussianEncoder`;
only their input channels differ (image channels plus mask channels).

Two covariance forms are supported, matching the paper's CIMD-AA and CIMD-FC variants:

* :attr:`Covariance.DIAGONAL`: the network predicts a mean and a raw scale per latent
  dimension, mapped to ``sigma = softplus(raw + shift) + eps`` exactly as the Cholesky diagonal
  of the full form (``sigma = 1`` at ``raw = 0``); the distribution is
  ``Independent(Normal(mu, sigma), 1)``. Unlike ``exp(raw)``, sigma grows only linearly in a
  large raw value and never underflows to 0, so ``log(sigma)`` and the KL stay finite.
* :attr:`Covariance.FULL`: the network predicts a mean and the lower triangle of a Cholesky
  factor ``L`` (positive diagonal), so ``Sigma = L L^T`` and ``z = mu + L eps``; the
  distribution is ``MultivariateNormal(mu, scale_tril=L)``.

An encoder with ``components > 1`` predicts a mixture of that many such Gaussians and their
weights (``MixtureSameFamily``). A single Gaussian prior fitted by KL(posterior ‖ prior) must cover
the posteriors of all raters of an image, so its codes fall between theirs
(docs/quality.md, "`cimd_latent`"); a mixture can put one component on each cluster of
posterior codes (the mixture-of-Gaussians priors of VAEs, e.g. Dilokthanakul et al. 2016). Its KL
from a Gaussian posterior has no closed form: :func:`kl_estimate` takes the one-draw Monte Carlo
estimate, whose gradient trains the prior by the likelihood of the posterior's codes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, MultivariateNormal, Normal

from cimd_pipeline.diffusion.noise import Generator
from cimd_pipeline.models import draws

__all__ = ["Covariance", "GaussianEncoder", "detached", "draw", "free_bits_kl", "kl_divergence", "kl_estimate"]

# Added to the softplus of every standard deviation (diagonal sigma, Cholesky diagonal) so that
# Sigma stays positive definite and log(sigma) finite.
_CHOLESKY_EPS = 1e-5
# softplus(_SOFTPLUS_SHIFT) == 1, so a zero raw diagonal maps to a unit standard deviation.
_SOFTPLUS_SHIFT = math.log(math.e - 1.0)
# Standard deviation of the initial 1x1 head weights: small enough that the initial
# distribution is close to N(0, I), large enough that gradients reach the trunk at step 0.
_HEAD_INIT_STD = 1e-2


def positive_scale(raw: Tensor) -> Tensor:
    """``softplus(raw + shift) + eps``: a standard deviation >= eps, equal to 1 at ``raw == 0``."""
    return F.softplus(raw + _SOFTPLUS_SHIFT) + _CHOLESKY_EPS


class Covariance(str, enum.Enum):
    """Covariance form of the latent Gaussian (CIMD-AA is DIAGONAL, CIMD-FC is FULL)."""

    DIAGONAL = "diagonal"
    FULL = "full"


class GaussianEncoder(nn.Module):
    """Convolutional encoder mapping an image-and-mask stack to a Gaussian over ``z``.

    Architecture (paper supplementary): for each entry ``f`` of ``filters`` a 3x3 convolution
    with ``f`` filters, a ReLU and a 2x2 average pooling with stride 2; then global average
    pooling and a 1x1 convolution that predicts the Gaussian parameters.

    Every pooling halves the spatial size (flooring odd sizes), so the input must be at least
    ``2 ** len(filters)`` pixels high and wide (16 for the default four levels); smaller inputs
    raise ``ValueError`` in :meth:`forward`.

    The 1x1 head has zero bias and weights drawn from ``N(0, 0.01^2)``, so the initial
    distribution is close to ``N(0, I)`` for any input while gradients still reach every layer.
    With ``components > 1`` the head also predicts the mixture's logits (equal at the start), and
    the components' means start at distinct points drawn from ``N(0, I)``: identical components
    would get identical gradients and never part.

    Args:
        in_channels: channels of the input stack, e.g. image channels + mask channels.
        latent_dim: dimension ``k`` of ``z`` (6 in the paper).
        filters: output channels of the successive convolution levels.
        covariance: :class:`Covariance` form (or its string value).
        components: Gaussians in the predicted mixture; 1 gives a plain Gaussian.
    """

    def __init__(
        self,
        in_channels: int,
        latent_dim: int = 6,
        filters: Sequence[int] = (32, 64, 128, 192),
        covariance: Covariance | str = Covariance.DIAGONAL,
        components: int = 1,
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        filters = tuple(filters)
        if not filters:
            raise ValueError("filters must name at least one convolution level")
        if any(f < 1 for f in filters):
            raise ValueError(f"every entry of filters must be >= 1, got {filters}")
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        try:
            covariance = Covariance(covariance)
        except ValueError:
            allowed = ", ".join(repr(c.value) for c in Covariance)
            message = f"unknown covariance {covariance!r}; expected one of {allowed}"
            raise ValueError(message) from None

        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.covariance = covariance
        self.components = components
        self.num_levels = len(filters)
        self.min_size = 2**self.num_levels

        layers: list[nn.Module] = []
        previous = in_channels
        for f in filters:
            layers += [
                nn.Conv2d(previous, f, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            previous = f
        self.features = nn.Sequential(*layers)

        if covariance is Covariance.DIAGONAL:
            num_params = 2 * latent_dim  # mean and log-sigma
        else:
            num_params = latent_dim + latent_dim * (latent_dim + 1) // 2  # mean and tril(L)
        self.num_params = num_params
        logits = components if components > 1 else 0
        self.head = nn.Conv2d(previous, components * num_params + logits, kernel_size=1)
        nn.init.normal_(self.head.weight, std=_HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)
        if components > 1:
            with torch.no_grad():
                self.head.bias[: components * num_params].view(components, num_params)[:, :latent_dim].normal_()

    def forward(self, x: Tensor) -> Distribution:
        """Encode ``x`` of shape (N, C, H, W) into a distribution.

        Returns a distribution with ``batch_shape == (N,)`` and ``event_shape == (latent_dim,)``:
        a Gaussian whose ``rsample()`` is differentiable with respect to the encoder parameters,
        or with ``components > 1`` a ``MixtureSameFamily`` of such Gaussians (draw it with
        :func:`draw`).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        if height < self.min_size or width < self.min_size:
            raise ValueError(
                f"input of size {height}x{width} is too small: {self.num_levels} 2x2 poolings "
                f"need H and W >= {self.min_size}"
            )
        pooled = self.features(x).mean(dim=(-2, -1), keepdim=True)  # (N, F, 1, 1)
        # float32 under bf16 autocast: the Gaussian, its Cholesky factor and the KL (values near
        # 1e-8 in a trained model) are meaningless at bf16's 8-bit mantissa.
        params = self.head(pooled).flatten(1).float()  # (N, components * num_params [+ components])
        if self.components == 1:
            return self._gaussian(params)
        split = self.components * self.num_params
        gaussians = self._gaussian(params[:, :split].reshape(len(x), self.components, self.num_params))
        weights = Categorical(logits=params[:, split:], validate_args=False)
        return MixtureSameFamily(weights, gaussians, validate_args=False)

    def _gaussian(self, params: Tensor) -> Distribution:
        """The Gaussian of head parameters (..., num_params), batch shape ``params.shape[:-1]``."""
        k = self.latent_dim
        mu, rest = params[..., :k], params[..., k:]
        # No argument validation: a NaN from upstream must surface as a NaN loss, which the
        # training loop reports with its step, not as a distribution-constructor error.
        if self.covariance is Covariance.DIAGONAL:
            return Independent(Normal(mu, positive_scale(rest), validate_args=False), 1, validate_args=False)
        return MultivariateNormal(mu, scale_tril=self._cholesky(rest), validate_args=False)

    def _cholesky(self, raw: Tensor) -> Tensor:
        """Scatter ``raw`` of shape (..., k(k+1)/2) into lower-triangular (..., k, k) factors.

        The diagonal goes through ``softplus(raw + shift) + eps`` (unit value at ``raw == 0``),
        the strictly lower entries are used as they are.
        """
        k = self.latent_dim
        rows, cols = torch.tril_indices(k, k, device=raw.device)
        on_diag = rows == cols
        values = torch.where(on_diag, positive_scale(raw), raw)
        tril = raw.new_zeros(*raw.shape[:-1], k, k)
        tril[..., rows, cols] = values
        return tril


def _diagonal_params(dist: Distribution) -> tuple[Tensor, Tensor] | None:
    """Return ``(mean, std)`` of an ``Independent(Normal, 1)``, or None for other families."""
    if (
        isinstance(dist, Independent)
        and isinstance(dist.base_dist, Normal)
        and dist.reinterpreted_batch_ndims == 1
    ):
        return dist.base_dist.loc, dist.base_dist.scale
    return None


def draw(dist: Distribution, generator: Generator) -> Tensor:
    """Reparameterised draw (N, k) from a Gaussian or a mixture of Gaussians, noise from ``generator``.

    ``rsample`` would take its noise from the global RNG; the loop's generator (or sampling's
    per-row generators) keeps training resumable and samples seeded per image. A mixture first
    picks one component per row by the Gumbel-max trick on the row's uniforms, then draws from it
    (differentiable in the component's parameters, not in the weights).
    """
    if isinstance(dist, MixtureSameFamily):
        logits = dist.mixture_distribution.logits
        uniform = draws.rand(logits.shape, generator, logits.device).clamp_min(torch.finfo(logits.dtype).tiny)
        pick = (logits - torch.log(-torch.log(uniform))).argmax(dim=1)
        rows = torch.arange(len(pick), device=pick.device)
        components = dist.component_distribution
        diagonal = _diagonal_params(components)
        if diagonal is None:
            mu, l = _full_params(components)
            dist = MultivariateNormal(mu[rows, pick], scale_tril=l[rows, pick], validate_args=False)
        else:
            normal = Normal(diagonal[0][rows, pick], diagonal[1][rows, pick], validate_args=False)
            dist = Independent(normal, 1, validate_args=False)
    eps = draws.randn(dist.mean.shape, generator, dist.mean.device)
    if isinstance(dist, MultivariateNormal):
        return dist.mean + (dist.scale_tril @ eps[..., None])[..., 0]
    return dist.mean + dist.stddev * eps


def _describe(dist: Distribution) -> str:
    """Name a distribution's family, including the base of an ``Independent``."""
    if isinstance(dist, Independent):
        return f"Independent({type(dist.base_dist).__name__}, {dist.reinterpreted_batch_ndims})"
    return type(dist).__name__


def _full_params(dist: Distribution) -> tuple[Tensor, Tensor]:
    """Return ``(mean, scale_tril)`` of a diagonal or full-covariance Gaussian."""
    diagonal = _diagonal_params(dist)
    if diagonal is not None:
        mu, sigma = diagonal
        return mu, torch.diag_embed(sigma)
    if isinstance(dist, MultivariateNormal):
        return dist.loc, dist.scale_tril
    raise TypeError(
        "kl_divergence supports Independent(Normal, 1) and MultivariateNormal, "
        f"got {_describe(dist)}"
    )


def kl_divergence(posterior: Distribution, prior: Distribution) -> Tensor:
    """Closed-form ``KL(posterior || prior)`` per sample, shape (N,) for batch shape (N,).

    Both arguments are Gaussians over ``z`` of the same dimension ``k``, either
    ``Independent(Normal, 1)`` or ``MultivariateNormal``. Two diagonal Gaussians use

        sum_i log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2;

    any other pair is treated as full covariance, with Cholesky factors ``L_q`` and ``L_p``:

        0.5 * (||L_p^-1 L_q||_F^2 + ||L_p^-1 (m_p - m_q)||^2 - k
               + 2 sum log diag L_p - 2 sum log diag L_q),

    which equals ``0.5 * (tr(S_p^-1 S_q) + d^T S_p^-1 d - k + log det S_p - log det S_q)``.
    """
    if posterior.event_shape != prior.event_shape or len(posterior.event_shape) != 1:
        raise ValueError(
            "posterior and prior must be Gaussians over the same vector space, got event shapes "
            f"{tuple(posterior.event_shape)} and {tuple(prior.event_shape)}"
        )
    q_diag = _diagonal_params(posterior)
    p_diag = _diagonal_params(prior)
    if q_diag is not None and p_diag is not None:
        (mu_q, s_q), (mu_p, s_p) = q_diag, p_diag
        terms = torch.log(s_p / s_q) + (s_q**2 + (mu_q - mu_p) ** 2) / (2 * s_p**2) - 0.5
        return terms.sum(-1)

    (mu_q, l_q), (mu_p, l_p) = _full_params(posterior), _full_params(prior)
    k = mu_q.shape[-1]
    batch = torch.broadcast_shapes(l_q.shape[:-2], l_p.shape[:-2], mu_q.shape[:-1], mu_p.shape[:-1])
    l_p = l_p.expand(*batch, k, k)
    l_q = l_q.expand(*batch, k, k)
    diff = (mu_p - mu_q).expand(*batch, k).unsqueeze(-1)  # (..., k, 1)
    trace = torch.linalg.solve_triangular(l_p, l_q, upper=False).square().sum((-2, -1))
    mahalanobis = torch.linalg.solve_triangular(l_p, diff, upper=False).square().sum((-2, -1))
    log_det_p = 2 * torch.diagonal(l_p, dim1=-2, dim2=-1).log().sum(-1)
    log_det_q = 2 * torch.diagonal(l_q, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (trace + mahalanobis - k + log_det_p - log_det_q)


def kl_estimate(posterior: Distribution, prior: Distribution, z: Tensor) -> Tensor:
    """``KL(posterior || prior)`` per sample (N,): closed form between Gaussians, else the one-draw
    Monte Carlo estimate ``log q(z) - log p(z)`` at ``z`` (N, k), a draw of the posterior.

    The estimate is unbiased and, unlike the closed form, can be negative for one draw; its
    gradient trains a mixture prior by the log-likelihood of the posterior's codes.
    """
    if not isinstance(prior, MixtureSameFamily):
        return kl_divergence(posterior, prior)
    if posterior.event_shape != prior.event_shape or z.shape[-1:] != prior.event_shape:
        raise ValueError(
            f"posterior, prior and z must share one latent dimension, got event shapes "
            f"{tuple(posterior.event_shape)}, {tuple(prior.event_shape)} and z of shape {tuple(z.shape)}"
        )
    return posterior.log_prob(z) - prior.log_prob(z)


def detached(dist: Distribution) -> Distribution:
    """The same Gaussian or mixture of Gaussians with its parameters cut from the graph."""
    if isinstance(dist, MixtureSameFamily):
        weights = Categorical(logits=dist.mixture_distribution.logits.detach(), validate_args=False)
        return MixtureSameFamily(weights, detached(dist.component_distribution), validate_args=False)
    diagonal = _diagonal_params(dist)
    if diagonal is not None:
        mu, sigma = diagonal
        return Independent(Normal(mu.detach(), sigma.detach(), validate_args=False), 1, validate_args=False)
    if isinstance(dist, MultivariateNormal):
        return MultivariateNormal(dist.loc.detach(), scale_tril=dist.scale_tril.detach(), validate_args=False)
    raise TypeError(f"expected a Gaussian or a mixture of Gaussians, got {type(dist).__name__}")


def free_bits_kl(posterior: Distribution, prior: Distribution, z: Tensor, free_nats: float) -> Tensor:
    """``KL(posterior || prior)`` per sample (N,) whose gradient leaves the posterior alone while the
    batch's mean KL is under ``free_nats`` (free bits, Kingma et al. 2016, on the whole code).

    The plain free-bits loss ``max(KL, free_nats)`` would also stop training the prior, which
    ``cimd_latent`` samples from; here the prior always follows the gradient of the KL (it fits the
    posterior's codes), and the posterior, with ``z`` and so the AMN, only once the batch spends more
    than ``free_nats``. The value is the KL itself, so the logged loss stays comparable.
    """
    prior_part = kl_estimate(detached(posterior), prior, z.detach())
    posterior_part = kl_estimate(posterior, detached(prior), z)
    kl = prior_part.detach()  # the value of either part is the KL
    pulled = (kl.mean() > free_nats).to(kl.dtype)
    return kl + (prior_part - kl) + pulled * (posterior_part - posterior_part.detach())
