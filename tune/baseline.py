"""The starting point of a compression sweep: the data (train split for fine-tuning and calibration, held-out
split for accuracy) and the trained fp32 checkpoint, which is an fp32 artifact (models/artifact.py).

Without a checkpoint, one is trained with the local training loop (actors/train_local.py) and cached as an
artifact under `cache_dir`, keyed by preset/epochs/seed, so repeated trials, tests and benchmarks train once.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from actors.dataset import DataConfig, load_tensors, prepare_data
from actors.train_local import TrainConfig, evaluate, fit_local
from models.artifact import load_artifact, save_artifact
from models.cnn import ModelConfig, build_model


@dataclass(kw_only=True, slots=True)
class BaselineConfig:
    """Which trained model a sweep starts from."""

    preset: str = "small"
    """Model preset trained when no checkpoint is given."""
    epochs: int = 8
    """Training epochs when no checkpoint is given."""
    seed: int = 0
    """Training seed."""
    checkpoint: str | None = None
    """Directory of an fp32 artifact holding the trained model; None = train one (cached)."""
    cache_dir: str | None = None
    """Where trained baselines and the prepared data are cached; None = <tempdir>/tandem-baselines."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset (default: the bundled digits)."""

    def __post_init__(self) -> None:
        if self.preset not in ModelConfig.preset_names():
            raise ValueError(f"preset must be one of {ModelConfig.preset_names()}, got {self.preset!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise ValueError(f"checkpoint must be an artifact directory, got {self.checkpoint!r}")

    def cache_path(self) -> Path:
        return Path(self.cache_dir or Path(tempfile.gettempdir()) / "tandem-baselines")


@dataclass(slots=True)
class EvalData:
    """Tensors of both splits: images (N, C, H, W) float32, labels (N,) int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    input_shape: tuple[int, int, int]
    num_classes: int

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy of `model` on the held-out split, in [0, 1]."""
        return evaluate(model, *self.test)[1]


def load_data(cfg: BaselineConfig) -> EvalData:
    splits = prepare_data(cfg.data, cfg.cache_path())
    _, x_tr, y_tr = load_tensors(splits.train)
    _, x_te, y_te = load_tensors(splits.test)
    return EvalData((x_tr, y_tr), (x_te, y_te), splits.image_shape, splits.num_classes)


def load_baseline(cfg: BaselineConfig, data: EvalData | None = None) -> tuple[nn.Module, EvalData]:
    """(trained fp32 CNN in eval mode, data). Loads `cfg.checkpoint`, else the cached training result, else
    trains and caches it."""
    data = load_data(cfg) if data is None else data
    cached = cfg.cache_path() / f"{cfg.preset}-e{cfg.epochs}-s{cfg.seed}"
    path = Path(cfg.checkpoint) if cfg.checkpoint else cached
    if not (path / "manifest.json").is_file():
        if cfg.checkpoint:
            raise ValueError(f"checkpoint {str(path)!r} is not an artifact (no manifest.json)")
        torch.manual_seed(cfg.seed)
        mcfg = ModelConfig.preset(cfg.preset, in_channels=data.input_shape[0], num_classes=data.num_classes)
        model = build_model(mcfg)
        fit_local(model, data.train, data.test, TrainConfig(epochs=cfg.epochs, seed=cfg.seed))
        acc = {"test_accuracy": data.accuracy(model)}
        save_artifact(model, path, input_shape=data.input_shape, accuracy=acc, probe=data.test[0][:32])
    model, manifest = load_artifact(path)
    if manifest["quantization"]["scheme"] != "none":
        scheme = manifest["quantization"]["scheme"]
        raise ValueError(f"checkpoint {str(path)!r} must be an fp32 model, got scheme {scheme!r}")
    return model, data
