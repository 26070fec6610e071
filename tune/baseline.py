"""The starting point of a compression sweep: the data (train split for fine-tuning and calibration, held-out
split for accuracy) and the trained fp32 checkpoint, which is an fp32 artifact (models/artifact.py).

Without a checkpoint, one is trained with the local training loop (models/training.py) and cached as an
artifact under `cache_dir`, keyed by preset/epochs/seed, so repeated trials, tests and benchmarks train once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from models import storage
from models.artifact import load_artifact, save_artifact
from models.cnn import ModelConfig
from models.data import DataConfig, load_tensors, prepare_data
from models.factory import ModelSpec
from models.training import TrainConfig, evaluate, fit_local


@dataclass(kw_only=True, slots=True)
class BaselineConfig:
    """Which trained model a sweep starts from."""

    preset: str = "small"
    """Model preset trained when no checkpoint is given (ignored with `model`)."""
    model: str | None = None
    """A user model 'package.module:function' (models/user_model.py): trained when no checkpoint is given;
    with a checkpoint, the artifact must be of this function."""
    model_args: dict = field(default_factory=dict)
    """Keyword arguments of `model` (as `--model-args`)."""
    epochs: int = 8
    """Training epochs when no checkpoint is given."""
    seed: int = 0
    """Training seed."""
    checkpoint: str | None = None
    """An fp32 artifact holding the trained model: a directory or a storage URI (models/storage.py, downloaded by
    each trial's process); None = train one (cached)."""
    cache_dir: str | None = None
    """Where trained baselines and the prepared data are cached; None = <tempdir>/tandem-baselines."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset (default: the bundled digits); its paths may be storage URIs."""

    def __post_init__(self) -> None:
        if self.preset not in ModelConfig.preset_names():
            raise ValueError(f"preset must be one of {ModelConfig.preset_names()}, got {self.preset!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.model is not None or self.model_args:
            self.spec()  # validates the form; importing it waits for the process that builds it
        if self.checkpoint is not None and not storage.is_remote(self.checkpoint):
            if not Path(self.checkpoint).is_dir():
                raise ValueError(f"checkpoint must be an artifact directory, got {self.checkpoint!r}")

    def cache_path(self) -> Path:
        return Path(self.cache_dir or Path(tempfile.gettempdir()) / "tandem-baselines")

    def cache_name(self) -> str:
        """The folder under cache_path() of a baseline trained here."""
        if self.model is None:
            return f"{self.preset}-e{self.epochs}-s{self.seed}"
        # the data's shape decides the user model's layers too: the data paths are part of the key
        key = repr(
            (
                self.model,
                sorted(self.model_args.items()),
                self.data.train_path,
                self.data.test_path,
                self.data.image_shape,
            )
        )
        return f"user-{hashlib.sha256(key.encode()).hexdigest()[:12]}-e{self.epochs}-s{self.seed}"

    def spec(self) -> ModelSpec:
        """The model's spec: the user function, else the preset (raises ValueError for model_args without a
        model)."""
        return ModelSpec(preset=self.preset, user=self.model, user_kwargs=dict(self.model_args))

    @property
    def name(self) -> str:
        """The trained model's name in reports: the user function or `preset:<name>`."""
        return self.model if self.model is not None else f"preset:{self.preset}"


@dataclass(slots=True)
class EvalData:
    """Tensors of both splits: images (N, C, H, W) float32, labels (N,) int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str] | None = None
    """Names of the classes (string labels), carried from the baseline artifact into every trial's artifact."""
    channel_stats: tuple | None = None
    """(per-channel mean, std) of the training split: the input normalization of a user model trained here."""

    def accuracy(self, model: nn.Module) -> float:
        """Top-1 accuracy of `model` on the held-out split, in [0, 1]."""
        return evaluate(model, *self.test)[1]


def _local_data(data: DataConfig, cache: Path) -> DataConfig:
    """`data` with storage-URI paths downloaded under `cache` (once per node and URI)."""
    paths = {}
    for key in ("train_path", "test_path"):
        uri = getattr(data, key)
        if uri is not None and storage.is_remote(uri):
            dest = cache / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix="dl-"))
                if storage.is_dir(uri):
                    storage.download_dir(uri, tmp)
                else:
                    storage.download_file(uri, tmp / uri.rsplit("/", 1)[-1])
                try:
                    os.replace(tmp, dest)  # atomic: concurrent trials on one node never read a half copy
                except OSError:  # another trial on this node got there first
                    assert dest.is_dir(), dest
            uri = str(dest)
        paths[key] = uri
    return replace(data, **paths)


def load_data(cfg: BaselineConfig) -> EvalData:
    cfg.cache_path().mkdir(parents=True, exist_ok=True)
    splits = prepare_data(_local_data(cfg.data, cfg.cache_path()), cfg.cache_path())
    _, x_tr, y_tr = load_tensors(splits.train)
    _, x_te, y_te = load_tensors(splits.test)
    return EvalData((x_tr, y_tr), (x_te, y_te), splits.image_shape, splits.num_classes, splits.class_names,
                    (splits.train.channel_mean, splits.train.channel_std))  # fmt: skip


def load_baseline(cfg: BaselineConfig, data: EvalData | None = None) -> tuple[nn.Module, EvalData]:
    """(trained fp32 CNN in eval mode, data). Loads `cfg.checkpoint`, else the cached training result, else
    trains and caches it."""
    data = load_data(cfg) if data is None else data
    cached = cfg.cache_path() / cfg.cache_name()
    path = Path(storage.download_dir(cfg.checkpoint)) if cfg.checkpoint else cached
    if not (path / "manifest.json").is_file():
        if cfg.checkpoint:
            raise ValueError(f"checkpoint {str(path)!r} is not an artifact (no manifest.json)")
        torch.manual_seed(cfg.seed)
        spec = cfg.spec().normalized(*(data.channel_stats or (None, None)))
        model = spec.build(data.input_shape, data.num_classes)
        fit_local(model, data.train, data.test, TrainConfig(epochs=cfg.epochs, seed=cfg.seed))
        acc = {"test_accuracy": data.accuracy(model)}
        save_artifact(model, path, input_shape=data.input_shape, accuracy=acc, probe=data.test[0][:32],
                      class_names=data.class_names)  # fmt: skip
    model, manifest = load_artifact(path)
    data.class_names = manifest.get("class_names")
    if cfg.model is not None and (manifest.get("model_spec") or {}).get("user") != cfg.model:
        got = (manifest.get("model_spec") or {}).get("user") or manifest["architecture"]
        raise ValueError(f"checkpoint {str(path)!r} must hold a model of {cfg.model!r}, got {got!r}")
    if manifest["quantization"]["scheme"] != "none":
        scheme = manifest["quantization"]["scheme"]
        raise ValueError(f"checkpoint {str(path)!r} must be an fp32 model, got scheme {scheme!r}")
    return model, data
