"""The one training loop (Ray-free): optimizer and schedule, the epoch, BatchNorm re-estimation, evaluation and
a local fit. Local training, every Ray Train worker (actors/trainer.py), QAT fine-tuning (models/quantize.py)
and the sweep's fine-tune (tune/trial.py) all run `train_epoch`, so they cannot drift apart.

BatchNorm statistics. In training, BN normalizes with the batch's statistics and keeps an exponential moving
average (momentum 0.1) for inference. When a run makes few optimizer steps (4 workers x 64 rows on 866 rows
is 3 steps an epoch) the average trails the fast-moving weights, and in data-parallel runs each worker keeps
its own average of its own shard (DDP broadcasts rank 0's). `recompute_bn_stats_` re-estimates them after each
epoch with the final weights on a sample of that epoch's training batches (cumulative average, "precise BN",
Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021), averaged over workers when a reduce is given, before
evaluation and export.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv_bn import plan_save_modes_on_first_step_
from kernels.precision import PrecisionConfig, PrecisionPolicy

if TYPE_CHECKING:
    from actors.infobatch import InfoBatchConfig


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimization settings shared by local and Ray Train runs, QAT and the sweep's fine-tune."""

    epochs: int = 8
    """Passes over the training data."""
    batch_size: int = 64
    """Samples per optimizer step. In a distributed run this is the global batch, split evenly over the workers,
    so N workers make as many steps per epoch, under the same LR schedule, as local training: with 64 rows per
    worker instead, 4 workers made 4x fewer steps and MNIST-1D ended 1.6-4.3 points below `--local` whatever the
    LR scaling (linear, sqrt, none); with the global batch it ended +0.3 (bench/dist_accuracy.py)."""
    lr: float = 0.1
    """Peak learning rate of SGD with Nesterov momentum; cosine decay to 0 after the warm-up."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay (not on BN parameters and biases)."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs (at most half of all steps); 0 starts at the peak."""
    bn_recompute_rows: int = 1024
    """Training rows (per worker) over which BN statistics are re-estimated after each epoch; 0 keeps the
    running averages as they are."""
    seed: int = 0
    """Seed for initialization and shuffling."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Training dtype / TF32 overrides (default: chosen from the hardware)."""
    infobatch: InfoBatchConfig | None = None
    """InfoBatch-style pruning (actors/infobatch.py): each epoch trains on its kept rows only (a share of the
    below-mean-loss samples skipped, the kept ones rescaled; fewer optimizer steps, the LR paced by epoch
    progress), full data in the last epochs. None: off."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if not isinstance(self.bn_recompute_rows, int) or self.bn_recompute_rows < 0:
            raise ValueError(f"bn_recompute_rows must be an int >= 0, got {self.bn_recompute_rows!r}")
        if self.infobatch is not None:
            # imported here: actors/infobatch.py is numpy/torch only, and the Ray-free users of this module
            # (tune/, QAT) need not load it
            from actors.infobatch import InfoBatchConfig

            if not isinstance(self.infobatch, InfoBatchConfig):
                raise TypeError(f"infobatch must be an InfoBatchConfig or None, got {type(self.infobatch).__name__}")


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """SGD (Nesterov) with linear warm-up and cosine decay over `cfg.epochs * steps_per_epoch` steps (the
    caller counts optimizer steps: per worker batches in a distributed run); no weight decay on BN/bias."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total // 2)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class EpochPacedLR:
    """`make_optimizer`'s schedule paced by epoch progress instead of by step: step b of an epoch of nb steps
    runs at the LR the uniform run has at the same share of the epochs, (epoch + b / nb) / epochs, i.e. its step
    (epoch * nb + b) * steps_per_epoch // nb. For epochs that make fewer steps than the uniform run (InfoBatch as
    the paper runs it); with nb = steps_per_epoch it is the schedule itself. `step()` as a scheduler's; the
    scheduler's `last_epoch` follows, so its checkpointed state stays meaningful."""

    def __init__(self, sched: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int):
        self.sched, self.steps_per_epoch = sched, steps_per_epoch
        self.epoch, self.steps, self.b = 0, steps_per_epoch, 0

    def begin_epoch(self, epoch: int, steps: int) -> None:
        """The next `steps` optimizer steps make epoch `epoch`."""
        self.epoch, self.steps, self.b = epoch, max(1, steps), 0
        self._apply()

    def step(self) -> None:
        self.b += 1
        self._apply()

    def _apply(self) -> None:
        s = self.sched
        k = (self.epoch * self.steps + self.b) * self.steps_per_epoch // self.steps
        lrs = [base * f(k) for base, f in zip(s.base_lrs, s.lr_lambdas, strict=True)]
        for g, lr in zip(s.optimizer.param_groups, lrs, strict=True):
            g["lr"] = lr
        s.last_epoch, s._last_lr = k, lrs


@dataclass(slots=True)
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float
    steps: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, scaler) -> None:
    """Backward, optimizer and scheduler step (through the GradScaler for fp16 training when given)."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if sched is not None:
        sched.step()


Batch = Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]


class BNSample:
    """The last `rows` training inputs of an epoch (references to the batches, not copies)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.batches: list[torch.Tensor] = []
        self._n = 0

    def add(self, x: torch.Tensor) -> None:
        if self.rows <= 0:
            return
        self.batches.append(x.detach())
        self._n += len(x)
        while self.batches and self._n - len(self.batches[0]) >= self.rows:
            self._n -= len(self.batches.pop(0))


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    opt: torch.optim.Optimizer,
    sched,
    policy: PrecisionPolicy,
    *,
    on_batch: Callable[[Mapping[str, torch.Tensor], torch.Tensor], None] | None = None,
    bn_sample: BNSample | None = None,
    step_model: nn.Module | None = None,
    on_loss: Callable[[Mapping[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> EpochStats:
    """One pass over `batches` ((images, labels) or dicts with "image", "label" and optionally "loss_scale", a
    per-sample loss weight normalized to mean 1 in each batch, or "loss_weight", one applied as it is).
    `step_model` is what the forward runs through (a DDP wrapper of `model`), `on_batch(batch, logits)` sees
    each batch after its step,
    `on_loss(batch, per_sample_loss)` its detached per-sample losses, `bn_sample` keeps inputs for
    `recompute_bn_stats_`. Returns this process's mean loss, accuracy, rows and steps."""
    run = step_model if step_model is not None else model
    run.train()
    scaler = policy.grad_scaler()
    total_loss, correct, seen, steps, t0 = 0.0, 0, 0, 0, time.perf_counter()
    for batch in batches:
        if isinstance(batch, tuple):
            batch = {"image": batch[0], "label": batch[1]}
        x, y = batch["image"], batch["label"]
        with policy.autocast():
            logits = run(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        scale, weight = batch.get("loss_scale"), batch.get("loss_weight")
        if weight is not None:
            loss = (per_sample * weight.float()).mean()
        elif scale is not None:
            loss = (per_sample * (scale.float() / scale.float().mean())).mean()
        else:
            loss = per_sample.mean()
        optimizer_step(loss, opt, sched, scaler)
        steps += 1
        seen += len(y)
        total_loss += per_sample.sum().item()
        correct += (logits.argmax(1) == y).sum().item()
        if bn_sample is not None:
            bn_sample.add(x)
        if on_batch is not None:
            on_batch(batch, logits.detach())
        if on_loss is not None:
            on_loss(batch, per_sample.detach())
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - t0, steps)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn_stats_(
    model: nn.Module,
    inputs: Iterable[torch.Tensor],
    all_reduce: Callable[[torch.Tensor], None] | None = None,
    world: int = 1,
) -> int:
    """Re-estimates every BatchNorm's running mean and variance as the plain average over `inputs` (batches of
    images) with the current weights. `all_reduce` (an in-place sum over `world` workers, each with the same
    number of rows) makes the statistics those of all workers' rows: mean = E[mean_r], var = E[var_r +
    mean_r^2] - mean^2. Returns the number of BN layers updated (0 when there are no inputs)."""
    bns = _batchnorms(model)
    inputs = list(inputs)
    if not bns or not inputs:
        return 0
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
        model.train()
        for x in inputs:
            model(x)
    finally:
        for bn, m in zip(bns, momenta, strict=True):
            bn.momentum = m
        model.train(was_training)
    if all_reduce is not None and world > 1:
        for bn in bns:
            mean, var = bn.running_mean, bn.running_var
            buf = torch.cat([mean, var + mean * mean]).double()
            all_reduce(buf)
            buf /= world
            m, sq = buf.split(len(mean))
            mean.copy_(m)
            var.copy_((sq - m * m).clamp_min(0))
    return len(bns)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` in eval mode over tensors x (N, C, H, W), y (N,)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size]).float()
        total_loss += F.cross_entropy(logits, y[i : i + batch_size], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch_size]).sum().item()
    return total_loss / len(x), correct / len(x)


def shuffled_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator, with_ids: bool = False
):
    """(x, y) batches of a random permutation; dicts with the rows' "sample_id" (index into x) when `with_ids`."""
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) > 1:  # a batch of 1 has no batch variance for BatchNorm
            yield {"image": x[idx], "label": y[idx], "sample_id": idx} if with_ids else (x[idx], y[idx])


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    opt: torch.optim.Optimizer,
    sched,
    policy: PrecisionPolicy,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """`train_epoch` with a per-step row-count callback (progress bars, benchmarks)."""
    cb = None if on_step is None else (lambda batch, logits: on_step(len(batch["label"])))
    return train_epoch(model, batches, opt, sched, policy, on_batch=cb)


def fit_epochs(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    policy: PrecisionPolicy | None = None,
) -> list[EpochStats]:
    """`cfg.epochs` shuffled passes over CPU tensors `train` (x (N, C, H, W), y (N,)) in this process, with BN
    statistics re-estimated after each; `on_epoch(epoch, stats)` after each; a lean model's save plan is made by
    its first step (kernels.conv_bn.SavePlan). The loop local training, QAT
    and the sweep's fine-tune share. With `cfg.infobatch`, each epoch trains on InfoBatch's kept rows only
    (fewer steps, `stats.samples` counts them), the LR paced by epoch progress."""
    policy = policy or PrecisionPolicy.for_device("cpu", cfg.precision)
    x, y = train
    plan_save_modes_on_first_step_(model)  # lean ops: recompute or keep the conv output, at this batch
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    cb = None if on_step is None else (lambda batch, logits: on_step(len(batch["label"])))
    pruner = infobatch_pruner(len(x), cfg)
    pace = EpochPacedLR(sched, steps_per_epoch) if pruner else None
    out = []
    for epoch in range(cfg.epochs):
        sample = BNSample(cfg.bn_recompute_rows)
        if pruner:
            batches = pruner.tensor_batches(epoch, x, y, cfg.batch_size)
            pace.begin_epoch(epoch, len(batches))
        else:
            batches = shuffled_batches(x, y, cfg.batch_size, gen)
        stats = train_epoch(model, batches, opt, pace or sched, policy, on_batch=cb, bn_sample=sample,
                            on_loss=pruner.record if pruner else None)  # fmt: skip
        recompute_bn_stats_(model, sample.batches)
        out.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return out


class EpochPruner:
    """InfoBatch (actors/infobatch.py) as a training loop uses it: each epoch's batches of kept rows (over tensors,
    `tensor_batches`; over a stream, `stream_batches`), and `record`, train_epoch's `on_loss`, which keeps the
    step's own per-sample losses as scores. `ids`: the dataset's sample ids when they are not 0..n-1 (a Ray Data
    stream)."""

    def __init__(self, n: int, cfg: TrainConfig, ids: np.ndarray | None = None):
        from actors.infobatch import InfoBatch

        self.pruner = InfoBatch(n, cfg.infobatch, seed=cfg.seed)
        self.epochs = cfg.epochs
        self.sorted_ids = None if ids is None else np.sort(np.asarray(ids))
        self.skipped = 0
        """Rows of the last epoch left out."""

    def index(self, sample_id: torch.Tensor) -> np.ndarray:
        ids = sample_id.detach().cpu().numpy()
        return ids if self.sorted_ids is None else np.searchsorted(self.sorted_ids, ids)

    def record(self, batch: Mapping[str, torch.Tensor], per_sample: torch.Tensor) -> None:
        self.pruner.record(self.index(batch["sample_id"]), per_sample.float().cpu().numpy())

    def tensor_batches(self, epoch: int, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[dict]:
        """Epoch `epoch` over tensors x (N, ...), y (N,): the kept rows shuffled, in batches of `batch_size` (the
        last one partial if it has 2 rows or more), each with its rows' "loss_weight" and "sample_id"."""
        order, scale = self.pruner.epoch(epoch / self.epochs)
        self.skipped = len(x) - len(order)
        out = []
        for i in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[i : i + batch_size])
            if len(idx) > 1:  # a batch of 1 has no batch variance for BatchNorm
                weight = torch.from_numpy(scale[i : i + batch_size])
                out.append({"image": x[idx], "label": y[idx], "sample_id": idx, "loss_weight": weight})
        return out

    def stream_batches(self, epoch: int, batches: Iterable[Mapping[str, torch.Tensor]], batch_size: int,
                       rows: int, workers: int = 1):  # fmt: skip
        """Epoch `epoch` over a stream of batches that reads `rows` rows over all `workers` (this worker's share
        of them): the kept rows re-batched (actors/infobatch.py `KeptStream`), as many steps on every worker,
        the kept share of the data's worth: (rows x kept share) // (workers x batch_size), at least 1."""
        from actors.infobatch import KeptStream

        keep, scale = self.pruner.plan(epoch / self.epochs)
        steps = max(1, int(rows * keep.mean()) // (workers * batch_size))
        return KeptStream(batches, self.index, keep, scale, batch_size, steps)


def infobatch_pruner(n: int, cfg: TrainConfig, ids: np.ndarray | None = None) -> EpochPruner | None:
    """The epoch pruner of `cfg.infobatch` over `n` samples, or None when it is off."""
    return None if cfg.infobatch is None else EpochPruner(n, cfg, ids)


@dataclass(slots=True)
class FitResult:
    history: list[dict]
    test_loss: float
    test_accuracy: float
    policy: dict


def fit_local(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    cfg: TrainConfig,
    progress: bool = False,
) -> FitResult:
    """Trains `model` on CPU tensors in this process; evaluates on `test` after every epoch."""
    torch.manual_seed(cfg.seed)
    policy = PrecisionPolicy.for_device("cpu", cfg.precision)
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs * len(train[0]), unit="sample", desc="train", leave=False)

    def on_epoch(epoch: int, stats: EpochStats) -> None:
        test_loss, test_acc = evaluate(model, *test)
        history.append(
            dict(
                epoch=epoch,
                loss=stats.loss,
                train_accuracy=stats.accuracy,
                test_loss=test_loss,
                test_accuracy=test_acc,
                samples_per_s=stats.samples_per_s,
            )
        )
        if bar is not None:
            bar.set_postfix(loss=f"{stats.loss:.3f}", test_acc=f"{test_acc:.3f}")

    fit_epochs(model, train, cfg, on_epoch, bar.update if bar else None, policy)
    if bar is not None:
        bar.close()
    last = history[-1]
    return FitResult(history, last["test_loss"], last["test_accuracy"], policy.describe())
