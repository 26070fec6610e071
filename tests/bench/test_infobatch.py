"""actors/infobatch.py: which samples an epoch skips, how the kept ones are scaled, annealing, bad config."""

from __future__ import annotations

import numpy as np
import pytest

from actors.infobatch import InfoBatch, InfoBatchConfig


def test_unscored_epoch_is_the_full_data_unscaled():
    ib = InfoBatch(50, seed=0)
    idx, scale = ib.epoch(0.0)
    assert np.array_equal(np.sort(idx), np.arange(50)) and np.all(scale == 1.0)


def test_prunes_only_below_mean_samples_and_rescales_the_kept_ones():
    n = 1000
    ib = InfoBatch(n, InfoBatchConfig(prune_ratio=0.5, anneal=0.125), seed=1)
    losses = np.where(np.arange(n) < 600, 0.1, 2.0)  # 600 well learned (below the mean 0.86), 400 hard
    ib.record(np.arange(n), losses)
    idx, scale = ib.epoch(0.5)
    assert len(set(idx.tolist())) == len(idx)  # no duplicates
    kept = set(idx.tolist())
    assert set(range(600, n)) <= kept  # every hard sample kept ...
    hard = idx >= 600
    assert np.all(scale[hard] == 1.0)  # ... unscaled
    assert np.allclose(scale[~hard], 2.0)  # kept easy ones carry 1 / (1 - 0.5)
    n_easy_kept = int((~hard).sum())
    assert 240 < n_easy_kept < 360  # about half of the 600 (binomial, sd ~12)
    assert ib.pruned_last_epoch == 600 - n_easy_kept
    # expected total weight of the easy samples is preserved: kept x 2 ~ 600
    assert abs(scale[~hard].sum() - 600) < 120


def test_annealing_uses_all_data_at_the_end():
    ib = InfoBatch(100, InfoBatchConfig(prune_ratio=0.5, anneal=0.25), seed=2)
    ib.record(np.arange(100), np.linspace(0, 1, 100))
    assert len(ib.epoch(0.5)[0]) < 100
    idx, scale = ib.epoch(0.8)
    assert len(idx) == 100 and np.all(scale == 1.0)


@pytest.mark.parametrize("kw", [dict(prune_ratio=1.0), dict(prune_ratio=-0.1), dict(anneal=1.5)])
def test_bad_config_raises(kw):
    with pytest.raises(ValueError, match="must be in"):
        InfoBatchConfig(**kw)
    with pytest.raises(ValueError, match="positive int"):
        InfoBatch(0)
