"""The contextual bandit controller (`Bandit`), its reward, config and JSON policy files."""

from __future__ import annotations

import bisect
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_app.batching.controllers import Controller
from serve_app.batching.settings import (
    BatchingConfig,
    BatchSettings,
    _check,
    _is_int,
)
from serve_app.batching.window import WindowStats


def window_reward(stats: WindowStats, slo_s: float, miss_penalty: float) -> float | None:
    """(completed - miss_penalty * SLO misses) / arrivals: throughput relative to the offered load, penalised
    for completions over the SLO and rejections. None for a window without arrivals."""
    if stats.arrivals == 0:
        return None
    return (len(stats.latencies_s) - miss_penalty * stats.slo_misses(slo_s)) / stats.arrivals


@dataclass(kw_only=True, slots=True)
class BanditConfig:
    """The bandit's action grid, load levels and learning settings."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """Candidate max_batch_size values (clamped to BatchingConfig's bounds when applied)."""
    waits_s: tuple[float, ...] = (0.0, 0.002, 0.005, 0.01, 0.02)
    """Candidate batch_wait_timeout_s values; each must be below the SLO."""
    rate_edges: tuple[float, ...] = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
    """Arrival-rate bin edges (requests/s) that define the load levels (contexts)."""
    epsilon: float = 0.2
    """Exploration probability for a load level never visited; decays as epsilon / sqrt(visits)."""
    min_epsilon: float = 0.02
    """Floor of the exploration probability, so it keeps exploring online (0: only the greedy arm learns)."""
    miss_penalty: float = 4.0
    """Reward = (completed - miss_penalty * SLO misses) / arrivals in the window."""
    seed: int = 0
    """Seed of the exploration RNG (decisions are deterministic given it and the observations)."""

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        self.waits_s = tuple(float(w) for w in self.waits_s)
        self.rate_edges = tuple(float(r) for r in self.rate_edges)
        _check(
            len(self.batch_sizes) > 0 and all(_is_int(b) and b >= 1 for b in self.batch_sizes),
            "batch_sizes must be non-empty ints >= 1",
            self.batch_sizes,
        )
        _check(
            len(self.waits_s) > 0 and all(w >= 0 for w in self.waits_s),
            "waits_s must be non-empty and >= 0",
            self.waits_s,
        )
        _check(
            all(x < y for x, y in zip(self.rate_edges, self.rate_edges[1:], strict=False))
            and all(r > 0 for r in self.rate_edges),
            "rate_edges must be positive and increasing",
            self.rate_edges,
        )
        _check(
            0 <= self.min_epsilon <= self.epsilon <= 1,
            "epsilon, min_epsilon must be 0 <= min_epsilon <= epsilon <= 1",
            (self.min_epsilon, self.epsilon),
        )
        _check(self.miss_penalty >= 0, "miss_penalty must be >= 0", self.miss_penalty)


class Bandit(Controller):
    """Contextual epsilon-greedy bandit: context = load level (arrival-rate bin), arm = (batch size, wait).

    The arm chosen for a window is credited with that window's reward, (completed - penalty * misses) /
    arrivals, where misses are completions over the SLO plus rejections: throughput relative to the offered
    load, penalised for SLO misses. Per (context, arm) a running mean. Learns online forever (with min_epsilon
    > 0); `save`/`load` keep the tables as JSON. Arms the grid offers with a wait at or above the SLO are
    refused at construction.
    """

    def __init__(self, config: BatchingConfig | None = None, bandit: BanditConfig | None = None) -> None:
        super().__init__(config)
        self.bandit = bandit if bandit is not None else BanditConfig()
        bad = [w for w in self.bandit.waits_s if w >= self.config.slo_s]
        _check(not bad, f"bandit waits_s must be below slo_s={self.config.slo_s}", bad)
        self.arms: list[BatchSettings] = [
            BatchSettings(b, w) for b in self.bandit.batch_sizes for w in self.bandit.waits_s
        ]
        n_ctx = len(self.bandit.rate_edges) + 1
        self.counts = [[0] * len(self.arms) for _ in range(n_ctx)]
        self.values = [[0.0] * len(self.arms) for _ in range(n_ctx)]
        self._rng = random.Random(self.bandit.seed)
        self._pending: tuple[int, int] | None = None  # (context, arm) acting in the current window
        self.explore = True
        """False: always exploit (evaluation)."""

    def context(self, rate: float) -> int:
        return bisect.bisect_right(self.bandit.rate_edges, rate)

    def reset_window(self) -> None:
        """Forgets which arm acts now (call between independent episodes so none is credited across them)."""
        self._pending = None

    def _decide(self, stats: WindowStats) -> tuple[int, float]:
        r = window_reward(stats, self.config.slo_s, self.bandit.miss_penalty)
        if self._pending is not None and r is not None:
            ctx, arm = self._pending
            self.counts[ctx][arm] += 1
            self.values[ctx][arm] += (r - self.values[ctx][arm]) / self.counts[ctx][arm]
        ctx = self.context(stats.arrival_rate)
        arm = self._choose(ctx)
        self._pending = (ctx, arm)
        return self.arms[arm].max_batch_size, self.arms[arm].batch_wait_timeout_s

    def _choose(self, ctx: int) -> int:
        counts, values = self.counts[ctx], self.values[ctx]
        visits = sum(counts)
        eps = max(self.bandit.min_epsilon, self.bandit.epsilon / math.sqrt(1 + visits))
        untried = [i for i, n in enumerate(counts) if n == 0]
        if self.explore and untried and visits < len(self.arms):  # try every arm once first
            return untried[self._rng.randrange(len(untried))]
        if self.explore and self._rng.random() < eps:
            return self._rng.randrange(len(self.arms))
        tried = [i for i, n in enumerate(counts) if n > 0]
        if not tried:  # nothing known at this load level: borrow the nearest level that has data
            return self._borrow(ctx)
        return max(tried, key=lambda i: (values[i], -i))

    def _borrow(self, ctx: int) -> int:
        order = sorted(range(len(self.counts)), key=lambda c: (abs(c - ctx), c))
        for c in order:
            tried = [i for i, n in enumerate(self.counts[c]) if n > 0]
            if tried:
                return max(tried, key=lambda i: (self.values[c][i], -i))
        return self._closest_arm(self.config.initial_batch_size, self.config.initial_wait_s)

    def _closest_arm(self, b: int, w: float) -> int:
        return min(
            range(len(self.arms)),
            key=lambda i: (abs(self.arms[i].max_batch_size - b), abs(self.arms[i].batch_wait_timeout_s - w)),
        )

    # JSON, never pickle: a policy file may come from elsewhere.
    def to_dict(self) -> dict[str, Any]:
        version, state, gauss = self._rng.getstate()
        return {
            "format": "tandem.bandit/1",
            "batching": asdict(self.config),
            "bandit": asdict(self.bandit),
            "counts": self.counts,
            "values": self.values,
            "rng": [version, list(state), gauss],
            "pending": list(self._pending) if self._pending is not None else None,
            "settings": [self._settings.max_batch_size, self._settings.batch_wait_timeout_s],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Bandit:
        if d.get("format") != "tandem.bandit/1":
            raise ValueError(f"bandit state format must be 'tandem.bandit/1', got {d.get('format')!r}")
        bandit_kw = dict(d["bandit"])
        for k in ("batch_sizes", "waits_s", "rate_edges"):
            bandit_kw[k] = tuple(bandit_kw[k])
        obj = cls(BatchingConfig.from_dict(d["batching"]), BanditConfig(**bandit_kw))
        shape = (len(obj.counts), len(obj.arms))
        for key in ("counts", "values"):
            got = (len(d[key]), len(d[key][0]) if d[key] else 0)
            _check(
                got == shape and all(len(row) == shape[1] for row in d[key]),
                f"{key} must have shape {shape}",
                got,
            )
        obj.counts = [[int(n) for n in row] for row in d["counts"]]
        obj.values = [[float(v) for v in row] for row in d["values"]]
        version, state, gauss = d["rng"]
        obj._rng.setstate((version, tuple(state), gauss))
        pending = d["pending"]
        if pending is not None:
            ok = 0 <= pending[0] < shape[0] and 0 <= pending[1] < shape[1]
            _check(ok, f"pending must index a (context, arm) within {shape}", pending)
            obj._pending = (int(pending[0]), int(pending[1]))
        obj._settings = BatchSettings(int(d["settings"][0]), float(d["settings"][1]))
        return obj

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Bandit:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_bandit_policy(path: str | Path, config: BatchingConfig) -> Bandit:
    """A saved Bandit's tables (arms, load levels, values) under `config`, the serving side's batching config
    (its bounds, window, quantile); ValueError naming the problem when the file is missing or not a policy, or
    was trained for another SLO (its rewards counted misses against that one)."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"bandit_policy {str(path)!r} cannot be read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"bandit_policy {str(path)!r} is not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("batching"), dict):
        raise ValueError(f"bandit_policy {str(path)!r} is not a saved bandit (tandem.bandit/1)")
    slo = d["batching"].get("slo_s")
    if not isinstance(slo, (int, float)) or not math.isclose(slo, config.slo_s, rel_tol=1e-9):
        raise ValueError(
            f"bandit_policy {str(path)!r} was trained for slo_s={slo!r}, the replica's is {config.slo_s!r}: "
            f"pre-train it for this SLO (tandem pretrain-bandit --slo-ms {config.slo_s * 1e3:g})"
        )
    # Start at the replica's initial settings, not where training ended (they may exceed this config's bounds).
    initial = [config.initial_batch_size, config.initial_wait_s]
    return Bandit.from_dict({**d, "batching": asdict(config), "settings": initial, "pending": None})
