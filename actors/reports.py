"""Every `ray.train.report` of every worker, collected for the driver.

Ray Train V2 keeps only rank 0's last checkpointed metrics in `Result.metrics`; a `UserCallback` sees all
reports but runs in the Train controller process, so it forwards them to this small actor, which the driver reads.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.train import UserCallback


@ray.remote(num_cpus=0)
class ReportCollector:
    def __init__(self) -> None:
        self.reports: list[list[dict[str, Any]]] = []

    def add(self, metrics: list[dict[str, Any]]) -> None:
        self.reports.append(metrics)

    def get(self) -> list[list[dict[str, Any]]]:
        """One entry per report round: the list of every worker's metrics (index = world rank)."""
        return self.reports

    def latest_epoch(self) -> int:
        return max((m[0].get("epoch", -1) for m in self.reports if m), default=-1)


class CollectReports(UserCallback):
    def __init__(self, collector) -> None:
        self.collector = collector

    def after_report(self, run_context, metrics, checkpoint) -> None:
        ray.get(self.collector.add.remote([dict(m) for m in metrics]))
        m = metrics[0] if metrics else {}
        if "epoch" in m:  # one progress line per epoch (printed by the Train controller, forwarded to the driver)
            print(
                f"[tandem train] epoch {m['epoch']}: loss {m.get('loss', float('nan')):.4f}  "
                f"test acc {m.get('test_accuracy', float('nan')):.4f}  {m.get('samples_per_s', 0):.0f} samples/s"
                + ("  (resumed from checkpoint)" if m.get("restored") else ""),
                flush=True,
            )
