"""Per-sample weights from training difficulty (the seed's dynamic data weighting), kept by one Ray actor.

Difficulty of a sample = the exact L2 norm of its gradient w.r.t. the last linear layer (weight and bias). For
cross-entropy on logits z = W h + b that gradient is (softmax(z) - onehot(y)) h^T and (softmax(z) - onehot(y)), so
    ||g||_2 = ||softmax(z) - onehot(y)||_2 * sqrt(||h||_2^2 + 1)
is computable from the forward pass alone (no extra backward; Katharopoulos & Fleuret 2018 use the same bound).

The rule (configurable, `WeightRule`), applied at the end of each interval (an epoch, or every k steps) to the
samples whose difficulty was recorded in that interval (samples not drawn keep their weight):
    difficulty above the p-th percentile:  w = min(cap,   w * up)      (seed: p = 90, up = 1.05, cap = 3)
    otherwise:                            w = max(floor, w * down)    (seed: down = 0.95, floor = 0.5)
Each epoch's rows are drawn with probability proportional to w (multinomial, `draw`).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from models import storage


@dataclass(kw_only=True, slots=True)
class WeightRule:
    """The weight update rule and its interval."""

    percentile: float = 90.0
    """Samples with difficulty above this percentile of the interval's difficulties are up-weighted."""
    up: float = 1.05
    """Factor for hard samples."""
    down: float = 0.95
    """Factor for the others."""
    cap: float = 3.0
    """Largest weight."""
    floor: float = 0.5
    """Smallest weight."""
    every_steps: int = 0
    """0: apply at each epoch end (the seed); k > 0: also every k training steps (summed over workers)."""
    initial: float = 1.0
    """Weight of a sample never updated."""

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must be in (0, 100), got {self.percentile}")
        if not (self.up >= 1.0 and 0.0 < self.down <= 1.0):
            raise ValueError(f"up must be >= 1 and down in (0, 1], got up={self.up}, down={self.down}")
        if not 0.0 < self.floor <= self.initial <= self.cap:
            raise ValueError(f"need 0 < floor <= initial <= cap, got {self.floor}, {self.initial}, {self.cap}")
        if not isinstance(self.every_steps, int) or self.every_steps < 0:
            raise ValueError(f"every_steps must be an int >= 0, got {self.every_steps!r}")


def last_layer_grad_norm(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B,) exact per-sample L2 norms of the cross-entropy gradient w.r.t. the last linear layer's weight and bias,
    from logits (B, K), labels (B,) and that layer's input features (B, D)."""
    with torch.no_grad():
        r = torch.softmax(logits.float(), dim=1)
        r[torch.arange(len(labels)), labels] -= 1.0
        return r.norm(dim=1) * torch.sqrt(features.float().square().sum(1) + 1.0)


class SampleWeightStore:
    """Weights and recorded difficulties for a fixed set of sample ids (numpy; millions are fine).

    Runs as a Ray actor (`ray.remote(SampleWeightStore)`); with `snapshot_path` (a local path or a storage URI,
    models/storage.py), every rule application writes the state there (atomically: a local rename, or one object
    PUT) and a restarted actor, wherever Ray restarts it, reloads it, so an actor restart loses no weights.
    """

    def __init__(self, sample_ids, rule: WeightRule | None = None, seed: int = 0, snapshot_path: str | None = None):
        ids = np.asarray(sample_ids, dtype=np.int64)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"sample_ids must be a non-empty 1-D array, got shape {ids.shape}")
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("sample_ids must be unique")
        self.rule = rule or WeightRule()
        self.seed = seed
        self.snapshot_path = snapshot_path
        n = len(self.ids)
        self.weights = np.full(n, self.rule.initial, dtype=np.float64)
        self.difficulty = np.full(n, np.nan, dtype=np.float32)  # latest recorded in the current interval
        self.steps_since_update = 0
        self.updates = 0
        self.epoch = -1
        self.draw_counts = np.ones(n, dtype=np.int32)
        if snapshot_path and storage.exists(snapshot_path):
            self.load_state(dict(np.load(io.BytesIO(storage.read_bytes(snapshot_path)), allow_pickle=False)))

    # -- indexing -------------------------------------------------------------------------------------------
    def _index(self, sample_ids) -> np.ndarray:
        ids = np.asarray(sample_ids, dtype=np.int64)
        idx = np.searchsorted(self.ids, ids)
        idx = np.minimum(idx, len(self.ids) - 1)
        if not np.array_equal(self.ids[idx], ids):
            bad = ids[self.ids[idx] != ids][:5]
            raise ValueError(f"unknown sample ids, e.g. {bad.tolist()}")
        return idx

    # -- recording and the rule -----------------------------------------------------------------------------
    def record(self, sample_ids, difficulty, steps: int = 0) -> None:
        """Records difficulties (a batch from one worker; the last value per sample wins). `steps` counts the
        training steps they came from, for the every-k-steps interval."""
        d = np.asarray(difficulty, dtype=np.float32)
        idx = self._index(sample_ids)
        if d.shape != idx.shape or not np.all(np.isfinite(d)):
            raise ValueError("difficulty must be finite and match sample_ids in length")
        self.difficulty[idx] = d
        self.steps_since_update += steps
        if self.rule.every_steps and self.steps_since_update >= self.rule.every_steps:
            self.apply_rule()

    def apply_rule(self) -> dict:
        """Applies the rule to the samples recorded since the last application; returns a summary."""
        seen = ~np.isnan(self.difficulty)
        self.steps_since_update = 0
        if not seen.any():
            return {"updated": 0}
        d = self.difficulty[seen]
        threshold = np.percentile(d, self.rule.percentile)
        w = self.weights[seen]
        hard = d > threshold
        w = np.where(hard, np.minimum(self.rule.cap, w * self.rule.up), np.maximum(self.rule.floor, w * self.rule.down))
        self.weights[seen] = w
        self.difficulty[:] = np.nan
        self.updates += 1
        self._snapshot()
        return {"updated": int(seen.sum()), "hard": int(hard.sum()), "threshold": float(threshold)}

    # -- drawing --------------------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int, epoch_size: int | None = None) -> dict:
        """Idempotent per epoch: applies the rule to what the previous epoch recorded, then draws this epoch's
        rows (multinomial, probability proportional to weight). Returns weight statistics."""
        if epoch != self.epoch:
            if self.epoch >= 0:
                self.apply_rule()
            size = len(self.ids) if epoch_size is None else int(epoch_size)
            if size < 1:
                raise ValueError(f"epoch_size must be >= 1, got {size}")
            rng = np.random.default_rng([self.seed, epoch])
            p = self.weights / self.weights.sum()
            self.draw_counts = rng.multinomial(size, p).astype(np.int32)
            self.epoch = epoch
            self._snapshot()
        return self.stats()

    def counts_for(self, sample_ids) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's draw count per sample and the unbiased loss scale 1 / (N p_i) = mean(w) / w_i."""
        idx = self._index(sample_ids)
        return self.draw_counts[idx], (self.weights.mean() / self.weights[idx]).astype(np.float32)

    # -- state ----------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        w = self.weights
        return {
            "epoch": self.epoch,
            "updates": self.updates,
            "weight_mean": float(w.mean()),
            "weight_min": float(w.min()),
            "weight_max": float(w.max()),
            "weight_at_cap": int((w >= self.rule.cap).sum()),
            "weight_at_floor": int((w <= self.rule.floor).sum()),
        }

    def get_weights(self, sample_ids=None) -> np.ndarray:
        return self.weights.copy() if sample_ids is None else self.weights[self._index(sample_ids)]

    def state(self) -> dict:
        return {
            "ids": self.ids,
            "weights": self.weights,
            "difficulty": self.difficulty,
            "draw_counts": self.draw_counts,
            "scalars": np.array([self.epoch, self.updates, self.steps_since_update, self.seed], dtype=np.int64),
            "rule": np.array([v for v in asdict(self.rule).values()], dtype=np.float64),
        }

    def load_state(self, state: dict) -> None:
        if not np.array_equal(state["ids"], self.ids):
            raise ValueError("weight store state is for a different set of sample ids")
        self.weights = np.array(state["weights"], dtype=np.float64)
        self.difficulty = np.array(state["difficulty"], dtype=np.float32)
        self.draw_counts = np.array(state["draw_counts"], dtype=np.int32)
        self.epoch, self.updates, self.steps_since_update, self.seed = (int(v) for v in state["scalars"])

    def save(self, path: str) -> None:
        """Writes the state as .npz (atomic rename, or one object PUT on an object store);
        `load_state(dict(np.load(path)))` restores it."""
        if storage.is_remote(path):
            buf = io.BytesIO()
            np.savez(buf, **self.state())
            storage.write_bytes(path, buf.getvalue())
            return
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **self.state())
        os.replace(tmp, path)

    def _snapshot(self) -> None:
        if self.snapshot_path:
            self.save(self.snapshot_path)

    def ping(self) -> bool:
        return True
