"""int8/fp8 quantize and dequantize: Triton kernels (interpreter on CPU) against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from kernels.quant import (
    QMAX,
    dequantize,
    dequantize_reference,
    dequantize_triton,
    fake_quantize,
    quantize,
    quantize_reference,
    quantize_triton,
)

DTYPES = [torch.int8, torch.float8_e4m3fn]
SHAPES = [(5, 37), (16, 8, 3, 3)]  # odd row length (masking), a conv weight


def _x(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different range
    scales = torch.logspace(-3, 1, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    return (torch.randn(shape, generator=g) * scales).to(device)


def _sqnr_db(x, y):
    return 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_quantize_kernel_matches_reference(dtype, shape, per_channel, device):
    x = _x(shape, device)
    q, s = quantize_triton(x, dtype, per_channel, block=16)  # small block: several loads per row
    q_ref, s_ref = quantize_reference(x, dtype, per_channel)
    assert q.dtype == dtype and q.shape == x.shape and s.shape == (shape[0] if per_channel else 1,)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["int8", "fp8"])
def test_given_scale_and_ties(dtype, device):
    # Halfway values must round to even, exactly like torch: int8 ties at k + 0.5, e4m3 ties between grid
    # points.
    scale = torch.tensor([1.0], device=device)
    x = torch.tensor([[0.5, 1.5, 2.5, -2.5, 126.5, 300.0, -1000.0, 9.0, 17.0, 0.0068359375]], device=device)
    q, _ = quantize_triton(x, dtype, per_channel=False, scale=scale)
    q_ref, _ = quantize_reference(x, dtype, per_channel=False, scale=scale)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)
    assert q.float().abs().max().item() <= QMAX[dtype]
    rows = torch.cat([x, -x, 2 * x])  # a given per-tensor scale on several rows (run as parallel programs)
    q3, s3 = quantize_triton(rows, dtype, per_channel=False, scale=scale)
    q3_ref, s3_ref = quantize_reference(rows, dtype, per_channel=False, scale=scale)
    assert s3.shape == s3_ref.shape == (1,)
    torch.testing.assert_close(q3.float(), q3_ref.float(), rtol=0, atol=0)


def test_fp8_dequantize_kernel_decodes_every_code(device):
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(16, 16).to(device)
    scale = torch.linspace(0.5, 2.0, 16, device=device)
    torch.testing.assert_close(
        dequantize_triton(codes, scale), dequantize_reference(codes, scale), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_dequantize_kernel_matches_reference(shape, device):
    q, s = quantize_reference(_x(shape, device), torch.int8)
    torch.testing.assert_close(dequantize_triton(q, s, block=16), dequantize_reference(q, s), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("dtype", "floor_db"), [(torch.int8, 38.0), (torch.float8_e4m3fn, 28.0)], ids=["int8", "fp8"]
)
def test_round_trip_error_floor(dtype, floor_db, device):
    # Per-channel scales keep every row's SQNR high even though the rows differ in range by 10^4; per tensor,
    # the small rows are crushed (int8) - the reason conv weights are quantized per output channel.
    x = _x((64, 288), device)
    q, s = quantize(x, dtype, per_channel=True)
    y = dequantize(q, s)
    worst = min(_sqnr_db(x[i], y[i]) for i in range(len(x)))
    assert worst > floor_db
    if dtype == torch.int8:
        assert (x - y).abs().le(s[:, None] / 2 + 1e-12).all()  # |error| <= half a step
        qt, st = quantize(x, dtype, per_channel=False)
        assert _sqnr_db(x[0], dequantize(qt, st)[0]) < 1.0  # smallest row: rounded to 0


def test_quantize_is_idempotent_on_its_own_grid(device):
    q, s = quantize(_x((8, 50), device), torch.int8)
    q2, s2 = quantize(dequantize(q, s), torch.int8, scale=s)
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_fake_quantize_straight_through_gradient(device):
    x = _x((4, 9), device).requires_grad_()
    y = fake_quantize(x, torch.int8)
    y.backward(torch.arange(36.0, device=device).view(4, 9))
    torch.testing.assert_close(x.grad, torch.arange(36.0, device=device).view(4, 9))
    assert torch.equal(y.detach(), dequantize(*quantize(x.detach(), torch.int8)))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="dtype must be"):
        quantize(torch.randn(3, 3), torch.float16)
    with pytest.raises(TypeError, match="floating-point"):
        quantize(torch.ones(3, 3, dtype=torch.int32), torch.int8)
    with pytest.raises(ValueError, match="scale must have"):
        dequantize(torch.zeros(4, 2, dtype=torch.int8), torch.ones(3))
