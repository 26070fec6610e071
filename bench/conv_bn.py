"""Unified Conv+BN+ReLU operator vs the eager Conv2d -> BatchNorm2d -> ReLU chain (issue: foundation).

Side by side in one run, medians of interleaved repeats; batch 32, 64 -> 64 channels, 32x32, 3x3, fp32:
  saved_bytes_ratio[_fast]       bytes saved for backward (saved_tensors_hooks, de-duplicated by storage),
                                 lean [fast] / eager                                  goals <= 0.40 [<= 0.70]
  train_step_time_ratio[_fast]   forward+backward time, lean [fast] / eager          goals <= 1.25 [<= 1.05]
  infer_latency_ratio            eval forward, folded ConvBNAct / eager conv+bn+relu  goal  <= 0.60
  max_grad_rel_err               max over x and parameters of max|g - g_eager| / max|g_eager|, lean and fast
Writes bench/results/conv_bn.json. `--quick` keeps it under 60 s.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn as nn

from bench._common import interleaved_medians, print_table, write_result
from kernels.conv_bn import ConvBNAct, SaveMode

GOALS = {
    "saved_bytes_ratio": 0.40,
    "train_step_time_ratio": 1.25,
    "saved_bytes_ratio_fast": 0.70,
    "train_step_time_ratio_fast": 1.05,
    "infer_latency_ratio": 0.60,
}


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def grads(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    module(x).backward(g)
    return [x.grad] + [p.grad for p in module.parameters()]


def run(batch: int, channels: int, size: int, repeats: int, device: str, clock: str = "cpu") -> dict:
    """`clock='cpu'`: one torch thread, timed by this thread's CPU time (robust on a shared machine);
    'wall': wall time with torch's default threads. CUDA always uses wall time with synchronization."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    timer = time.perf_counter
    if clock == "cpu" and device == "cpu":
        torch.set_num_threads(1)
        timer = time.thread_time
    try:
        return _run(batch, channels, size, repeats, device, timer) | {"clock": clock if device == "cpu" else "wall"}
    finally:
        torch.set_num_threads(threads)


def _run(batch: int, channels: int, size: int, repeats: int, device: str, timer) -> dict:
    lean = ConvBNAct(channels, channels, 3, padding=1, act="relu", save="lean").to(device)
    fast = copy.deepcopy(lean)
    fast.save = SaveMode.FAST
    eager = nn.Sequential(copy.deepcopy(lean.conv), copy.deepcopy(lean.bn), nn.ReLU()).to(device)
    x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    g = torch.randn(batch, channels, size, size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    bytes_ = {name: saved_bytes(m, x) for name, m in (("eager", eager), ("lean", lean), ("fast", fast))}

    def step(m):
        def f():
            m(x).backward(g)
            sync()

        return f

    train = interleaved_medians({"eager": step(eager), "lean": step(lean), "fast": step(fast)}, repeats, clock=timer)

    ref = grads(eager, x, g)
    rel_err = 0.0
    for m in (lean, fast):
        for a, b in zip(grads(m, x, g), ref):
            rel_err = max(rel_err, ((a - b).abs().max() / b.abs().max()).item())

    for m in (lean, eager):
        m.eval()
    xi = x.detach()

    def infer(m):
        def f():
            with torch.inference_mode():
                m(xi)
            sync()

        return f

    infer_t = interleaved_medians({"eager": infer(eager), "folded": infer(lean)}, repeats * 2, clock=timer)
    with torch.inference_mode():
        torch.testing.assert_close(lean(xi), eager(xi), atol=1e-4, rtol=1e-4)

    return {
        "saved_bytes_ratio": bytes_["lean"] / bytes_["eager"],
        "train_step_time_ratio": train["lean"] / train["eager"],
        "saved_bytes_ratio_fast": bytes_["fast"] / bytes_["eager"],
        "train_step_time_ratio_fast": train["fast"] / train["eager"],
        "infer_latency_ratio": infer_t["folded"] / infer_t["eager"],
        "max_grad_rel_err": rel_err,
        "saved_bytes": bytes_,
        "train_step_ms": {k: v * 1e3 for k, v in train.items()},
        "infer_ms": {k: v * 1e3 for k, v in infer_t.items()},
        "setup": {
            "batch": batch,
            "channels": channels,
            "size": size,
            "kernel": 3,
            "repeats": repeats,
            "device": device,
            "dtype": "float32",
        },
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--name", default="conv_bn", help="results file name (bench/results/<name>.json)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="cpu: 1 thread, thread CPU time")
    args = p.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 25)
    res = run(32, 64, 32, repeats, args.device, args.clock)
    rows = [
        {
            "metric": k,
            "measured": res[k],
            "goal": f"<= {GOALS[k]}",
            "met": "yes" if res[k] <= GOALS[k] else "NO",
        }
        for k in GOALS
    ]
    rows.append({"metric": "max_grad_rel_err", "measured": res["max_grad_rel_err"], "goal": "", "met": ""})
    print_table(rows, title=f"conv_bn ({args.device}, batch 32, 64->64, 32x32, 3x3, {repeats} repeats)")
    print_table(
        [
            {
                "variant": k,
                "train_step_ms": v,
                "saved_MB": res["saved_bytes"][k] / 2**20,
                "infer_ms": res["infer_ms"].get("folded" if k == "lean" else k, float("nan")),
            }
            for k, v in res["train_step_ms"].items()
        ]
    )
    path = write_result(args.name, res)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
