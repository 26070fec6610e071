"""Dynamic data weighting (the seed's per-sample rule) vs uniform sampling: samples trained on until a target test
accuracy (issue: distributed training, "Benchmarks").

The training loop of actors/trainer.py is simulated in one process so that many seeds fit: the same model preset,
optimizer and schedule (`make_optimizer`: SGD Nesterov, warm-up, cosine over the whole budget), the same
`SampleWeightStore` drawing each interval's rows (multinomial by weight, then shuffled), difficulty recorded every
step as the exact last-layer per-sample gradient norm (`last_layer_grad_norm`), the unbiased loss scale normalised
per batch as the trainer does. Every variant gets the same budget of samples; the test accuracy is evaluated every
`eval_every` steps, and a run's "samples to target" is the first evaluation at or above the target, which is a
fixed fraction (`target_frac`) of the mean final accuracy of uniform permutation (runs that never reach it count as
the budget plus one evaluation interval). Counting samples, not seconds, makes this immune to a loaded machine.

Variants (classes below; seeds paired: the same initial weights for every variant of a seed):
  uniform_permutation     every sample once per epoch, reshuffled (the usual loader; control 1)
  uniform_replacement     uniform multinomial draws: sampling with replacement, no weighting (control 2)
  seed_rule               the seed's rule per epoch: top 10% difficulty x1.05 (cap 3), others x0.95 (floor 0.5)
  seed_rule_unbiased      the same draw, each sample's loss scaled by 1 / (N p_i)
  seed_rule_every_k       the seed's rule applied and the rows redrawn every k steps (a quarter epoch), unbiased
  difficulty_mix          this benchmark's design: p_i = a / N + (1 - a) d_i / sum(d), d_i = the latest recorded
                          last-layer gradient norm of sample i, redrawn every k steps, unbiased; importance
                          sampling by the gradient-norm bound (Katharopoulos & Fleuret 2018) mixed with uniform
  difficulty_mix_biased   the same draw without the loss correction (hard-example emphasis, as the seed's rule)
  infobatch               InfoBatch-style pruning (actors/infobatch.py, ICLR 2024): each epoch skips a share r of
                          the below-mean-loss samples, scales the kept ones' loss by 1 / (1 - r), full data in the
                          last share of the budget (InfoBatchConfig's defaults); scores are the step's own
                          per-sample losses. The uniform run's steps over full batches of kept rows (the budget of
                          samples spans more, shorter epochs); compared by training CPU time to the target
                          (sampling and scoring included)
  infobatch_paper         the same pruning as the paper runs it, and as the trainer's `--infobatch` does: an epoch
                          is its kept rows only, so it makes fewer optimizer steps; the LR follows epoch progress
                          (models/training.py EpochPacedLR: the uniform run's LR at the same share of the
                          epochs); the trainer's InfoBatchConfig defaults. The infobatch_* keys report it.

Keys, per dataset (prefix `mnist1d_`, `digits_`):
  seed_rule_ratio         mean samples to target, seed_rule / uniform_permutation         goal <= 1.05
  best_ratio              the same for the best weighting variant                          goal <= 0.85 (MNIST-1D)
  best_ratio_ci_high      upper bound of its paired bootstrap 95% interval over seeds       goal < 1
  best_ratio_vs_replacement[_ci_high]   best variant / uniform_replacement                 goal < 1 (upper bound)
  best_variant            its name (chosen by mean ratio among the weighting variants; the interval does not
                          account for that choice)
  final_acc_delta_pts     mean final test accuracy, best - uniform_permutation, in points   goal >= -0.2
  infobatch_wall_ratio[_ci]  training CPU seconds to target, infobatch_paper / uniform_permutation, paired bootstrap
                          95% interval over seeds                                          goal <= 0.80
  infobatch_acc_delta_pts mean final test accuracy, infobatch_paper - uniform_permutation, pts goal >= -0.3
Plus per variant: ratios and intervals against both controls, final accuracy, runs that reached the target, the
mean accuracy curve. Writes bench/results/weighting.json. `--quick`: 5 seeds (a few minutes); default 20 seeds.
`--jobs 2` trains seeds in parallel processes; `--cache FILE` appends each finished seed's runs there, so an
interrupted invocation resumes and a repeated one only re-summarises (its `seconds` then count new runs only).
`--infobatch-only --jobs 2`: the InfoBatch keys alone (MNIST-1D; uniform_permutation, uniform_replacement,
infobatch_paper), 20 seeds in about 4-7 minutes on 2 cores (a --quick run, 5 seeds, took 59 s with --jobs 2 on a
loaded machine: about 24 core-seconds per seed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from actors.infobatch import InfoBatch, InfoBatchConfig
from actors.train_local import TrainConfig, evaluate, make_optimizer
from actors.weight_store import SampleWeightStore, WeightRule, last_layer_grad_norm
from bench._common import print_table, write_result
from models.cnn import ModelConfig, build_model
from models.training import EpochPacedLR

GOALS = {
    "best_ratio": 0.85,
    "best_ratio_ci_high": 1.0,
    "best_ratio_vs_replacement_ci_high": 1.0,
    "seed_rule_ratio": 1.05,
    "final_acc_delta_pts": -0.2,
    "infobatch_wall_ratio": 0.80,
    "infobatch_acc_delta_pts": -0.3,
}
CONTROLS = ("uniform_permutation", "uniform_replacement")
PRUNING = ("infobatch", "infobatch_paper")
"""Variants that skip samples rather than weight them: compared by wall-clock, not in the best-variant choice."""
INFOBATCH_KEYS_FROM = "infobatch_paper"
"""The variant the infobatch_* keys report: the paper's (fewer steps), which alone can save wall-clock."""


# -- data -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Data:
    train_x: torch.Tensor  # (N, C, H, W)
    train_y: torch.Tensor  # (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def load_digits_data() -> Data:
    """scikit-learn's bundled 8x8 digits through the project's own preparation (parquet, stratified split)."""
    from actors.dataset import DataConfig, load_tensors, prepare_data

    with tempfile.TemporaryDirectory(prefix="bench-weighting-") as d:
        splits = prepare_data(DataConfig(), d)
        _, x, y = load_tensors(splits.train)
        _, xt, yt = load_tensors(splits.test)
    return Data(x, y, xt, yt)


def load_mnist1d_data(num_samples: int, seed: int = 42) -> Data:
    """MNIST-1D (Greydanus 2020) generated offline from its templates by the `mnist1d` package: 1x1x40 signals,
    80/20 split; the package's default transform parameters."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32).view(-1, 1, 1, a.shape[-1])  # (N, 1, 1, 40)

    return Data(
        images(d["x"]),
        torch.tensor(d["y"], dtype=torch.int64),
        images(d["x_test"]),
        torch.tensor(d["y_test"], dtype=torch.int64),
    )


# -- samplers -----------------------------------------------------------------------------------------------------
class Sampler:
    """Yields batches of sample indices (and per-sample loss scales, or None) and takes back their difficulty."""

    unbiased = False

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.rng = np.random.default_rng([seed, 7])
        self.queue = np.empty(0, dtype=np.int64)
        self.scales = np.empty(0, dtype=np.float32)
        self.chunks = 0

    def chunk(self) -> tuple[np.ndarray, np.ndarray]:
        """The next interval's rows in training order and their loss scales."""
        raise NotImplementedError

    def record(self, idx: np.ndarray, difficulty: np.ndarray) -> None:
        pass

    def next_batch(self) -> tuple[np.ndarray, np.ndarray | None]:
        # Batches run on across interval boundaries, so no drawn row is dropped.
        while len(self.queue) < self.batch_size:
            idx, scale = self.chunk()
            self.chunks += 1
            self.queue = np.concatenate([self.queue, idx])
            self.scales = np.concatenate([self.scales, scale])
        idx, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
        scale, self.scales = self.scales[: self.batch_size], self.scales[self.batch_size :]
        return idx, (scale if self.unbiased else None)


class InfoBatchSampler(Sampler):
    """actors/infobatch.py: each epoch skips a share of the below-mean-loss samples, scales the kept ones' loss
    by 1 / (1 - r), full data in the last `anneal` share of the budget. Scores are the per-sample losses of the
    step (no extra computation); the loss scales are applied as given (not normalised per batch)."""

    unbiased = True
    normalise_scale = False
    score = "loss"

    def __init__(self, n: int, batch_size: int, seed: int, config: InfoBatchConfig):
        super().__init__(n, batch_size, seed)
        self.pruner = InfoBatch(n, config, seed=seed)
        self.budget_rows = None  # set by train_run: rows of the whole budget (the progress of annealing)
        self.drawn = 0

    def chunk(self):
        progress = self.drawn / self.budget_rows if self.budget_rows else 0.0
        idx, scale = self.pruner.epoch(progress)
        self.drawn += len(idx)
        return idx, scale

    def record(self, idx, difficulty):
        self.pruner.record(idx, difficulty)


class UniformPermutation(Sampler):
    def chunk(self):
        return self.rng.permutation(self.n), np.ones(self.n, dtype=np.float32)


class StoreSampler(Sampler):
    """Draws through the project's `SampleWeightStore`: one store "epoch" per interval of `interval` rows; the
    store applies its rule to the previous interval's difficulties when the next one begins."""

    def __init__(self, n: int, batch_size: int, seed: int, rule: WeightRule, interval: int, unbiased: bool):
        super().__init__(n, batch_size, seed)
        self.store = SampleWeightStore(np.arange(n), rule, seed=seed)
        self.interval, self.unbiased = interval, unbiased
        self.ids = np.arange(n)

    def chunk(self):
        self.store.begin_epoch(self.chunks, self.interval)
        counts, scale = self.store.counts_for(self.ids)
        idx = self.rng.permutation(np.repeat(self.ids, counts))
        return idx, scale[idx]

    def record(self, idx, difficulty):
        self.store.record(idx, difficulty, steps=1)


class DifficultyMix(Sampler):
    """p_i = a / N + (1 - a) d_i / sum(d) with d_i the latest recorded difficulty (the mean of the recorded ones for
    samples not yet seen), redrawn every `interval` rows; loss scale 1 / (N p_i) when unbiased."""

    def __init__(self, n: int, batch_size: int, seed: int, interval: int, mix: float, unbiased: bool):
        super().__init__(n, batch_size, seed)
        self.interval, self.mix, self.unbiased = interval, mix, unbiased
        self.difficulty = np.full(n, np.nan)

    def chunk(self):
        d = self.difficulty
        seen = ~np.isnan(d)
        d = np.where(seen, d, d[seen].mean() if seen.any() else 1.0)
        p = self.mix / self.n + (1.0 - self.mix) * d / d.sum()
        p /= p.sum()
        idx = self.rng.permutation(np.repeat(np.arange(self.n), self.rng.multinomial(self.interval, p)))
        return idx, (1.0 / (self.n * p[idx])).astype(np.float32)

    def record(self, idx, difficulty):
        self.difficulty[idx] = difficulty


def _interval(epochs: float, n: int, batch_size: int) -> int:
    return max(batch_size, int(round(epochs * n)))


@dataclass(frozen=True, slots=True)
class PermutationVariant:
    """Every sample once per epoch, reshuffled."""

    name: str

    def build(self, n: int, batch_size: int, seed: int) -> Sampler:
        return UniformPermutation(n, batch_size, seed)


@dataclass(frozen=True, slots=True)
class StoreVariant:
    """Draws by `SampleWeightStore` weights under `rule`, redrawn every `interval_epochs` epochs of rows."""

    name: str
    rule: WeightRule
    unbiased: bool = False
    interval_epochs: float = 1.0
    """1 = the seed's per-epoch update."""

    def build(self, n: int, batch_size: int, seed: int) -> Sampler:
        interval = _interval(self.interval_epochs, n, batch_size)
        return StoreSampler(n, batch_size, seed, self.rule, interval, self.unbiased)


@dataclass(frozen=True, slots=True)
class MixVariant:
    """Difficulty-proportional draws mixed with uniform (`DifficultyMix`)."""

    name: str
    mix: float = 0.5
    """Uniform share a of the draw probability."""
    interval_epochs: float = 0.25
    unbiased: bool = True

    def build(self, n: int, batch_size: int, seed: int) -> Sampler:
        interval = _interval(self.interval_epochs, n, batch_size)
        return DifficultyMix(n, batch_size, seed, interval, self.mix, self.unbiased)


@dataclass(frozen=True, slots=True)
class InfoBatchVariant:
    """InfoBatch-style pruning (`InfoBatchSampler`)."""

    name: str
    config: InfoBatchConfig = field(default_factory=InfoBatchConfig)
    """Prune share and annealing: by default the trainer's (`--infobatch`)."""
    skip_steps: bool = False
    """True: as the paper, an epoch is the kept rows only (fewer optimizer steps), the LR schedule paced by epoch
    progress, the annealing by epoch (`train_run_epochs`); False: the uniform run's steps over the same samples."""

    def build(self, n: int, batch_size: int, seed: int) -> Sampler:
        return InfoBatchSampler(n, batch_size, seed, self.config)


Variant = PermutationVariant | StoreVariant | MixVariant | InfoBatchVariant
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        PermutationVariant(name="uniform_permutation"),
        StoreVariant(name="uniform_replacement", rule=WeightRule(up=1.0, down=1.0)),  # weights never move
        StoreVariant(name="seed_rule", rule=WeightRule()),
        StoreVariant(name="seed_rule_unbiased", rule=WeightRule(), unbiased=True),
        StoreVariant(name="seed_rule_every_k", rule=WeightRule(), unbiased=True, interval_epochs=0.25),
        MixVariant(name="difficulty_mix", mix=0.5, interval_epochs=0.25),
        MixVariant(name="difficulty_mix_biased", mix=0.5, interval_epochs=0.25, unbiased=False),
        InfoBatchVariant(name="infobatch"),
        InfoBatchVariant(name="infobatch_paper", skip_steps=True),
    )
}


# -- one run ------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True, slots=True)
class Setting:
    """One dataset's training budget."""

    dataset: str
    """digits | mnist1d"""
    epochs: int
    """Budget in epochs of N samples (the LR schedule spans it)."""
    preset: str = "tiny"
    """Model preset."""
    batch_size: int = 64
    """Samples per step."""
    lr: float = 0.1
    """Peak learning rate."""
    evals_per_epoch: int = 4
    """Test-set evaluations per epoch of samples."""
    target_frac: float = 0.98
    """Target = this fraction of uniform permutation's mean final test accuracy."""
    mnist1d_samples: int = 6000
    """MNIST-1D samples generated (train + test, 80/20)."""

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "mnist1d"):
            raise ValueError(f"dataset must be 'digits' or 'mnist1d', got {self.dataset!r}")
        if not 0.0 < self.target_frac <= 1.0:
            raise ValueError(f"target_frac must be in (0, 1], got {self.target_frac}")


def train_run(data: Data, setting: Setting, variant: Variant, seed: int) -> dict:
    """Trains one model for the budget; returns the accuracy curve as (samples trained on, test accuracy,
    training CPU seconds)."""
    if getattr(variant, "skip_steps", False):
        return train_run_epochs(data, setting, variant, seed)
    n = len(data.train_x)
    steps_per_epoch = n // setting.batch_size
    total = setting.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // setting.evals_per_epoch)
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig.preset(setting.preset, in_channels=data.image_shape[0], num_classes=int(data.train_y.max()) + 1)
    )
    cfg = TrainConfig(epochs=setting.epochs, batch_size=setting.batch_size, lr=setting.lr, seed=seed)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    sampler = variant.build(n, setting.batch_size, seed)
    if hasattr(sampler, "budget_rows"):
        sampler.budget_rows = total * setting.batch_size
    score = getattr(sampler, "score", "grad_norm")
    normalise = getattr(sampler, "normalise_scale", True)
    curve: list[tuple[int, float]] = []
    train_s = 0.0  # this thread's CPU time in training steps (sampling and scoring included, evaluation not)
    model.train()
    for step in range(1, total + 1):
        t0 = time.thread_time()
        idx, scale = sampler.next_batch()
        x, y = data.train_x[idx], data.train_y[idx]
        feats = model.features(x)  # (B, D) penultimate activations
        logits = model.head(feats)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        if scale is None:
            loss = per_sample.mean()
        else:
            s = torch.from_numpy(scale)
            # as actors/trainer.py: normalised per batch (InfoBatch: its scales as they are)
            loss = (per_sample * (s / s.mean() if normalise else s)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if score == "loss":
            sampler.record(idx, per_sample.detach().numpy())
        else:
            sampler.record(idx, last_layer_grad_norm(logits, y, feats).numpy())
        train_s += time.thread_time() - t0
        if step % eval_every == 0 or step == total:
            curve.append((step * setting.batch_size, evaluate(model, data.test_x, data.test_y)[1], train_s))
            model.train()
    return {"curve": curve, "final_acc": curve[-1][1], "draw_intervals": sampler.chunks}


def train_run_epochs(data: Data, setting: Setting, variant: InfoBatchVariant, seed: int) -> dict:
    """InfoBatch as the paper runs it: `setting.epochs` epochs, each over the rows the pruner keeps that epoch
    (full batches; the remainder is dropped, as the uniform loop drops its last partial batch), so a pruned epoch
    makes fewer optimizer steps. The LR at a step is the uniform run's at the same epoch progress (warm-up and
    cosine of `make_optimizer`, evaluated at progress x the uniform run's steps), and the last `anneal` share of
    the epochs uses the full data, unscaled. Kept below-mean-loss rows have their loss scaled by 1 / (1 - r), as
    given (not normalised per batch); scores are the step's own per-sample losses. Test accuracy is evaluated
    `evals_per_epoch` times per epoch; the curve is (samples trained on, accuracy, training CPU seconds)."""
    n = len(data.train_x)
    bs = setting.batch_size
    steps_per_epoch = n // bs
    total = setting.epochs * steps_per_epoch
    torch.manual_seed(seed)
    model = build_model(
        ModelConfig.preset(setting.preset, in_channels=data.image_shape[0], num_classes=int(data.train_y.max()) + 1)
    )
    cfg = TrainConfig(epochs=setting.epochs, batch_size=bs, lr=setting.lr, seed=seed)
    opt, sched = make_optimizer(model, cfg, steps_per_epoch)
    pruner = InfoBatch(n, variant.config, seed=seed)
    pace = EpochPacedLR(sched, steps_per_epoch)  # the trainer's pacing (models/training.py)
    curve: list[tuple[int, float, float]] = []
    train_s, samples, steps, pruned = 0.0, 0, 0, 0
    model.train()
    for epoch in range(setting.epochs):
        t0 = time.thread_time()
        order, scales = pruner.epoch(epoch / setting.epochs)
        pruned += pruner.pruned_last_epoch
        nb = len(order) // bs
        pace.begin_epoch(epoch, nb)
        train_s += time.thread_time() - t0
        evals = {max(1, round(nb * (k + 1) / setting.evals_per_epoch)) for k in range(setting.evals_per_epoch)}
        for b in range(nb):
            t0 = time.thread_time()
            idx = order[b * bs : (b + 1) * bs]
            x, y = data.train_x[idx], data.train_y[idx]
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            loss = (per_sample * torch.from_numpy(scales[b * bs : (b + 1) * bs])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pace.step()
            pruner.record(idx, per_sample.detach().numpy())
            samples, steps = samples + len(idx), steps + 1
            train_s += time.thread_time() - t0
            if b + 1 in evals:
                curve.append((samples, evaluate(model, data.test_x, data.test_y)[1], train_s))
                model.train()
    return {"curve": curve, "final_acc": curve[-1][1], "draw_intervals": setting.epochs, "steps": steps,
            "uniform_steps": total, "pruned_rows": pruned}  # fmt: skip


def samples_to_target(curve: list, target: float, field: int = 0) -> tuple[float, bool]:
    """First number of samples (field 0; field 2: training seconds) at which the test accuracy is >= target;
    (budget + one interval, False) if never."""
    for point in curve:
        if point[1] >= target:
            return float(point[field]), True
    step = curve[-1][field] - curve[-2][field] if len(curve) > 1 else curve[-1][field]
    return float(curve[-1][field] + step), False


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) and its paired percentile bootstrap 95% interval, resampling seeds."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(reps, len(a)))
    ratios = a[idx].mean(1) / b[idx].mean(1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(a.mean() / b.mean()), float(lo), float(hi)


def _load_cache(path: str, setting: Setting, names: list[str]) -> dict[int, dict]:
    """Runs of earlier invocations with the same setting, by seed (a JSON-lines file; absent = none)."""
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            if entry["setting"] == asdict(setting) and all(name in entry["runs"] for name in names):
                done[int(entry["seed"])] = entry["runs"]
    return done


def seed_runs(data: Data, setting: Setting, names: list[str], seed: int) -> dict[str, dict]:
    """Every variant in `names` for one seed (one task of the process pool)."""
    return {name: train_run(data, setting, VARIANTS[name], seed) for name in names}


def run_dataset(
    setting: Setting,
    seeds: list[int],
    variants: list[str] | None = None,
    data: Data | None = None,
    progress: bool = True,
    jobs: int = 1,
    cache: str | None = None,
) -> dict:
    """All variants x seeds on one dataset; returns the keys (without prefix) and per-variant details. With
    `cache`, each seed's runs are appended to that JSON-lines file and reused by a later call."""
    names = variants or list(VARIANTS)
    missing = [c for c in CONTROLS if c not in names]
    if missing:
        raise ValueError(f"variants must include the controls {CONTROLS}, missing {missing}")
    if data is None:
        data = load_digits_data() if setting.dataset == "digits" else load_mnist1d_data(setting.mnist1d_samples)
    done = _load_cache(cache, setting, names) if cache else {}
    cached = sum(seed in done for seed in seeds)
    todo = [seed for seed in seeds if seed not in done]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:  # seeds in parallel processes (spawned: a forked torch process can hang)
            pool = stack.enter_context(
                ProcessPoolExecutor(
                    jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,)
                )
            )
            futures = {pool.submit(seed_runs, data, setting, names, seed): seed for seed in todo}
            results = ((futures[f], f.result()) for f in as_completed(futures))
        else:
            results = ((seed, seed_runs(data, setting, names, seed)) for seed in todo)
        for seed, res in results:
            done[seed] = res
            if cache:
                with open(cache, "a") as f:
                    f.write(json.dumps({"setting": asdict(setting), "seed": seed, "runs": res}) + "\n")
            if progress:
                print(f"  {setting.dataset}: seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    runs = {name: [done[seed][name] for seed in seeds] for name in names}

    final = {name: np.array([r["final_acc"] for r in rs]) for name, rs in runs.items()}
    target = setting.target_frac * float(final["uniform_permutation"].mean())
    reached = {name: [samples_to_target(r["curve"], target) for r in rs] for name, rs in runs.items()}
    samples = {name: np.array([s for s, _ in v]) for name, v in reached.items()}

    per_variant = {}
    for name in names:
        row = {
            "mean_samples_to_target": float(samples[name].mean()),
            "reached_target": int(sum(ok for _, ok in reached[name])),
            "final_acc_mean": float(final[name].mean()),
            "final_acc_std": float(final[name].std(ddof=1)) if len(seeds) > 1 else 0.0,
            "mean_curve": [
                [int(s), float(np.mean([r["curve"][i][1] for r in runs[name]]))]
                # the paper-InfoBatch curve's points are per epoch share, not at equal samples across seeds
                for i, (s, *_) in enumerate(runs[name][0]["curve"][: min(len(r["curve"]) for r in runs[name])])
            ],
        }
        for control in CONTROLS:
            ratio, lo, hi = bootstrap_ratio(samples[name], samples[control])
            row[f"ratio_vs_{control}"] = ratio
            row[f"ci_vs_{control}"] = [lo, hi]
        per_variant[name] = row

    for name in names:  # wall-clock (training CPU seconds) to target, for the pruning comparison
        if len(runs[name][0]["curve"][0]) > 2 and len(runs["uniform_permutation"][0]["curve"][0]) > 2:
            wall = np.array([samples_to_target(r["curve"], target, field=2)[0] for r in runs[name]])
            wall_u = np.array([samples_to_target(r["curve"], target, field=2)[0] for r in runs["uniform_permutation"]])
            ratio, lo, hi = bootstrap_ratio(wall, wall_u)
            per_variant[name]["mean_train_s_to_target"] = float(wall.mean())
            per_variant[name]["wall_ratio_vs_uniform_permutation"] = ratio
            per_variant[name]["wall_ci_vs_uniform_permutation"] = [lo, hi]

    weighting = [name for name in names if name not in CONTROLS and name not in PRUNING]
    best = min(weighting, key=lambda name: per_variant[name]["ratio_vs_uniform_permutation"]) if weighting else None
    out = {
        "target_acc": target,
        "uniform_final_acc": float(final["uniform_permutation"].mean()),
        "best_variant": best,
        "variants": per_variant,
        "seconds": time.perf_counter() - t0,
        "seeds_from_cache": cached,
        "setting": {
            **asdict(setting),
            "seeds": list(seeds),
            "train_samples": len(data.train_x),
            "test_samples": len(data.test_x),
            "image_shape": list(data.image_shape),
        },
    }
    if "seed_rule" in per_variant:
        out["seed_rule_ratio"] = per_variant["seed_rule"]["ratio_vs_uniform_permutation"]
    ib_name = next((v for v in (INFOBATCH_KEYS_FROM, "infobatch") if v in per_variant), None)
    if ib_name is not None and "wall_ratio_vs_uniform_permutation" in per_variant[ib_name]:
        ib = per_variant[ib_name]
        out["infobatch_variant"] = ib_name
        out["infobatch_wall_ratio"] = ib["wall_ratio_vs_uniform_permutation"]
        out["infobatch_wall_ratio_ci"] = ib["wall_ci_vs_uniform_permutation"]
        out["infobatch_acc_delta_pts"] = 100.0 * (ib["final_acc_mean"] - out["uniform_final_acc"])
    if best is not None:
        b = per_variant[best]
        out.update(
            best_ratio=b["ratio_vs_uniform_permutation"],
            best_ratio_ci_high=b["ci_vs_uniform_permutation"][1],
            best_ratio_vs_replacement=b["ratio_vs_uniform_replacement"],
            best_ratio_vs_replacement_ci_high=b["ci_vs_uniform_replacement"][1],
            final_acc_delta_pts=100.0 * (b["final_acc_mean"] - out["uniform_final_acc"]),
        )
    return out


SETTINGS = {
    # digits: 1437 training images; every sampler is near its final accuracy after ~2 epochs.
    "digits": Setting(dataset="digits", epochs=6),
    # MNIST-1D: 4800 training signals; the tiny CNN needs ~6-8 epochs to settle.
    "mnist1d": Setting(dataset="mnist1d", epochs=8),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 seeds instead of 20 (a few minutes)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides --quick)")
    p.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"], choices=sorted(SETTINGS))
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes")
    p.add_argument("--cache", default=None, help="JSON-lines file of finished runs, reused when run again")
    p.add_argument("--name", default="weighting", help="results file name (bench/results/<name>.json)")
    p.add_argument(
        "--infobatch-only",
        action="store_true",
        help="only the InfoBatch keys: MNIST-1D, the two controls and infobatch_paper (20 seeds: minutes, --jobs 2)",
    )
    args = p.parse_args(argv)
    if args.infobatch_only:
        args.datasets, args.variants = ["mnist1d"], [*CONTROLS, INFOBATCH_KEYS_FROM]
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    seeds = list(range(args.seeds or (5 if args.quick else 20)))
    result: dict = {}
    for dataset in args.datasets:
        res = run_dataset(SETTINGS[dataset], seeds, args.variants, jobs=args.jobs, cache=args.cache)
        for key in (
            "seed_rule_ratio",
            "best_ratio",
            "best_ratio_ci_high",
            "best_ratio_vs_replacement",
            "best_ratio_vs_replacement_ci_high",
            "best_variant",
            "final_acc_delta_pts",
            "target_acc",
            "infobatch_wall_ratio",
            "infobatch_wall_ratio_ci",
            "infobatch_acc_delta_pts",
        ):
            if key in res:
                result[f"{dataset}_{key}"] = res[key]
        result[dataset] = res
        print_table(
            [
                {
                    "variant": name,
                    "samples_to_target": v["mean_samples_to_target"],
                    "vs_uniform": v["ratio_vs_uniform_permutation"],
                    "95%_ci": "[{:.3f}, {:.3f}]".format(*v["ci_vs_uniform_permutation"]),
                    "vs_replacement": v["ratio_vs_uniform_replacement"],
                    "95%_ci_repl": "[{:.3f}, {:.3f}]".format(*v["ci_vs_uniform_replacement"]),
                    "reached": f"{v['reached_target']}/{len(seeds)}",
                    "final_acc": v["final_acc_mean"],
                }
                for name, v in res["variants"].items()
            ],
            title=f"\n{dataset}: target test accuracy {res['target_acc']:.4f} "
            f"({SETTINGS[dataset].target_frac} x uniform's final), {len(seeds)} seeds, {res['seconds']:.0f} s",
        )
    rows = []
    for dataset in args.datasets:
        for key, goal in GOALS.items():
            v = result.get(f"{dataset}_{key}")
            if v is None:
                continue
            met = v >= goal if key.endswith("acc_delta_pts") else (v < goal if key.endswith("ci_high") else v <= goal)
            sign = ">=" if key.endswith("acc_delta_pts") else ("<" if key.endswith("ci_high") else "<=")
            rows.append(
                {"metric": f"{dataset}_{key}", "measured": v, "goal": f"{sign} {goal}", "met": "yes" if met else "NO"}
            )
        if f"{dataset}_best_variant" in result:
            rows.append({"metric": f"{dataset}_best_variant", "measured": result[f"{dataset}_best_variant"]})
    print_table(rows, columns=["metric", "measured", "goal", "met"], title="\nweighting: goals (set for MNIST-1D)")
    result["goals_mnist1d"] = {
        r["metric"]: {"goal": r["goal"], "met": r["met"] == "yes"}
        for r in rows
        if r["metric"].startswith("mnist1d_") and "goal" in r
    }
    result["notes"] = (
        "In-process simulation of the trainer's loop (SampleWeightStore draws, last-layer gradient-norm difficulty, "
        "unbiased loss scale normalised per batch); samples counted, not time, so the loaded shared machine "
        f"(load average {os.getloadavg()[0]:.1f} at the end) does not affect the keys. best_ratio_ci_high is the "
        "interval of the variant chosen by mean ratio; it does not account for the choice among variants. "
        "MNIST-1D: generated by the mnist1d package (0.0.2.post1, make_dataset, its default transform, seed 42)."
    )
    path = write_result(args.name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
