"""ResNet-style CNN built only from the unified ConvBNAct operator.

    stem: ConvBNAct(in -> w0, 3x3)
    stages: for each width w_i, `depth_i` residual blocks; the first of a stage i > 0 has stride 2
        block: ConvBNAct(3x3, relu) -> ConvBNAct(3x3, none) (+ shortcut: identity or ConvBNAct(1x1, none)) -> relu
    head: global average pool -> Linear(num_classes)

`features(x)` returns the pooled penultimate activations and `head` the last layer, so per-sample difficulty can
be computed from them (last-layer gradient norm) without another backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct, SaveMode

_PRESETS: dict[str, dict] = {
    "tiny": dict(widths=(8, 16), depths=(1, 1)),
    "small": dict(widths=(16, 32, 64), depths=(1, 1, 1)),
    "resnet18": dict(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2)),
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture of the CNN. Use `ModelConfig.preset(name, **overrides)` for the named sizes."""

    in_channels: int = 1
    """Channels of the input image."""
    num_classes: int = 10
    """Number of output classes."""
    widths: tuple[int, ...] = (16, 32, 64)
    """Channels of each stage."""
    depths: tuple[int, ...] = (1, 1, 1)
    """Residual blocks per stage."""
    act: str = "relu"
    """Activation inside blocks: none, relu, relu6, silu."""
    save: str = "lean"
    """What the unified op saves for backward: lean (recompute conv) or fast (keep conv output)."""
    preset_name: str | None = field(default=None)
    """Name of the preset this config came from, if any (recorded in artifacts)."""
    input_mean: tuple[float, ...] | None = None
    """Per-channel mean of the training pixels, subtracted from the input (with input_std), or None."""
    input_std: tuple[float, ...] | None = None
    """Per-channel standard deviation of the training pixels, divided out after the mean, or None."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.widths, self.depths = tuple(self.widths), tuple(self.depths)
        if not self.widths or len(self.widths) != len(self.depths):
            raise ValueError(
                f"widths and depths must be non-empty and of equal length, got {self.widths}, {self.depths}"
            )
        if any(not isinstance(w, int) or w < 1 for w in self.widths + self.depths):
            raise ValueError(f"widths and depths must be positive ints, got {self.widths}, {self.depths}")
        SaveMode.parse(self.save)
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("input_mean and input_std must be given together")
        if self.input_mean is not None:
            self.input_mean, self.input_std = tuple(self.input_mean), tuple(self.input_std)
            stats = self.input_mean + self.input_std
            if len(self.input_mean) != self.in_channels or len(self.input_std) != self.in_channels:
                raise ValueError(f"input_mean and input_std must have {self.in_channels} values (one per channel), "
                                 f"got {len(self.input_mean)} and {len(self.input_std)}")  # fmt: skip
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in stats) or min(self.input_std) <= 0:
                raise ValueError(f"input_mean must be finite and input_std finite and > 0, got {self.input_mean}, "
                                 f"{self.input_std}")  # fmt: skip
        from kernels.activations import get_activation

        get_activation(self.act)

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        """Named sizes: 'tiny' (tests, seconds), 'small' (default demo), 'resnet18' (ResNet-18 layout)."""
        if name not in _PRESETS:
            raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {name!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{**_PRESETS[name], "preset_name": name, **overrides})

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**d)

    def with_(self, **changes) -> ModelConfig:
        return replace(self, **changes)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str, save: str):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride=stride, padding=1, act=act, save=save)
        self.conv2 = ConvBNAct(cout, cout, 3, padding=1, act="none", save=save)
        self.shortcut = (
            ConvBNAct(cin, cout, 1, stride=stride, act="none", save=save)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = ConvBNAct.activation_module(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class CNN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w0 = cfg.widths[0]
        self.stem = ConvBNAct(cfg.in_channels, w0, 3, padding=1, act=cfg.act, save=cfg.save)
        blocks: list[nn.Module] = []
        cin = w0
        for i, (w, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(cin, w, stride, cfg.act, cfg.save))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, cfg.num_classes)
        # the training data's per-channel normalization, part of the model so that every caller (training, the
        # sweep, Serve) applies it alike; not in the state_dict: the artifact's model_config carries it
        stats = (cfg.input_mean, cfg.input_std) if cfg.input_mean is not None else (None, None)
        for name, v in zip(("input_mean", "input_std"), stats):
            t = None if v is None else torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
            self.register_buffer(name, t, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_last) pooled penultimate activations."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"input must be (N, {self.cfg.in_channels}, H, W), got shape {tuple(x.shape)}")
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: ModelConfig) -> CNN:
    return CNN(cfg)
