"""Batch norm over the global batch: 2 gloo processes with half a batch each equal one process."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cimd_pipeline.models.batch_norm import GlobalBatchNorm2d, data_parallel


def batch() -> torch.Tensor:
    return torch.randn(6, 3, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 + 1


def reference(momentum: float | None = 0.1) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """nn.BatchNorm2d on the whole batch, two steps: output, input gradient (and the module)."""
    norm = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        norm.bias.copy_(torch.tensor([0.0, 0.3, 1.0]))
    x = batch().requires_grad_(True)
    norm(x)
    out = norm(x)
    (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
    return norm, out.detach(), x.grad


def _half_batch(rank: int, folder: Path, momentum: float | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=2)
    try:
        assert data_parallel()
        norm = GlobalBatchNorm2d(3, momentum=momentum)
        with torch.no_grad():
            norm.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            norm.bias.copy_(torch.tensor([0.0, 0.3, 1.0]))
        rows = slice(3 * rank, 3 * rank + 3)
        x = batch()[rows].clone().requires_grad_(True)
        norm(x)
        out = norm(x)
        weights = torch.arange(6 * 3 * 5 * 4).reshape(6, 3, 5, 4).sin()[rows]
        (out * weights).sum().backward()
        torch.save({"out": out.detach(), "grad": x.grad, "state": norm.state_dict(),
                    "weight_grad": norm.weight.grad, "bias_grad": norm.bias.grad}, folder / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_normalise_and_differentiate_as_one_batch(tmp_path):
    for momentum, sub in ((0.1, "ema"), (None, "cumulative")):
        folder = (tmp_path / sub).resolve()
        folder.mkdir()
        mp.spawn(_half_batch, args=(folder, momentum), nprocs=2, join=True)
        parts = [torch.load(folder / f"{rank}.pt", weights_only=True) for rank in range(2)]
        norm, out, grad = reference(momentum)
        assert torch.allclose(torch.cat([p["out"] for p in parts]), out, atol=1e-5)
        assert torch.allclose(torch.cat([p["grad"] for p in parts]), grad, atol=1e-5)
        # parameter gradients: each process holds its share's; data parallelism sums them
        assert torch.allclose(parts[0]["weight_grad"] + parts[1]["weight_grad"], norm.weight.grad, atol=1e-4)
        assert torch.allclose(parts[0]["bias_grad"] + parts[1]["bias_grad"], norm.bias.grad, atol=1e-4)
        for part in parts:  # the same running statistics in every process, those of one process
            assert part["state"].keys() == norm.state_dict().keys()
            for key, value in norm.state_dict().items():
                assert torch.allclose(part["state"][key].float(), value.float(), atol=1e-5), (sub, key)


def test_in_one_process_and_in_evaluation_it_is_plain_batch_norm():
    assert not data_parallel()
    norm, out, grad = reference()
    mine = GlobalBatchNorm2d(3)
    mine.load_state_dict(nn.BatchNorm2d(3).state_dict())  # the same keys: old model files load
    with torch.no_grad():
        mine.weight.copy_(norm.weight)
        mine.bias.copy_(norm.bias)
    x = batch().requires_grad_(True)
    mine(x)
    again = mine(x)
    (again * torch.arange(again.numel()).reshape(again.shape).sin()).sum().backward()
    assert torch.equal(again, out) and torch.equal(x.grad, grad)
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), norm.state_dict().values()))
    mine.eval()
    norm.eval()
    assert torch.equal(mine(batch()), norm(batch()))
