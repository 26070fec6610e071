"""The BatchNorm-apply + activation epilogue of the unified operator, forward and backward.

Forward:  out = act(z),  z = y * scale[c] + shift[c]  with scale = gamma * invstd, shift = beta - mean * scale.
Backward (training-mode BN, M = N * H * W values per channel, xhat = (y - mean) * invstd):
    g_z     = act'(z) * g_out
    g_beta  = sum(g_z),  g_gamma = sum(g_z * xhat)
    g_y     = gamma * invstd * (g_z - g_beta / M - xhat * g_gamma / M)
            = a[c] * g_z + b[c] * y + d[c]      (per-channel coefficients, computed from the two sums)
The Triton backward is two kernels: a per-channel reduction of the two sums, then one elementwise pass writing
g_y. z is recomputed from y in both (one FMA), so nothing but y is read from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton
from kernels.activations import IDENTITY, Activation
from kernels.bn_stats import channel_stats_triton


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _act_bwd(g, z, ACT: tl.constexpr):
    if ACT == 1:
        g = tl.where(z > 0.0, g, 0.0)
    elif ACT == 2:
        g = tl.where((z > 0.0) & (z < 6.0), g, 0.0)
    elif ACT == 3:
        s = tl.sigmoid(z)
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _bn_act_fwd_kernel(
    y_ptr,  # (N, C, HW) contiguous conv output
    out_ptr,  # (N, C, HW) output, dtype of y
    scale_ptr,  # (C,) fp32 gamma * invstd
    shift_ptr,  # (C,) fp32 beta - mean * scale
    numel,  # N * C * HW
    C,  # channels
    HW,  # spatial size
    ACT: tl.constexpr,  # activation code, see kernels/activations.py
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // HW) % C
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _act_fwd(z, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    g_ptr,  # (N, C, HW) grad of the output
    y_ptr,  # (N, C, HW) conv output
    scale_ptr,  # (C,) fp32
    shift_ptr,  # (C,) fp32
    mean_ptr,  # (C,) fp32 batch mean
    sum_gz_ptr,  # (SPLIT, C) fp32 out: partial sum of g_z
    sum_gzy_ptr,  # (SPLIT, C) fp32 out: partial sum of g_z * (y - mean)
    N,
    C,
    HW,
    ACT: tl.constexpr,
    SPLIT: tl.constexpr,  # programs per channel along N
    BLOCK: tl.constexpr,  # spatial elements per load
):
    c = tl.program_id(0)
    s = tl.program_id(1)
    scale = tl.load(scale_ptr + c)
    shift = tl.load(shift_ptr + c)
    mean = tl.load(mean_ptr + c)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_y = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(s, N, SPLIT):
        base = (n * C + c) * HW
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HW
            y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            gz = _act_bwd(g, y * scale + shift, ACT)
            gz = tl.where(mask, gz, 0.0)
            acc += gz
            acc_y += gz * (y - mean)
    tl.store(sum_gz_ptr + s * C + c, tl.sum(acc, axis=0))
    tl.store(sum_gzy_ptr + s * C + c, tl.sum(acc_y, axis=0))


@triton.jit
def _bn_act_bwd_apply_kernel(
    g_ptr,  # (N, C, HW) grad of the output
    y_ptr,  # (N, C, HW) conv output
    gy_ptr,  # (N, C, HW) out: grad of y
    scale_ptr,  # (C,) fp32
    shift_ptr,  # (C,) fp32
    a_ptr,  # (C,) fp32 coefficient of g_z
    b_ptr,  # (C,) fp32 coefficient of y
    d_ptr,  # (C,) fp32 constant
    numel,
    C,
    HW,
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // HW) % C
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = y * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
    gz = _act_bwd(g, z, ACT)
    a = tl.load(a_ptr + c, mask=mask, other=0.0)
    b = tl.load(b_ptr + c, mask=mask, other=0.0)
    d = tl.load(d_ptr + c, mask=mask, other=0.0)
    tl.store(gy_ptr + offs, (a * gz + b * y + d).to(gy_ptr.dtype.element_ty), mask=mask)


def _scale_shift(gamma, beta, mean, invstd):
    scale = gamma.to(mean.dtype) * invstd
    return scale, beta.to(mean.dtype) - mean * scale


def bn_act_forward_triton(y, gamma, beta, mean, invstd, act: Activation, block: int = 1024):
    assert y.dim() == 4 and y.is_contiguous(), "expects a contiguous (N, C, H, W) tensor"
    n, c, h, w = y.shape
    scale, shift = _scale_shift(gamma, beta, mean, invstd)
    out = torch.empty_like(y)
    grid = lambda meta: (triton.cdiv(y.numel(), meta["BLOCK"]),)
    _bn_act_fwd_kernel[grid](y, out, scale, shift, y.numel(), c, h * w, ACT=act.code, BLOCK=block)
    return out


def bn_act_forward_reference(y, gamma, beta, mean, invstd, act: Activation):
    """PyTorch reference (and CPU path): act(y * scale + shift), in y's dtype."""
    scale, shift = _scale_shift(gamma, beta, mean, invstd)
    c = y.shape[1]
    z = torch.addcmul(shift.view(1, c, 1, 1), y, scale.view(1, c, 1, 1)).to(y.dtype)
    return act.forward(z)


def bn_act_forward(y, gamma, beta, mean, invstd, act: Activation) -> torch.Tensor:
    """out = act((y - mean) * invstd * gamma + beta) for a (N, C, H, W) y and per-channel fp32 vectors."""
    if use_triton(y):
        return bn_act_forward_triton(y.contiguous(), gamma, beta, mean, invstd, act)
    return bn_act_forward_reference(y, gamma, beta, mean, invstd, act)


def bn_act_train_forward(
    y, gamma, beta, running_mean, running_var, momentum: float, eps: float, act: Activation
):
    """Training-mode BN + activation: (out, batch mean, batch invstd); updates running stats in place (given).

    Triton: the statistics kernel, then the epilogue kernel. Reference (CPU): aten's fused batch-norm forward
    (statistics, normalization and running-stat update in one call) and the activation in place on its output.
    """
    if use_triton(y):
        y = y.contiguous()
        mean, var = channel_stats_triton(y)
        invstd = torch.rsqrt(var + eps)
        out = bn_act_forward_triton(y, gamma, beta, mean, invstd, act)
        if running_mean is not None:
            count = y.numel() // y.shape[1]
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * (count / max(count - 1, 1))).to(running_var.dtype), momentum)
        return out, mean, invstd
    out, mean, invstd = torch.ops.aten.native_batch_norm(
        y, gamma, beta, running_mean, running_var, True, momentum, eps
    )
    return act.forward_(out), mean, invstd


def _grad_coefficients(gamma, invstd, mean, sum_gz, sum_gzy, count):
    """Per-channel (a, b, d) with g_y = a * g_z + b * y + d; also g_gamma = sum(g_z * xhat), g_beta."""
    g_gamma = sum_gzy * invstd
    a = gamma.to(invstd.dtype) * invstd
    b = -a * invstd * g_gamma / count
    d = -b * mean - a * sum_gz / count
    return a, b, d, g_gamma, sum_gz


def bn_act_backward_triton(g_out, y, gamma, beta, mean, invstd, act: Activation, split=None, block=1024):
    assert y.dim() == 4 and y.is_contiguous() and g_out.is_contiguous()
    n, c, h, w = y.shape
    hw = h * w
    if split is None:
        split = max(1, min(n, 4096 // max(c, 1)))
    scale, shift = _scale_shift(gamma, beta, mean, invstd)
    sum_gz = torch.empty((split, c), device=y.device, dtype=torch.float32)
    sum_gzy = torch.empty_like(sum_gz)
    rblock = min(block, triton.next_power_of_2(hw))
    _bn_act_bwd_reduce_kernel[(c, split)](
        g_out, y, scale, shift, mean, sum_gz, sum_gzy, n, c, hw, ACT=act.code, SPLIT=split, BLOCK=rblock
    )
    a, b, d, g_gamma, g_beta = _grad_coefficients(gamma, invstd, mean, sum_gz.sum(0), sum_gzy.sum(0), n * hw)
    g_y = torch.empty_like(y)
    grid = lambda meta: (triton.cdiv(y.numel(), meta["BLOCK"]),)
    _bn_act_bwd_apply_kernel[grid](
        g_out, y, g_y, scale, shift, a, b, d, y.numel(), c, hw, ACT=act.code, BLOCK=block
    )
    return g_y, g_gamma, g_beta


def bn_act_backward_reference(g_out, y, gamma, beta, mean, invstd, act: Activation):
    """PyTorch reference (and CPU path). The BN part is aten's fused batch-norm backward, which computes
    exactly the formula in the module docstring in two passes over memory."""
    if act is IDENTITY:  # no pre-activation needed: skip recomputing it (one pass over memory less)
        g_z = g_out
    else:
        g_z = act.backward(g_out, bn_act_forward_reference(y, gamma, beta, mean, invstd, IDENTITY))
    g_y, g_gamma, g_beta = torch.ops.aten.native_batch_norm_backward(
        g_z, y, gamma, None, None, mean, invstd, True, 0.0, [True, True, True]
    )
    return g_y, g_gamma, g_beta


def bn_act_backward(g_out, y, gamma, beta, mean, invstd, act: Activation):
    """(g_y, g_gamma, g_beta) of out = act(BN_train(y)) given the batch mean/invstd used in forward."""
    if use_triton(y):
        return bn_act_backward_triton(g_out.contiguous(), y.contiguous(), gamma, beta, mean, invstd, act)
    return bn_act_backward_reference(g_out, y, gamma, beta, mean, invstd, act)
