"""InfoBatch in the training loop (models/training.py + actors/infobatch.py): which rows an epoch trains on, how the
kept rows are weighted, that a pruned epoch makes fewer steps with the LR paced by epoch progress, pooled scores,
and scores in the checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from actors.infobatch import InfoBatch, InfoBatchConfig, KeptStream
from kernels.precision import PrecisionConfig, PrecisionPolicy
from models.cnn import ModelConfig, build_model
from models.training import EpochPacedLR, EpochPruner, TrainConfig, fit_epochs, make_optimizer, train_epoch


def _stream(n: int, rows: int):
    """Batches of `rows` rows over samples 0..n-1 in order; the image is the sample id."""
    for i in range(0, n, rows):
        ids = torch.arange(i, min(i + rows, n))
        yield {"image": ids.float()[:, None], "label": ids % 3, "sample_id": ids}


def test_kept_stream_rebatches_kept_rows_into_the_planned_full_steps():
    n = 40
    keep = np.arange(n) % 4 != 0  # 30 kept
    scale = np.where(np.arange(n) % 2 == 1, 2.0, 1.0).astype(np.float32)
    ks = KeptStream(_stream(n, 8), lambda ids: ids.numpy(), keep, scale, batch_size=8, steps=3)
    out = list(ks)
    assert [len(b["label"]) for b in out] == [8, 8, 8]  # full batches; the 6 kept rows left over are dropped
    ids = torch.cat([b["sample_id"] for b in out]).numpy()
    assert keep[ids].all() and len(set(ids.tolist())) == 24 and ids.tolist() == sorted(ids.tolist())
    for b in out:  # each row carries its own scale
        torch.testing.assert_close(b["loss_weight"], torch.from_numpy(scale[b["sample_id"].numpy()]))
        assert b["image"].flatten().tolist() == b["sample_id"].float().tolist()
    assert ks.read == n and ks.trained == 24  # the stream is read to its end


def test_kept_stream_fills_a_short_shard_with_skipped_rows_unscaled():
    n = 16
    keep = np.arange(n) < 10
    scale = np.full(n, 2.0, dtype=np.float32)
    out = list(KeptStream(_stream(n, 4), lambda ids: ids.numpy(), keep, scale, batch_size=4, steps=4))
    assert [len(b["label"]) for b in out] == [4, 4, 4, 4]
    ids = torch.cat([b["sample_id"] for b in out])
    weights = torch.cat([b["loss_weight"] for b in out])
    assert (weights[ids < 10] == 2.0).all() and (weights[ids >= 10] == 1.0).all() and (ids >= 10).sum() == 6
    # nothing left to fill with: the last batch is repeated, so every worker still makes its planned steps
    out = list(KeptStream(_stream(4, 4), lambda ids: ids.numpy(), np.ones(4, bool), scale[:4], 4, steps=2))
    assert len(out) == 2 and out[1]["sample_id"].tolist() == out[0]["sample_id"].tolist()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        KeptStream([], lambda ids: ids, keep, scale, 4, steps=0)


def test_train_epoch_applies_loss_weight_as_given():
    """Gradient of the step = that of mean(loss_weight x loss) over the batch's rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ref = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    weight = torch.tensor([2.0, 1.0, 1.0, 2.0])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    policy = PrecisionPolicy.for_device("cpu", PrecisionConfig(train_dtype="fp32"))
    batch = {"image": x, "label": y, "sample_id": torch.arange(4), "loss_weight": weight}
    seen = []
    train_epoch(model, [batch], opt, None, policy, on_loss=lambda b, loss: seen.append(loss))
    per = nn.functional.cross_entropy(ref(x), y, reduction="none")
    (per * weight).mean().backward()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            p -= p.grad  # the same SGD step, lr 1
            torch.testing.assert_close(q, p)
    torch.testing.assert_close(seen[0], per.detach())  # the rows' own, unweighted losses are the scores


def test_epoch_paced_lr_is_the_schedule_at_the_same_epoch_progress():
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1.0)
    spe = 10
    ref_opt, ref = make_optimizer(nn.Linear(2, 2), cfg, spe)
    uniform = []
    for _ in range(4 * spe):
        uniform.append(ref.get_last_lr()[0])
        ref_opt.step()
        ref.step()
    opt, sched = make_optimizer(nn.Linear(2, 2), cfg, spe)
    pace = EpochPacedLR(sched, spe)
    paced = []
    for epoch, steps in enumerate([10, 5, 4, 10]):
        pace.begin_epoch(epoch, steps)
        for _ in range(steps):
            paced.append(opt.param_groups[0]["lr"])
            pace.step()
    assert paced[:10] == uniform[:10] and paced[-10:] == uniform[-10:]  # full epochs: the schedule itself
    assert paced[10:15] == uniform[10:20:2]  # half the steps: every other step's LR
    assert paced[15:19] == [uniform[20], uniform[22], uniform[25], uniform[27]]  # (2 * 4 + b) * 10 // 4
    assert sched.last_epoch == 40 and opt.param_groups[0]["lr"] == sched.get_last_lr()[0]


def test_fit_epochs_trains_the_kept_rows_in_fewer_steps():
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
    assert [s.steps for s in uniform] == [n // batch] * epochs and [s.samples for s in uniform] == [n] * epochs
    # epoch 0: nothing scored yet; last epoch (progress 0.75 >= 1 - anneal): full data, the uniform steps
    assert pruned[0].samples == n and pruned[-1].samples == n and pruned[-1].steps == n // batch
    # in between, half of the below-mean-loss samples (a share of n between ~0.2 and ~0.8) are skipped, and the
    # epoch is the kept rows only: fewer optimizer steps
    for s in pruned[1:-1]:
        assert 0.55 * n < s.samples < 0.93 * n, [p.samples for p in pruned]
        assert s.steps == -(-s.samples // batch) < n // batch


def test_scores_and_draw_survive_a_checkpoint(tmp_path):
    """A restored run prunes from its first epoch and draws what the uninterrupted run draws (actors/trainer.py
    saves `state_dict` with rank 0's checkpoint and every worker loads it)."""
    from ray.train import Checkpoint

    from actors.trainer import _restore, _save

    cfg = TrainConfig(epochs=4, infobatch=InfoBatchConfig())
    ids = np.arange(100, 200)
    pruner = EpochPruner(100, cfg, ids)
    pruner.pruner.record(np.arange(100), np.linspace(0.0, 1.0, 100))
    pruner.pruner.epoch(0.25)  # moves the draw's generator on
    model = nn.Linear(2, 2)
    opt, sched = make_optimizer(model, cfg, 4)

    class Comm:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    job = type("Job", (), {"model": type("M", (), {"name": "tiny"})()})()
    d = _save(model, opt, sched, Comm(), None, 0, 1, job, pruner)
    restored = EpochPruner(100, cfg, ids)
    assert _restore(Checkpoint.from_directory(d), model, opt, sched, Comm(), None, 1, restored) == 2
    np.testing.assert_array_equal(restored.pruner.scores, pruner.pruner.scores)
    a, b = pruner.pruner.epoch(0.5), restored.pruner.epoch(0.5)
    assert len(a[0]) < 100 and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


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
