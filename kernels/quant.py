"""Symmetric quantize / dequantize to int8 or fp8 (e4m3), one scale per channel (row) or per tensor.

A tensor is viewed as rows (R, K): per channel, R = dim 0 (output channels of a conv/linear weight); per
tensor, R = 1. For each row, scale = amax(|x|) / QMAX (QMAX = 127 for int8, 448 for e4m3; scale = 1 for an
all-zero row) unless a scale is given, and
    int8: q = clamp(round_half_even(x / scale), -127, 127)        (symmetric: -128 is never used)
    fp8:  q = e4m3(clamp(x / scale, -448, 448))                      (round to nearest even on the e4m3 grid)
    dequantize: x' = q * scale, in fp32.
The Triton kernels compute the e4m3 rounding arithmetically (exponent from log2, then rounding to a step of
2^(e-3), subnormal step 2^-9), so they need no fp8 load/store and run under TRITON_INTERPRET; the reference
uses torch's own float8_e4m3fn cast, so the tests check the arithmetic against the real format.

`fake_quantize` = dequantize(quantize(x)) with a straight-through gradient (QAT, FP8 emulation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._dispatch import use_triton

QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
_FMT = {torch.int8: 0, torch.float8_e4m3fn: 1}


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _to_grid(v, FMT: tl.constexpr):
    # v: scaled and clamped values; returns the nearest grid value (an integer, or an e4m3 number)
    if FMT == 0:
        return _round_half_even(v)
    a = tl.abs(v)
    am = tl.maximum(a, 0.015625)  # 2^-6, the smallest normal: below it the step is constant (subnormals)
    e = tl.floor(tl.log2(am))
    e = tl.where(tl.exp2(e) > am, e - 1.0, e)  # log2 may be off by one ulp at powers of two
    e = tl.where(tl.exp2(e + 1.0) <= am, e + 1.0, e)
    step = tl.exp2(e - 3.0)  # 3 mantissa bits
    r = _round_half_even(a / step) * step
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_rows_kernel(
    x_ptr,  # (R, K) contiguous input, any float dtype
    q_ptr,  # (R, K) out: int8 values, or fp32 holding e4m3 grid values (cast exactly by the wrapper)
    scale_ptr,  # (R,) fp32: out when computed, in when HAS_SCALE
    K,  # row length
    QMAX: tl.constexpr,  # 127.0 or 448.0
    FMT: tl.constexpr,  # 0 = int8, 1 = fp8 e4m3
    HAS_SCALE: tl.constexpr,  # scale given (static, e.g. calibrated activations) instead of amax / QMAX
    BLOCK: tl.constexpr,  # elements per load
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * K
    if HAS_SCALE:
        scale = tl.load(scale_ptr + row)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + base + offs, mask=offs < K, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.where(amax > 0.0, amax / QMAX, 1.0)
        tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(q_ptr + base + offs, _to_grid(v, FMT).to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_rows_kernel(
    q_ptr,  # (R, K) int8, or the uint8 bytes of float8_e4m3fn
    scale_ptr,  # (R,) fp32
    out_ptr,  # (R, K) fp32 out
    K,  # row length
    FMT: tl.constexpr,  # 0 = int8, 1 = fp8 e4m3
    BLOCK: tl.constexpr,  # elements per program
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    base = row.to(tl.int64) * K
    q = tl.load(q_ptr + base + offs, mask=mask, other=0)
    if FMT == 0:
        v = q.to(tl.float32)
    else:  # e4m3fn bits: s eeee mmm, bias 7; e = 0 subnormal (m * 2^-9); s 1111 111 is NaN; no infinities
        b = q.to(tl.int32) & 0xFF
        ex = (b >> 3) & 15
        man = (b & 7).to(tl.float32)
        v = tl.where(ex == 0, man * 0.001953125, (8.0 + man) * tl.exp2(ex.to(tl.float32) - 10.0))
        v = tl.where((b >> 7) == 1, -v, v)
        v = tl.where((ex == 15) & ((b & 7) == 7), float("nan"), v)
    tl.store(out_ptr + base + offs, v * tl.load(scale_ptr + row), mask=mask)


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return x.reshape(x.shape[0] if per_channel and x.dim() > 0 else 1, -1)


def _check(x: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype not in QMAX:
        raise ValueError(f"dtype must be torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x must not be empty")


def quantize_triton(x, dtype, per_channel=True, scale=None, block: int = 1024):
    _check(x, dtype)
    has_scale = scale is not None
    # A given per-tensor scale needs no reduction: split the rows anyway so that programs run in parallel.
    rows = _rows(x.contiguous(), per_channel or (has_scale and scale.numel() == 1))
    r, k = rows.shape
    row_scale = (
        scale.to(device=x.device, dtype=torch.float32).reshape(-1).expand(r).contiguous()
        if has_scale
        else torch.empty(r, device=x.device, dtype=torch.float32)
    )
    q = torch.empty_like(rows, dtype=torch.int8 if dtype == torch.int8 else torch.float32)
    block = min(block, triton.next_power_of_2(k))
    _quantize_rows_kernel[(r,)](
        rows, q, row_scale, k, QMAX=QMAX[dtype], FMT=_FMT[dtype], HAS_SCALE=has_scale, BLOCK=block
    )
    out_scale = row_scale if not has_scale or per_channel else row_scale[:1]
    return q.to(dtype).reshape(x.shape), out_scale


def quantize_reference(x, dtype, per_channel=True, scale=None):
    """PyTorch reference (and CPU path); see the module docstring for the formula."""
    _check(x, dtype)
    rows = _rows(x, per_channel).float()
    qmax = QMAX[dtype]
    if scale is None:
        amax = rows.abs().amax(1)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    else:
        scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1).expand(rows.shape[0]).contiguous()
    v = (rows / scale[:, None]).clamp(-qmax, qmax)
    q = v.round() if dtype == torch.int8 else v
    return q.to(dtype).reshape(x.shape), scale


def quantize(
    x: torch.Tensor, dtype: torch.dtype, per_channel: bool = True, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q of `dtype` (torch.int8 or torch.float8_e4m3fn) with x's shape, scale fp32 of shape (C,)
    per channel (dim 0) or (1,) per tensor; x ~= q * scale. A given `scale` (one per row) is used as is."""
    if use_triton(x):
        return quantize_triton(x, dtype, per_channel, scale)
    return quantize_reference(x, dtype, per_channel, scale)


def dequantize_triton(q, scale, block: int = 1024):
    assert q.dtype in _FMT, f"q must be int8 or float8_e4m3fn, got {q.dtype}"
    rows = q.contiguous().reshape(scale.numel(), -1)
    raw = rows if q.dtype == torch.int8 else rows.view(torch.uint8)
    r, k = rows.shape
    out = torch.empty((r, k), device=q.device, dtype=torch.float32)
    block = min(block, triton.next_power_of_2(k))
    grid = lambda meta: (r, triton.cdiv(k, meta["BLOCK"]))
    _dequantize_rows_kernel[grid](raw, scale.float().contiguous(), out, k, FMT=_FMT[q.dtype], BLOCK=block)
    return out.reshape(q.shape)


def dequantize_reference(q, scale):
    """PyTorch reference (and CPU path): q * scale in fp32, one scale per row of q."""
    rows = q.reshape(scale.numel(), -1).to(torch.float32)
    return (rows * scale.float()[:, None]).reshape(q.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 q * scale, with one scale per row (scale of shape (C,) per channel, (1,) per tensor)."""
    if q.dtype not in _FMT:
        raise TypeError(f"q must be torch.int8 or torch.float8_e4m3fn, got {q.dtype}")
    if scale.numel() not in (1, q.shape[0] if q.dim() else 1):
        raise ValueError(f"scale must have 1 or {q.shape[0]} entries, got {scale.numel()}")
    if use_triton(q):
        return dequantize_triton(q, scale)
    return dequantize_reference(q, scale)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, per_channel, scale):
        q, s = quantize(x.detach(), dtype, per_channel, scale)
        return dequantize(q, s).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None, None, None  # straight-through: d fake_quant(x) / dx := 1


def fake_quantize(
    x: torch.Tensor, dtype: torch.dtype, per_channel: bool = True, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, differentiable with a straight-through gradient."""
    return _FakeQuantSTE.apply(x, dtype, per_channel, scale)
