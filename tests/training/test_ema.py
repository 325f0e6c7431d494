import copy

import pytest
import torch
from torch import nn

from cimd_pipeline.training.ema import EMA


class WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)  # float running stats and an integer batch counter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def per_tensor_reference(shadow: nn.Module, live: nn.Module, decay: float) -> None:
    """The textbook update, one tensor at a time."""
    for s, w in zip(shadow.state_dict().values(), live.state_dict().values()):
        if s.dtype.is_floating_point:
            s.mul_(decay).add_(w, alpha=1 - decay)
        else:
            s.copy_(w)


@pytest.mark.parametrize("warmup", [True, False])
def test_update_equals_the_per_tensor_formula_bit_for_bit(warmup):
    torch.manual_seed(0)
    model = WithBuffers()
    ema = EMA(model, decay=0.999, warmup=warmup)
    reference = copy.deepcopy(ema.shadow)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        model(torch.randn(3, 2, 8, 8)).square().mean().backward()
        optimiser.step()
        optimiser.zero_grad()
        ema.update(model, step)
        with torch.no_grad():
            per_tensor_reference(reference, model, ema.current_decay(step))
    for (name, value), expected in zip(ema.shadow.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name
    assert int(ema.shadow.norm.num_batches_tracked) == 5
    assert not torch.equal(ema.shadow.conv.weight, model.conv.weight)  # an average, not a copy


def test_warmup_decay_grows_towards_the_configured_decay():
    ema = EMA(nn.Linear(2, 2), decay=0.9999, warmup=True)
    assert ema.current_decay(0) == pytest.approx(0.1)
    assert ema.current_decay(10**7) == 0.9999
    assert EMA(nn.Linear(2, 2), decay=0.9999, warmup=False).current_decay(0) == 0.9999
