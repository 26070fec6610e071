"""Latency of a model on this machine: median wall time of one forward at a given batch size.

fp32 and quantized models are timed under the same compiler when `compile=True`: an fp32 `CNN` is BN-folded
and wrapped in the same `BucketCompiled` (inductor, freezing) that `QuantizedModel.compile_()` uses.
FP8 on a CPU is timed as what it is there: an fp32 emulation (slower than fp32, not a deployment target).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.quantize import QuantizedModel, compiled_for_inference


@dataclass(kw_only=True, slots=True)
class MeasureConfig:
    """How latency is measured."""

    batch_sizes: tuple[int, ...] = (1, 32)
    """Batch sizes timed; the sweep's latency objective is the last one."""
    compile: bool = True
    """Time the inductor-compiled model (the deployment path); False times eager (fast to set up)."""
    warmup: int = 5
    """Untimed calls before timing."""
    iters: int = 30
    """Timed calls; the median is reported."""

    def __post_init__(self) -> None:
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {list(self.batch_sizes)}")
        for name in ("warmup", "iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'warmup' else 'positive'} int")


def inference_callable(model: nn.Module, compile: bool, example: torch.Tensor | None = None,
                       batch_sizes: tuple[int, ...] = (1, 32)):  # fmt: skip
    """What gets timed: the model itself (eval mode), or what Serve runs (`compiled_for_inference`, which for
    fp32 picks the faster form on `example`'s shape and `batch_sizes`)."""
    return compiled_for_inference(model, example, batch_sizes) if compile else model.eval()


def median_ms(fn, x: torch.Tensor, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn(x)` over `iters` calls after `warmup` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], cfg: MeasureConfig,
               device: str = "cpu") -> dict[str, float]:  # fmt: skip
    """{"batch_<b>": median ms} for each batch size of `cfg`, on random inputs of `input_shape` (C, H, W).
    `device` "cpu" times `inference_callable` (what a CPU replica runs); "cuda" times what an FP8 replica runs
    (serve_app.placement.on_device): the eager model on the GPU, CPU inputs moved there and outputs back (which
    waits for the GPU); the model is back on CPU afterwards."""
    return measured_form(model, input_shape, cfg, device)[0]


def measured_form(model: nn.Module, input_shape: tuple[int, ...], cfg: MeasureConfig,
                  device: str = "cpu") -> tuple[dict[str, float], dict | None]:  # fmt: skip
    """(`latency_ms`'s figures, the record of the fp32 form they were timed on). The record
    (models.fuse.inference_form_record: the form's name, batch sizes, threads, machine) is what the artifact's
    manifest carries so that a replica on a matching machine runs that very form (serve_app.form_choice); None
    where no fp32 form was chosen: a quantized model (its form follows from its scheme), eager timing
    (`cfg.compile` False) or a GPU."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    g = torch.Generator().manual_seed(0)

    def timed(fn) -> dict[str, float]:
        return {
            f"batch_{b}": median_ms(fn, torch.rand(b, *input_shape, generator=g), cfg.warmup, cfg.iters)
            for b in cfg.batch_sizes
        }

    if device == "cpu":
        fn = inference_callable(model, cfg.compile, torch.rand(1, *input_shape, generator=g), cfg.batch_sizes)
        record = None
        if cfg.compile and not isinstance(model, QuantizedModel):
            from models.fuse import inference_form_record

            # the very callable timed below: the latency recorded beside the form is that form's
            record = inference_form_record(fn, cfg.batch_sizes)
        return timed(fn), record
    model.to(device).eval()
    try:
        return timed(lambda x: model(x.to(device, non_blocking=True)).cpu()), None
    finally:
        model.to("cpu")


def device_label(device: str) -> str:
    """Where a latency was measured, as recorded with it: "cpu", or "cuda sm_XY" (compute capability)."""
    if device == "cpu":
        return "cpu"
    major, minor = torch.cuda.get_device_capability()
    return f"cuda sm_{major}{minor}"
