"""BatchingConfig, BatchSettings and the validation helpers every part of batching uses."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SERVE_DEFAULT_BATCH_SIZE = 10
SERVE_DEFAULT_WAIT_S = 0.01


@dataclass(kw_only=True, slots=True)
class BatchingConfig:
    """Latency objective and the bounds every controller stays within."""

    slo_s: float = 0.1
    """Latency objective (seconds) for the `quantile` of request latency."""
    quantile: float = 0.99
    """Which latency percentile the SLO is about."""
    window_s: float = 1.0
    """Control window: the app closes a WindowRecorder and calls update() this often."""
    min_batch_size: int = 1
    """Smallest max_batch_size a controller may set."""
    max_batch_size: int = 64
    """Largest max_batch_size a controller may set (max_ongoing_requests must be at least this)."""
    max_wait_s: float = 0.05
    """Largest batch_wait_timeout_s a controller may set; must be below slo_s (a wait alone never breaks
    it)."""
    initial_batch_size: int = SERVE_DEFAULT_BATCH_SIZE
    """Settings before the first window."""
    initial_wait_s: float = SERVE_DEFAULT_WAIT_S
    """Wait before the first window."""
    max_queue_len: int | None = 256
    """Bounded queue: requests beyond this many waiting are rejected (None: unbounded)."""
    target_utilization: float = 0.7
    """With a non-blocking model call, SLOModel waits long enough that rate * t(b) / b stays below this."""
    model_blocks_loop: bool = True
    """True when the next batch forms only once the running one returns and takes what queued meanwhile: the
    replica's model queue (serve_app/replica.py runs the model in a thread and merges what Serve's batch queue
    handed on while it ran, the event loop free meanwhile), or a handler that calls the model synchronously,
    holding the loop. False when the handler awaits the model (asyncio.to_thread, async GPU work): Ray then
    closes batches while one executes, and a zero wait makes batches of one (see serve_app/simulator)."""

    def __post_init__(self) -> None:
        _check(self.slo_s > 0, "slo_s must be > 0", self.slo_s)
        _check(0.5 <= self.quantile < 1, "quantile must be in [0.5, 1)", self.quantile)
        _check(self.window_s > 0, "window_s must be > 0", self.window_s)
        _check(
            _is_int(self.min_batch_size) and self.min_batch_size >= 1,
            "min_batch_size must be an int >= 1",
            self.min_batch_size,
        )
        _check(
            _is_int(self.max_batch_size) and self.max_batch_size >= self.min_batch_size,
            f"max_batch_size must be an int >= min_batch_size ({self.min_batch_size})",
            self.max_batch_size,
        )
        _check(
            0 <= self.max_wait_s < self.slo_s,
            f"max_wait_s must be in [0, slo_s={self.slo_s})",
            self.max_wait_s,
        )
        _check(
            _is_int(self.initial_batch_size) and self.min_batch_size <= self.initial_batch_size <= self.max_batch_size,
            f"initial_batch_size must be an int in [{self.min_batch_size}, {self.max_batch_size}]",
            self.initial_batch_size,
        )
        _check(
            0 <= self.initial_wait_s <= self.max_wait_s,
            f"initial_wait_s must be in [0, {self.max_wait_s}]",
            self.initial_wait_s,
        )
        _check(
            self.max_queue_len is None or (_is_int(self.max_queue_len) and self.max_queue_len >= 1),
            "max_queue_len must be None or an int >= 1",
            self.max_queue_len,
        )
        _check(0 < self.target_utilization <= 1, "target_utilization must be in (0, 1]", self.target_utilization)

    @staticmethod
    def slo_fields(slo_s: float) -> dict[str, float]:
        """The fields `tandem serve --slo-ms` sets: the SLO, and waits kept well below it (a wait alone must
        stay below the SLO)."""
        max_wait = min(0.05, slo_s / 2)
        return {"slo_s": slo_s, "max_wait_s": max_wait, "initial_wait_s": min(0.01, max_wait)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BatchingConfig:
        """Builds a config from a dict (a Serve user_config); unknown keys are an error, not silently
        dropped."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"batching config keys must be among {sorted(known)}, got unknown {unknown}")
        return cls(**d)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, what: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{what}, got {got!r}")


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """What a controller decides: the two runtime knobs of `@serve.batch`."""

    max_batch_size: int
    batch_wait_timeout_s: float
