"""The fp32 inference forms a replica chooses from (models.fuse.fastest_inference_module), timed alone and beside
Python threads that hold the GIL, as a Serve replica's forward thread runs beside its event loops.

Every eager op (and each kernel call of inductor's wrapper, each oneDNN primitive) releases the GIL and takes it
back; a thread waiting for it waits up to the switch interval (5 ms) while another runs Python. The traced form
(`ScriptedInference`) runs the whole graph in one call: one hand-off per forward.

    python -m bench.inference_forms            # -> bench/results/inference_forms.json

Keys: per model and batch size, each form's median wall time alone and beside `BUSY_THREADS` spinning threads
(`<model>_b<batch>_<form>_alone_ms`, `..._contended_ms`), and `<model>_contended_ratio_scripted_vs_best_other`:
the traced form's contended time over the fastest other form's (summed over the batch sizes; < 1: faster).
Each round times every form once (interleaved), one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from bench._common import print_table, write_result

MODELS = ("tiny", "small")
BATCHES = (1, 32)
BUSY_THREADS = 2


def _forms(preset: str) -> dict:
    from models.cnn import ModelConfig, build_model
    from models.fuse import CompiledInference, OneDNNInference, ScriptedInference, inference_module, onednn_available

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, in_channels=1, num_classes=10)).eval()
    example = torch.rand(1, 1, 8, 8)
    plain = inference_module(model)
    forms = {"eager": plain, "compiled": CompiledInference(plain)}
    forms["compiled"].warmup(example, BATCHES)
    if onednn_available():
        forms["onednn"] = OneDNNInference(model, example, BATCHES)
    forms["scripted"] = ScriptedInference(plain, example)
    return forms


def _time(forms: dict, batch: int, rounds: int) -> dict[str, float]:
    """Median wall time (ms) of one forward per form, the forms interleaved round by round."""
    x = torch.rand(batch, 1, 8, 8)
    times: dict[str, list[float]] = {name: [] for name in forms}
    with torch.inference_mode():
        for i in range(rounds + 2):
            for name, fn in forms.items():
                t0 = time.perf_counter()
                fn(x)
                if i >= 2:  # two warm-up rounds
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _spinning(n: int):
    """n threads running pure Python (holding the GIL but for the interpreter's switches) until stopped."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return stop, threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result: dict = {"busy_threads": BUSY_THREADS, "rounds": args.rounds, "switch_interval_s": 0.005}
    rows = []
    for preset in MODELS:
        forms = _forms(preset)
        contended_sum = dict.fromkeys(forms, 0.0)
        for b in BATCHES:
            alone = _time(forms, b, args.rounds)
            stop, threads = _spinning(BUSY_THREADS)
            try:
                busy = _time(forms, b, args.rounds)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            for name in forms:
                result[f"{preset}_b{b}_{name}_alone_ms"] = round(alone[name], 4)
                result[f"{preset}_b{b}_{name}_contended_ms"] = round(busy[name], 3)
                contended_sum[name] += busy[name]
                rows.append({"model": preset, "batch": b, "form": name, "alone_ms": alone[name],
                             "contended_ms": busy[name]})  # fmt: skip
        best_other = min(v for k, v in contended_sum.items() if k != "scripted")
        result[f"{preset}_contended_ratio_scripted_vs_best_other"] = round(contended_sum["scripted"] / best_other, 3)
    print_table(rows, title=f"forward wall time, alone and beside {BUSY_THREADS} Python threads (median ms)")
    for preset in MODELS:
        key = f"{preset}_contended_ratio_scripted_vs_best_other"
        print(f"{key}: {result[key]}")
    print("wrote", write_result("inference_forms", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
