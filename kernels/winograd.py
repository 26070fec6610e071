"""Winograd convolution F(m x m, 3 x 3) for stride-1 3x3 convs at inference (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", CVPR 2016), in PyTorch ops: one batched GEMM does the multiplications.

A 3x3 conv computes each m x m output tile from an a x a input tile (a = m + 2) with a^2 multiplications per
(input channel, output channel) pair instead of 9 m^2: 16 against 36 for F(2, 3), 36 against 144 for F(4, 3).
    U = G w G^T              (a, a) per (K, C): the weight, transformed once (`winograd_weight`)
    V = B^T d B              (a, a) per (tile, C): the input tiles d, overlapping by 2
    M[xi] = V[xi] @ U[xi]    a^2 GEMMs of (tiles, C) x (C, K): where the time goes
    Y = A^T M A              (m, m) per (tile, K): the output tiles
Why here: oneDNN's direct fp32 convs already run near this CPU's peak (~205 GFLOP/s on one core), so on the
channel-heavy small maps of resnet18 (256-512 channels, 4x4 and 8x8 at batch 32) only fewer multiplications
make the conv faster; on large maps the transforms' passes over memory cost more than they save, which is why
`models.fuse` times this form per layer against oneDNN's instead of using it everywhere.
Float rounding differs from a direct conv (F(2, 3) ~1e-6 relative, F(4, 3) ~1e-5 with its larger constants).
No Triton kernel: a CPU inference path (on a GPU, cuDNN chooses Winograd itself).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    # (B^T (a x a), G (a x 3), A^T (m x a)) of Lavin & Gray, section 4
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
TILES = tuple(_MATRICES)
"""The output tile sizes m offered: 2 and 4."""


@functools.cache
def _transforms(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T (x) B^T (a^2, a^2), G (a, 3), A^T (x) A^T (m^2, a^2)) in float64, for the float32 casts below."""
    bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in _MATRICES[m])
    return torch.kron(bt, bt), g, torch.kron(at, at)


def _check_tile(m: int) -> None:
    if m not in _MATRICES:
        raise ValueError(f"tile must be one of {TILES}, got {m!r}")


def winograd_weight(weight: torch.Tensor, m: int) -> torch.Tensor:
    """U = G w G^T of a (K, C, 3, 3) weight, as (a^2, C, K) in the weight's dtype: the right operands of the GEMMs."""
    _check_tile(m)
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"weight must be (K, C, 3, 3), got shape {tuple(weight.shape)}")
    _, g, _ = _transforms(m)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)  # (a, a, C, K)
    a = m + 2
    return u.reshape(a * a, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, m: int, padding: int = 1
) -> torch.Tensor:
    """conv2d(x, w, bias, stride=1, padding=padding) for the 3x3 weight w whose `winograd_weight(w, m)` is `u`.
    x: (N, C, H, W), any memory format; returns (N, K, H + 2p - 2, W + 2p - 2), channels_last."""
    _check_tile(m)
    n, c, h, w = x.shape
    a = m + 2
    if u.shape[:2] != (a * a, c):
        raise ValueError(f"u must be ({a * a}, {c}, K) for F({m}, 3) on {c} channels, got {tuple(u.shape)}")
    k = u.shape[2]
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    th, tw = -(-ho // m), -(-wo // m)  # tiles per column and row
    bt2, _, at2 = (t.to(x.dtype) for t in _transforms(m))
    # (N, C, H', W') zero-padded so the tiles cover the output: (th - 1) m + a rows
    xp = F.pad(x, (padding, tw * m + 2 - w - padding, padding, th * m + 2 - h - padding))
    d = xp.unfold(2, a, m).unfold(3, a, m)  # (N, C, th, tw, a, a), a view
    p = n * th * tw
    d = d.permute(4, 5, 0, 2, 3, 1).reshape(a * a, p * c)  # (a^2, tiles x C): one copy
    v = (bt2 @ d).view(a * a, p, c)  # (a^2, tiles, C)
    mm = torch.bmm(v, u)  # (a^2, tiles, K)
    y = (at2 @ mm.view(a * a, p * k)).view(m, m, n, th, tw, k)  # (m, m, N, th, tw, K)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, k)  # (N, H_out', W_out', K): one copy
    if th * m != ho or tw * m != wo:
        y = y[:, :ho, :wo].contiguous()
    if bias is not None:
        y += bias
    return y.permute(0, 3, 1, 2)  # (N, K, H_out, W_out), channels_last memory


def winograd_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int = 1):
    """The specification: the direct conv."""
    return F.conv2d(x, weight, bias, 1, padding)
