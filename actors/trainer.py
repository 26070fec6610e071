"""Distributed training on Ray Train (V2): the unified-operator model, DDP with a pluggable gradient communication
(plain allreduce, or the hierarchical compressed hook from collectives/), the weighted Ray Data stream, per-sample
difficulty sent to the weight store, selective activation checkpointing, checkpoints and resume.

Driver side: `fit_distributed(job, splits)`. Worker side: `train_loop(config)`, run by TorchTrainer on every worker.

Checkpoint layout (one directory per epoch; every rank writes into the same one):
    model.pt, optim.pt (optimizer + scheduler), meta.json (epoch, model spec), weights.npz (weight store),
    infobatch.npz (InfoBatch's pooled scores and draw state) — rank 0
    comm_rank{r}.pt — each rank's gradient-communication state (error-feedback residuals, counters)
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch.nn.parallel import DistributedDataParallel

from actors.comm import CommConfig, build_comm
from actors.dataset import DatasetInfo, DataSplits, load_tensors
from actors.reports import CollectReports, ReportCollector
from actors.train_local import TrainConfig, make_optimizer
from actors.train_metrics import TrainMetrics
from actors.weight_store import SampleWeightStore, WeightRule, last_layer_grad_norm
from actors.weighted_stream import StreamConfig, build_stream, read_sample_ids
from kernels.conv_bn import plan_save_modes_on_first_step_
from kernels.precision import PrecisionPolicy
from models.checkpointing import CheckpointConfig as ActivationCheckpointing
from models.checkpointing import checkpoint_
from models.factory import ModelSpec


@dataclass(kw_only=True, slots=True)
class DistConfig:
    """How the training runs on the cluster."""

    num_workers: int = 2
    """Ray Train workers (one process each)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs reserved per worker."""
    gpus_per_worker: float = 0.0
    """GPUs reserved per worker; > 0 trains on CUDA with NCCL inside the worker group, 0 on CPU with gloo."""
    max_failures: int = 2
    """Worker-group restarts (from the last checkpoint) before the run fails."""
    checkpointing: str = "none"
    """Selective activation checkpointing: 'none', 'all', or k (every k-th block)."""
    storage_path: str | None = None
    """Storage URI (models/storage.py) under which Ray Train keeps this run's checkpoints; None: the run URI."""
    name: str = "tandem-train"
    """Run name: Ray Train's run under storage_path, the report collector's actor name, the metrics' label."""
    workers_per_node: int | None = None
    """Workers on every node the run uses (the hierarchical allreduce needs the same number on each); None: as
    Ray places them."""
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom resources each worker needs, e.g. {"worker_slot": 1} to pin a fixed number per node."""
    placement: str = "PACK"
    """Placement group strategy for the workers: PACK (fill nodes in turn) or SPREAD (across nodes)."""
    wait_for_resources: bool = False
    """False: fail at once when the cluster cannot place the workers (no autoscaler); True: wait."""
    comm: CommConfig = field(default_factory=CommConfig)
    """Gradient communication: plain allreduce or the hierarchical compressed hook."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive int, got {self.num_workers!r}")
        if not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise ValueError(f"max_failures must be an int >= 0, got {self.max_failures!r}")
        ActivationCheckpointing.parse(self.checkpointing)
        if self.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement!r}")
        if not isinstance(self.gpus_per_worker, int | float) or self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be a number >= 0, got {self.gpus_per_worker!r}")
        if self.workers_per_node is not None:
            k = self.workers_per_node
            if not isinstance(k, int) or k < 1 or self.num_workers % k:
                raise ValueError(
                    f"workers_per_node must be a positive int dividing num_workers ({self.num_workers}), got {k!r}"
                )

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def worker_resources_request(self) -> dict[str, float]:
        """What each Train worker asks Ray for (ScalingConfig.resources_per_worker)."""
        res = {"CPU": self.cpus_per_worker, **self.worker_resources}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass(kw_only=True, slots=True)
class TrainJob:
    """Everything a worker needs; pickled into the train loop config."""

    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    rule: WeightRule = field(default_factory=WeightRule)

    def __post_init__(self) -> None:
        if self.train.infobatch is not None and self.stream.weighted:
            raise ValueError("train.infobatch needs a uniform stream, got stream.weighted=True as well")
        if self.train.batch_size < self.dist.num_workers:
            raise ValueError(
                f"train.batch_size is the global batch, split over the workers: it must be >= the "
                f"{self.dist.num_workers} workers, got {self.train.batch_size}"
            )

    @property
    def worker_batch(self) -> int:
        """Rows per worker per step: the global batch split evenly (the remainder of an uneven split is dropped)."""
        return self.train.batch_size // self.dist.num_workers


class LastLayerTap:
    """Captures the input of the model's last nn.Linear (the penultimate features) on every forward."""

    def __init__(self, model: nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"{type(model).__name__} has no nn.Linear layer to compute difficulty from")
        self.features: torch.Tensor | None = None
        linears[-1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.features = inputs[0].detach()


def _local_info(info: DatasetInfo) -> DatasetInfo:
    """`info` readable here: a dataset on an object store is downloaded once per worker process (the test split
    is small; the training split streams through Ray Data, which reads URIs itself)."""
    from models import storage

    if not storage.is_remote(info.path):
        return info
    local = storage.download_dir(info.path) if storage.is_dir(info.path) else storage.download_file(info.path)
    return replace(info, path=local)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _restore(ckpt: Checkpoint, model, opt, sched, comm, store, rank: int, pruner=None) -> int:
    """Loads a checkpoint into this worker; returns the first epoch still to run."""
    with ckpt.as_directory() as d:
        d = Path(d)
        model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
        optim = torch.load(d / "optim.pt", weights_only=True)
        opt.load_state_dict(optim["optimizer"])
        sched.load_state_dict(optim["scheduler"])
        comm_file = d / f"comm_rank{rank}.pt"
        if comm_file.exists():
            comm.load_state_dict(torch.load(comm_file, weights_only=True))
        meta = json.loads((d / "meta.json").read_text())
        if rank == 0 and store is not None and (d / "weights.npz").exists():
            with np.load(d / "weights.npz", allow_pickle=False) as z:
                ray.get(store.load_state.remote({k: z[k] for k in z.files}))
        if pruner is not None and (d / "infobatch.npz").exists():  # every worker: they plan the same epochs
            with np.load(d / "infobatch.npz", allow_pickle=False) as z:
                pruner.pruner.load_state_dict({k: z[k] for k in z.files})
    return int(meta["epoch"]) + 1


def _save(model, opt, sched, comm, store, rank: int, epoch: int, job: TrainJob, pruner=None) -> str:
    d = tempfile.mkdtemp(prefix=f"tandem-ckpt-r{rank}-")
    torch.save(comm.state_dict(), os.path.join(d, f"comm_rank{rank}.pt"))
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(d, "model.pt"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, os.path.join(d, "optim.pt"))
        Path(d, "meta.json").write_text(json.dumps({"epoch": epoch, "model": job.model.name}))
        if store is not None:
            state = ray.get(store.state.remote())
            np.savez(os.path.join(d, "weights.npz"), **state)
        if pruner is not None:  # scores pooled by merge_: rank 0's are every worker's
            np.savez(os.path.join(d, "infobatch.npz"), **pruner.pruner.state_dict())
    return d


def _evaluate(model: nn.Module, test, rank: int, world: int, device):
    """(accuracy, mean loss) on the held-out data, summed over workers: `test` is this worker's Ray Data shard
    of the test set (each worker scores its own rows, decoded by Ray Data), or (x, y) tensors of which each
    worker scores rows rank, rank + world, ... (when the trainer was given no "test" dataset)."""
    if isinstance(test, tuple):
        x, y = test[0][rank::world], test[1][rank::world]
        batches = ((x[i : i + 512], y[i : i + 512]) for i in range(0, len(x), 512))
    else:
        batches = ((b["image"], b["label"]) for b in test.iter_torch_batches(batch_size=512))
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for xb, t in batches:
            xb, t = xb.to(device), t.to(device)
            logits = model(xb).float()
            sums += torch.tensor(
                [F.cross_entropy(logits, t, reduction="sum").item(), (logits.argmax(1) == t).sum().item(), len(t)],
                dtype=torch.float64,
            )
    dist.all_reduce(sums)
    model.train()
    return sums[1].item() / max(sums[2].item(), 1), sums[0].item() / max(sums[2].item(), 1)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    from models.training import BNSample, EpochPacedLR, infobatch_pruner, recompute_bn_stats_, train_epoch

    job: TrainJob = config["job"]
    store = config["store"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.train.seed)
    model = job.model.build(config["image_shape"], config["num_classes"]).to(device)
    # lean ops keep or recompute their conv output by its size at this worker's batch, decided by the first step
    plan_save_modes_on_first_step_(model)
    checkpoint_(model, ActivationCheckpointing.parse(job.dist.checkpointing))
    tap = LastLayerTap(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    comm = build_comm(job.dist.comm, ctx, ddp)
    policy = PrecisionPolicy.for_device(device, job.train.precision)
    policy.apply_backend_flags()
    epoch_rows = job.stream.epoch_size or config["num_train"]
    steps_per_epoch = max(1, epoch_rows // (world * job.worker_batch))
    opt, sched = make_optimizer(model, job.train, steps_per_epoch)
    weighted = job.stream.weighted
    try:  # the test set through Ray Data when the trainer was given one (build_eval_stream), else tensors
        test = ray.train.get_dataset_shard("test")
    except (KeyError, ValueError):
        test = None
    if test is None:
        _, test_x, test_y = load_tensors(_local_info(config["test_info"]))
        test = (test_x, test_y)
    # InfoBatch: every worker plans the same epoch (same seed, scores pooled after each epoch, both checkpointed)
    ids = config.get("sample_ids")
    pruner = None if ids is None else infobatch_pruner(len(ids), job.train, ids)
    pace = None if pruner is None else EpochPacedLR(sched, steps_per_epoch)
    start, restored = 0, False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        start, restored = _restore(ckpt, model, opt, sched, comm, store if weighted else None, rank, pruner), True
    gauges = TrainMetrics(job.dist.name)
    pending, buf_ids, buf_d = [], [], []

    def reduce_(t: torch.Tensor) -> None:  # in place over the workers, through the group's device (NCCL on GPU)
        d = t.to(device)
        dist.all_reduce(d)
        t.copy_(d.cpu())

    def on_batch(batch, logits) -> None:
        if weighted:
            buf_ids.append(batch["sample_id"].cpu().numpy())
            buf_d.append(last_layer_grad_norm(logits, batch["label"], tap.features).cpu().numpy())
            if len(buf_ids) >= 8:  # one actor call per 8 steps, not awaited here
                pending.append(store.record.remote(np.concatenate(buf_ids), np.concatenate(buf_d), len(buf_ids)))
                buf_ids.clear()
                buf_d.clear()

    for epoch in range(start, job.train.epochs):
        if weighted and rank == 0:
            ray.get(store.begin_epoch.remote(epoch, job.stream.epoch_size))
        dist.barrier()  # the draw of this epoch is fixed before any worker reads
        t0 = time.perf_counter()
        pending.clear()
        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_torch_batches(
            batch_size=job.worker_batch,
            drop_last=True,
            local_shuffle_buffer_size=job.stream.shuffle_buffer,
            local_shuffle_seed=job.train.seed * 1000 + epoch * world + rank,
            device=device,
        )

        bn_sample = BNSample(job.train.bn_recompute_rows)
        if pruner is not None:  # the kept rows only: fewer steps (as many on every worker), the LR by progress
            batches = pruner.stream_batches(epoch, batches, job.worker_batch, epoch_rows, world)
            pace.begin_epoch(epoch, batches.steps)
        stats = train_epoch(
            model, batches, opt, pace or sched, policy, on_batch=on_batch, bn_sample=bn_sample, step_model=ddp,
            on_loss=pruner.record if pruner is not None else None,
        )  # fmt: skip
        steps = stats.steps
        skipped = max(0, batches.read - batches.trained) if pruner is not None else 0
        sums = torch.tensor([stats.loss * stats.samples, stats.accuracy * stats.samples, stats.samples, skipped],
                            dtype=torch.float64)  # fmt: skip
        if pruner is not None:
            pruner.pruner.merge_(reduce_)
        if weighted and buf_ids:
            pending.append(store.record.remote(np.concatenate(buf_ids), np.concatenate(buf_d), len(buf_ids)))
            buf_ids.clear()
            buf_d.clear()
        ray.get(pending)  # this epoch's difficulties have arrived before the next draw
        dist.all_reduce(sums)
        # BN statistics of all workers' rows, with the final weights (models/training.py): rank 0's running
        # average alone trails the weights and sees only its shard
        recompute_bn_stats_(model, bn_sample.batches, dist.all_reduce, world)
        seconds = time.perf_counter() - t0
        test_acc, test_loss = _evaluate(model, test, rank, world, device)
        metrics = {
            "epoch": epoch,
            "loss": sums[0].item() / max(sums[2].item(), 1),
            "train_accuracy": sums[1].item() / max(sums[2].item(), 1),
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "samples_per_s": sums[2].item() / seconds,
            "steps": steps,
            "infobatch_skipped": int(sums[3].item()),
            "peak_rss_mb": _peak_rss_mb(),
            "pid": os.getpid(),
            "world_rank": rank,
            "node_rank": ctx.get_node_rank(),
            "local_rank": ctx.get_local_rank(),
            "restored": restored,
            **comm.metrics(),
        }
        if weighted and rank == 0:
            metrics.update({f"weights_{k}": v for k, v in ray.get(store.stats.remote()).items() if k != "epoch"})
        if rank == 0:
            gauges.update(metrics)
        d = _save(model, opt, sched, comm, store if weighted else None, rank, epoch, job, pruner)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


@dataclass(slots=True)
class DistResult:
    history: list[dict]
    """Rank 0's metrics per epoch (in report order; a resumed run repeats no epoch)."""
    all_reports: list[list[dict]]
    """Every report round, every worker."""
    checkpoint_path: str | None
    weights: np.ndarray | None
    seconds: float


def collector_name(run_name: str) -> str:
    """Name of the run's report collector actor (readable from any driver in the namespace while it runs)."""
    return f"tandem-reports:{run_name}"


def check_resources(dist_cfg: DistConfig) -> list[dict[str, str]] | None:
    """Fails fast, with the numbers, when the cluster cannot place the workers (instead of hanging). With
    `workers_per_node`, returns one label selector per worker pinning `workers_per_node` of them to each of
    num_workers / workers_per_node nodes (Ray's default `ray.io/node-id` label), or raises when too few nodes
    can hold that many."""
    if dist_cfg.comm.transport == "ray" and not dist_cfg.use_gpu:
        raise ValueError("inter_transport 'ray' (CuPy/NCCL through ray.util.collective) needs gpus_per_worker > 0")
    total = ray.cluster_resources()
    if not dist_cfg.wait_for_resources:
        need_cpu = dist_cfg.num_workers * dist_cfg.cpus_per_worker + 1  # + 1 for Ray Data and the controller
        if total.get("CPU", 0) < need_cpu:
            raise ValueError(
                f"the cluster has {total.get('CPU', 0):g} CPUs but {dist_cfg.num_workers} workers x "
                f"{dist_cfg.cpus_per_worker:g} CPUs + 1 for data need {need_cpu:g}; use fewer workers, smaller "
                "cpus_per_worker, over-declare CPUs (ray start --num-cpus) or set wait_for_resources for an "
                "autoscaler"
            )
        need_gpu = dist_cfg.num_workers * dist_cfg.gpus_per_worker
        if total.get("GPU", 0) < need_gpu:
            raise ValueError(
                f"the cluster has {total.get('GPU', 0):g} GPUs but {dist_cfg.num_workers} workers x "
                f"{dist_cfg.gpus_per_worker:g} GPUs need {need_gpu:g}; pass --gpus-per-worker 0 to train on CPU"
            )
    if dist_cfg.workers_per_node is None:
        return None
    return plan_nodes(dist_cfg, [n for n in ray.nodes() if n.get("Alive")])


def plan_nodes(dist_cfg: DistConfig, nodes: list[dict]) -> list[dict[str, str]]:
    """Label selectors (one per worker, node by node) placing exactly `workers_per_node` workers on each of the
    first nodes (by node id) whose total resources can hold that many; `nodes` as `ray.nodes()` lists them."""
    k = dist_cfg.workers_per_node
    assert k is not None
    want = dist_cfg.num_workers // k
    per_worker = dist_cfg.worker_resources_request()
    fits = sorted(
        n["NodeID"] for n in nodes if all(n.get("Resources", {}).get(r, 0) >= k * v for r, v in per_worker.items() if v)
    )
    if len(fits) < want:
        ask = ", ".join(f"{k * v:g} {r}" for r, v in per_worker.items() if v)
        raise ValueError(
            f"workers_per_node={k} with {dist_cfg.num_workers} workers needs {want} nodes with {ask} each; the "
            f"cluster has {len(fits)} such node(s) of {len(nodes)}. Use fewer workers, fewer per node, or add nodes"
        )
    return [{"ray.io/node-id": node} for node in fits[:want] for _ in range(k)]


def fit_distributed(
    job: TrainJob, splits: DataSplits, run_uri: str, progress_bars: bool = False, train_dir: str | None = None
) -> DistResult:
    """Trains `job` on the connected Ray cluster with the weighted stream; returns the history and weights.

    `run_uri`: the run's storage (models/storage.py URI: a directory, file://, s3://, gs://). Ray Train's
    checkpoints (in `train_dir`, default the job's name) and the weight store's snapshot go under it; `splits`
    name files every node can read (a shared directory or the same storage). Ray Train restores its own run there
    after a worker failure (FailureConfig); a run snapshot an earlier run left in the same `train_dir` is restored
    too, so a new run needs its own run_uri or name.
    """
    from models import storage

    labels = check_resources(job.dist)
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    t0 = time.perf_counter()
    store = None
    if job.stream.weighted:
        ids = read_sample_ids(_local_info(splits.train))
        store = (
            ray.remote(SampleWeightStore)
            .options(num_cpus=0, max_restarts=-1, max_task_retries=-1)
            .remote(ids, job.rule, job.train.seed, storage.join(run_uri, "weight_store.npz"))
        )
    collector = ReportCollector.options(name=collector_name(job.dist.name), get_if_exists=False).remote()
    fs, path = storage.resolve(job.dist.storage_path or run_uri)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "job": job,
            "store": store,
            "image_shape": splits.image_shape,
            "num_classes": splits.num_classes,
            "num_train": splits.train.num_rows,
            "test_info": splits.test,
            # InfoBatch's score table is indexed by sample id
            "sample_ids": read_sample_ids(_local_info(splits.train)) if job.train.infobatch is not None else None,
        },
        torch_config=torch_config(job.dist),
        scaling_config=scaling_config(job.dist, labels),
        run_config=RunConfig(
            name=train_dir or job.dist.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=job.dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[CollectReports(collector)],
        ),
        datasets={"train": build_stream(splits.train, job.stream, store)},
    )
    result = trainer.fit()
    reports = ray.get(collector.get.remote())
    ray.kill(collector)  # its name is free for the next run in this namespace
    history, seen = [], set()
    for rnd in reports:
        m = rnd[0]
        if m["epoch"] in seen:  # an epoch repeated after a restart: keep the later report
            history = [h for h in history if h["epoch"] != m["epoch"]]
        seen.add(m["epoch"])
        history.append(m)
    weights = ray.get(store.get_weights.remote()) if store is not None else None
    ckpt = result.checkpoint
    return DistResult(
        history=history,
        all_reports=reports,
        checkpoint_path=storage.fs_uri(ckpt.filesystem, ckpt.path) if ckpt else None,
        weights=weights,
        seconds=time.perf_counter() - t0,
    )


def torch_config(dist_cfg: DistConfig) -> TorchConfig:
    """The worker group's default process group: NCCL on GPUs (also the hierarchical hook's intra-node groups,
    which inherit the default backend), gloo on CPU."""
    return TorchConfig(backend="nccl" if dist_cfg.use_gpu else "gloo")


def scaling_config(dist_cfg: DistConfig, label_selector: list[dict[str, str]] | None = None) -> ScalingConfig:
    """The worker group Ray Train is asked for: CPUs/GPUs per worker, placement, optional per-node pinning."""
    return ScalingConfig(
        num_workers=dist_cfg.num_workers,
        use_gpu=dist_cfg.use_gpu,
        resources_per_worker=dist_cfg.worker_resources_request(),
        placement_strategy=dist_cfg.placement,
        label_selector=label_selector,
    )


def load_trained(checkpoint_path: str, spec: ModelSpec, image_shape, num_classes: int) -> nn.Module:
    """The trained model from a checkpoint directory written by `train_loop` (a storage URI or local path)."""
    from models import storage

    model = spec.build(tuple(image_shape), num_classes)
    state = torch.load(storage.download_file(storage.join(checkpoint_path, "model.pt")), weights_only=True)
    # checkpointed blocks are saved under '...inner...': map them back onto the plain model
    state = {k.replace(".inner.", "."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model
