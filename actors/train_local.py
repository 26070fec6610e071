"""Single-process training and evaluation: the epoch and eval steps the Ray Train loop reuses, and a local fit for
`tandem run` on one machine and for tests."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.precision import PrecisionConfig, PrecisionPolicy


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Optimization settings shared by local and Ray Train runs."""

    epochs: int = 8
    """Passes over the training data."""
    batch_size: int = 64
    """Samples per step (per worker in distributed runs)."""
    lr: float = 0.1
    """Peak learning rate of SGD with Nesterov momentum; cosine decay to 0 after one warm-up epoch."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    seed: int = 0
    """Seed for initialization and shuffling."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Training dtype / TF32 overrides (default: chosen from the hardware)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v < 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")


def make_optimizer(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int):
    """SGD (Nesterov) with linear warm-up over the first epoch and cosine decay; no weight decay on BN/bias."""
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
    warm = min(steps_per_epoch, total // 2)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass(slots=True)
class EpochStats:
    loss: float
    accuracy: float
    samples: int
    seconds: float

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
    sched.step()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    opt: torch.optim.Optimizer,
    sched,
    policy: PrecisionPolicy,
    on_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over `batches` of (images, labels); returns mean loss and training accuracy."""
    model.train()
    scaler = policy.grad_scaler()
    total_loss, correct, seen, t0 = 0.0, 0, 0, time.perf_counter()
    for x, y in batches:
        with policy.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer_step(loss, opt, sched, scaler)
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == y).sum().item()
        seen += n
        if on_step is not None:
            on_step(n)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), seen, time.perf_counter() - t0)


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


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator):
    perm = torch.randperm(len(x), generator=generator)
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) > 1:  # a batch of 1 has no batch variance for BatchNorm
            yield x[idx], y[idx]


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
    x, y = train
    steps = math.ceil(len(x) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs * len(x), unit="sample", desc="train", leave=False)
    for epoch in range(cfg.epochs):
        stats = train_one_epoch(
            model,
            shuffled_batches(x, y, cfg.batch_size, gen),
            opt,
            sched,
            policy,
            bar.update if bar else None,
        )
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
    if bar is not None:
        bar.close()
    last = history[-1]
    return FitResult(history, last["test_loss"], last["test_accuracy"], policy.describe())
