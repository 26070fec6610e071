"""The end-to-end job behind `tandem run` (and the training step alone, `tandem train`).

    prepare data (digits or the user's parquet, validated)
    -> train: Ray Train workers, weighted Ray Data stream, hierarchical 2-bit gradient hook (or in-process, --local)
    -> export the trained model as an fp32 artifact
    -> tune: Ray Tune sweep over pruning x quantization, Pareto front, chosen artifact
    -> serve the chosen artifact on Ray Serve (same cluster) -> short load test with adaptive batching
    -> report: terminal table, report.json, report.md, PNG plots
A user model (`package.module:function`) goes through every step: its artifact records how to rebuild it.

Every run has a name (default: a timestamp) and its own folder `<storage>/<name>` (models/storage.py URI: a
directory, file://, s3://, gs://) holding everything another node or a later step reads:
    data/train, data/test      the prepared parquet
    train/                     Ray Train's run (checkpoints; restored by Ray Train after a worker failure)
    weight_store.npz           the sample-weight store's snapshot
    artifacts/trained          the trained fp32 artifact
    tune/                      the Tune experiment, trial artifacts, the chosen artifact, the sweep report
    report.json, report.md, *.png
A name already there is refused unless resumed explicitly (`resume`), so a new run never trips over an old one.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from actors.dataset import DataConfig, DataSplits, is_image_folder, load_tensors, parquet_files, prepare_data
from actors.train_local import TrainConfig, fit_local
from actors.trainer import DistConfig, TrainJob
from actors.weight_store import WeightRule
from actors.weighted_stream import StreamConfig
from models import storage
from models.factory import ModelSpec

STEPS = ("train", "tune", "serve", "loadtest")
DEFAULT_STORAGE = "~/tandem-runs"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Everything `tandem run` / `tandem train` need."""

    preset: str = "small"
    """Built-in model preset (tiny, small, resnet18); ignored when `model` is set."""
    model: str | None = None
    """A user model as 'package.module:function' returning an nn.Module; its Conv->BN->act chains are fused."""
    model_args: dict = field(default_factory=dict)
    """Keyword arguments of the user model's function (`--model-args` JSON)."""
    input_stats: tuple | None = None
    """(per-channel mean, std) of the training data, set by the job after validating it: a user model normalizes
    its input with them (models.factory.InputNorm, part of the model and its artifact)."""
    save: str = "lean"
    """Memory mode of the unified operator: lean or fast."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset (default: the bundled digits)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimization settings."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Ray Train workers, gradient communication, checkpointing, fault tolerance."""
    stream: StreamConfig = field(default_factory=lambda: StreamConfig(weighted=False))
    """Sampling of the training stream: uniform by default (weighted sampling needed 1.064x uniform's samples to
    reach the target on MNIST-1D); `StreamConfig(weighted=True)` draws rows by difficulty weights."""
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
    """Leave the Serve app running after the report (until Ctrl-C); otherwise it is deleted with the job."""
    name: str = ""
    """The run's name: its folder under `storage`; empty = a UTC timestamp (YYYYmmdd-HHMMSS)."""
    resume: bool = False
    """Continue the run `name` already in storage (Ray Train restores its latest checkpoint); without it an
    existing name is refused."""
    storage: str = DEFAULT_STORAGE
    """Where runs live: a directory, file://, s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL) or gs://. On a
    cluster it must be reachable from every node (an object store or a shared mount)."""
    workdir: str | None = None
    """A local directory that also receives the report and its plots; None: only the storage."""
    gpus_per_worker: float | None = None
    """GPUs per Train worker and Tune trial; None = 1 where the cluster has GPUs, else 0. Serve replicas ask for a
    GPU only where their served form runs on one (serve_app.deploy.replica_gpus: FP8)."""
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
        if not isinstance(self.name, str) or (self.name and not _NAME.fullmatch(self.name)):
            raise ValueError(f"name must be letters, digits, '.', '_' or '-' (at most 128), got {self.name!r}")
        if self.resume and not self.name:
            raise ValueError("resume needs the name of the run to continue")
        self.storage = storage.absolute(self.storage)  # checks it too
        if self.gpus_per_worker is not None and not self.gpus_per_worker >= 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker!r}")
        if self.train.infobatch is not None and self.stream.weighted:
            raise ValueError("--infobatch needs a uniform stream, got --weighted as well")

    def model_spec(self) -> ModelSpec:
        spec = ModelSpec(preset=self.preset, user=self.model, save=self.save, user_kwargs=self.model_args)
        return spec.normalized(*self.input_stats) if self.input_stats is not None else spec

    def train_job(self) -> TrainJob:
        dist = self.dist
        if self.address is None and self.nodes > 1 and not dist.worker_resources:
            # the embedded cluster offers ceil(workers / nodes) worker slots per simulated node
            dist = replace(dist, worker_resources={"worker_slot": 1})
        if self.gpus_per_worker is not None:
            dist = replace(dist, gpus_per_worker=self.gpus_per_worker)
        dist = replace(dist, name=self.name or dist.name)
        return TrainJob(model=self.model_spec(), train=self.train, dist=dist, stream=self.stream, rule=self.rule)

    def run_uri(self) -> str:
        assert self.name, "claim_run() names the run first"
        return storage.join(self.storage, self.name)


def claim_run(cfg: RunConfig) -> RunConfig:
    """`cfg` with its run name fixed: a fresh timestamp (suffixed when taken), a given new name, or an existing
    run to resume. Raises ValueError for a given name that exists without `resume`, or a resume of nothing."""
    if cfg.name:
        there = storage.exists(cfg.run_uri())
        if there and not cfg.resume:
            raise ValueError(
                f"run {cfg.name!r} already exists under {cfg.storage}; pass --resume {cfg.name} to continue it or "
                "choose another --name"
            )
        if cfg.resume and not there:
            raise ValueError(f"resume: no run {cfg.name!r} under {cfg.storage}")
        return cfg
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name, i = stamp, 1
    while storage.exists(storage.join(cfg.storage, name)):
        i += 1
        name = f"{stamp}-{i}"
    return replace(cfg, name=name)


def stage_data(data: DataConfig, scratch: Path, run_uri: str) -> tuple[DataSplits, DataSplits]:
    """Validates the data (downloading object-store inputs first, preparing in `scratch`) and copies both splits
    under `run_uri`/data; returns (splits readable here, the same splits at their storage URIs, for workers on any
    node). `scratch` must outlive the returned local splits unless the storage is local."""
    inputs = {}
    for key in ("train_path", "test_path"):
        path = getattr(data, key)
        # an image folder is read where it is (listed here, read by Ray Data's workers), never downloaded
        if path is not None and storage.is_remote(path) and not is_image_folder(path):
            dest = scratch / "input" / key
            path = storage.download_dir(path, dest) if storage.is_dir(path) else storage.download_file(path)
        inputs[key] = path
    local = prepare_data(replace(data, **inputs), scratch)
    shared = {}
    for split, info in (("train", local.train), ("test", local.test)):
        dest = storage.join(run_uri, "data", split)
        for f in parquet_files(info.path):
            target = storage.join(dest, Path(f).name)
            if storage.local_path(target) != str(Path(f).resolve()):
                storage.upload_file(f, target)
        shared[split] = replace(info, path=dest)
    shared = DataSplits(**shared)
    return (shared if storage.local_path(run_uri) is not None else local), shared


def _train_local(cfg: RunConfig, splits: DataSplits, scratch: Path) -> dict:
    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    torch.manual_seed(cfg.train.seed)
    model = cfg.model_spec().build(splits.image_shape, splits.num_classes)
    res = fit_local(model, (xtr, ytr), (xte, yte), cfg.train, progress=True)
    ckpt = scratch / "local_model.pt"
    torch.save(model.state_dict(), ckpt)
    uri = storage.join(cfg.run_uri(), ckpt.name)
    if storage.local_path(uri) != str(ckpt.resolve()):
        storage.upload_file(ckpt, uri)
    return {
        "history": res.history,
        "test_accuracy": res.test_accuracy,
        "precision": res.policy,
        "checkpoint": uri,
        "mode": "local",
    }


def _train_ray(cfg: RunConfig, splits: DataSplits) -> dict:
    from actors.trainer import fit_distributed

    res = fit_distributed(cfg.train_job(), splits, cfg.run_uri(), train_dir="train")
    history_uri = storage.join(cfg.run_uri(), "train_history.json")
    if cfg.resume and storage.exists(history_uri):  # epochs an earlier attempt of this run finished
        done = {h["epoch"] for h in res.history}
        earlier = [h for h in json.loads(storage.read_text(history_uri)) if h["epoch"] not in done]
        res.history = sorted(earlier + res.history, key=lambda h: h["epoch"])
    if not res.history:
        raise ValueError(f"run {cfg.name!r} trained no epoch (all {cfg.train.epochs} were done before the resume)")
    storage.write_text(history_uri, json.dumps(res.history, default=str))
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


def train_step(cfg: RunConfig, splits: DataSplits, shared: DataSplits, scratch: Path) -> dict:
    """Trains in process (`local`, on `splits`) or on the connected Ray cluster (on `shared`, the storage copy);
    returns the training report."""
    return _train_local(cfg, splits, scratch) if cfg.local else _train_ray(cfg, shared)


def _gpus(cfg: RunConfig) -> RunConfig:
    """`cfg` with gpus_per_worker fixed from the connected cluster: 1 where it has GPUs, else 0."""
    if cfg.gpus_per_worker is not None:
        return cfg
    import ray

    return replace(cfg, gpus_per_worker=1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)


def main(cfg: RunConfig) -> dict:
    """Runs the configured pipeline steps; returns the report (also `<storage>/<name>/report.json`, report.md)."""
    cfg = claim_run(cfg)
    run_uri = cfg.run_uri()
    here = storage.local_path(run_uri)
    # with a local (or mounted) storage the run's folder is the scratch space; with an object store a temp dir is,
    # and what others read is uploaded
    scratch = Path(here) if here is not None else Path(tempfile.mkdtemp(prefix=f"tandem-{cfg.name}-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-prep-") as prep:
            return _run(cfg, run_uri, scratch, Path(prep))
    finally:
        if here is None:
            shutil.rmtree(scratch, ignore_errors=True)


def _run(cfg: RunConfig, run_uri: str, scratch: Path, prep: Path) -> dict:
    t0 = time.perf_counter()
    splits, shared = stage_data(cfg.data, prep, run_uri)
    cfg = replace(cfg, input_stats=(splits.train.channel_mean, splits.train.channel_std))
    spec = cfg.model_spec()
    from models.preflight import preflight

    # before any cluster starts: the model builds and takes one training step on this data's shape
    checked = preflight(spec, splits.image_shape, splits.num_classes)
    print(f"tandem: {checked.describe()}")
    print(
        f"tandem: run {cfg.name!r}{' (resumed)' if cfg.resume else ''}: {spec.name} on {splits.train.num_rows} "
        f"train / {splits.test.num_rows} test samples of shape {splits.image_shape}, {splits.num_classes} classes; "
        f"steps {', '.join(cfg.steps)}; storage {run_uri}"
    )
    report: dict = {
        "name": cfg.name,
        "storage": run_uri,
        "model": spec.name,
        "preflight": {"fused": checked.fused, "unfused_convs": checked.unfused_convs, "params": checked.params},
        "data": {"train": shared.train.path, "test": shared.test.path, "image_shape": list(splits.image_shape)},
    }
    if cfg.local:
        report["config"] = _config_dict(cfg)
        report["train"] = train_step(cfg, splits, shared, scratch)
        report["seconds"] = time.perf_counter() - t0
        _finish(report, cfg, scratch)
        return report
    from models.user_model import runtime_env_for
    from tandem.local_ray import ray_session

    per_node = -(-cfg.dist.num_workers // cfg.nodes)
    # a user model's package reaches a cluster's workers, trials and replicas through the job's runtime_env
    # (nothing to ship on the embedded cluster, inside a Ray job, or for an installed package)
    env = runtime_env_for(cfg.model) if cfg.address is not None and cfg.model else None
    with ray_session(cfg.address, cfg.nodes, slots_per_node=per_node, runtime_env=env) as session:
        cfg = _gpus(cfg)
        report["config"] = _config_dict(cfg)
        report["cluster"] = session
        try:
            report["train"] = train_step(cfg, splits, shared, scratch)
            _after_training(cfg, splits, shared, report, scratch)
            report["seconds"] = time.perf_counter() - t0
            _finish(report, cfg, scratch)
            if cfg.keep_serving and "serve" in report:
                _block_serving(report["serve"]["url"])
        finally:
            # the app goes with the job (its replicas hold CPUs, its proxy the port). On the embedded cluster it
            # goes with the cluster, which ray_session then stops: after the job's own load test nothing is in
            # flight, and draining the replicas first only took time (~5 s); a kept app's clients may still call
            if "serve" in report and (not report["cluster"]["embedded"] or cfg.keep_serving):
                from tandem import pipeline

                pipeline.stop_serving()
        return report


def _config_dict(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _after_training(cfg: RunConfig, splits: DataSplits, shared: DataSplits, report: dict, scratch: Path) -> None:
    from tandem import pipeline

    weights = report["train"].pop("_weights", None)
    report["plots"] = pipeline.plot_training(report["train"]["history"], weights, scratch)
    if set(cfg.steps) == {"train"}:
        return
    run_uri = cfg.run_uri()
    local_artifact, acc = pipeline.export_trained(report["train"]["checkpoint"], cfg.model_spec(), splits,
                                                  scratch / "artifacts" / "trained")  # fmt: skip
    artifact = storage.upload_dir(local_artifact, storage.join(run_uri, "artifacts", "trained"))
    report["export"] = {"artifact": artifact, "test_accuracy": acc}
    chosen = artifact
    if "tune" in cfg.steps:
        report["tune"] = pipeline.sweep(artifact, cfg, shared, scratch / "tune", storage.join(run_uri, "tune"))
        chosen = report["tune"]["artifact"] or artifact
        if report["tune"]["paths"].get("plot"):
            report["plots"]["pareto_front"] = report["tune"]["paths"]["plot"]
    if "serve" in cfg.steps:
        from concurrent.futures import ThreadPoolExecutor

        from models.preflight import check_artifact_out_of_process

        # loaded as a replica will, in a fresh process, before anything is deployed; Serve's controller and
        # ingress start meanwhile (they deploy nothing), so the check's seconds hide Serve's start-up
        embedded = report["cluster"]["embedded"]
        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(check_artifact_out_of_process, storage.download_dir(chosen))
            try:
                pipeline.start_serving(cfg.serve_port, embedded=embedded)
                report["artifact_check"] = check.result()
            except BaseException:
                from ray import serve as ray_serve

                # nothing was deployed: on a cluster, a Serve without apps goes (as after stop_serving)
                if not embedded and not ray_serve.status().applications:
                    ray_serve.shutdown()
                raise
        # replicas ask for a GPU where the artifact runs on one (serve_app.config.default_num_gpus): the INT8 and
        # fp32 artifacts are served on CPU even on a GPU cluster
        # the sweep's serving set where it wrote one: each replica loads the measured form for its hardware
        served = report.get("tune", {}).get("serving") or chosen
        url = pipeline.serve(served, cfg.serve_port, embedded=embedded)
        report["serve"] = {"url": url, **pipeline.served_forms(served)}
        print(f"tandem: serving {served} at {url}")
        if "loadtest" in cfg.steps:
            report["loadtest"] = pipeline.loadtest(
                url, cfg.load_rate, cfg.load_seconds, scratch / "latency_under_load.png"
            )
            report["plots"]["latency_under_load"] = report["loadtest"]["plot"]


def _finish(report: dict, cfg: RunConfig, scratch: Path) -> None:
    """Writes report.json (+ report.md and the plots) into the run's storage, and into `workdir` when set."""
    from tandem.pipeline import write_markdown

    report["test_accuracy"] = report["train"]["test_accuracy"]
    run_uri = cfg.run_uri()
    plots = [Path(p) for p in report.get("plots", {}).values()]
    # the report names the plots where they stay: in the run's storage (the scratch copy of an object store goes)
    report["plots"] = {k: storage.join(run_uri, Path(p).name) for k, p in report.get("plots", {}).items()}
    files = [scratch / "report.json"]
    files[0].write_text(json.dumps(report, indent=2, default=str))
    if not cfg.local:
        write_markdown(report, scratch / "report.md")
        files.append(scratch / "report.md")
    files += plots
    for f in files:
        target = storage.join(run_uri, f.name)
        if storage.local_path(target) != str(f.resolve()):
            storage.upload_file(f, target)
    if cfg.workdir is not None:
        out = Path(cfg.workdir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            if out / f.name != f.resolve():
                shutil.copy2(f, out / f.name)
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
