"""kernels/winograd.py: F(m x m, 3 x 3) equals the direct conv (the reference) for every size, padding, layout."""

from __future__ import annotations

import pytest
import torch

from kernels.winograd import TILES, winograd_conv3x3, winograd_reference, winograd_weight


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize(("size", "padding"), [((8, 8), 1), ((7, 5), 1), ((4, 4), 1), ((9, 6), 0), ((1, 1), 1)])
def test_winograd_equals_the_direct_conv_in_float64(m, size, padding):
    """In float64 the algorithm is exact up to rounding: any tile, map size (tiles cropped at the edge), padding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, *size, generator=g, dtype=torch.float64)
    w = torch.randn(6, 5, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    y = winograd_conv3x3(x, winograd_weight(w, m), b, m, padding)
    ref = winograd_reference(x, w, b, padding)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("m", TILES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_winograd_float32_error_floor_and_layout(m, channels_last):
    """float32 at resnet-like width: max error below 1e-4 of the output's scale (F(4, 3) rounds more than F(2, 3));
    the output is channels_last whatever the input's layout, and no bias works."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 64, 8, 8, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 64, 3, 3, generator=g) / 24.0
    y = winograd_conv3x3(x, winograd_weight(w, m), None, m)
    ref = winograd_reference(x.double(), w.double(), None)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < (1e-6 if m == 2 else 1e-4), err
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32


def test_winograd_rejects_bad_arguments():
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_weight(w, 3)
    with pytest.raises(ValueError, match=r"weight must be \(K, C, 3, 3\)"):
        winograd_weight(torch.randn(4, 3, 5, 5), 2)
    with pytest.raises(ValueError, match=r"u must be \(16, 5, K\)"):
        winograd_conv3x3(torch.randn(1, 5, 4, 4), winograd_weight(w, 2), None, 2)
