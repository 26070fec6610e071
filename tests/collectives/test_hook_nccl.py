"""The hierarchical hook over NCCL on CUDA, as a GPU cluster's Train workers run it (actors.trainer: NCCL for the
world and the intra-node groups, and between nodes with --inter-transport torch): 2 ranks with one GPU each, as
2 nodes x 1, so the 2-bit codec runs on CUDA between the two. Needs 2 GPUs (NCCL takes one device per rank);
bench/gpu_check.sh runs it."""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from test_hook import LOSS_TOLERANCE, _net, _opt
from test_hook import _train as train_steps
from torch.nn.parallel import DistributedDataParallel as DDP

from collectives.hook import HookConfig, register
from collectives.internode import TwoBitEF

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one per rank)"),
    pytest.mark.timeout(300),
]

STEPS = 40


def _train(rank: int, config: HookConfig | None) -> dict:
    dev = torch.device("cuda", rank)
    ddp = DDP(_net().to(dev), device_ids=[rank], bucket_cap_mb=0.001)  # several buckets, with a partial block
    state = register(ddp, config) if config is not None else None
    out = train_steps(ddp, _opt(ddp), rank, range(STEPS), state, device=dev)
    return {"losses": out["losses"], "params": out["params"], "inter": [b["inter"] for b in out["bytes"]],
            "gbit": state.measured_gbit if state else None, "compress": state.compress if state else None}  # fmt: skip


def _worker(rank: int, world: int) -> dict:
    return {
        "exact": _train(rank, None),
        "twobit": _train(rank, HookConfig(codec=TwoBitEF(), warmup_steps=2, ranks_per_node=1, mode="always")),
        "auto": _train(rank, HookConfig(ranks_per_node=1, probe_bytes=1 << 20)),  # probes the link on CUDA
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, 2, tmp_path_factory.mktemp("hook_nccl"), backend="nccl")


def test_the_2bit_hook_over_nccl_trains_like_exact_ddp(results):
    a, b = results
    assert torch.equal(a["twobit"]["params"], b["twobit"]["params"])  # both ranks apply the same decoded sum
    exact, twobit = (sum(a[k]["losses"][-10:]) / 10 for k in ("exact", "twobit"))
    assert abs(twobit - exact) <= LOSS_TOLERANCE, (twobit, exact)
    grad_bytes = sum(p.numel() for p in _net().parameters()) * 4
    # the warm-up's 2 steps are exact flat allreduces; after it every step crosses the inter-node link coded
    # (~2 bits a value, plus each block's levels and the padding of this net's small buckets: < 1/4 of fp32)
    inter = a["twobit"]["inter"]
    assert inter[:2] == [0, 0] and all(0 < n < grad_bytes / 4 for n in inter[2:]), inter


def test_auto_mode_probes_the_link_on_cuda_and_both_ranks_agree(results):
    a, b = results
    assert a["auto"]["gbit"] > 0 and a["auto"]["gbit"] == b["auto"]["gbit"]
    assert a["auto"]["compress"] == b["auto"]["compress"]
