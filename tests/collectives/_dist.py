"""Runs a function on N spawned gloo ranks on 127.0.0.1 (file-store rendezvous) and collects their results."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=90)  # a collective mismatch fails the run instead of hanging it


def _entry(rank: int, fn, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        torch.save(fn(rank, world, *args), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path: Path, *args) -> list:
    """fn(rank, world, *args) in `world` processes; returns each rank's return value, in rank order."""
    mp.spawn(_entry, args=(fn, world, str(tmp_path), args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
