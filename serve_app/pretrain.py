"""Pre-training the `Bandit` batching controller in the simulator for one model artifact (`tandem pretrain-bandit`).

A bandit that starts from nothing in a replica spends its first minutes trying every (batch size, wait) arm at
every load level on live traffic. Here it learns them first against the artifact's own measured t(b) (one torch
thread, as a replica runs it) under +-50% sine loads spread over the model's capacity; the replica then starts
from the saved tables (`ModelUserConfig.bandit_policy`) and keeps learning online.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.batching import AdmissionControl, Bandit, BanditConfig, BatchingConfig
from serve_app.simulator import ServiceTime, Sine, TableServiceTime, train_bandit

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """What `pretrain_bandit` simulates."""

    slo_s: float = 0.1
    """Latency objective the rewards count misses against (the replica's SLO must be the same)."""
    episodes: int = 48
    """Simulated episodes, cycling through the load levels."""
    duration_s: float = 20.0
    """Simulated seconds per episode."""
    max_rate: float | None = None
    """Requests/s the load levels are spread over: the most the deployment will be offered. Default: the model's
    capacity (its best items/s over the batch sizes), which is what the replica alone could serve; behind Serve's
    HTTP proxy far less is reachable (a `small` CNN: ~58k items/s alone, ~300-460 requests/s through the proxy on
    2 cores), and real traffic would then all fall in the lowest load level."""
    load_fractions: tuple[float, ...] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
    """Sine means as fractions of `max_rate`."""
    period_s: float = 10.0
    """Sine period (the swing is +-50%)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.slo_s <= 60:
            raise ValueError(f"slo_s must be in (0, 60], got {self.slo_s!r}")
        if not isinstance(self.episodes, int) or isinstance(self.episodes, bool) or self.episodes < 1:
            raise ValueError(f"episodes must be an int >= 1, got {self.episodes!r}")
        if not self.duration_s > 0 or not self.period_s > 0:
            raise ValueError(f"duration_s and period_s must be > 0, got {self.duration_s!r}, {self.period_s!r}")
        if self.max_rate is not None and not (isinstance(self.max_rate, (int, float)) and self.max_rate > 0):
            raise ValueError(f"max_rate must be > 0 requests/s or None, got {self.max_rate!r}")
        if not self.load_fractions or not all(0 < f < 2 for f in self.load_fractions):
            raise ValueError(f"load_fractions must be non-empty, each in (0, 2), got {self.load_fractions!r}")


def measure_service_time(artifact: str, repeats: int = 7) -> TableServiceTime:
    """Median CPU time of the artifact's forward pass per batch size (one torch thread, this thread's CPU time:
    other processes on a shared machine do not inflate it), with the spread between repeats as the noise."""
    import torch

    from models.artifact import load_artifact

    model, manifest = load_artifact(artifact)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.rand(max(BATCH_SIZES), *manifest["input_shape"], generator=torch.Generator().manual_seed(0))
        medians, spreads = [], []
        with torch.inference_mode():
            for b in BATCH_SIZES:
                model(x[:b])  # first call: allocation, lazy init
                ts = []
                for _ in range(repeats):
                    t0 = time.thread_time()
                    model(x[:b])
                    ts.append(max(time.thread_time() - t0, 1e-6))
                medians.append(statistics.median(ts))
                spreads.append(statistics.pstdev(ts) / medians[-1])
    finally:
        torch.set_num_threads(threads)
    return TableServiceTime(BATCH_SIZES, tuple(medians), jitter=min(0.5, statistics.median(spreads)))


def capacity(service: ServiceTime, batch_sizes: tuple[int, ...] = BATCH_SIZES) -> float:
    """Items/s at the batch size that serves the most (median service times)."""
    return max(b / _median_time(service, b) for b in batch_sizes)


def _median_time(service: ServiceTime, b: int, n: int = 101) -> float:
    rng = random.Random(0)
    return statistics.median(service.sample(b, rng) for _ in range(n))


def pretrain_bandit(
    service: ServiceTime, cfg: PretrainConfig, progress: Callable[[int, float], None] | None = None
) -> tuple[Bandit, list[float]]:
    """A Bandit trained in the simulator on `service` under sine loads at `cfg.load_fractions` of `cfg.max_rate`
    (default: its capacity); its load levels (rate bins) are spread over the same range. Returns it and the mean
    reward per episode; `progress(episode, reward)` is called after each episode."""
    top = cfg.max_rate if cfg.max_rate is not None else capacity(service)
    batching = BatchingConfig(**BatchingConfig.slo_fields(cfg.slo_s))
    waits = tuple(w for w in (0.0, 0.002, 0.005, 0.01, 0.02) if w <= batching.max_wait_s)
    # Load-level edges half-way between the trained means (and beyond the top one), so each level is trained.
    means = sorted(f * top for f in cfg.load_fractions)
    edges = tuple((a + b) / 2 for a, b in zip(means, means[1:], strict=False)) + (means[-1] * 1.5,)
    bandit = Bandit(batching, BanditConfig(batch_sizes=BATCH_SIZES, waits_s=waits, rate_edges=edges, seed=cfg.seed))
    scenarios = [(Sine(m, 0.5, cfg.period_s), service) for m in means]
    curve: list[float] = []
    for e in range(cfg.episodes):  # one episode per call, for progress output
        curve += train_bandit(
            bandit,
            [scenarios[e % len(scenarios)]],
            episodes=1,
            duration_s=cfg.duration_s,
            seed=cfg.seed + e,
            admission=AdmissionControl(bandit.config),
        )
        if progress is not None:
            progress(e, curve[-1])
    return bandit, curve
