"""Activations the unified operator fuses: each knows its forward, its backward from the pre-activation, the
integer code its Triton kernels use, and the oneDNN post-op name for the folded CPU inference path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class Activation:
    name: str
    code: int
    """Integer code passed to the Triton kernels as the ACT constexpr."""
    forward: Callable[[torch.Tensor], torch.Tensor]
    forward_: Callable[[torch.Tensor], torch.Tensor]
    """In-place forward, for buffers nobody else holds."""
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(grad of output, pre-activation z) -> grad of z."""
    module: type[torch.nn.Module] | None
    """The nn.Module this activation replaces when fusing a user model (None for identity)."""


IDENTITY = Activation("none", 0, lambda z: z, lambda z: z, lambda g, z: g, None)
RELU = Activation(
    "relu", 1, torch.relu, torch.relu_, lambda g, z: torch.ops.aten.threshold_backward(g, z, 0), torch.nn.ReLU
)
RELU6 = Activation(
    "relu6",
    2,
    F.relu6,
    lambda z: F.hardtanh_(z, 0.0, 6.0),
    lambda g, z: torch.ops.aten.hardtanh_backward(g, z, 0.0, 6.0),
    torch.nn.ReLU6,
)
SILU = Activation(
    "silu",
    3,
    F.silu,
    lambda z: F.silu(z, inplace=True),
    lambda g, z: torch.ops.aten.silu_backward(g, z),
    torch.nn.SiLU,
)

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (IDENTITY, RELU, RELU6, SILU)}
BY_CODE: dict[int, Activation] = {a.code: a for a in ACTIVATIONS.values()}
"""Activation by its integer code (the custom ops of kernels/conv_bn.py take the code, a schema-friendly int)."""


def get_activation(name: str | None) -> Activation:
    """Looks an activation up by name ('none', 'relu', 'relu6', 'silu'); None means identity."""
    if name is None:
        return IDENTITY
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
