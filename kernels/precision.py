"""Precision policy derived from the hardware: training autocast dtype, TF32, and the inference quant target.

    CPU:                     train bf16 autocast, no TF32,   infer INT8 (PT2E + x86 inductor on x86_64)
    CUDA sm < 8.0:           train fp16 + GradScaler,        infer INT8
    CUDA sm 8.0 - 8.8:       train bf16, TF32 on (Ampere),   infer INT8
    CUDA sm >= 8.9:          train bf16, TF32 on,            infer FP8 e4m3 (Ada/Hopper tensor cores, _scaled_mm)
Every choice can be overridden through `PrecisionConfig`; tests fake the capabilities with `DeviceCaps`.
"""

from __future__ import annotations

import contextlib
import enum
import platform
from dataclasses import dataclass

import torch


class QuantTarget(str, enum.Enum):
    NONE = "none"
    INT8 = "int8"
    FP8 = "fp8"


_TRAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class DeviceCaps:
    """What the policy needs to know about a device."""

    device_type: str
    """'cpu' or 'cuda'."""
    cuda_capability: tuple[int, int] | None = None
    """(major, minor) SM version for CUDA devices."""
    cpu_arch: str = "x86_64"
    """platform.machine() of the host."""

    @classmethod
    def probe(cls, device: str | torch.device | None = None) -> DeviceCaps:
        """Capabilities of `device` (default: cuda:0 when present, else cpu)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        arch = platform.machine()
        if device.type == "cuda":
            return cls("cuda", torch.cuda.get_device_capability(device), arch)
        return cls(device.type, None, arch)


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    """Overrides for the hardware-derived policy; None means 'choose from the hardware'."""

    train_dtype: str | None = None
    """Training autocast dtype: 'fp32' (autocast off), 'bf16' or 'fp16'."""
    tf32: bool | None = None
    """Allow TF32 matmul/conv on CUDA."""
    infer_target: str | None = None
    """Inference quantization target: 'none', 'int8' or 'fp8'."""

    def __post_init__(self) -> None:
        if self.train_dtype is not None and self.train_dtype not in _TRAIN_DTYPES:
            raise ValueError(
                f"train_dtype must be one of {sorted(_TRAIN_DTYPES)} or None, got {self.train_dtype!r}"
            )
        if self.infer_target is not None and self.infer_target not in {t.value for t in QuantTarget}:
            raise ValueError(
                f"infer_target must be one of {[t.value for t in QuantTarget]} or None, got {self.infer_target!r}"
            )
        if self.tf32 is not None and not isinstance(self.tf32, bool):
            raise TypeError(f"tf32 must be a bool or None, got {type(self.tf32).__name__}")


@dataclass(frozen=True, slots=True)
class PrecisionPolicy:
    device_type: str
    train_dtype: torch.dtype
    tf32: bool
    infer_target: QuantTarget

    @classmethod
    def from_caps(cls, caps: DeviceCaps, cfg: PrecisionConfig | None = None) -> PrecisionPolicy:
        cfg = cfg or PrecisionConfig()
        cap = caps.cuda_capability
        if caps.device_type == "cuda":
            assert cap is not None, "CUDA caps need a compute capability"
            auto_dtype = torch.bfloat16 if cap >= (8, 0) else torch.float16
            auto_tf32 = cap >= (8, 0)
            auto_target = QuantTarget.FP8 if cap >= (8, 9) else QuantTarget.INT8
        else:
            auto_dtype, auto_tf32, auto_target = torch.bfloat16, False, QuantTarget.INT8
        train_dtype = auto_dtype if cfg.train_dtype is None else _TRAIN_DTYPES[cfg.train_dtype]
        if train_dtype == torch.float16 and caps.device_type == "cpu":
            raise ValueError("train_dtype 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        if cfg.infer_target == QuantTarget.FP8.value and not (cap is not None and cap >= (8, 9)):
            raise ValueError(f"infer_target 'fp8' needs CUDA sm_89 or newer, got {caps}")
        return cls(
            device_type=caps.device_type,
            train_dtype=train_dtype,
            tf32=(auto_tf32 if cfg.tf32 is None else cfg.tf32) and caps.device_type == "cuda",
            infer_target=auto_target if cfg.infer_target is None else QuantTarget(cfg.infer_target),
        )

    @classmethod
    def for_device(cls, device: str | torch.device | None = None, cfg: PrecisionConfig | None = None):
        return cls.from_caps(DeviceCaps.probe(device), cfg)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the training forward pass (a no-op for fp32)."""
        if self.train_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.train_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 training (bf16 and fp32 need none)."""
        if self.train_dtype == torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None

    def apply_backend_flags(self) -> None:
        """Sets TF32 for CUDA matmuls and cuDNN convs (process-wide flags; call once at start)."""
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    def describe(self) -> dict:
        return {
            "device": self.device_type,
            "train_dtype": str(self.train_dtype).removeprefix("torch."),
            "tf32": self.tf32,
            "infer_target": self.infer_target.value,
        }
