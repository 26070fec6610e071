"""Ray Train with the weighted stream: topology on a simulated 2-node cluster, accuracy, fault tolerance."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from actors.comm import CommConfig
from actors.dataset import DataConfig, prepare_data
from actors.train_local import TrainConfig
from actors.trainer import DistConfig, TrainJob, collector_name, fit_distributed
from actors.weighted_stream import StreamConfig
from kernels.precision import PrecisionConfig
from models.factory import ModelSpec

pytestmark = pytest.mark.timeout(420)


def _job(epochs: int, workers: int, comm: CommConfig | None = None, **dist) -> TrainJob:
    return TrainJob(
        model=ModelSpec(preset="tiny"),
        train=TrainConfig(epochs=epochs, batch_size=32, precision=PrecisionConfig(train_dtype="fp32")),
        dist=DistConfig(num_workers=workers, comm=comm or CommConfig(kind="allreduce"), **dist),
        stream=StreamConfig(),
    )


def test_two_nodes_four_workers(ray_two_nodes, tmp_path):
    splits = prepare_data(DataConfig(), tmp_path)
    comm = CommConfig(kind="hierarchical", codec="2bit", mode="always", compiled_codec=False)
    job = _job(6, 4, comm, placement="SPREAD", worker_resources={"worker_slot": 1}, name="two-nodes")
    res = fit_distributed(job, splits, str(tmp_path))
    last_round = res.all_reports[-1]
    placement = sorted((m["node_rank"], m["local_rank"]) for m in last_round)
    assert placement == [(0, 0), (0, 1), (1, 0), (1, 1)], placement
    assert [h["epoch"] for h in res.history] == list(range(6))
    assert res.history[-1]["test_accuracy"] >= 0.85, res.history
    # every worker ran the same number of steps per epoch (equal split), and the weights moved
    assert len({m["steps"] for m in last_round}) == 1
    assert res.weights.min() < 1.0 < res.weights.max()
    assert res.history[-1]["weights_updates"] == 5
    # the hook saw the same two nodes, compressed between them, and sent far fewer bytes across than inside
    # inter-node bytes per step = the codec's formula: each rank reduces shard = padded / L values with its N - 1
    # peers as N chunks, all-to-all then all-gather of one payload per peer: 2 (N - 1) payload_nbytes(shard / N)
    from kernels.codec2bit import DEFAULT_BLOCK, payload_nbytes
    from models.factory import ModelSpec as Spec

    n = sum(p.numel() for p in Spec(preset="tiny").build((1, 8, 8), 10).parameters())  # one DDP bucket
    nodes, per_node = 2, 2
    unit = nodes * per_node * DEFAULT_BLOCK
    padded = -(-n // unit) * unit
    expected_inter = 2 * (nodes - 1) * payload_nbytes(padded // (per_node * nodes), DEFAULT_BLOCK)
    for m in last_round:
        assert m["comm"] == "hierarchical/2bit" and m["nodes"] == 2 and m["compressing"]
        assert m["grad_bytes_inter_per_step"] == expected_inter
        assert 0 < 8 * m["grad_bytes_inter_per_step"] < m["grad_bytes_intra_per_step"]


def test_workers_per_node_places_equal_counts(ray_two_nodes, tmp_path):
    """Label selectors put 2 + 2 workers on the two nodes with no custom resource and PACK placement (which would
    fill one node first); a request no node can hold fails before training."""
    splits = prepare_data(DataConfig(), tmp_path)
    job = _job(1, 4, workers_per_node=2, placement="PACK", name="per-node")
    res = fit_distributed(job, splits, str(tmp_path / "run"))
    placement = sorted((m["node_rank"], m["local_rank"]) for m in res.all_reports[-1])
    assert placement == [(0, 0), (0, 1), (1, 0), (1, 1)], placement
    assert (tmp_path / "run" / "per-node").is_dir()  # Ray Train's run lives under the run's storage
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="needs 1 nodes with 8 CPU each; the cluster has 0 such node"):
        fit_distributed(_job(1, 4, workers_per_node=4, cpus_per_worker=2), splits, str(tmp_path / "run2"))
    assert time.monotonic() - t0 < 10


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_local, tmp_path):
    splits = prepare_data(DataConfig(), tmp_path)
    job = _job(5, 2, max_failures=1, name="kill-test")
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fit_distributed(job, splits, str(tmp_path))), daemon=True)
    thread.start()
    ray = ray_local
    deadline = time.monotonic() + 300
    collector = None
    while time.monotonic() < deadline:
        try:
            collector = collector or ray.get_actor(collector_name("kill-test"))
            if ray.get(collector.latest_epoch.remote()) >= 1:
                break
        except ValueError:
            pass
        time.sleep(0.5)
    assert collector is not None, "training never reported"
    victim = ray.get(collector.get.remote())[-1][1]["pid"]  # world rank 1's process
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=360)
    assert not thread.is_alive() and out, "the run did not finish after the worker was killed"
    res = out[0]
    assert [h["epoch"] for h in res.history] == list(range(5))
    resumed = [h for h in res.history if h["restored"]]
    assert resumed, "no epoch ran after a restore from checkpoint"
    assert all(h["pid"] != victim for h in resumed)
    # the weight rule was applied once per epoch boundary: the restored store neither lost nor repeated one
    assert res.history[-1]["weights_updates"] == 4
    assert np.isfinite(res.weights).all() and res.weights.std() > 0


def test_weight_store_actor_survives_a_restart(ray_local, tmp_path):
    """The store actor is killed (Ray restarts it, max_restarts=-1) and reloads its snapshot: no weight is lost."""
    ray = ray_local
    from actors.weight_store import SampleWeightStore

    ids = np.arange(1000)
    store = (
        ray.remote(SampleWeightStore)
        .options(max_restarts=-1, max_task_retries=-1)
        .remote(ids, None, 0, str(tmp_path / "w.npz"))
    )
    ray.get(store.begin_epoch.remote(0))
    ray.get(store.record.remote(ids[:500], np.linspace(0, 1, 500)))
    ray.get(store.begin_epoch.remote(1))  # applies the rule and snapshots
    before = ray.get(store.get_weights.remote())
    assert before.std() > 0
    ray.kill(store, no_restart=False)
    deadline = time.monotonic() + 60
    while True:
        try:
            after = ray.get(store.get_weights.remote(), timeout=10)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the store actor did not come back"
            time.sleep(0.5)
    np.testing.assert_array_equal(after, before)
    assert ray.get(store.stats.remote())["epoch"] == 1


def test_more_workers_than_cluster_fails_fast(ray_local, tmp_path):
    splits = prepare_data(DataConfig(), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="the cluster has 8 CPUs but 16 workers"):
        fit_distributed(_job(1, 16), splits, str(tmp_path))
    assert time.monotonic() - t0 < 10


def test_bad_dist_config():
    with pytest.raises(ValueError, match="num_workers must be a positive int"):
        DistConfig(num_workers=0)
    with pytest.raises(ValueError, match="placement must be"):
        DistConfig(placement="RANDOM")
    with pytest.raises(ValueError, match="checkpointing must be"):
        DistConfig(checkpointing="most")
    with pytest.raises(ValueError, match="unbiased needs weighted"):
        StreamConfig(weighted=False, unbiased=True)


def test_train_metrics_reach_the_metrics_endpoint(ray_local):
    """Gauges set from a Ray worker appear on the node's Prometheus export as ray_tandem_train_*."""
    import urllib.request

    ray = ray_local

    @ray.remote(num_cpus=0)
    class Reporter:
        """Holds the gauges, as a Train worker does, until the export has been seen (Ray exports a process's
        metrics every few seconds: waiting for the line, not a fixed sleep)."""

        def report(self) -> None:
            from actors.train_metrics import TrainMetrics

            self.metrics = TrainMetrics("metrics-test")
            self.metrics.update({"loss": 0.125, "test_accuracy": 0.875, "restored": True})

    reporter = Reporter.remote()
    ray.get(reporter.report.remote())
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 60
    text = ""
    try:
        while time.monotonic() < deadline:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            if 'run="metrics-test"' in text:
                break
            time.sleep(1)
    finally:
        ray.kill(reporter)
    mine = 'run="metrics-test"'
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_tandem_train_test_accuracy{") and mine in ln]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) == 0.875, lines


def test_gpu_requests_and_backend():
    """What Ray Train is asked for: GPUs per worker and NCCL with GPUs, gloo and no GPU request on CPU."""
    from actors.trainer import scaling_config, torch_config

    gpu = DistConfig(num_workers=4, gpus_per_worker=1, cpus_per_worker=2)
    sc = scaling_config(gpu)
    assert sc.use_gpu and sc.num_workers == 4 and sc.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert torch_config(gpu).backend == "nccl"
    cpu = DistConfig(num_workers=2)
    sc = scaling_config(cpu)
    assert not sc.use_gpu and sc.resources_per_worker == {"CPU": 1.0}
    assert torch_config(cpu).backend == "gloo"
    with pytest.raises(ValueError, match="gpus_per_worker must be a number >= 0"):
        DistConfig(gpus_per_worker=-1)


def test_ray_transport_needs_gpus():
    from actors.trainer import check_resources

    with pytest.raises(ValueError, match="inter_transport 'ray'"):
        check_resources(DistConfig(comm=CommConfig(transport="ray")))
    with pytest.raises(ValueError, match="transport must be one of"):
        CommConfig(transport="mpi")


def test_plan_nodes_pins_equal_workers_per_node():
    from actors.trainer import plan_nodes

    nodes = [
        {"NodeID": "c", "Resources": {"CPU": 2.0}},
        {"NodeID": "b", "Resources": {"CPU": 1.0}},  # too small for 2 workers
        {"NodeID": "a", "Resources": {"CPU": 4.0, "GPU": 2.0}},
    ]
    labels = plan_nodes(DistConfig(num_workers=4, workers_per_node=2), nodes)
    assert labels == [{"ray.io/node-id": n} for n in ("a", "a", "c", "c")]
    with pytest.raises(ValueError, match="needs 2 nodes with 2 CPU, 2 GPU each; the cluster has 1 such node"):
        plan_nodes(DistConfig(num_workers=4, workers_per_node=2, gpus_per_worker=1), nodes)
    with pytest.raises(ValueError, match="workers_per_node must be a positive int dividing num_workers"):
        DistConfig(num_workers=4, workers_per_node=3)


def test_infobatch_through_ray_train(ray_local, tmp_path):
    """Both workers plan the same pruned epoch from pooled scores: the middle epoch skips rows (the same count
    reported by each, an all-reduced sum), the first (nothing scored) and the last (annealing) skip none. As the
    paper runs it (9b6a3d2), the pruned epoch trains its kept rows only, so it makes fewer steps than the full
    ones, the same number on every worker (data-parallel workers step together)."""
    from actors.infobatch import InfoBatchConfig

    splits = prepare_data(DataConfig(), tmp_path)
    job = _job(3, 2, name="infobatch")
    job.train.infobatch = InfoBatchConfig(prune_ratio=0.5, anneal=0.34)  # epoch 2 of 3 (progress 0.67) is full
    res = fit_distributed(job, splits, str(tmp_path))
    skipped = [h["infobatch_skipped"] for h in res.history]
    assert skipped[0] == 0 and skipped[2] == 0 and skipped[1] > 0, skipped
    assert len({m["infobatch_skipped"] for m in res.all_reports[1]}) == 1
    full = splits.train.num_rows // 32  # batch_size is the global batch: as many steps as local training
    steps = [sorted({m["steps"] for m in rnd}) for rnd in res.all_reports]
    assert steps[0] == steps[2] == [full] and len(steps[1]) == 1 and 0 < steps[1][0] < full, (steps, full)


def test_batch_size_is_the_global_batch():
    """N workers split `batch_size`, so a distributed epoch makes local training's number of steps (a per-worker
    batch cost MNIST-1D 1.6-4.3 points against --local, bench/dist_accuracy.py)."""
    job = _job(1, 4)
    assert job.worker_batch == 8
    with pytest.raises(ValueError, match="global batch, split over the workers: it must be >= the 4 workers, got 2"):
        TrainJob(train=TrainConfig(batch_size=2), dist=DistConfig(num_workers=4))
