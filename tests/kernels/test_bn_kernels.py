"""Triton kernels of the unified operator against their PyTorch references (interpreter on CPU, real on CUDA)."""

from __future__ import annotations

import pytest
import torch

from kernels.activations import ACTIVATIONS
from kernels.bn_act import (
    bn_act_backward_reference,
    bn_act_backward_triton,
    bn_act_forward_reference,
    bn_act_forward_triton,
)
from kernels.bn_stats import channel_stats_reference, channel_stats_triton

SHAPES = [(3, 5, 7, 9), (2, 4, 16, 16)]  # odd spatial size (masking), and a block-multiple one


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    y = (torch.randn(shape, generator=g) * 2 + torch.arange(c).view(1, c, 1, 1)).to(device)
    gamma = (torch.rand(c, generator=g) + 0.5).to(device)
    beta = torch.randn(c, generator=g).to(device)
    g_out = torch.randn(shape, generator=g).to(device)
    return y, gamma, beta, g_out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("split", [1, 2])
def test_channel_stats(shape, split, device):
    y, *_ = _inputs(shape, device)
    mean, var = channel_stats_triton(y, split=split, block=64)
    mean_ref, var_ref = channel_stats_reference(y)
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var, var_ref, atol=1e-5, rtol=1e-5)


def test_channel_stats_large_offset_is_stable(device):
    """Values around 1e4 with unit spread: naive E[y^2] - E[y]^2 in fp32 would lose the variance."""
    y, *_ = _inputs((2, 3, 8, 8), device)
    y = y + 1e4
    _, var = channel_stats_triton(y, block=64)
    _, var_ref = channel_stats_reference(y.double())
    torch.testing.assert_close(var, var_ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bn_act_forward(shape, act, device):
    y, gamma, beta, _ = _inputs(shape, device)
    mean, var = channel_stats_reference(y)
    invstd = torch.rsqrt(var + 1e-5)
    a = ACTIVATIONS[act]
    out = bn_act_forward_triton(y, gamma, beta, mean, invstd, a, block=256)
    torch.testing.assert_close(
        out, bn_act_forward_reference(y, gamma, beta, mean, invstd, a), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_bn_act_backward(shape, act, device):
    y, gamma, beta, g_out = _inputs(shape, device)
    mean, var = channel_stats_reference(y)
    invstd = torch.rsqrt(var + 1e-5)
    a = ACTIVATIONS[act]
    got = bn_act_backward_triton(g_out, y, gamma, beta, mean, invstd, a, split=2, block=256)
    want = bn_act_backward_reference(g_out, y, gamma, beta, mean, invstd, a)
    for name, x, r in zip(("g_y", "g_gamma", "g_beta"), got, want):
        torch.testing.assert_close(x, r, atol=1e-4, rtol=1e-4, msg=name)


def test_bn_act_backward_reference_matches_autograd():
    """The reference itself against autograd through F.batch_norm + activation (float64)."""
    y, gamma, beta, g_out = (t.double() for t in _inputs((3, 4, 5, 5), "cpu"))
    for a in ACTIVATIONS.values():
        y_ = y.clone().requires_grad_()
        gm, bt = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        out = a.forward(torch.nn.functional.batch_norm(y_, None, None, gm, bt, training=True, eps=1e-5))
        out.backward(g_out)
        var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
        got = bn_act_backward_reference(g_out, y, gamma, beta, mean, torch.rsqrt(var + 1e-5), a)
        torch.testing.assert_close(got[0], y_.grad)
        torch.testing.assert_close(got[1], gm.grad)
        torch.testing.assert_close(got[2], bt.grad)
