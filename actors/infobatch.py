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

The trainers (models/training.py `fit_epochs`, actors/trainer.py) keep their batches and steps, so the LR schedule
is the uniform run's step for step: `plan` says which samples this epoch keeps and `prune_batch` drops the others
from each batch before the forward (fewer rows to compute, same number of optimizer steps). In a data-parallel
run each worker scores the rows it read and `merge_` pools the scores after each epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch


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
        self._fresh = np.zeros(n, dtype=bool)  # recorded since the last merge_

    def record(self, idx: np.ndarray, losses: np.ndarray) -> None:
        """The latest per-sample losses of the samples in `idx`."""
        idx = np.asarray(idx)
        self.scores[idx] = np.asarray(losses, dtype=np.float64)
        self._fresh[idx] = True

    def plan(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """(keep (n,) bool, loss scale (n,) float32) of this epoch. `progress` in [0, 1]: share of the budget
        already trained; from 1 - anneal on, every sample, unscaled."""
        if not isinstance(progress, int | float) or not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
        cfg = self.config
        scale = np.ones(self.n, dtype=np.float32)
        keep = np.ones(self.n, dtype=bool)
        seen = ~np.isnan(self.scores)
        self.pruned_last_epoch = 0
        if progress >= 1.0 - cfg.anneal or cfg.prune_ratio == 0.0 or not seen.any():
            return keep, scale
        well_learned = seen & (self.scores < np.nanmean(self.scores))
        pruned = well_learned & (self.rng.random(self.n) < cfg.prune_ratio)
        scale[well_learned & ~pruned] = 1.0 / (1.0 - cfg.prune_ratio)
        keep[pruned] = False
        self.pruned_last_epoch = int(pruned.sum())
        return keep, scale

    def epoch(self, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """(indices of this epoch in training order, their loss scales): `plan`'s kept samples, shuffled."""
        keep, scale = self.plan(progress)
        order = self.rng.permutation(np.flatnonzero(keep))
        return order, scale[order]

    def merge_(self, all_reduce: Callable[[torch.Tensor], None]) -> None:
        """Makes every worker's scores those of all workers: each worker scored only the rows it read since the
        last merge; `all_reduce` is an in-place sum over the workers (a sample read twice gets the mean)."""
        fresh = self._fresh
        buf = torch.from_numpy(np.stack([np.where(fresh, self.scores, 0.0), fresh.astype(np.float64)]))
        all_reduce(buf)
        total, count = buf.numpy()
        got = count > 0
        self.scores[got] = total[got] / count[got]
        self._fresh[:] = False


def prune_batch(
    batch: Mapping[str, torch.Tensor], index: np.ndarray, keep: np.ndarray, scale: np.ndarray, min_rows: int = 2
) -> dict[str, torch.Tensor]:
    """The rows of `batch` this epoch keeps (`index`: each row's sample index into `keep`/`scale`), with
    "loss_weight" = scale * kept / rows: the mean of weight x loss over the kept rows is then sum(scale x loss)
    / rows, the full batch's mean loss in expectation. At least `min_rows` rows stay (a data-parallel worker must
    step with the others; BatchNorm needs two rows), the first ones of the batch, at their scale."""
    rows = len(index)
    sel = keep[index]
    if sel.sum() < min(min_rows, rows):
        sel = sel.copy()
        sel[: min(min_rows, rows)] = True
    weight = scale[index][sel] * (sel.sum() / rows)
    first = next(iter(batch.values()))
    mask = torch.from_numpy(sel).to(first.device)
    out = {k: v[mask] for k, v in batch.items()}
    out["loss_weight"] = torch.from_numpy(weight.astype(np.float32)).to(first.device)
    return out
