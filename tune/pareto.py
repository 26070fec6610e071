"""The sweep's result: the Pareto front over (accuracy up, latency down, size down), the chosen model, and the
report files (a markdown table, the rows as JSON, and a PNG plot of accuracy vs latency, size as marker).

A row is a dict holding at least "accuracy", "latency_ms", "size_bytes" (finished trials only).
"""

from __future__ import annotations

import json
from pathlib import Path

from tune.space import caps_of_label, runs_fp8

OBJECTIVES: dict[str, str] = {"accuracy": "max", "latency_ms": "min", "size_bytes": "min"}


def _key(row: dict, name: str) -> float:
    return row[name] if OBJECTIVES[name] == "max" else -row[name]


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b in every objective and strictly better in one."""
    ka = [_key(a, n) for n in OBJECTIVES]
    kb = [_key(b, n) for n in OBJECTIVES]
    return all(x >= y for x, y in zip(ka, kb, strict=True)) and any(x > y for x, y in zip(ka, kb, strict=True))


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row dominates, sorted by latency."""
    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["latency_ms"], -r["accuracy"]))


def choose(rows: list[dict], baseline_accuracy: float, max_acc_drop_pts: float) -> dict | None:
    """The fastest row whose accuracy is within `max_acc_drop_pts` points of the baseline (ties: smaller,
    then more accurate); None when no row qualifies."""
    ok = [r for r in rows if 100 * (baseline_accuracy - r["accuracy"]) <= max_acc_drop_pts + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["latency_ms"], r["size_bytes"], -r["accuracy"]))


GPU_FORMS = ("fp8",)
"""Schemes served on a GPU (serve_app.config.GPU_SCHEMES); the rest (fp32, the x86 INT8 path) on CPU."""


def serving_forms(rows: list[dict], baseline_accuracy: float, max_acc_drop_pts: float) -> dict[str, dict]:
    """The sweep's choice per kind of replica hardware, from the measured rows only (a form the sweep did not
    measure is never served): scheme -> row.
    - CPU replicas (and GPUs without FP8): the fastest row within the accuracy bound among the CPU schemes
      (fp32, INT8; usually INT8), keyed by its scheme;
    - sm_89+ replicas: the fastest FP8 row within the bound whose latency was measured on a GPU that runs FP8
      (`measured_on` "cuda sm_89" or newer), keyed "fp8"; none when the trials ran FP8 only as an emulation (on a
      CPU or an older GPU) or not at all.
    Empty when no row is within the bound."""

    def measured_where_served(row: dict) -> bool:
        caps = caps_of_label(str(row.get("measured_on", "")))
        return caps is not None and runs_fp8(caps)

    forms = {}
    cpu = choose([r for r in rows if r.get("quant") not in GPU_FORMS], baseline_accuracy, max_acc_drop_pts)
    if cpu is not None:
        forms[cpu.get("quant", "none")] = cpu
    gpu = [r for r in rows if r.get("quant") in GPU_FORMS and measured_where_served(r)]
    for scheme in GPU_FORMS:
        best = choose([r for r in gpu if r["quant"] == scheme], baseline_accuracy, max_acc_drop_pts)
        if best is not None:
            forms[scheme] = best
    return forms


_COLUMNS = ("trial", "prune_ratio", "quant", "per_channel", "finetune_epochs", "calib_size", "accuracy",
            "acc_drop_pts", "latency_ms", "size_bytes", "macs")  # fmt: skip


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict], chosen: dict | None = None) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " | chosen |", "|" + "---|" * (len(_COLUMNS) + 1)]
    for r in rows:
        mark = "*" if chosen is not None and r is chosen else ""
        lines.append("| " + " | ".join(_cell(r.get(c, "")) for c in _COLUMNS) + f" | {mark} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], front: list[dict], chosen: dict | None, path: Path, title: str) -> None:
    """PNG: accuracy vs latency, marker area proportional to size, front joined by a line, chosen starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    biggest = max(r["size_bytes"] for r in rows)
    colors = {"none": "tab:gray", "int8_ptq": "tab:blue", "int8_qat": "tab:green", "fp8": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for quant, color in colors.items():
        sel = [r for r in rows if r.get("quant") == quant]
        if sel:
            ax.scatter([r["latency_ms"] for r in sel], [100 * r["accuracy"] for r in sel], c=color, alpha=0.7,
                       s=[20 + 300 * r["size_bytes"] / biggest for r in sel], label=quant)  # fmt: skip
    xs, ys = [r["latency_ms"] for r in front], [100 * r["accuracy"] for r in front]
    ax.plot(xs, ys, "k--", lw=1, label="Pareto front")
    if chosen is not None:
        ax.scatter([chosen["latency_ms"]], [100 * chosen["accuracy"]], marker="*", s=250, c="red", label="chosen")
    ax.set_xlabel("latency (ms per batch)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    rows: list[dict], baseline_accuracy: float, max_acc_drop_pts: float, out_dir: Path, title: str
) -> dict:
    """Writes pareto.md, trials.json and pareto.png under `out_dir`; returns {front, chosen, paths}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows)
    chosen = choose(rows, baseline_accuracy, max_acc_drop_pts)
    text = (
        f"# {title}\n\nbaseline accuracy {100 * baseline_accuracy:.2f}%, max drop {max_acc_drop_pts} points; "
        f"chosen = fastest within it (marked *).\n\n## Pareto front\n\n{markdown_table(front, chosen)}\n"
        f"## All finished trials\n\n{markdown_table(sorted(rows, key=lambda r: r['latency_ms']), chosen)}"
    )
    paths = {"table": out_dir / "pareto.md", "rows": out_dir / "trials.json", "plot": out_dir / "pareto.png"}
    paths["table"].write_text(text)
    summary = {
        "baseline_accuracy": baseline_accuracy,
        "trials": rows,
        "front": [r["trial"] for r in front],
        "chosen": None if chosen is None else chosen["trial"],
    }
    paths["rows"].write_text(json.dumps(summary, indent=2))
    plot(rows, front, chosen, paths["plot"], title)
    return {"front": front, "chosen": chosen, "paths": paths}
