"""Selective activation checkpointing (models/checkpointing.py) on the CNN presets: activation memory kept for
backward and step time, against no checkpointing (issue: distributed training, "Benchmarks").

Models `small` and `resnet18` (built of the unified operator, `save='lean'`), batch 64, 3x16x16 inputs by default,
fp32, training mode, forward + cross-entropy + backward. Settings: `every2` (every 2nd block) and `all` (every block).
Keys, per preset (prefix `small_`, `resnet18_`) and setting (suffix `_every2`, `_all`):
  activation_mem_ratio   activation bytes kept for backward, with / without checkpointing      seed claims 0.6
                         (tensors saved by autograd, de-duplicated by storage, plus the block inputs a checkpoint
                         keeps for its recompute; parameters and buffers not counted)
  step_time_ratio        median forward+backward time (one thread, its CPU time), with / without, interleaved
  macs_step_time_ratio   what exact MAC counts predict for step_time_ratio: 1 + f / 4, f = forward MACs of the
                         checkpointed blocks / the model's (a lean unified-op step costs ~4 conv passes)
  max_grad_rel_err       max over parameters of max|g - g_none| / max|g_none| on one batch     (must be ~1e-6)
`activation_mem_ratio` is the best ratio over the settings for each preset. Writes bench/results/checkpointing.json.
`--quick`: 3 timing repeats (default 11).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench._common import interleaved_medians, print_table, write_result
from models.checkpointing import CheckpointConfig, Checkpointed, checkpoint_
from models.cnn import ModelConfig, build_model
from models.macs import count_macs

SETTINGS = {"every2": CheckpointConfig(every=2), "all": CheckpointConfig(every=1)}
SEED_CLAIM = 0.6


def activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of activations alive for backward after the forward of `model` on x: every tensor autograd saves
    (outside checkpointed blocks) plus the inputs checkpointed blocks keep, each storage counted once."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    handles = [
        m.register_forward_pre_hook(lambda _m, args: keep(args[0]))
        for m in model.modules()
        if isinstance(m, Checkpointed)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
    finally:
        for h in handles:
            h.remove()
    loss.backward()  # frees the graph (and checks it runs)
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def grad_rel_err(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Max over parameters of max|g - g_ref| / max|g_ref| for one forward+backward of both (fresh copies)."""
    grads = []
    for m in (copy.deepcopy(model), copy.deepcopy(ref)):
        F.cross_entropy(m(x), y).backward()
        grads.append([p.grad for p in m.parameters()])
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads))


def recompute_fraction(model: nn.Module, cfg: CheckpointConfig, size: int) -> float:
    """Forward MACs of the blocks `cfg` checkpoints / forward MACs of the whole model (exact counts)."""
    shapes: dict[int, tuple[int, ...]] = {}

    def remember(i: int):
        def hook(_module: nn.Module, args: tuple) -> None:
            shapes[i] = tuple(args[0].shape[1:])  # (C, H, W) of the block's input

        return hook

    hooks = [b.register_forward_pre_hook(remember(i)) for i, b in enumerate(model.blocks)]
    try:
        total = count_macs(model, (3, size, size))
    finally:
        for h in hooks:
            h.remove()
    chosen = sum(count_macs(b, shapes[i]) for i, b in enumerate(model.blocks) if i % cfg.every == 0)
    return chosen / total


def run_preset(preset: str, batch: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    base = build_model(ModelConfig.preset(preset, in_channels=3, num_classes=10)).train()
    models = {"none": base}
    for name, cfg in SETTINGS.items():
        models[name] = checkpoint_(copy.deepcopy(base), cfg)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    mem = {name: activation_bytes(m, x, y) for name, m in models.items()}
    err = {name: grad_rel_err(models[name], base, x, y) for name in SETTINGS}

    def step(m: nn.Module):
        def f():
            F.cross_entropy(m(x), y).backward()
            m.zero_grad(set_to_none=True)

        return f

    # one thread, timed by its CPU time: other processes on a shared machine do not inflate it
    times = interleaved_medians(
        {name: step(m) for name, m in models.items()}, repeats, warmup=1, clock=time.thread_time
    )
    blocks = len(base.blocks)
    out: dict = {}
    for name, cfg in SETTINGS.items():
        frac = recompute_fraction(base, cfg, size)
        out[f"recompute_macs_fraction_{name}"] = frac
        # lean op step = 4 conv passes (forward, recompute, grad input, grad weight); checkpointing adds a forward
        out[f"macs_step_time_ratio_{name}"] = 1.0 + frac / 4.0
        out[f"activation_mem_ratio_{name}"] = mem[name] / mem["none"]
        out[f"step_time_ratio_{name}"] = times[name] / times["none"]
        out[f"max_grad_rel_err_{name}"] = err[name]
        out[f"checkpointed_blocks_{name}"] = sum(isinstance(b, Checkpointed) for b in models[name].blocks)
    out["activation_mem_ratio"] = min(out[f"activation_mem_ratio_{name}"] for name in SETTINGS)
    out["activation_mb"] = {name: b / 2**20 for name, b in mem.items()}
    out["step_ms"] = {name: t * 1e3 for name, t in times.items()}
    out["blocks"] = blocks
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 timing repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--presets", nargs="+", default=["small", "resnet18"], choices=ModelConfig.preset_names())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=16, help="input height and width (3 channels)")
    p.add_argument("--name", default="checkpointing", help="results file name (bench/results/<name>.json)")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 11)
    torch.set_num_threads(1)  # steadier under outside load than OpenMP threads spinning on an oversubscribed CPU
    result: dict = {}
    rows = []
    for preset in args.presets:
        res = run_preset(preset, args.batch, args.size, repeats)
        result[preset] = res
        for key in (
            "activation_mem_ratio",
            *(
                f"{k}_{s}"
                for s in SETTINGS
                for k in ("activation_mem_ratio", "step_time_ratio", "macs_step_time_ratio")
            ),
        ):
            result[f"{preset}_{key}"] = res[key]
        for name in ("none", *SETTINGS):
            rows.append(
                {
                    "preset": preset,
                    "setting": name,
                    "blocks_ckpt": res.get(f"checkpointed_blocks_{name}", 0),
                    "act_MB": res["activation_mb"][name],
                    "mem_ratio": res.get(f"activation_mem_ratio_{name}", 1.0),
                    "step_ms": res["step_ms"][name],
                    "time_ratio": res.get(f"step_time_ratio_{name}", 1.0),
                    "macs_time_ratio": res.get(f"macs_step_time_ratio_{name}", 1.0),
                    "grad_rel_err": res.get(f"max_grad_rel_err_{name}", 0.0),
                }
            )
    print_table(
        rows,
        title=f"checkpointing (cpu, batch {args.batch}, 3x{args.size}x{args.size}, {repeats} repeats; "
        f"seed claims memory ratio {SEED_CLAIM})",
    )
    result["setup"] = {
        "batch": args.batch,
        "input": [3, args.size, args.size],
        "dtype": "float32",
        "unified_op_save": "lean",
        "repeats": repeats,
        "settings": {name: cfg.every for name, cfg in SETTINGS.items()},
        "device": "cpu",
        "torch_threads": 1,
        "clock": "thread_time",
    }
    result["notes"] = (
        "Memory is counted, not sampled, so it is exact and load-independent. Step times: one torch thread, timed by "
        "its CPU time (time.thread_time), medians of interleaved repeats, on a shared, heavily loaded 2-core machine "
        f"(load average {os.getloadavg()[0]:.1f} at the end); CPU time is not inflated by other processes, but "
        "cache and memory-bandwidth contention remain."
    )
    path = write_result(args.name, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
