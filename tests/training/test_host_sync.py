"""The training step never waits for the device: no loss value or random draw is read on the host.

Without a GPU, a tensor subclass stands for device memory: the batch the loop feeds the model is
a `DeviceTensor`, and so is every draw from the model's (device) generator; everything computed
from them stays one, and each host read of such a tensor (``item``, ``float``, ``bool``,
``tolist``, ``cpu``, ``numpy``, ...) is counted. On a GPU each of them is a synchronisation that
stalls the queue of kernels.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cimd_pipeline.models.cimd import CIMD
from cimd_pipeline.training import loop
from cimd_pipeline.training.loop import train
from tests.models.test_cimd import tiny
from tests.training.test_loop import data, fresh, params  # noqa: F401  (fixture)

HOST_READS = {"item", "tolist", "cpu", "numpy", "__array__", "__bool__", "__float__", "__int__", "__index__"}


class DeviceTensor(torch.Tensor):
    """A tensor whose values live on the device: reading them on the host is recorded."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], kwargs.get("device")))
        if name in HOST_READS or to_host:
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs)


class DeviceDraws(TorchFunctionMode):
    """Draws from the model's generator come out as `DeviceTensor`; the loop's CPU index
    generator (seeded with ``loop.index_seed``) draws on the host and stays plain."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        host = generator is None or generator.initial_seed() == loop.index_seed(params().seed)
        if isinstance(out, torch.Tensor) and not host and not isinstance(out, DeviceTensor):
            out = out.as_subclass(DeviceTensor)
        return out


@pytest.fixture
def device_batches(monkeypatch):
    batch = loop._batch
    monkeypatch.setattr(loop, "_batch", lambda *a: tuple(t.as_subclass(DeviceTensor) for t in batch(*a)))
    DeviceTensor.reads = []
    return DeviceTensor.reads


def host_reads(reads, data, tmp_path, steps, model=fresh):  # noqa: F811
    reads.clear()
    every = {"max_steps": steps, "log_every": steps, "checkpoint_every": steps}
    with DeviceDraws():
        result = train(model(), data, params(**every), tmp_path / f"{steps}.pt", "fp")
    assert len(result.history) == 1 and result.steps == steps
    return list(reads)


def test_the_step_reads_nothing_from_the_device_between_logged_steps(data, tmp_path, device_batches):  # noqa: F811
    two, six = (host_reads(device_batches, data, tmp_path, steps) for steps in (2, 6))
    assert two, "the logged loss must come from the device tensors (is the spy working?)"
    assert six == two, f"host reads grow with the steps between logs: {two} vs {six}"
    assert len(six) <= 2, six  # one read of the summed terms per logged/checkpointed step


def self_conditioned():
    torch.manual_seed(0)
    return CIMD(tiny("cimd_aa").model_copy(update={"self_condition": True}), image_channels=1)


def test_self_conditioning_draws_its_coin_without_a_host_read(data, tmp_path, device_batches):  # noqa: F811
    two, six = (host_reads(device_batches, data, tmp_path, steps, self_conditioned) for steps in (2, 6))
    assert six == two and len(six) <= 2, f"host reads: {two} in 2 steps, {six} in 6"


def test_draws_of_the_model_generator_count_as_device_tensors():
    generator = torch.Generator().manual_seed(1)
    with DeviceDraws():
        coin = torch.rand((1,), generator=generator)
        index = torch.randint(0, 5, (3,), generator=torch.Generator().manual_seed(loop.index_seed(0)))
    assert type(coin) is DeviceTensor and type(index) is torch.Tensor


def test_a_nan_loss_is_caught_at_the_next_read_naming_the_steps(data, tmp_path):  # noqa: F811
    net = fresh()
    with torch.no_grad():
        for p in net.denoiser.parameters():
            p.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"became nan \(summed\) between steps 1 and 3; no checkpoint"):
        train(net, data, params(max_steps=6, log_every=3, checkpoint_every=6), tmp_path / "last.pt", "fp")
    assert not (tmp_path / "last.pt").exists()
