"""The end-to-end job behind `tandem run` (and the training step alone, `tandem train`).

    prepare data (digits or the user's parquet, validated)
    -> train: Ray Train workers, weighted Ray Data stream, hierarchical 2-bit gradient hook (or in-process, --local)
    -> export the trained model as an fp32 artifact
    -> tune: Ray Tune sweep over pruning x quantization, Pareto front, chosen artifact
    -> serve the chosen artifact on Ray Serve (same cluster) -> short load test with adaptive batching
    -> report: terminal table, report.json, report.md, PNG plots
Tune/serve need a built-in preset (artifacts rebuild models.cnn.CNN); a user model stops after training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from actors.dataset import DataConfig, DataSplits, load_tensors, prepare_data
from actors.train_local import TrainConfig, fit_local
from actors.trainer import DistConfig, TrainJob
from actors.weight_store import WeightRule
from actors.weighted_stream import StreamConfig
from models.factory import ModelSpec

STEPS = ("train", "tune", "serve", "loadtest")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything `tandem run` / `tandem train` need."""

    preset: str = "small"
    """Built-in model preset (tiny, small, resnet18); ignored when `model` is set."""
    model: str | None = None
    """A user model as 'package.module:function' returning an nn.Module; its Conv->BN->act chains are fused."""
    save: str = "lean"
    """Memory mode of the unified operator: lean or fast."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset (default: the bundled digits)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization settings."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Ray Train workers, gradient communication, checkpointing, fault tolerance."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Weighted sampling of the training stream."""
    rule: WeightRule = field(default_factory=WeightRule)
    """Sample-weight update rule."""
    address: str | None = None
    """Ray cluster address; None = an embedded local Ray."""
    nodes: int = 2
    """Simulated nodes of the embedded Ray (ignored with `address`)."""
    local: bool = False
    """Train in this process without Ray (quick experiments; training only)."""
    steps: tuple[str, ...] = ("train",)
    """Pipeline steps: train, tune, serve, loadtest (`tandem run` takes all, `tandem train` only train)."""
    trials: int = 8
    """Compression sweep trials (4 with smoke)."""
    max_acc_drop: float = 1.0
    """Accuracy points the chosen compressed model may lose."""
    serve_port: int = 8000
    """HTTP port of Serve's proxy on 127.0.0.1."""
    load_rate: float = 100.0
    """Mean request rate of the load test (sine +-50 %)."""
    load_seconds: float = 10.0
    """Duration of the load test."""
    keep_serving: bool = False
    """Leave the Serve app running after the report (until Ctrl-C)."""
    workdir: str = "runs/latest"
    """Where data, checkpoints and reports are written."""
    smoke: bool = False
    """Tiny sizes so the whole job runs in seconds (tests, CI)."""

    def __post_init__(self) -> None:
        self.model_spec()  # validates preset / save
        if not isinstance(self.nodes, int) or self.nodes < 1:
            raise ValueError(f"nodes must be a positive int, got {self.nodes!r}")
        unknown = set(self.steps) - set(STEPS)
        if unknown or "train" not in self.steps:
            raise ValueError(f"steps must include 'train' and be among {STEPS}, got {self.steps!r}")
        if self.local and set(self.steps) != {"train"}:
            raise ValueError("local (in-process) runs train only; drop --local for the whole pipeline")
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be a positive int, got {self.trials!r}")
        if not 0 < self.serve_port < 65536:
            raise ValueError(f"serve_port must be in (0, 65536), got {self.serve_port!r}")
        if not (self.load_rate > 0 and self.load_seconds > 0):
            raise ValueError(f"load_rate and load_seconds must be > 0, got {self.load_rate}, {self.load_seconds}")

    def model_spec(self) -> ModelSpec:
        return ModelSpec(preset=self.preset, user=self.model, save=self.save)

    def train_job(self) -> TrainJob:
        dist = self.dist
        if self.address is None and self.nodes > 1 and not dist.worker_resources:
            # the embedded cluster offers ceil(workers / nodes) worker slots per simulated node
            dist = replace(dist, worker_resources={"worker_slot": 1})
        return TrainJob(model=self.model_spec(), train=self.train, dist=dist, stream=self.stream, rule=self.rule)


def _train_local(cfg: RunConfig, splits: DataSplits) -> dict:
    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    torch.manual_seed(cfg.train.seed)
    model = cfg.model_spec().build(splits.image_shape, splits.num_classes)
    res = fit_local(model, (xtr, ytr), (xte, yte), cfg.train, progress=True)
    ckpt = Path(cfg.workdir) / "local_model.pt"
    torch.save(model.state_dict(), ckpt)
    return {
        "history": res.history,
        "test_accuracy": res.test_accuracy,
        "precision": res.policy,
        "checkpoint": str(ckpt),
        "mode": "local",
    }


def _train_ray(cfg: RunConfig, splits: DataSplits) -> dict:
    from actors.trainer import fit_distributed

    res = fit_distributed(cfg.train_job(), splits, cfg.workdir)
    weights = res.weights
    return {
        "_weights": weights,
        "history": res.history,
        "test_accuracy": res.history[-1]["test_accuracy"],
        "checkpoint": res.checkpoint_path,
        "mode": "ray",
        "train_seconds": res.seconds,
        "weights_summary": None
        if weights is None
        else {
            "mean": float(weights.mean()),
            "min": float(weights.min()),
            "max": float(weights.max()),
            "histogram": np.histogram(weights, bins=10, range=(0.5, 3.0))[0].tolist(),
        },
    }


def train_step(cfg: RunConfig, splits: DataSplits) -> dict:
    """Trains in process (`local`) or on the connected Ray cluster; returns the training report."""
    return _train_local(cfg, splits) if cfg.local else _train_ray(cfg, splits)


def main(cfg: RunConfig) -> dict:
    """Runs the configured pipeline steps; returns the report (also `<workdir>/report.json` and `report.md`)."""
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = prepare_data(cfg.data, workdir)
    spec = cfg.model_spec()
    print(
        f"tandem: {spec.name} on {splits.train.num_rows} train / {splits.test.num_rows} test samples of shape "
        f"{splits.image_shape}, {splits.num_classes} classes; steps {', '.join(cfg.steps)}; workdir {workdir}"
    )
    report: dict = {
        "model": spec.name,
        "data": {"train": splits.train.path, "test": splits.test.path, "image_shape": list(splits.image_shape)},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    if cfg.local:
        report["train"] = train_step(cfg, splits)
    else:
        from tandem.local_ray import ray_session

        per_node = -(-cfg.dist.num_workers // cfg.nodes)
        with ray_session(cfg.address, cfg.nodes, slots_per_node=per_node) as session:
            report["cluster"] = session
            report["train"] = train_step(cfg, splits)
            _after_training(cfg, splits, report, workdir)
            report["seconds"] = time.perf_counter() - t0
            _finish(report, workdir)
            if cfg.keep_serving and "serve" in report:
                _block_serving(report["serve"]["url"])
            return report
    report["seconds"] = time.perf_counter() - t0
    _finish(report, workdir)
    return report


def _after_training(cfg: RunConfig, splits: DataSplits, report: dict, workdir: Path) -> None:
    from tandem import pipeline

    weights = report["train"].pop("_weights", None)
    report["plots"] = pipeline.plot_training(report["train"]["history"], weights, workdir)
    if set(cfg.steps) == {"train"}:
        return
    if cfg.model is not None:
        report["skipped"] = "tune/serve/loadtest need a built-in preset; a user model stops after training"
        print(f"tandem: {report['skipped']}")
        return
    artifact, acc = pipeline.export_trained(report["train"]["checkpoint"], cfg.model_spec(), splits,
                                            workdir / "artifacts" / "trained")  # fmt: skip
    report["export"] = {"artifact": artifact, "test_accuracy": acc}
    chosen = artifact
    if "tune" in cfg.steps:
        report["tune"] = pipeline.sweep(artifact, cfg, workdir / "tune")
        chosen = report["tune"]["artifact"] or artifact
        if report["tune"]["paths"].get("plot"):
            report["plots"]["pareto_front"] = report["tune"]["paths"]["plot"]
    if "serve" in cfg.steps:
        url = pipeline.serve(chosen, cfg.serve_port)
        report["serve"] = {"url": url, "artifact": chosen}
        print(f"tandem: serving {chosen} at {url}")
        if "loadtest" in cfg.steps:
            report["loadtest"] = pipeline.loadtest(
                url, cfg.load_rate, cfg.load_seconds, workdir / "latency_under_load.png"
            )
            report["plots"]["latency_under_load"] = report["loadtest"]["plot"]


def _finish(report: dict, workdir: Path) -> None:
    from tandem.pipeline import write_markdown

    report["test_accuracy"] = report["train"]["test_accuracy"]
    (workdir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if not report["config"]["local"]:
        write_markdown(report, workdir / "report.md")
    _print_summary(report)


def _block_serving(url: str) -> None:
    print(f"tandem: the app keeps serving at {url} (Ctrl-C to stop). Try:")
    print(f"  curl -s -X POST {url}/predict -H 'content-type: application/json' -d '{{\"instances\": [[...]]}}'")
    print(f"  curl -s {url}/v2/health/ready")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _print_summary(report: dict) -> None:
    hist = report["train"]["history"]
    print(f"{'epoch':>5} {'loss':>8} {'train acc':>9} {'test acc':>9} {'samples/s':>10}")
    for h in hist:
        print(
            f"{h['epoch']:>5} {h['loss']:>8.4f} {h['train_accuracy']:>9.4f} {h['test_accuracy']:>9.4f} "
            f"{h['samples_per_s']:>10.0f}"
        )
    print(f"test accuracy: {report['test_accuracy']:.4f} (training on {report['train']['mode']})")
    if "tune" in report:
        from tandem import pipeline

        tu = report["tune"]
        c = tu["chosen"]
        keys = ("prune_ratio", "quant", "accuracy", "latency_batch_1_ms", "size_bytes")
        print(f"sweep: {tu['trials']} trials ({pipeline.trial_outcomes(tu)}); chosen: "
              f"{({k: c.get(k) for k in keys} if c else None)}")  # fmt: skip
    if "loadtest" in report:
        lt = report["loadtest"]

        def ms(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f} ms"

        print(
            f"load test at {report['serve']['url']}: p50 {ms(lt.get('p50_ms'))}, p99 {ms(lt.get('p99_ms'))}, "
            f"SLO attainment {lt.get('slo_attainment', float('nan')):.3f}"
        )
    print(f"total {report['seconds']:.1f} s")
    if "plots" in report:
        print("plots: " + ", ".join(report["plots"].values()))
