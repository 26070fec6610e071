"""The search space of the compression sweep, and the boundary where a Tune trial's dict becomes configs.

Dimensions: prune ratio (uniform), quantization scheme (none, int8_ptq, int8_qat, fp8), fine-tune epochs
(integer; for int8_qat they are the QAT epochs), calibration size, per-channel vs per-tensor weight scales.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from kernels.precision import DeviceCaps, PrecisionPolicy, QuantTarget
from models.prune import PruneConfig
from models.quantize import CONFIGS, FP8, Int8PTQ, Int8QAT, QuantConfig

QUANT_SCHEMES = ("none", *CONFIGS)


@dataclass(kw_only=True, slots=True)
class SearchSpace:
    """Ranges and choices the sweep draws from."""

    prune_ratio: tuple[float, float] = (0.0, 0.5)
    """Uniform range of the fraction of channels pruned from every group, within [0, 0.9]."""
    quant: tuple[str, ...] = QUANT_SCHEMES
    """Quantization schemes to try: a subset of none, int8_ptq, int8_qat, fp8."""
    finetune_epochs: tuple[int, int] = (0, 3)
    """Inclusive range of fine-tune (or QAT) epochs after pruning."""
    calib_size: tuple[int, ...] = (64, 256)
    """Calibration sample counts to choose from."""
    per_channel: tuple[bool, ...] = (True, False)
    """Weight scale granularity choices: per output channel (True), per tensor (False)."""

    def __post_init__(self) -> None:
        lo, hi = _pair(self.prune_ratio, "prune_ratio")
        if not (0.0 <= lo <= hi <= 0.9):
            raise ValueError(f"prune_ratio must be (lo, hi) with 0 <= lo <= hi <= 0.9, got {self.prune_ratio!r}")
        self.quant = tuple(self.quant)
        bad = [q for q in self.quant if q not in QUANT_SCHEMES]
        if not self.quant or bad:
            raise ValueError(f"quant must be a non-empty subset of {list(QUANT_SCHEMES)}, got {list(self.quant)}")
        e_lo, e_hi = _pair(self.finetune_epochs, "finetune_epochs")
        if not all(isinstance(v, int) for v in (e_lo, e_hi)) or not 0 <= e_lo <= e_hi <= 100:
            raise ValueError(f"finetune_epochs must be ints (lo, hi), 0 <= lo <= hi <= 100, got {(e_lo, e_hi)}")
        self.calib_size = tuple(self.calib_size)
        if not self.calib_size or any(not isinstance(c, int) or c < 2 for c in self.calib_size):
            raise ValueError(f"calib_size must be non-empty ints >= 2, got {list(self.calib_size)}")
        self.per_channel = tuple(self.per_channel)
        if not self.per_channel or any(not isinstance(p, bool) for p in self.per_channel):
            raise ValueError(f"per_channel must be a non-empty tuple of bools, got {list(self.per_channel)}")

    def to_tune(self) -> dict:
        """The Ray Tune param_space."""
        from ray import tune

        lo, hi = self.prune_ratio
        e_lo, e_hi = self.finetune_epochs
        return {
            "prune_ratio": tune.uniform(lo, hi) if hi > lo else lo,
            "quant": tune.choice(list(self.quant)),
            "finetune_epochs": tune.randint(e_lo, e_hi + 1) if e_hi > e_lo else e_lo,
            "calib_size": tune.choice(list(self.calib_size)),
            "per_channel": tune.choice(list(self.per_channel)),
        }

    def for_hardware(self, caps: DeviceCaps) -> SearchSpace:
        """This space for trials that run on `caps`: FP8 stays only where they run it (`runs_fp8`: CUDA sm_89+);
        elsewhere an FP8 trial would time an fp32 emulation that is never served (tune.pareto.serving_forms), a
        trial lost. ValueError when no scheme of the space is left."""
        quant = tuple(q for q in self.quant if q != "fp8" or runs_fp8(caps))
        if not quant:
            raise ValueError(f"quant must hold a scheme trials on {caps} run (fp8 needs CUDA sm_89+), got "
                             f"{list(self.quant)}")  # fmt: skip
        return replace(self, quant=quant)


def runs_fp8(caps: DeviceCaps) -> bool:
    """Whether hardware `caps` runs FP8 inference (kernels/precision.py's infer target: CUDA sm_89+), the rule
    Serve's replicas follow too (serve_app.config.scheme_for_device)."""
    if not isinstance(caps, DeviceCaps):
        raise TypeError(f"caps must be a kernels.precision.DeviceCaps, got {type(caps).__name__}")
    return PrecisionPolicy.from_caps(caps).infer_target == QuantTarget.FP8


def caps_of_label(label: str) -> DeviceCaps | None:
    """The hardware a latency was measured on, from its label (tune.measure.device_label: "cpu" or
    "cuda sm_XY"); None for a label it cannot read (a row of an older sweep)."""
    if label == "cpu":
        return DeviceCaps("cpu")
    sm = label.removeprefix("cuda sm_") if isinstance(label, str) and label.startswith("cuda sm_") else ""
    if len(sm) < 2 or not sm.isdigit():
        return None
    return DeviceCaps("cuda", (int(sm[:-1]), int(sm[-1])))  # sm_89 -> (8, 9), sm_100 -> (10, 0)


def _pair(v, name: str) -> tuple:
    if not isinstance(v, tuple | list) or len(v) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair, got {v!r}")
    return tuple(v)


@dataclass(kw_only=True, slots=True)
class TrialSettings:
    """One point of the space (what a trial receives), validated."""

    prune_ratio: float
    """Fraction of channels pruned from every group."""
    quant: str
    """Quantization scheme name."""
    finetune_epochs: int
    """Fine-tune epochs after pruning (QAT epochs for int8_qat)."""
    calib_size: int
    """Calibration samples."""
    per_channel: bool
    """Per-channel (True) or per-tensor weight scales."""

    def __post_init__(self) -> None:
        PruneConfig(ratio=self.prune_ratio)  # validates the ratio
        if self.quant not in QUANT_SCHEMES:
            raise ValueError(f"quant must be one of {list(QUANT_SCHEMES)}, got {self.quant!r}")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be an int >= 0, got {self.finetune_epochs!r}")
        self.quant_config()  # validates calib_size / per_channel

    @classmethod
    def from_dict(cls, d: dict) -> TrialSettings:
        known = {f.name for f in fields(cls)}
        if set(d) != known:
            raise ValueError(f"trial settings must have exactly the keys {sorted(known)}, got {sorted(d)}")
        return cls(**{k: (int(v) if k in ("finetune_epochs", "calib_size") else v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    def prune_config(self) -> PruneConfig | None:
        return PruneConfig(ratio=self.prune_ratio) if self.prune_ratio > 0 else None

    def plain_finetune_epochs(self) -> int:
        """Epochs of ordinary fine-tuning (QAT takes the epochs itself)."""
        return 0 if self.quant == "int8_qat" else self.finetune_epochs

    def quant_config(self) -> QuantConfig | None:
        common = dict(per_channel=self.per_channel, calib_samples=self.calib_size)
        if self.quant == "int8_ptq":
            return Int8PTQ(**common)
        if self.quant == "int8_qat":
            return Int8QAT(**common, epochs=max(1, self.finetune_epochs))
        if self.quant == "fp8":
            return FP8(**common)
        return None
