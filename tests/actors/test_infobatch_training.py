"""InfoBatch in the training loop (models/training.py + actors/infobatch.py): which rows an epoch trains on, how the
kept rows are weighted, that steps (so the LR schedule) stay those of the uniform run, and pooled scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from actors.infobatch import InfoBatch, InfoBatchConfig, prune_batch
from kernels.precision import PrecisionConfig, PrecisionPolicy
from models.cnn import ModelConfig, build_model
from models.training import TrainConfig, fit_epochs, train_epoch


def test_prune_batch_keeps_planned_rows_and_weights_them_to_the_full_batch_mean():
    keep = np.array([True, False, True, True, False, True])
    scale = np.array([1.0, 1.0, 2.0, 1.0, 1.0, 2.0], dtype=np.float32)
    batch = {"image": torch.arange(4.0)[:, None], "label": torch.tensor([0, 1, 2, 3])}
    index = np.array([5, 1, 2, 4])  # rows -> sample index: kept 5 (x2), 2 (x2); pruned 1, 4
    out = prune_batch(batch, index, keep, scale)
    assert out["image"].flatten().tolist() == [0.0, 2.0] and out["label"].tolist() == [0, 2]
    # mean over the 2 kept rows of w x loss == (2 loss_5 + 2 loss_2) / 4 rows
    torch.testing.assert_close(out["loss_weight"], torch.tensor([1.0, 1.0]))
    # all pruned: the first two rows stay (DDP workers step together; BN needs two rows)
    out = prune_batch(batch, np.array([1, 4, 1, 4]), keep, scale)
    assert out["label"].tolist() == [0, 1]
    torch.testing.assert_close(out["loss_weight"], torch.tensor([0.5, 0.5]))


def test_train_epoch_applies_loss_weight_as_given():
    """Gradient of the step = that of sum(scale x loss) over the kept rows / all rows of the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    keep = np.array([True, False, True, True, True, False])
    scale = np.array([2.0, 1.0, 1.0, 2.0, 1.0, 1.0], dtype=np.float32)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    policy = PrecisionPolicy.for_device("cpu", PrecisionConfig(train_dtype="fp32"))
    batch = {"image": x, "label": y, "sample_id": torch.arange(6)}
    seen = []
    train_epoch(model, [batch], opt, None, policy,
                select=lambda b: prune_batch(b, b["sample_id"].numpy(), keep, scale),
                on_loss=lambda b, loss: seen.append((b["sample_id"].tolist(), loss)))  # fmt: skip
    per = nn.functional.cross_entropy(ref(x), y, reduction="none")
    (per * torch.from_numpy(scale * keep)).sum().div(6).backward()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            p -= p.grad  # the same SGD step, lr 1
            torch.testing.assert_close(q, p)
    assert seen[0][0] == [0, 2, 3, 4]  # the kept rows' own losses are what gets recorded
    torch.testing.assert_close(seen[0][1], per.detach()[[0, 2, 3, 4]])


def test_fit_epochs_skips_the_expected_share_with_the_same_steps():
    n, batch, epochs = 256, 32, 4
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)
    x += y[:, None, None, None].float()  # learnable: some samples fall well below the mean loss
    runs = {}
    for name, ib in (("uniform", None), ("infobatch", InfoBatchConfig(prune_ratio=0.5, anneal=0.25))):
        torch.manual_seed(0)
        model = build_model(ModelConfig.preset("tiny", in_channels=3, num_classes=4))
        cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=0.05, bn_recompute_rows=0, infobatch=ib,
                          precision=PrecisionConfig(train_dtype="fp32"))  # fmt: skip
        runs[name] = fit_epochs(model, (x, y), cfg)
    uniform, pruned = runs["uniform"], runs["infobatch"]
    # the LR schedule is per step: the same optimizer steps every epoch
    assert [s.steps for s in pruned] == [s.steps for s in uniform] == [n // batch] * epochs
    assert [s.samples for s in uniform] == [n] * epochs
    # epoch 0: nothing scored yet; last epoch (progress 0.75 >= 1 - anneal): full data again
    assert pruned[0].samples == n and pruned[-1].samples == n
    # in between, half of the below-mean-loss samples (a share of n between ~0.2 and ~0.8) are skipped
    for s in pruned[1:-1]:
        assert 0.55 * n < s.samples < 0.93 * n, [p.samples for p in pruned]


def test_merge_pools_scores_of_all_workers():
    a, b = InfoBatch(6, seed=0), InfoBatch(6, seed=0)
    a.record(np.array([0, 1, 2]), np.array([1.0, 2.0, 3.0]))
    b.record(np.array([2, 3]), np.array([5.0, 4.0]))
    pre = {}  # each worker's buffer before the reduce
    for name, ib in (("a", a), ("b", b)):
        copy.deepcopy(ib).merge_(lambda t, name=name: pre.__setitem__(name, t.clone()))
    a.merge_(lambda t: t.add_(pre["b"]))  # an all-reduce sum over the two workers
    b.merge_(lambda t: t.add_(pre["a"]))
    for ib in (a, b):
        np.testing.assert_allclose(ib.scores[:4], [1.0, 2.0, 4.0, 4.0])  # sample 2 read by both: the mean
        assert np.isnan(ib.scores[4:]).all()
    assert not a._fresh.any() and not b._fresh.any()


def test_bad_infobatch_config():
    with pytest.raises(TypeError, match="infobatch must be an InfoBatchConfig"):
        TrainConfig(infobatch=0.5)
    with pytest.raises(ValueError, match="progress must be a number in"):
        InfoBatch(4).plan(1.5)


def test_cli_flag_reaches_the_train_config():
    from tandem.cli import build_parser, run_config

    cfg = run_config(build_parser().parse_args(["run", "--smoke", "--infobatch"]))
    assert isinstance(cfg.train.infobatch, InfoBatchConfig) and cfg.train_job().train.infobatch is cfg.train.infobatch
    assert run_config(build_parser().parse_args(["run", "--smoke"])).train.infobatch is None
    with pytest.raises(ValueError, match="--infobatch needs a uniform stream"):
        run_config(build_parser().parse_args(["run", "--smoke", "--infobatch", "--weighted"]))
