"""Fail fast, before any cluster starts: build the model the run will train and run one training step on the
data's shape (`preflight`), and load an artifact in a fresh Python process (`check_artifact_out_of_process`), as a
Serve replica will. Each failure names its step and cause within seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv_bn import ConvBNAct
from models.factory import ModelSpec


class PreflightError(ValueError):
    """The model cannot be trained on this data; the message names the step (import, build, forward, backward)."""


@dataclass(slots=True)
class PreflightReport:
    model: str
    image_shape: tuple[int, int, int]
    num_classes: int
    params: int
    fused: list[str] = field(default_factory=list)
    """Qualified names of the ConvBNAct ops in the built model (what `fuse_` fused, for a user model)."""
    unfused_convs: list[str] = field(default_factory=list)
    """Conv2d layers left as they are (no BatchNorm right after them, shared, hooked, ...)."""
    seconds: float = 0.0

    def describe(self) -> str:
        fused = ", ".join(self.fused) if self.fused else "none"
        left = f"; left unfused: {', '.join(self.unfused_convs)}" if self.unfused_convs else ""
        return (
            f"preflight ok: {self.model} on {self.image_shape} -> {self.num_classes} classes, {self.params:,} "
            f"parameters, one training step in {self.seconds:.2f} s; fused {len(self.fused)} Conv-BN(-act) "
            f"chains: {fused}{left}"
        )


def preflight(spec: ModelSpec, image_shape: tuple[int, int, int], num_classes: int, batch: int = 2) -> PreflightReport:
    """Imports and builds `spec` for `image_shape` (C, H, W) and `num_classes`, runs one forward and backward on a
    random batch in train mode, and reports what was fused. Raises PreflightError naming the failing step."""
    t0 = time.perf_counter()
    try:
        model = spec.build(tuple(image_shape), num_classes)
    except ImportError as e:
        raise PreflightError(f"preflight: importing the model {spec.name} failed: {e}") from e
    except Exception as e:  # a user's constructor may raise anything; all mean "cannot build"
        raise PreflightError(f"preflight: building the model {spec.name} failed ({type(e).__name__}: {e})") from e
    x = torch.rand(batch, *image_shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(batch) % num_classes
    model.train()
    try:
        logits = model(x)
    except Exception as e:  # user forwards fail in arbitrary ways
        raise PreflightError(
            f"preflight: the forward of {spec.name} on a ({batch}, {', '.join(map(str, image_shape))}) batch failed "
            f"({type(e).__name__}: {e})"
        ) from e
    if logits.dim() != 2 or logits.shape[1] < num_classes:
        raise PreflightError(
            f"preflight: {spec.name} must return (N, >= {num_classes}) logits, got shape {tuple(logits.shape)}"
        )
    try:
        F.cross_entropy(logits.float(), y).backward()
    except Exception as e:
        raise PreflightError(f"preflight: the backward of {spec.name} failed ({type(e).__name__}: {e})") from e
    if not any(p.grad is not None for p in model.parameters()):
        raise PreflightError(f"preflight: no parameter of {spec.name} received a gradient")
    fused = [n for n, m in model.named_modules() if isinstance(m, ConvBNAct)]
    inner = {id(m.conv) for m in model.modules() if isinstance(m, ConvBNAct)}
    unfused = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in inner]
    return PreflightReport(
        model=spec.name,
        image_shape=tuple(image_shape),
        num_classes=num_classes,
        params=sum(p.numel() for p in model.parameters()),
        fused=fused,
        unfused_convs=unfused,
        seconds=time.perf_counter() - t0,
    )


def check_artifact_out_of_process(path: str, timeout_s: float = 600.0) -> dict:
    """Loads artifact directory `path` in a fresh Python process (`python -m models.artifact_check`), exactly as
    a Serve replica does (INT8: compiled and checked), and returns its summary; raises ArtifactError with the
    child's message when it cannot be loaded."""
    from models.artifact import ArtifactError

    cmd = [sys.executable, "-m", "models.artifact_check", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{path}: loading the artifact in a fresh process took over {timeout_s:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise ArtifactError(
            f"{path}: a fresh process cannot load the artifact: {lines[-1] if lines else proc.returncode}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])
