from torch import nn

from cimd_pipeline.training.model_flops import training_step_flops
from tests.training.test_loop import data, fresh  # noqa: F401  (data is a fixture)


class LinearSegmenter(nn.Module):
    """A loss whose FLOPs have a closed form: one (B, H*W) @ (H*W, H*W) product without bias."""

    def __init__(self, pixels: int):
        super().__init__()
        self.linear = nn.Linear(pixels, pixels, bias=False)

    def losses(self, image, masks, valid, generator):
        out = self.linear(image[:, 0].flatten(1))
        return {"loss": (out - masks[:, 0].flatten(1).float()).square().mean()}


def test_counts_forward_and_backward_of_the_loss_in_closed_form(data):
    pixels = data.images.shape[-1] * data.images.shape[-2]
    flops = training_step_flops(LinearSegmenter(pixels), data, batch_size=4)
    # forward B*P*P multiply-adds, backward the same again for the weight gradient (the image
    # needs none), 2 FLOPs each
    assert flops == 2 * 2 * 4 * pixels * pixels


def test_cimd_step_flops_grow_with_the_batch_and_leave_no_gradients(data):
    net = fresh()
    small, large = training_step_flops(net, data, 2), training_step_flops(net, data, 4)
    assert small > 0 and large == 2 * small
    assert all(p.grad is None for p in net.parameters())
