"""Batch normalisation over the global batch, whatever the number of data-parallel processes.

Data-parallel training promises the one-process trajectory at the same global batch
(docs/scaling.md). Plain ``nn.BatchNorm2d`` breaks that promise: every process normalises over its
own share of the batch, so activations, gradients and running statistics differ from one process.
``nn.SyncBatchNorm`` computes global statistics but refuses CPU tensors (gloo), where the
equivalence is tested and where CPU users train. `GlobalBatchNorm2d` sums the statistics of every
process with a differentiable all-reduce (gradients flow back through the global mean and
variance, as in one process), on any backend. In one process, and in evaluation, it is exactly
``nn.BatchNorm2d``: same state-dict keys, same numbers, so model files stay readable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce


def data_parallel() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the batch of all processes.

    Two all-reduces per call: the per-channel sums and counts give the global mean, then the sums
    of squared deviations from it give the global (biased) variance; the two-pass form keeps the
    rounding of one process's batch norm. Running statistics are updated from the global ones
    (unbiased variance, as ``nn.BatchNorm2d``), so every process holds the same buffers.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and data_parallel()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = (0, 2, 3)
        x = x.float()
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:-1] / count
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.square().sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * (count / (count - 1.0).clamp_min(1.0))  # on the device: no host sync
        self.running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased, alpha=factor)
