"""Shared benchmark plumbing: interleaved side-by-side timing with medians, result JSON, a readable table.

Machines here are shared and noisy, so every claim is a ratio of variants timed in the same run, interleaved
(A B C A B C ...) so that a burst of outside load hits all of them alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median time in seconds of each callable, run round-robin `repeats` times after `warmup` rounds.
    `clock`: wall time by default; `time.thread_time` measures this thread's CPU time, which other processes on a
    shared machine do not inflate (use it with single-threaded work, torch.set_num_threads(1))."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            dt = clock() - t0
            if i >= warmup:
                times[name].append(dt)
    return {name: statistics.median(ts) for name, ts in times.items()}


def hardware() -> dict:
    info = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_capability"] = list(torch.cuda.get_device_capability(0))
    return info


def write_result(name: str, data: dict, results_dir: Path | None = None) -> Path:
    """Writes bench/results/<name>.json with the measured keys plus hardware and time."""
    out = (results_dir or RESULTS) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **data,
        "hardware": hardware(),
        # 1/5/15-minute load averages as the run ends (the benchmark itself counts ~1): a figure taken while
        # something else ran on the machine shows here
        "load_avg": [round(v, 2) for v in os.getloadavg()],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return out


def print_table(rows: list[dict], columns: list[str] | None = None, title: str | None = None) -> None:
    """Prints rows of dicts as an aligned text table (floats with 4 significant digits)."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
