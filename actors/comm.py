"""The gradient communication a Ray Train worker's DDP uses, chosen by config: DDP's own flat allreduce, or the
hierarchical hook of collectives/ (exact inside a node, compressed between nodes). One small interface so the
train loop does not care which: counters of bytes per step, and state for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn.parallel import DistributedDataParallel

_KINDS = ("allreduce",)


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """Gradient communication between workers."""

    kind: str = "allreduce"
    """'allreduce': DDP's flat allreduce (exact)."""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"comm kind must be one of {list(_KINDS)}, got {self.kind!r}")


class FlatAllreduce:
    """DDP's built-in bucketed allreduce; bytes counted as a ring allreduce sends them: 2 (n - 1) / n of the
    gradient bytes per rank and step."""

    def __init__(self, ddp: DistributedDataParallel, world_size: int):
        self.grad_bytes = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        self.world_size = world_size

    def reset_counters(self) -> None:
        pass

    def metrics(self, steps: int) -> dict:
        n = self.world_size
        return {"comm": "allreduce", "grad_bytes_per_step": 2 * (n - 1) / n * self.grad_bytes}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_comm(cfg: CommConfig, ctx, ddp: DistributedDataParallel):
    """Registers the configured communication on `ddp`; `ctx` is the Ray Train context (topology)."""
    return FlatAllreduce(ddp, ctx.get_world_size())


__all__ = ["CommConfig", "FlatAllreduce", "build_comm"]
