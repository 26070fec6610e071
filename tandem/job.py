"""The end-to-end job behind `tandem run`: data -> model -> training -> report.

(Later steps of the pipeline, distributed training, the compression sweep and serving, plug in here as they land.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from actors.dataset import DataConfig, DataSplits, load_tensors, prepare_data
from actors.train_local import FitResult, TrainConfig, fit_local
from models.factory import ModelSpec


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything `tandem run` needs."""

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
    workdir: str = "runs/latest"
    """Where data, results and artifacts are written."""
    smoke: bool = False
    """Tiny sizes so the whole job runs in seconds (tests, CI)."""

    def __post_init__(self) -> None:
        self.model_spec()  # validates preset / save

    def model_spec(self) -> ModelSpec:
        return ModelSpec(preset=self.preset, user=self.model, save=self.save)


def build(cfg: RunConfig, splits: DataSplits) -> tuple[nn.Module, dict]:
    """The model to train and a description of it for the report."""
    spec = cfg.model_spec()
    model = spec.build(splits.image_shape, splits.num_classes)
    mcfg = spec.config(splits.image_shape, splits.num_classes)
    return model, {"model": spec.name, **({"config": mcfg.to_dict()} if mcfg else {})}


def main(cfg: RunConfig) -> dict:
    """Runs the job and returns its report (also written to `<workdir>/report.json`)."""
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = prepare_data(cfg.data, workdir)
    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    torch.manual_seed(cfg.train.seed)
    model, desc = build(cfg, splits)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"tandem: {desc['model']} ({n_params:,} parameters) on {splits.train.num_rows} train / "
        f"{splits.test.num_rows} test samples of shape {splits.image_shape}, {splits.num_classes} classes"
    )
    result: FitResult = fit_local(model, (xtr, ytr), (xte, yte), cfg.train, progress=True)
    report = {
        **desc,
        "parameters": n_params,
        "data": {
            "train": splits.train.path,
            "test": splits.test.path,
            "image_shape": list(splits.image_shape),
        },
        "precision": result.policy,
        "history": result.history,
        "test_accuracy": result.test_accuracy,
        "seconds": time.perf_counter() - t0,
    }
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    _print_summary(report)
    return report


def _print_summary(report: dict) -> None:
    print(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>9} {'samples/s':>10}")
    for h in report["history"]:
        print(
            f"{h['epoch']:>5} {h['loss']:>8.4f} {h['train_accuracy']:>9.4f} {h['test_accuracy']:>9.4f} "
            f"{h['samples_per_s']:>10.0f}"
        )
    print(
        f"test accuracy: {report['test_accuracy']:.4f}  ({report['seconds']:.1f} s, precision {report['precision']})"
    )
