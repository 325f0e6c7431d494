import pytest
import torch

from cimd_pipeline.config import ModelParams, validate_parameters
from cimd_pipeline.errors import ConfigError
from cimd_pipeline.models import draws
from cimd_pipeline.models.trained import build_model
from cimd_pipeline.training.dropout import add_dropout
from cimd_pipeline.training.fingerprint import data_digest, run_fingerprint
from cimd_pipeline.training.loop import train
from tests.models.test_cimd import TINY_UNET
from tests.training.test_loop import assert_resumes_exactly_and_changes_the_run, data, fresh, params  # noqa: F401


def trained_looking():
    """A tiny CIMD whose zero-initialised convolutions are filled in, so every block's conv2 (where
    dropout acts) changes the output."""
    net = fresh()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def inputs(n=6):
    torch.manual_seed(2)
    return torch.randn(n, 1, 16, 16), torch.randn(n, 1, 16, 16), torch.randint(0, 1000, (n,))


def test_dropout_zeroes_the_chosen_share_of_each_conv2_input_scales_the_rest_and_only_while_training():
    net = trained_looking()
    x_t, image, t = inputs()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.eval()
    plain_eval = net.denoiser(x_t, image, t)
    net.train()
    plain_train = net.denoiser(x_t, image, t)
    convs = [m.conv2 for m in net.denoiser.modules() if type(m).__name__ == "DiffusionUNetResnetBlock"]
    # down: 1 per level; middle: 2; up: 2 per level (num_res_blocks + 1)
    assert len(convs) == len(TINY_UNET["channels"]) * (2 * TINY_UNET["num_res_blocks"] + 1) + 2
    seen_plain = [convs[0].register_forward_pre_hook(lambda m, a: seen_plain.append(a[0].clone()))]
    net.denoiser(x_t, image, t)
    seen_plain[0].remove()
    plain_hidden = seen_plain[1]

    hooks = add_dropout(net, 0.3, torch.Generator().manual_seed(5))
    seen = []
    spy = convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))  # runs after dropout's
    dropped_train = net.denoiser(x_t, image, t)
    dropped = seen[0]
    zero = dropped == 0
    assert 0.25 < zero.float().mean().item() < 0.35  # the rate, on 6 x 16 x 16 x 16 values
    assert torch.allclose(dropped[~zero], plain_hidden[~zero] / 0.7, atol=1e-6)
    assert not torch.allclose(dropped_train, plain_train, atol=1e-3)
    net.eval()
    assert torch.equal(net.denoiser(x_t, image, t), plain_eval)  # sampling never drops
    net.train()
    spy.remove()
    for hook in hooks:
        hook.remove()
    assert torch.equal(net.denoiser(x_t, image, t), plain_train)
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_the_masks_come_from_the_generator_and_follow_the_batch_share():
    net = trained_looking().train()
    x_t, image, t = inputs()
    runs = []
    for seed in (5, 5, 6):
        hooks = add_dropout(net, 0.5, torch.Generator().manual_seed(seed))
        runs.append(net.denoiser(x_t, image, t))
        for hook in hooks:
            hook.remove()
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    # a process holding rows 2:4 of the 6 draws what the one process drew for those rows
    hooks = add_dropout(net, 0.5, torch.Generator().manual_seed(5))
    with draws.batch_share(2, 4, 6):
        share = net.denoiser(x_t[2:4], image[2:4], t[2:4])
    assert torch.allclose(share, runs[0][2:4], atol=1e-5)
    for hook in hooks:
        hook.remove()


def test_training_with_dropout_resumes_exactly_and_differs_from_training_without(data, tmp_path):  # noqa: F811
    net = fresh()
    full = train(net, data, params(dropout=0.2), tmp_path / "a" / "last.pt", "fp")
    # the hooks are gone after the run: the caller's network is the plain one again
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert_resumes_exactly_and_changes_the_run(full, data, tmp_path, dropout=0.2)


def test_dropout_is_part_of_the_fingerprint_only_when_set_and_refused_where_it_cannot_act(data):  # noqa: F811
    model, digest = {"variant": "cimd_aa"}, data_digest(data)
    assert len({run_fingerprint(model, params(**kw), digest) for kw in ({}, {"dropout": 0.1}, {"dropout": 0.3})}) == 3
    assert run_fingerprint(model, params(dropout=0.0), digest) == run_fingerprint(model, params(), digest)
    with pytest.raises(ValueError, match="dropout"):
        params(dropout=1.0)
    with pytest.raises(ValueError, match="ProbUNet has none"):
        baseline = ModelParams.model_validate({"variant": "prob_unet", "baselines": {"filters": [8, 16], "num_convs": 1}})
        add_dropout(build_model(baseline, 1), 0.1, torch.Generator())
    with pytest.raises(ConfigError, match="training.dropout: acts in the diffusion U-Net's residual blocks, which prob_unet"):
        validate_parameters({"model": {"variant": "prob_unet"}, "training": {"dropout": 0.1}})
