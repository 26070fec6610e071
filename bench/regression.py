"""Performance-regression gate: a quick subset of the benchmarks, as ratios, against committed baselines.

    python -m bench.regression             # measure, compare with bench/baselines.json, exit 1 on a regression
    python -m bench.regression --update    # measure and REWRITE the baselines (explicit; never done silently)

Each check is a ratio measured side by side in this run (never an absolute time). `exact` checks are
deterministic (bytes saved for backward, bytes on the wire, artifact sizes, MACs) and must stay within a tight
tolerance; `timing` checks get a wide relative tolerance, and a failing timing check is measured once more before
it fails the gate, since shared machines are noisy. The test suite runs the gate (tests/bench/test_regression.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

BASELINES = Path(__file__).resolve().parent / "baselines.json"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    kind: str
    """'exact' (absolute tolerance) or 'timing' (relative tolerance, re-measured once before failing)."""
    better: str
    """'lower' or 'higher': which direction is an improvement."""
    tolerance: float


CHECKS = {
    c.name: c
    for c in (
        Check("conv_bn.saved_bytes_ratio", "exact", "lower", 0.01),
        Check("conv_bn.saved_bytes_ratio_fast", "exact", "lower", 0.01),
        Check("conv_bn.train_step_time_ratio_fast", "timing", "lower", 0.5),
        Check("conv_bn.infer_latency_ratio", "timing", "lower", 0.5),
        Check("codec.wire_bytes_ratio", "exact", "higher", 0.01),
        Check("codec.encode_speedup_vs_reference", "timing", "higher", 0.6),
        Check("compress.int8_size_ratio", "exact", "lower", 0.01),
        Check("compress.prune20_macs_ratio", "exact", "lower", 0.01),
    )
}


def _conv_bn() -> dict[str, float]:
    from bench.conv_bn import run

    r = run(batch=16, channels=32, size=16, repeats=5, device="cpu", compiled=False)  # compiles: minutes on CPU
    return {f"conv_bn.{k}": r[k] for k in ("saved_bytes_ratio", "saved_bytes_ratio_fast",
                                            "train_step_time_ratio_fast", "infer_latency_ratio")}  # fmt: skip


def _codec() -> dict[str, float]:
    from bench._common import interleaved_medians
    from kernels import codec2bit

    n = 1 << 20
    x = torch.randn(n)
    residual = torch.zeros(n)
    fast = lambda: codec2bit.encode(x, residual.clone())
    ref = lambda: codec2bit.encode(x, residual.clone(), compiled=False)
    t = interleaved_medians({"fast": fast, "ref": ref}, repeats=5)
    return {
        # what encode emits, not the size formula: a payload that grew would show here
        "codec.wire_bytes_ratio": n * 4 / codec2bit.encode(x, residual.clone())[0].numel(),
        "codec.encode_speedup_vs_reference": t["ref"] / t["fast"],
    }


def _compress() -> dict[str, float]:
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model
    from models.prune import PruneConfig, prune_
    from models.quantize import Int8PTQ, quantize_

    torch.manual_seed(0)
    shape = (1, 16, 16)
    model = build_model(ModelConfig.preset("small", in_channels=1, num_classes=10)).eval()
    calib = torch.rand(64, *shape)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = save_artifact(model, Path(tmp) / "fp32", input_shape=shape)["size_bytes"]
        int8 = save_artifact(quantize_(copy.deepcopy(model), Int8PTQ(), calib=calib), Path(tmp) / "int8",
                             input_shape=shape)["size_bytes"]  # fmt: skip
    pruned = copy.deepcopy(model)
    rep = prune_(pruned, PruneConfig(ratio=0.2), input_shape=shape)
    return {"compress.int8_size_ratio": int8 / fp32, "compress.prune20_macs_ratio": rep.macs_after / rep.macs_before}


MEASURES: list[Callable[[], dict[str, float]]] = [_conv_bn, _codec, _compress]


def measure(only: set[str] | None = None) -> dict[str, float]:
    """Runs the measurement groups holding the wanted checks (all by default)."""
    out: dict[str, float] = {}
    for fn in MEASURES:
        group = fn.__name__.lstrip("_")
        if only is None or any(name.startswith(group + ".") for name in only):
            out.update(fn())
    return out


def compare(measured: dict[str, float], baselines: dict[str, float]) -> list[str]:
    """Messages for every check that regressed beyond its tolerance (or is missing)."""
    failures = []
    for name, check in CHECKS.items():
        if name not in baselines:
            failures.append(f"{name}: no baseline (run python -m bench.regression --update)")
            continue
        if name not in measured:
            failures.append(f"{name}: not measured")
            continue
        base, value = baselines[name], measured[name]
        if check.kind == "exact":
            worse = value - base if check.better == "lower" else base - value
            bad = worse > check.tolerance
        else:
            bound = base * (1 + check.tolerance) if check.better == "lower" else base * (1 - check.tolerance)
            bad = value > bound if check.better == "lower" else value < bound
        if bad:
            failures.append(
                f"{name}: {value:.4g} vs baseline {base:.4g} ({check.kind}, {check.better} is better, "
                f"tolerance {check.tolerance:g})"
            )
    return failures


def gate(baselines: dict[str, float] | None = None) -> tuple[dict[str, float], list[str]]:
    """Measures, compares, re-measures failing timing checks once; returns (measured, remaining failures)."""
    baselines = load_baselines() if baselines is None else baselines
    measured = measure()
    failures = compare(measured, baselines)
    timing = {f.split(":")[0] for f in failures if CHECKS.get(f.split(":")[0], Check("", "", "", 0)).kind == "timing"}
    if timing:
        again = measure(timing)
        measured.update({k: v for k, v in again.items() if k in timing})
        failures = compare(measured, baselines)
    return measured, failures


def load_baselines() -> dict[str, float]:
    return json.loads(BASELINES.read_text())["baselines"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help="rewrite bench/baselines.json with this run's values")
    args = p.parse_args(argv)
    from bench._common import hardware, print_table

    if args.update:
        measured = measure()
        BASELINES.write_text(json.dumps({"hardware": hardware(), "baselines": measured}, indent=2) + "\n")
        print(f"wrote {BASELINES}")
        return 0
    baselines = load_baselines()
    measured, failures = gate(baselines)
    rows = []
    for name, check in CHECKS.items():
        failed = any(f.startswith(name + ":") for f in failures)
        rows.append({"check": name, "kind": check.kind, "baseline": baselines.get(name, float("nan")),
                     "measured": measured.get(name, float("nan")), "ok": "no" if failed else "yes"})  # fmt: skip
    print_table(rows, title="performance-regression gate")
    for f in failures:
        print("REGRESSION", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
