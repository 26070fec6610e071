"""Runs a function on N spawned ranks on 127.0.0.1 (gloo, or NCCL with one GPU a rank; file-store rendezvous) and
collects their results."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=90)  # a collective mismatch fails the run instead of hanging it


def _entry(rank: int, fn, world: int, tmp: str, args: tuple, backend: str) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)  # NCCL: one device per rank
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        torch.save(fn(rank, world, *args), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, *args, backend: str = "gloo") -> list:
    """fn(rank, world, *args) in `world` processes; returns each rank's return value, in rank order."""
    mp.spawn(_entry, args=(fn, world, str(tmp_path), args, backend), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
