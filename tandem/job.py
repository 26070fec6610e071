"""The end-to-end job behind `tandem run` (and the training step alone, `tandem train`).

    prepare data (digits or the user's parquet, validated)
    -> train: Ray Train workers, weighted Ray Data stream, DDP gradient communication (or in-process, --local)
    -> report (terminal table + report.json)
Later pipeline steps (the compression sweep, serving, the load test) plug in after training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from actors.dataset import DataConfig, DataSplits, load_tensors, prepare_data
from actors.train_local import TrainConfig, fit_local
from actors.trainer import DistConfig, TrainJob
from actors.weight_store import WeightRule
from actors.weighted_stream import StreamConfig
from models.factory import ModelSpec


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything `tandem run` / `tandem train` need."""

    preset: str = "small"
    """Built-in model preset (tiny, small, resnet18); ignored when `model` is set."""
    model: str | None = None
    """A user model as 'package.module:function' returning an nn.Module; its Conv->BN->act chains are fused."""
    save: str = "lean"
    """Memory mode of the unified operator: lean or fast."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset (default: the bundled digits)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization settings."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Ray Train workers, gradient communication, checkpointing, fault tolerance."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Weighted sampling of the training stream."""
    rule: WeightRule = field(default_factory=WeightRule)
    """Sample-weight update rule."""
    address: str | None = None
    """Ray cluster address; None = an embedded local Ray."""
    nodes: int = 2
    """Simulated nodes of the embedded Ray (ignored with `address`)."""
    local: bool = False
    """Train in this process without Ray (quick experiments)."""
    workdir: str = "runs/latest"
    """Where data, checkpoints and reports are written."""
    smoke: bool = False
    """Tiny sizes so the whole job runs in seconds (tests, CI)."""

    def __post_init__(self) -> None:
        self.model_spec()  # validates preset / save
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes must be a positive int, got {self.nodes!r}")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(preset=self.preset, user=self.model, save=self.save)

    def train_job(self) -> TrainJob:
        dist = self.dist
        if self.address is None and self.nodes > 1 and not dist.worker_resources:
            # the embedded cluster offers ceil(workers / nodes) worker slots per simulated node
            dist = replace(dist, worker_resources={"worker_slot": 1})
        return TrainJob(model=self.model_spec(), train=self.train, dist=dist, stream=self.stream, rule=self.rule)


def _train_local(cfg: RunConfig, splits: DataSplits) -> dict:
    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    torch.manual_seed(cfg.train.seed)
    model = cfg.model_spec().build(splits.image_shape, splits.num_classes)
    res = fit_local(model, (xtr, ytr), (xte, yte), cfg.train, progress=True)
    ckpt = Path(cfg.workdir) / "local_model.pt"
    torch.save(model.state_dict(), ckpt)
    return {
        "history": res.history,
        "test_accuracy": res.test_accuracy,
        "precision": res.policy,
        "checkpoint": str(ckpt),
        "mode": "local",
    }


def _train_ray(cfg: RunConfig, splits: DataSplits) -> dict:
    from actors.trainer import fit_distributed

    res = fit_distributed(cfg.train_job(), splits, cfg.workdir)
    weights = res.weights
    return {
        "history": res.history,
        "test_accuracy": res.history[-1]["test_accuracy"],
        "checkpoint": res.checkpoint_path,
        "mode": "ray",
        "train_seconds": res.seconds,
        "weights_summary": None
        if weights is None
        else {
            "mean": float(weights.mean()),
            "min": float(weights.min()),
            "max": float(weights.max()),
            "histogram": np.histogram(weights, bins=10, range=(0.5, 3.0))[0].tolist(),
        },
    }


def train_step(cfg: RunConfig, splits: DataSplits) -> dict:
    """Trains in process (`local`) or on the connected Ray cluster; returns the training report."""
    return _train_local(cfg, splits) if cfg.local else _train_ray(cfg, splits)


def main(cfg: RunConfig, steps: tuple[str, ...] = ("train",)) -> dict:
    """Runs the pipeline steps and returns the report (also written to `<workdir>/report.json`)."""
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = prepare_data(cfg.data, workdir)
    spec = cfg.model_spec()
    print(
        f"tandem: {spec.name} on {splits.train.num_rows} train / {splits.test.num_rows} test samples of shape "
        f"{splits.image_shape}, {splits.num_classes} classes; workdir {workdir}"
    )
    report: dict = {
        "model": spec.name,
        "data": {"train": splits.train.path, "test": splits.test.path, "image_shape": list(splits.image_shape)},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    if cfg.local:
        report["train"] = train_step(cfg, splits)
    else:
        from tandem.local_ray import ray_session

        per_node = -(-cfg.dist.num_workers // cfg.nodes)
        with ray_session(cfg.address, cfg.nodes, slots_per_node=per_node) as session:
            report["cluster"] = session
            report["train"] = train_step(cfg, splits)
    report["test_accuracy"] = report["train"]["test_accuracy"]
    report["seconds"] = time.perf_counter() - t0
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    hist = report["train"]["history"]
    print(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>9} {'samples/s':>10}")
    for h in hist:
        print(
            f"{h['epoch']:>5} {h['loss']:>8.4f} {h['train_accuracy']:>9.4f} {h['test_accuracy']:>9.4f} "
            f"{h['samples_per_s']:>10.0f}"
        )
    print(f"test accuracy: {report['test_accuracy']:.4f}  ({report['seconds']:.1f} s, {report['train']['mode']})")
