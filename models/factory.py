"""Which network to build: a named preset or a user's `package.module:function`, as one picklable spec that the
driver, Ray Train workers and Tune trials all build the same way."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kernels.conv_bn import SaveMode
from models.cnn import ModelConfig, build_model


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """A preset or a user model; the data decides input channels and classes."""

    preset: str = "small"
    """Built-in preset (tiny, small, resnet18); ignored when `user` is set."""
    user: str | None = None
    """'package.module:function' returning an nn.Module; its Conv->BN->act chains are fused."""
    save: str = "lean"
    """Memory mode of the unified operator."""
    user_kwargs: dict = field(default_factory=dict)
    """Keyword arguments of the user function (`--model-args` JSON); `num_classes` is added when it takes it."""
    input_mean: tuple[float, ...] | None = None
    """Per-channel mean of the training pixels: a user model gets an `InputNorm` front ((x - mean) / std), a preset
    CNN normalizes in its forward (ModelConfig.input_mean); either way it is part of the model, so training, the
    artifact, the sweep and Serve all apply the same normalization."""
    input_std: tuple[float, ...] | None = None
    """Per-channel standard deviation of the training pixels (with input_mean)."""

    def __post_init__(self) -> None:
        if self.user is None and self.preset not in ModelConfig.preset_names():
            raise ValueError(f"preset must be one of {ModelConfig.preset_names()}, got {self.preset!r}")
        SaveMode.parse(self.save)
        if not isinstance(self.user_kwargs, dict):
            raise TypeError(f"user_kwargs must be a dict, got {type(self.user_kwargs).__name__}")
        try:
            json.dumps(self.user_kwargs)
        except TypeError as e:
            raise ValueError(f"user_kwargs must be JSON values (they are recorded in artifacts): {e}") from None
        if self.user_kwargs and self.user is None:
            raise ValueError("user_kwargs need a user model")
        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("input_mean and input_std must be given together")
        if self.input_mean is not None:
            self.input_mean = tuple(float(v) for v in self.input_mean)
            self.input_std = tuple(float(v) for v in self.input_std)
            if len(self.input_mean) != len(self.input_std) or not self.input_mean:
                raise ValueError(f"input_mean and input_std must have one value per channel, got "
                                 f"{len(self.input_mean)} and {len(self.input_std)}")  # fmt: skip
            if not all(math.isfinite(m) for m in self.input_mean) or not all(
                math.isfinite(v) and v > 0 for v in self.input_std
            ):
                raise ValueError(f"input_std must be finite and > 0, input_mean finite, got {self.input_mean}, "
                                 f"{self.input_std}")  # fmt: skip

    def to_dict(self) -> dict:
        d = {"preset": self.preset, "user": self.user, "save": self.save, "user_kwargs": dict(self.user_kwargs)}
        if self.input_mean is not None:  # absent otherwise: artifacts written before normalization still read
            d.update(input_mean=list(self.input_mean), input_std=list(self.input_std))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {"preset", "user", "save", "user_kwargs", "input_mean", "input_std"}
        if not isinstance(d, dict) or set(d) - known:
            raise ValueError(f"model spec must be an object with keys among {sorted(known)}, got {d!r}")
        return cls(**d)

    def normalized(self, mean, std) -> ModelSpec:
        """This spec with the training data's per-channel statistics as its input normalization (a user model gets
        an InputNorm module in front, a preset CNN normalizes in its own forward). A constant channel (std ~ 0) is
        only shifted."""
        if mean is None or std is None:
            return self
        std = tuple(float(v) if v > 1e-6 else 1.0 for v in std)
        return dataclasses.replace(self, input_mean=tuple(mean), input_std=std)

    @property
    def name(self) -> str:
        return self.user if self.user is not None else f"preset:{self.preset}"

    def config(self, image_shape: tuple[int, int, int], num_classes: int) -> ModelConfig | None:
        """The ModelConfig of a preset for this data (None for a user model)."""
        if self.user is not None:
            return None
        if self.input_mean is not None and len(self.input_mean) != image_shape[0]:
            raise ValueError(f"input_mean must have {image_shape[0]} values (one per channel), got "
                             f"{len(self.input_mean)}")  # fmt: skip
        return ModelConfig.preset(self.preset, in_channels=image_shape[0], num_classes=num_classes, save=self.save,
                                  input_mean=self.input_mean, input_std=self.input_std)  # fmt: skip

    def build(self, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        """The model for images of `image_shape` (C, H, W) and `num_classes`; a user model is fused and its
        output shape checked on a dummy batch. One eval forward at batch 2 lays out the weights (and checks a
        user model's output); a lean model's save plan is made where training starts (models/training.py), since
        only backward needs it."""
        from kernels.conv_bn import plan_weight_layouts_

        if self.user is None:
            model = build_model(self.config(image_shape, num_classes))
            # weights laid out for the map sizes this data gives (channels_last only where maps are large enough)
            plan_weight_layouts_(model, torch.zeros(2, *image_shape))
            return model
        from models.fuse import fuse_
        from models.user_model import load_model

        model = fuse_(load_model(self.user, self.user_kwargs, num_classes), save=self.save)
        if self.input_mean is not None:
            if len(self.input_mean) != image_shape[0]:
                raise ValueError(f"input_mean must have {image_shape[0]} values (one per channel), got "
                                 f"{len(self.input_mean)}")  # fmt: skip
            model = Normalized(model, self.input_mean, self.input_std)
        outputs: list[torch.Tensor] = []  # the layout plan's forward is the shape check's too
        hook = model.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            plan_weight_layouts_(model, torch.zeros(2, *image_shape))
        finally:
            hook.remove()
        out = outputs[0]
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < num_classes:
            raise ValueError(
                f"model {self.user} must map (N, {', '.join(map(str, image_shape))}) to (N, >= {num_classes}) "
                f"logits, got output shape {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        setattr(model, SPEC_ATTR, self.to_dict())
        return model


class InputNorm(nn.Module):
    """(x - mean) / std per channel, the constants as buffers (saved with the weights, traced by export)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class Normalized(nn.Module):
    """A user model behind its input normalization: `norm` then `net` (the user's module, its names under net.)."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.norm = InputNorm(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.norm(x))


# The spec a user model was built from travels with it (a plain attribute), so that saving, pruning and
# quantizing it anywhere downstream can record how to rebuild it.
SPEC_ATTR = "_tandem_model_spec"
USER_ARCHITECTURE = "user"


def describe(model: nn.Module) -> dict:
    """How to rebuild `model` (fp32, pruned or not): {"architecture": "models.cnn.CNN", "model_config", "channels"}
    for a preset CNN, {"architecture": "user", "model_spec", "fused", "shapes"} for a model built by
    `ModelSpec.build` from a user function. Raises TypeError for a model of neither kind."""
    from kernels.conv_bn import ConvBNAct
    from models.cnn import CNN
    from models.prune import channel_counts, module_shapes

    if isinstance(model, CNN):
        return {
            "architecture": "models.cnn.CNN",
            "model_config": model.cfg.to_dict(),
            "channels": channel_counts(model),
        }
    spec = getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise TypeError(
            f"model must be a models.cnn.CNN or built by ModelSpec.build (which records its spec), got "
            f"{type(model).__name__}"
        )
    fused = [n for n, m in model.named_modules() if isinstance(m, ConvBNAct)]
    return {"architecture": USER_ARCHITECTURE, "model_spec": dict(spec), "fused": fused, "shapes": module_shapes(model)}


def rebuild(desc: dict, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly built model of `desc` (from `describe`), its layers resized to the recorded (pruned) shapes, so
    that the recorded state_dict loads into it. Raises ValueError when the description does not fit."""
    from kernels.conv_bn import ConvBNAct
    from models.cnn import ModelConfig
    from models.prune import apply_module_shapes_, resize_

    arch = desc.get("architecture")
    if arch == "models.cnn.CNN":
        model = build_model(ModelConfig.from_dict(desc["model_config"]))
        return resize_(model, desc["channels"])
    if arch != USER_ARCHITECTURE:
        raise ValueError(f"architecture must be 'models.cnn.CNN' or {USER_ARCHITECTURE!r}, got {arch!r}")
    model = ModelSpec.from_dict(desc["model_spec"]).build(tuple(input_shape), num_classes)
    fused = [n for n, m in model.named_modules() if isinstance(m, ConvBNAct)]
    if fused != list(desc.get("fused", fused)):
        raise ValueError(
            f"fuse_ fused {len(fused)} chains of the rebuilt model, the recorded one had {len(desc['fused'])}"
        )
    return apply_module_shapes_(model, desc["shapes"])
