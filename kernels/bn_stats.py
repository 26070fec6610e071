"""Per-channel batch statistics of an NCHW tensor: mean and biased variance over (N, H, W).

The Triton kernel runs a (C, SPLIT) grid: program (c, s) sums rows n = s, s+SPLIT, ... of channel c, shifted by
the channel's first value (a cheap guard against cancellation in E[y^2] - E[y]^2); the SPLIT partial sums are
combined in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton


@triton.jit
def _channel_stats_kernel(
    y_ptr,  # (N, C, HW) contiguous input
    sum_ptr,  # (SPLIT, C) fp32 out: sum of (y - shift)
    sumsq_ptr,  # (SPLIT, C) fp32 out: sum of (y - shift)^2
    N,  # batch size
    C,  # channels
    HW,  # spatial size H * W
    SPLIT: tl.constexpr,  # programs per channel along N
    BLOCK: tl.constexpr,  # spatial elements per load
):
    c = tl.program_id(0)
    s = tl.program_id(1)
    shift = tl.load(y_ptr + c * HW).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(s, N, SPLIT):
        row = y_ptr + (n * C + c) * HW
        for start in range(0, HW, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < HW
            v = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.where(mask, v - shift, 0.0)
            acc += v
            acc_sq += v * v
    tl.store(sum_ptr + s * C + c, tl.sum(acc, axis=0))
    tl.store(sumsq_ptr + s * C + c, tl.sum(acc_sq, axis=0))


def channel_stats_triton(y: torch.Tensor, split: int | None = None, block: int = 1024):
    """Triton path of `channel_stats`; `split` programs per channel (default: enough to fill the GPU)."""
    assert y.dim() == 4 and y.is_contiguous(), "expects a contiguous (N, C, H, W) tensor"
    n, c, h, w = y.shape
    hw = h * w
    if split is None:
        split = max(1, min(n, 4096 // max(c, 1)))
    block = min(block, triton.next_power_of_2(hw))
    sums = torch.empty((split, c), device=y.device, dtype=torch.float32)
    sumsq = torch.empty_like(sums)
    _channel_stats_kernel[(c, split)](y, sums, sumsq, n, c, hw, SPLIT=split, BLOCK=block)
    count = n * hw
    shift = y[0, :, 0, 0].float()
    mean_shifted = sums.sum(0) / count
    var = (sumsq.sum(0) / count - mean_shifted * mean_shifted).clamp_min_(0.0)
    return mean_shifted + shift, var


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics: float64 for float64 data (gradcheck), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def channel_stats_reference(y: torch.Tensor):
    """PyTorch reference (and CPU path): per-channel mean and biased variance (fp64 for fp64 input, else fp32)."""
    var, mean = torch.var_mean(y.to(stat_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) of a (N, C, H, W) tensor, each of shape (C,) in `stat_dtype`."""
    if use_triton(y):
        return channel_stats_triton(y.contiguous())
    return channel_stats_reference(y)
