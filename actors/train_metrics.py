"""Training metrics through `ray.util.metrics`, so the Ray dashboard and Prometheus see them (as `ray_tandem_train_*`).

Rank 0 sets them once per epoch from the same dict it reports to Ray Train.
"""

from __future__ import annotations

from typing import Any

PREFIX = "tandem_train_"
GAUGES = {
    "loss": "Mean training loss of the last epoch.",
    "train_accuracy": "Training accuracy of the last epoch.",
    "test_accuracy": "Held-out accuracy after the last epoch.",
    "samples_per_s": "Training samples per second over all workers, last epoch.",
    "grad_bytes_intra_per_step": "Gradient bytes a worker sent inside its node in the last step.",
    "grad_bytes_inter_per_step": "Gradient bytes a worker sent to other nodes in the last step.",
    "grad_bytes_per_step": "Gradient bytes a worker sent in the last step, all levels.",
    "peak_rss_mb": "Peak resident memory of a worker (MiB).",
    "epoch": "Last finished epoch.",
    "weights_weight_mean": "Mean sample weight.",
    "weights_weight_min": "Smallest sample weight.",
    "weights_weight_max": "Largest sample weight.",
    "weights_weight_at_cap": "Samples at the weight cap.",
}


class TrainMetrics:
    """Gauges tagged with the run name; created on first use (inside a Ray worker)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self._g: dict[str, Any] | None = None

    def update(self, metrics: dict[str, Any]) -> None:
        if self._g is None:
            from ray.util.metrics import Gauge

            self._g = {
                k: Gauge(PREFIX + k, d, tag_keys=("run",)).set_default_tags({"run": self.run})
                for k, d in GAUGES.items()
            }
        for k, g in self._g.items():
            v = metrics.get(k)
            if isinstance(v, int | float) and not isinstance(v, bool):
                g.set(float(v))


def grafana_panels(first_id: int, first_row: int) -> list[dict[str, Any]]:
    """Grafana timeseries panels over the training gauges (Prometheus names `ray_tandem_train_*`), laid out two
    per row starting at grid row `first_row`."""
    p = "ray_" + PREFIX
    specs = [
        ("Training loss / accuracy", "short", [(f"max({p}loss) by (run)", "loss {{run}}"),
                                               (f"max({p}test_accuracy) by (run)", "test acc {{run}}")]),
        ("Training throughput (samples/s)", "short", [(f"max({p}samples_per_s) by (run)", "{{run}}")]),
        ("Gradient bytes per step and worker", "bytes",
         [(f"max({p}grad_bytes_{level}_per_step) by (run)", f"{level}-node") for level in ("intra", "inter")]),
        ("Sample weights", "short", [(f"max({p}weights_weight_{k}) by (run)", k) for k in ("mean", "min", "max")]),
        ("Training worker peak memory (MiB)", "short", [(f"max({p}peak_rss_mb) by (run)", "{{run}}")]),
    ]  # fmt: skip
    ds = {"type": "prometheus", "uid": "${datasource}"}
    return [
        {
            "id": first_id + i,
            "type": "timeseries",
            "title": title,
            "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (first_row + i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(ord("A") + k), "datasource": ds, "expr": expr, "legendFormat": legend}
                for k, (expr, legend) in enumerate(targets)
            ],
        }
        for i, (title, unit, targets) in enumerate(specs)
    ]
