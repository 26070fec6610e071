"""InfoBatch-style data pruning (Qin et al., ICLR 2024), as a Ray-free piece a training loop can use.

Each epoch, among the samples whose last recorded loss is below the mean of the recorded losses ("well learned"),
a random share `prune_ratio` is skipped; the kept well-learned samples have their loss scaled by
1 / (1 - prune_ratio), so the expected gradient over the epoch stays that of the full data. Samples not yet scored
are always kept. In the last `anneal` share of training every sample is used, unscaled (the paper's annealing,
which removes the remaining bias before the end). Scoring costs nothing extra: the per-sample losses are those the
step computed anyway.

    pruner = InfoBatch(n, InfoBatchConfig(prune_ratio=0.5, anneal=0.125), seed=0)
    idx, scale = pruner.epoch(progress)       # progress: fraction of the training budget done, in [0, 1]
    ... loss = (per_sample_loss * scale_of_batch).mean(); pruner.record(batch_idx, per_sample_loss)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True, slots=True)
class InfoBatchConfig:
    prune_ratio: float = 0.5
    """Share of the well-learned (below-mean loss) samples skipped each epoch."""
    anneal: float = 0.125
    """Final share of the training budget that uses the full data (the paper's default 0.125)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if not 0.0 <= self.anneal <= 1.0:
            raise ValueError(f"anneal must be in [0, 1], got {self.anneal}")


class InfoBatch:
    """Per-sample scores and the epoch draw of InfoBatch over `n` samples (indices 0..n-1)."""

    def __init__(self, n: int, config: InfoBatchConfig | None = None, seed: int = 0) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.n = n
        self.config = config or InfoBatchConfig()
        self.scores = np.full(n, np.nan)
        self.rng = np.random.default_rng([seed, 11])
        self.pruned_last_epoch = 0

    def record(self, idx: np.ndarray, losses: np.ndarray) -> None:
        """The latest per-sample losses of the samples in `idx`."""
        self.scores[np.asarray(idx)] = np.asarray(losses, dtype=np.float64)

    def epoch(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """(indices of this epoch in training order, their loss scales). `progress` in [0, 1]: share of the
        budget already trained; from 1 - anneal on, the full data unscaled."""
        cfg = self.config
        scale = np.ones(self.n, dtype=np.float32)
        seen = ~np.isnan(self.scores)
        if progress >= 1.0 - cfg.anneal or cfg.prune_ratio == 0.0 or not seen.any():
            self.pruned_last_epoch = 0
            return self.rng.permutation(self.n), scale
        well_learned = seen & (self.scores < np.nanmean(self.scores))
        pruned = well_learned & (self.rng.random(self.n) < cfg.prune_ratio)
        scale[well_learned & ~pruned] = 1.0 / (1.0 - cfg.prune_ratio)
        kept = np.flatnonzero(~pruned)
        self.pruned_last_epoch = self.n - len(kept)
        order = self.rng.permutation(kept)
        return order, scale[order]
