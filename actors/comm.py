"""The gradient communication a Ray Train worker's DDP uses, chosen by config: DDP's own flat allreduce, or the
hierarchical hook of collectives/ (exact inside a node, compressed between node peers). One small interface so
the train loop does not care which: bytes per step by level, and state (error-feedback residuals) for
checkpoints. The topology comes from the Ray Train context (node rank / local rank of every worker)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.nn.parallel import DistributedDataParallel

KINDS = ("allreduce", "hierarchical")
CODECS = ("2bit", "lowrank", "none")
TRANSPORTS = ("torch", "ray")


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """Gradient communication between workers."""

    kind: str = "hierarchical"
    """'hierarchical': collectives' hook (exact inside a node, `codec` between nodes); 'allreduce': DDP's own."""
    codec: str = "2bit"
    """Inter-node codec of the hierarchical hook: '2bit' (error feedback), 'lowrank' (PowerSGD-style), 'none'."""
    mode: str = "auto"
    """'auto' (default: compress only where the probed inter-node link is slow; on a fast link 2-bit measured
    0.79x flat allreduce's speed for `small`, bench/results/slow_link.json), 'always' compress, or 'never'."""
    warmup_steps: int = 0
    """Exact allreduce steps before compressing."""
    lowrank_rank: int = 4
    """Rank of the low-rank codec."""
    compiled_codec: bool = True
    """Use the inductor-compiled CPU codec (fast after a one-off compile) instead of the plain torch one."""
    transport: str = "torch"
    """Inter-node exchange of the hierarchical hook: 'torch' (torch.distributed: gloo on CPU, NCCL on GPU) or
    'ray' (CuPy/NCCL through ray.util.collective; GPUs only)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"comm kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {list(CODECS)}, got {self.codec!r}")
        if self.mode not in ("always", "auto", "never"):
            raise ValueError(f"mode must be always, auto or never, got {self.mode!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {self.transport!r}")


class FlatAllreduce:
    """DDP's built-in bucketed allreduce; bytes counted as a ring allreduce sends them: 2 (n - 1) / n of the
    gradient bytes per rank and step."""

    def __init__(self, ddp: DistributedDataParallel, world_size: int):
        self.grad_bytes = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
        self.world_size = world_size

    def metrics(self) -> dict:
        n = self.world_size
        return {"comm": "allreduce", "grad_bytes_per_step": 2 * (n - 1) / n * self.grad_bytes}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HierarchicalComm:
    """collectives' hierarchical hook registered on the DDP model."""

    def __init__(self, cfg: CommConfig, ddp: DistributedDataParallel, context):
        from collectives.hook import HookConfig, register
        from collectives.internode import LowRank, NoCompression, TwoBitEF
        from collectives.topology import Topology

        codec = {
            "2bit": lambda: TwoBitEF(compiled=cfg.compiled_codec),
            "lowrank": lambda: LowRank(rank=cfg.lowrank_rank),
            "none": NoCompression,
        }[cfg.codec]()
        self.topology = Topology.from_ray_train(context)
        transports = _ray_transports(self.topology, context) if cfg.transport == "ray" else None
        self.state = register(
            ddp,
            HookConfig(codec=codec, warmup_steps=cfg.warmup_steps, mode=cfg.mode),
            topology=self.topology,
            transports=transports,
        )
        self.codec = cfg.codec
        self.transport = cfg.transport

    def metrics(self) -> dict:
        b = self.state.last_step_bytes
        return {
            "comm": f"hierarchical/{self.codec}",
            "inter_transport": self.transport,
            "compressing": self.state.compressing,
            "nodes": self.topology.nodes,
            "grad_bytes_intra_per_step": b.get("intra", 0),
            "grad_bytes_inter_per_step": b.get("inter", 0),
            "grad_bytes_flat_per_step": b.get("flat", 0),
            "grad_bytes_per_step": sum(b.values()),
        }

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.state.load_state_dict(state)


def _ray_transports(topology, context):
    """(flat, intra-node, inter-node) transports with the inter-node peers on a ray.util.collective NCCL group:
    one group per local rank, holding that local rank of every node, ranked by node (the peers of the hook)."""
    from ray.util import collective

    from collectives.transport import RayCollectiveTransport, TorchDistTransport

    node_group, _ = topology.build_groups()  # collective: every rank builds both torch groups
    name = f"tandem-inter-{context.get_experiment_name()}-{context.get_local_rank()}"
    collective.init_collective_group(topology.nodes, context.get_node_rank(), backend="nccl", group_name=name)
    return TorchDistTransport(), TorchDistTransport(node_group), RayCollectiveTransport(name)


def build_comm(cfg: CommConfig, context, ddp: DistributedDataParallel) -> FlatAllreduce | HierarchicalComm:
    """Registers the configured communication on `ddp`; `context` is the Ray Train context (topology)."""
    if cfg.kind == "allreduce":
        return FlatAllreduce(ddp, context.get_world_size())
    return HierarchicalComm(cfg, ddp, context)
