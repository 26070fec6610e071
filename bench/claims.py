"""BENCHMARKS.md: each of the seed's claims (shared/SEED.md), the stated figure, what we measured, the setup, and
whether it held. Reads bench/results/*.json; a missing result is reported as not measured, never guessed.

    python -m bench.claims            # rewrite BENCHMARKS.md from the current results
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench._common import RESULTS

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class Claim:
    claim: str
    stated: str
    result: str
    """bench/results/<result>.json"""
    key: str
    unit: str
    """How to read the measured value."""
    holds: str
    """'<= x' or '>= x': the measured value that reproduces the claim."""
    setup: str
    extra: tuple[str, str] | None = None
    """(key, how to read it): a second figure of the same run shown beside the first (e.g. the step time that the
    memory saving costs)."""
    comparable: bool = True
    """False where the seed's figure cannot be measured here: the row says so; our nearest figure has its own row."""


CLAIMS = [
    Claim("unified operator: memory -40%", "0.60x saved activations", "conv_bn", "saved_bytes_ratio",
          "saved-for-backward bytes, lean / eager", "<= 0.60", "CPU, batch 32, 64->64 ch, 32x32, 3x3, fp32"),
    Claim("unified operator: training throughput +22%", "1.22x", "train_throughput", "unified_vs_eager_throughput",
          "samples/s, unified / eager", ">= 1.22", "Ray Train, 2 workers, `small` layout (see the JSON)"),
    Claim("unified operator, whole model, save='fast' (ours; issue 15 goal)", "(>= 1.0x)", "train_throughput",
          "whole_model_train_ratio_fast", "training samples/s, unified fast / eager NCHW, worst case", ">= 1.0",
          "in-process, 1 thread, batch 64, `small` and `resnet18` at 8x8 and 32x32"),
    Claim("unified operator, whole model, save='lean' (ours; issue 15 goal)", "(>= 0.9x)", "train_throughput",
          "whole_model_train_ratio_lean", "training samples/s, unified lean / eager NCHW, worst case", ">= 0.9",
          "in-process, 1 thread, batch 64, `small` and `resnet18` at 8x8 and 32x32"),
    Claim("unified operator under torch.compile (ours; issue 15 goal)", "(>= 1.0x)", "train_throughput",
          "compiled_unified_vs_compiled_eager", "training samples/s, compiled unified fast / compiled eager, worst",
          ">= 1.0", "in-process, 1 thread, batch 64, fullgraph, inductor"),
    Claim("unified operator: inference latency -18%", "0.82x", "conv_bn", "infer_latency_ratio",
          "eval forward, served form (BN folded) / eager conv+bn+relu", "<= 0.82", "CPU, batch 32, 64->64 ch, 32x32"),
    Claim("unified operator, whole-model inference (ours; issue 15 goal)", "(<= 0.82x)", "train_throughput",
          "whole_model_infer_ratio", "eval latency, inference_module / eager NCHW, worst case", "<= 0.82",
          "`small` and `resnet18`, 8x8 and 32x32, batch 1 and 32, 1 thread"),
    Claim("unified operator vs inductor freezing (ours; issue 15 goal)", "(<= 1.0x)", "conv_bn",
          "infer_latency_ratio_vs_inductor_frozen", "eval latency, compiled served form / compiled frozen eager",
          "<= 1.0", "CPU, batch 32, 64->64 ch, 32x32"),
    Claim("gradient checkpointing: 12 GB -> 7.2 GB", "0.60x", "checkpointing", "small_activation_mem_ratio_every2",
          "saved activations with / without, selective (every 2nd block)", "<= 0.60",
          "`small` preset, batch 64, CPU; the every-block setting saves more at a higher step time (JSON)",
          extra=("small_step_time_ratio_every2", "step time with / without")),
    Claim("dynamic data weighting: converges 35% faster", "0.65x samples to target", "weighting",
          "mnist1d_seed_rule_ratio", "samples to target, seed's rule / uniform", "<= 0.65", "MNIST-1D, in-process"),
    Claim("dynamic data weighting (our best variant)", "0.65x samples to target", "weighting", "mnist1d_best_ratio",
          "samples to target, best variant / uniform", "<= 0.65", "MNIST-1D, in-process"),
    Claim("dynamic data weighting: +1.2 accuracy points", "+1.2 pts", "weighting", "mnist1d_final_acc_delta_pts",
          "final accuracy, best variant - uniform (points)", ">= 1.2", "MNIST-1D"),
    Claim("2-bit compression: volume -93.75%", "16x fewer bytes", "codec", "wire_bytes_ratio",
          "fp32 bytes / payload bytes (scales counted)", ">= 16", "block 512: 2 bits a value + a 4-byte scale"),
    Claim("hierarchical 2-bit over a slow link", "efficiency 48% -> 72% at 128 GPUs", "slow_link",
          "speedup_100mbit", "", "", "128 GPUs: not measurable here; our 4-rank figure is the next row",
          comparable=False),
    Claim("hierarchical 2-bit, 4 ranks over a 100 Mbit link (ours)", "(no seed figure; goal >= 5x)", "slow_link",
          "speedup_100mbit", "flat allreduce time / hierarchical 2-bit, 100 Mbit", ">= 5",
          "4 ranks in 2 network namespaces, tc tbf"),
    Claim("hierarchical 2-bit through `tandem train`, 100 Mbit (ours; issue 14 goal)", "(no seed figure; goal >= 5x)",
          "cluster_link", "train_epoch_speedup_100mbit", "epoch time, flat DDP allreduce / hierarchical 2-bit",
          ">= 5", "resnet18, 2 nodes x 2 Train workers in network namespaces sharing no disk, tc tbf"),
    Claim("hierarchical 2-bit through `tandem train`, 1 Gbit (ours; issue 14 goal)", "(no seed figure; goal >= 1.3x)",
          "cluster_link", "train_epoch_speedup_1gbit", "epoch time, flat DDP allreduce / hierarchical 2-bit",
          ">= 1.3", "as above; on 2 cores the 1 Gbit epoch is compute-bound (see the JSON)"),
    Claim("prune 20% + INT8: 4x smaller", "0.25x size", "compress", "combined_size_ratio",
          "artifact bytes, pruned+int8 / fp32", "<= 0.25", "`small` on digits, CPU"),
    Claim("prune 20% + INT8: 3.2x faster", "3.2x", "compress", "combined_speedup",
          "latency fp32 / pruned+int8, batch 32, inductor", ">= 3.2", "`small` on digits, 2-core CPU"),
    Claim("prune 20% + INT8: -0.8 points", "-0.8 pts", "compress", "combined_acc_delta_pts",
          "accuracy points vs fp32", ">= -0.8", "`small` on digits (360 test samples)"),
    Claim("adaptive batching: latency held under a 50% QPS swing", "mean < 12 ms", "serving",
          "max_rate_ratio_adaptive_vs_static", "highest sine mean held at 99% in SLO, adaptive / static",
          ">= 1.2", "Serve HTTP on 2 cores"),
    Claim("adaptive batching, model-bound (handle path)", "(latency held under a 50% swing)", "serving",
          "max_rate_ratio_adaptive_vs_static_handle",
          "highest sine mean held at 99% in SLO, adaptive / static, DeploymentHandle", ">= 1.5",
          "`resnet18` preset on 8x8 images, 1 thread, 2 cores"),
    Claim("TF32 on A100: matmul 2x", "2x", "gpu_tf32", "tf32_speedup", "fp32 / tf32 matmul time", ">= 2",
          "an A100 is not lent here; our H200 figure is the next row", comparable=False),
    Claim("TF32 matmul speedup on a lent H200 (ours)", "(no seed figure for Hopper)", "gpu_tf32", "tf32_speedup",
          "fp32 / tf32 matmul time, 8192^2", ">= 2", "H200 (sm_90), torch 2.11, bench/gpu_kernels.py"),
    Claim("H100 FP16 inference: 1200 samples/s", "1200/s", "gpu_infer", "samples_per_s",
          "samples/s", ">= 1200", "the seed's model and an H100 are not available; our figure is the next row",
          comparable=False),
    Claim("FP16 inference of our resnet18 preset on a lent H200 (ours)", "(no seed figure for this model)",
          "gpu_infer", "samples_per_s", "samples/s (resnet18 preset, 3x224x224, fp16 autocast, folded BN, batch 256)",
          ">= 1200", "H200 (sm_90), torch 2.11, bench/gpu_kernels.py"),
]  # fmt: skip


def _value(result: dict | None, key: str):
    if result is None:
        return None
    v = result.get(key)
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


def _holds(value: float, rule: str) -> bool:
    op, bound = rule.split()
    return value <= float(bound) if op == "<=" else value >= float(bound)


def rows() -> list[dict]:
    out = []
    for c in CLAIMS:
        path = RESULTS / f"{c.result}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        v = _value(result, c.key)
        hw = (result or {}).get("hardware", {})
        where = hw.get("gpu") or f"{hw.get('processor', '?')} CPU x{hw.get('cpus', '?')}" if result else ""
        measured = "not measured" if v is None else f"{v:.4g} ({c.unit})"
        extra = _value(result, c.extra[0]) if c.extra else None
        if v is not None and extra is not None:
            measured += f"; {c.extra[1]} {extra:.3g}"
        if not c.comparable:
            measured, held = "not comparable here", "n/a"
        else:
            held = "n/a" if v is None else ("yes" if _holds(v, c.holds) else "no")
        out.append({
            "claim": c.claim, "stated": c.stated, "measured": measured, "held": held,
            "setup": f"{c.setup}; {where}".strip("; "), "source": f"bench/results/{c.result}.json#{c.key}",
        })  # fmt: skip
    return out


def write(path: Path = ROOT / "BENCHMARKS.md") -> Path:
    lines = [
        "# The seed's claims, measured",
        "",
        "Generated by `python -m bench.claims` (or `tandem bench all`) from `bench/results/*.json`. Every figure is a",
        "ratio of variants measured side by side in one run; 'held' compares it with the stated figure.",
        "A claim we could not measure here says so.",
        "",
        "| claim | stated | measured | held | setup | source |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows():
        cells = (r["claim"], r["stated"], r["measured"], r["held"], r["setup"], f"`{r['source']}`")
        lines.append("| " + " | ".join(cells) + " |")
    notes = RESULTS.parent / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text()]
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    path = write()
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
