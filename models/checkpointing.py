"""Selective activation checkpointing: recompute chosen blocks in backward instead of keeping their activations.

`checkpoint_(model, CheckpointConfig(every=2))` wraps every 2nd block of the model's block sequence (for the CNN
presets `model.blocks`; for other models the longest nn.Sequential of blocks) in `Checkpointed`, which runs it
under `torch.utils.checkpoint` (non-reentrant). The recompute pass runs inside `frozen_running_stats()`, so a
ConvBNAct's BatchNorm running statistics are updated once per step, as without checkpointing. Composes with the
unified operator: its `lean` mode already recomputes the conv inside a block; checkpointing drops whole blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels.conv_bn import frozen_running_stats


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Which blocks to checkpoint."""

    every: int = 0
    """0: none; k >= 1: every k-th block (1 = all), counted from the first block."""

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"every must be an int >= 0 (0 = none, 1 = all blocks), got {self.every!r}")

    @classmethod
    def parse(cls, text: str | int) -> CheckpointConfig:
        """'none' | 'all' | an int k (every k-th block)."""
        if text in ("none", 0, "0"):
            return cls(every=0)
        if text == "all":
            return cls(every=1)
        try:
            return cls(every=int(text))
        except ValueError:
            raise ValueError(f"checkpointing must be 'none', 'all' or an int k, got {text!r}") from None


class Checkpointed(nn.Module):
    """Runs `inner` under activation checkpointing while training with grad enabled."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.inner(x)
        return checkpoint(
            self.inner,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), frozen_running_stats()),
        )


def _block_sequence(model: nn.Module) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return blocks
    seqs = [m for m in model.modules() if isinstance(m, nn.Sequential)]
    if not seqs:
        raise ValueError(f"{type(model).__name__} has no nn.Sequential of blocks to checkpoint")
    return max(seqs, key=len)


def checkpoint_(model: nn.Module, cfg: CheckpointConfig) -> nn.Module:
    """Wraps the chosen blocks in place; returns the model. Idempotent."""
    if cfg.every == 0:
        return model
    seq = _block_sequence(model)
    for i, block in enumerate(list(seq)):
        if i % cfg.every == 0 and not isinstance(block, Checkpointed):
            seq[i] = Checkpointed(block)
    return model
