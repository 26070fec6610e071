"""Exact parameter and multiply-accumulate counts, by construction rather than by a profiler.

Counted: every parameter (`numel` of `model.parameters()`, BN affine included, running statistics excluded
since they are buffers); MACs of convolutions and linear layers for ONE sample, measured on the shapes a
forward pass actually sees: conv = (C_out * H_out * W_out) * (C_in / groups) * k_h * k_w (+0 for the bias),
linear = out_features * in_features. BatchNorm is not counted (folded into the conv at inference), nor are
activations, residual adds and pooling (no multiplies worth a MAC; the usual convention, as in Torch-Pruning
and fvcore).

Works on `ConvBNAct` (whose forward never calls its `conv` submodule: its conv geometry is read from it)
and on plain `nn.Conv2d`/`nn.Linear`, so it counts fp32, pruned and BN-folded models alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(conv: nn.Conv2d, out: torch.Tensor) -> int:
    # out: (1, C_out, H_out, W_out)
    k = math.prod(conv.kernel_size)
    return out[0].numel() * (conv.in_channels // conv.groups) * k


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of convs and linears for one sample of shape `input_shape` (C, H, W), see the module docstring."""
    if len(input_shape) != 3 or any(not isinstance(v, int) or v < 1 for v in input_shape):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {input_shape!r}")
    total = 0
    hooked: list[torch.utils.hooks.RemovableHandle] = []
    inner_convs = {id(m.conv) for m in model.modules() if isinstance(m, ConvBNAct)}

    def hook(module: nn.Module, args, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, ConvBNAct):
            total += _conv_macs(module.conv, out)
        elif isinstance(module, nn.Conv2d):
            total += _conv_macs(module, out)
        else:  # nn.Linear, out: (1, ..., out_features)
            total += out[0].numel() * module.in_features

    for m in model.modules():
        if isinstance(m, ConvBNAct | nn.Linear) or (isinstance(m, nn.Conv2d) and id(m) not in inner_convs):
            hooked.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    finally:
        for h in hooked:
            h.remove()
        model.train(was_training)
    return total
