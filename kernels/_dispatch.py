"""Decides once, per tensor device, whether an op runs its Triton kernel or its PyTorch reference.

Triton has no CPU backend: kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
The public op functions call `use_triton(t)`; nothing wraps a launch in try/except.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernel should serve this tensor: a CUDA tensor and Triton installed."""
    return t.is_cuda and triton_installed()
