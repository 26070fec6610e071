"""2-bit block codec: wire format, exactness of every path against the reference, error feedback, quality."""

from __future__ import annotations

import pytest
import torch

from kernels import codec2bit as c

# Sizes: a lone block, a partial tail, several whole blocks, blocks not a power of two.
CASES = [(512, 512), (1000, 512), (5 * 512 + 37, 512), (999, 12), (4096, 2048), (37, 4)]


def _gaussian(n: int, seed: int = 0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).to(device)


def _reference(x: torch.Tensor, residual: torch.Tensor | None, block: int):
    return c.encode(x.cpu(), None if residual is None else residual.cpu(), block, compiled=False)


@pytest.mark.parametrize("n,block", CASES)
def test_payload_bytes_match_formula(n, block):
    payload, _ = c.encode(_gaussian(n), block=block, compiled=False)
    nb = -(-n // block)
    assert payload.dtype == torch.uint8
    assert payload.numel() == c.payload_nbytes(n, block) == nb * (4 + block // 4)


def test_wire_ratio_of_default_block():
    """The bytes encode actually emits (not the size formula): 2 bits a value plus one fp32 scale per 512."""
    n = 1 << 16
    payload, _ = c.encode(_gaussian(n), compiled=False)
    assert payload.numel() * payload.element_size() == n // 4 + 4 * (n // 512)
    assert 4 * n / (payload.numel() * payload.element_size()) >= 15
    assert c.decode(payload, n, compiled=False).numel() == n


def test_round_trip_exact_for_representable_values():
    # Each block holds only +-1 and +-0.25 (12-bit fixed point exact): the code carries them without loss.
    g = torch.Generator().manual_seed(1)
    n = 4 * 512
    mag = torch.where(torch.rand(n, generator=g) < 0.3, 1.0, 0.25)
    x = mag * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    payload, residual = c.encode(x, torch.zeros(n), compiled=False)
    assert torch.equal(c.decode(payload, n, compiled=False), x)
    assert torch.equal(residual, torch.zeros(n))


@pytest.mark.parametrize("n,block", CASES)
def test_error_feedback_identity_is_exact(n, block):
    x, old = _gaussian(n, 2), 0.1 * _gaussian(n, 3)
    payload, residual = c.encode(x, old, block, compiled=False)
    assert torch.equal(residual, x + old - c.decode(payload, n, block, compiled=False))


def test_decode_add_accumulates_exactly():
    n, block = 3 * 512 + 100, 512
    payload, _ = c.encode(_gaussian(n, 4), block=block, compiled=False)
    acc = _gaussian(n, 5)
    expected = acc + c.decode(payload, n, block, compiled=False)
    assert torch.equal(c.decode_add_(acc, payload, block, compiled=False), expected)


def test_error_floor_gaussian():
    # 4-level Lloyd-Max on a Gaussian reaches relative squared error 0.1175 (the 0.3 max split: 0.119);
    # sign with one scale per block gives 0.36.
    n = 256 * 512
    x = _gaussian(n, 6)
    payload, _ = c.encode(x, compiled=False)
    rel = ((c.decode(payload, n, compiled=False) - x) ** 2).sum() / (x**2).sum()
    assert 0.10 < rel.item() < 0.125


def test_residual_stays_bounded_under_a_persistent_signal():
    # A fixed direction plus noise, as gradients of consecutive steps: the residual must settle (a split at
    # 1.25 mean|v| lets it grow past 2.5x the signal within 100 steps; the max-anchored split keeps it ~0.6x).
    n = 5 * 512
    base = _gaussian(n, 20)
    residual = torch.zeros(n)
    norms = []
    for t in range(100):
        x = base + 0.5 * _gaussian(n, 200 + t)
        _, residual = c.encode(x, residual, compiled=False)
        norms.append(residual.norm().item())
    signal = (base.norm() ** 2 + 0.25 * n) ** 0.5
    assert max(norms[50:]) < 0.8 * signal
    assert max(norms[50:]) < 1.3 * max(norms[10:20])


def test_error_feedback_carries_what_was_dropped():
    # Over T steps: sum of decoded == sum of inputs - final residual, the residual stays bounded, and the
    # accumulated error is far below that of the same code without error feedback.
    n, steps = 8 * 512, 50
    residual = torch.zeros(n)
    sent = torch.zeros(n, dtype=torch.float64)
    sent_no_ef = torch.zeros(n, dtype=torch.float64)
    true = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        x = _gaussian(n, 100 + t) * 0.01 + 0.001
        payload, residual = c.encode(x, residual, compiled=False)
        sent += c.decode(payload, n, compiled=False).double()
        sent_no_ef += c.decode(c.encode(x, compiled=False)[0], n, compiled=False).double()
        true += x.double()
    torch.testing.assert_close(sent + residual.double(), true, rtol=0, atol=1e-5)
    assert residual.norm() < 2 * (0.01 * n**0.5)
    assert (sent - true).norm() < 0.2 * (sent_no_ef - true).norm()


def test_zero_and_nonfinite_blocks():
    n, block = 3 * 512, 512
    x = _gaussian(n, 7)
    x[:block] = 0.0
    x[block + 3] = float("inf")
    payload, residual = c.encode(x, compiled=False)
    out = c.decode(payload, n, compiled=False)
    assert torch.equal(out[:block], torch.zeros(block)) and torch.equal(residual[:block], torch.zeros(block))
    assert out[block : 2 * block].isnan().all()
    assert out[2 * block :].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_codes_its_fp32_value(dtype):
    x = _gaussian(1000, 8).to(dtype)
    assert torch.equal(c.encode(x, compiled=False)[0], c.encode(x.float(), compiled=False)[0])


@pytest.mark.parametrize("block", [0, 6, 2 * c.MAX_BLOCK, 5.0])
def test_bad_block_raises(block):
    with pytest.raises(ValueError, match="block must be a multiple of 4"):
        c.encode(torch.zeros(8), block=block)


def test_bad_residual_raises():
    with pytest.raises(ValueError, match="residual must be a contiguous torch.float32"):
        c.encode(torch.zeros(8), torch.zeros(8, dtype=torch.float16), block=4)
    with pytest.raises(ValueError, match="residual must be a contiguous torch.float32"):
        c.encode(torch.zeros(8), torch.zeros(9), block=4)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_cpu_path_is_bit_exact():
    # Several chunks of the compiled path and a partial tail; fresh outputs, given outputs and an in-place
    # residual update. One compile per process (~20-40 s cold).
    block = 512
    n = 2 * c._CHUNK_VALUES + 3 * block + 37
    x, old = _gaussian(n, 9), 0.1 * _gaussian(n, 10)
    ref_payload, ref_residual = _reference(x, old, block)
    payload, residual = c.encode(x, old, block)
    assert torch.equal(payload, ref_payload) and torch.equal(residual, ref_residual)
    in_place, payload_out = old.clone(), torch.empty_like(ref_payload)
    c.encode(x, in_place, block, residual_out=in_place, payload_out=payload_out)
    assert torch.equal(payload_out, ref_payload) and torch.equal(in_place, ref_residual)
    ref_out = c.decode(payload, n, block, compiled=False)
    assert torch.equal(c.decode(payload, n, block), ref_out)
    out = torch.empty(n)
    assert torch.equal(c.decode(payload, n, block, out=out), ref_out) and torch.equal(out, ref_out)
    acc = _gaussian(n, 11)
    expected = c.decode_add_(acc.clone(), payload, block, compiled=False)
    assert torch.equal(c.decode_add_(acc, payload, block), expected)


def test_in_place_residual_and_outputs_reference():
    n, block = 3 * 512 + 9, 512
    x, old = _gaussian(n, 16), 0.1 * _gaussian(n, 17)
    ref_payload, ref_residual = _reference(x, old, block)
    payload_out = torch.empty_like(ref_payload)
    payload, residual = c.encode(x, old, block, residual_out=old, payload_out=payload_out, compiled=False)
    assert payload is payload_out and residual.data_ptr() == old.data_ptr()
    assert torch.equal(payload, ref_payload) and torch.equal(old, ref_residual)
    with pytest.raises(ValueError, match="payload_out must be"):
        c.encode(x, None, block, payload_out=torch.empty(3, dtype=torch.uint8), compiled=False)


@pytest.mark.parametrize("n,block", CASES + [(64 * 512 + 5, 512)])
def test_triton_matches_reference_bit_exact(device, n, block):
    # CPU: the kernels under TRITON_INTERPRET (64 blocks per program keeps the interpreter fast);
    # CUDA: the public functions, which dispatch to the same kernels.
    x, old = _gaussian(n, 12, device), 0.1 * _gaussian(n, 13, device)
    rows = 64 if device.type == "cpu" else 4
    payload, residual = c.encode_triton(x, old, block, rows=rows)
    ref_payload, ref_residual = _reference(x, old, block)
    assert torch.equal(payload.cpu(), ref_payload)
    assert torch.equal(residual.cpu(), ref_residual)
    no_res_payload, _ = c.encode_triton(x, None, block, rows=rows)
    assert torch.equal(no_res_payload.cpu(), _reference(x, None, block)[0])
    in_place = old.clone()  # res_out aliasing the residual: each program reads its values before writing
    c.encode_triton(x, in_place, block, rows=rows, res_out=in_place)
    assert torch.equal(in_place.cpu(), ref_residual)
    out = torch.empty(n, device=device)
    ref_out = c.decode(ref_payload, n, block, compiled=False)
    assert torch.equal(c.decode_triton(payload, out, block, accumulate=False, rows=rows).cpu(), ref_out)
    acc = _gaussian(n, 14, device)
    expected = acc.cpu() + ref_out
    assert torch.equal(c.decode_triton(payload, acc, block, accumulate=True, rows=rows).cpu(), expected)


@pytest.mark.gpu
def test_public_functions_dispatch_to_triton_on_cuda():
    n = 10_000
    x = _gaussian(n, 15, "cuda")
    payload, residual = c.encode(x, torch.zeros_like(x))
    assert payload.is_cuda and residual.is_cuda
    assert torch.equal(payload.cpu(), _reference(x, torch.zeros_like(x), c.DEFAULT_BLOCK)[0])
    assert torch.equal(c.decode(payload, n).cpu(), c.decode(payload.cpu(), n, compiled=False))
