"""Serving from run storage (issue 14): replicas fetch the artifact from a storage URI onto their own node, ask
for GPUs where the artifact runs on one, and `tandem serve --storage URI --run NAME` finds a run's artifact.
CPU only, no Serve cluster: the replica class runs in this process against a real S3-compatible server."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile

import numpy as np
import pytest
import torch
from _moto import moto_server, patched_env

from models import storage
from serve_app.config import GPU_SCHEMES, AppConfig, ModelUserConfig, default_num_gpus, one_machine_num_replicas
from serve_app.deploy import DeployConfig, app_schema

SHAPE = (1, 8, 8)


def _artifact(path, seed: int) -> str:
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(seed)
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), path, input_shape=SHAPE)
    return str(path)


def _fake_artifact(path, scheme: str) -> str:
    """Just the manifest field the GPU default reads."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"quantization": {"scheme": scheme}}))
    return str(path)


def _actor_options(schema) -> dict[str, dict]:
    return {
        d.name: d.ray_actor_options.model_dump(include={"num_cpus", "num_gpus"})
        for d in schema.applications[0].deployments
    }


@pytest.fixture
def cluster_gpus(monkeypatch):
    """Sets the GPUs the 'connected cluster' reports (ray.cluster_resources), without starting Ray. The runtime
    context is faked too (a one-node cluster on loopback): with the real one these tests passed only after another
    module had started Ray in the same session, and failed on their own."""
    import types

    import ray

    def set_gpus(n: float, labels: dict | None = None) -> None:
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, **({"GPU": n} if n else {})})
        node = {
            "Alive": True,
            "Labels": labels or {},
            "NodeManagerAddress": "127.0.0.1",
            "Resources": {"CPU": 4.0},
            "NodeID": "n1",
        }
        monkeypatch.setattr(ray, "nodes", lambda: [node])
        context = types.SimpleNamespace(gcs_address="127.0.0.1:6379", get_node_id=lambda: "n1")
        monkeypatch.setattr(ray, "get_runtime_context", lambda: context)

    return set_gpus


@pytest.mark.parametrize(
    ("gpus", "scheme", "want"), [(0, "fp8", 0.0), (2, "fp8", 1.0), (2, "none", 0.0), (2, "int8_ptq", 0.0)]
)
def test_replica_gpu_request_follows_cluster_and_artifact(tmp_path, cluster_gpus, gpus, scheme, want):
    cluster_gpus(gpus)
    art = _fake_artifact(tmp_path / "a", scheme)
    opts = _actor_options(app_schema(art, DeployConfig(app={"num_cpus": 0.5})))
    assert opts == {"Model": {"num_cpus": 0.5, "num_gpus": want}}
    assert default_num_gpus(gpus, scheme) == want and ("fp8" in GPU_SCHEMES)


def test_explicit_gpus_reach_model_and_canary(tmp_path, cluster_gpus):
    from serve_app.placement import SERVE_NODE_LABEL

    cluster_gpus(0)  # an explicit request is passed on as given, even where the cluster has none now
    cfg = DeployConfig(app={"num_gpus": 0.5, "canary": {"artifact": "s3://b/canary", "weight": 0.2}})
    opts = _actor_options(app_schema("s3://b/stable", cfg, {"Model": {"artifact": "s3://b/v2"}}))
    assert opts == {"Model": {"num_cpus": 1.0, "num_gpus": 0.5}, "Canary": {"num_cpus": 1.0, "num_gpus": 0.5}}
    # the config's options replace build_app's whole: the replicas' placement (serve_app/placement.py) stays
    cluster_gpus(0, labels=dict([SERVE_NODE_LABEL]))
    schema = app_schema("s3://b/stable", cfg)
    (model,) = [d for d in schema.applications[0].deployments if d.name == "Model"]
    assert model.ray_actor_options.label_selector == dict([SERVE_NODE_LABEL])


def test_one_replica_per_core_within_logical_cpus_and_memory():
    gib = 1 << 30
    assert one_machine_num_replicas(8, cores=6, memory_bytes=64 * gib) == 6
    assert one_machine_num_replicas(4, cores=6, memory_bytes=64 * gib) == 4  # the cluster's logical CPUs
    assert one_machine_num_replicas(8, cpus_per_replica=2, cores=6, memory_bytes=64 * gib) == 4
    assert one_machine_num_replicas(0, cpus_per_replica=0, cores=6, memory_bytes=64 * gib) == 6
    assert one_machine_num_replicas(8, cores=6, memory_bytes=3 * gib + 1) == 3  # REPLICA_MEMORY_BYTES each
    assert one_machine_num_replicas(8, deployments=2, cores=6, memory_bytes=64 * gib) == 3  # stable + canary
    assert one_machine_num_replicas(8, cores=1, memory_bytes=gib // 2) == 1  # never 0
    with pytest.raises(ValueError, match="deployments must be"):
        one_machine_num_replicas(8, deployments=0)


def test_replicas_per_core_only_where_asked_none_given_and_cpu(tmp_path, cluster_gpus, monkeypatch):
    """`tandem serve` on its own Ray and `tandem run` embedded ask for one replica per core (DeployConfig
    replicas_per_core): the count reaches build_app's args, counted against the serve node's logical CPUs; a
    count the user gave, a cluster tandem joined, a canary's share and GPU replicas are left as they are."""
    import os

    from serve_app.placement import SERVE_NODE_LABEL

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    cluster_gpus(0, labels=dict([SERVE_NODE_LABEL]))  # the serve node: 4 logical CPUs
    art = _fake_artifact(tmp_path / "a", "none")

    def replicas(cfg: DeployConfig) -> int:
        return app_schema(art, cfg).applications[0].args["num_replicas"]

    assert replicas(DeployConfig(replicas_per_core=True)) == 3
    assert replicas(DeployConfig()) == 1
    assert replicas(DeployConfig(replicas_per_core=True, app={"num_replicas": 1})) == 1
    assert replicas(DeployConfig(replicas_per_core=True, app={"num_cpus": 2})) == 2  # 4 logical CPUs / 2
    canary = {"canary": {"artifact": str(tmp_path / "a"), "weight": 0.2}}
    assert replicas(DeployConfig(replicas_per_core=True, app=canary)) == 1  # 3 cores over two deployments
    cluster_gpus(0)  # no labelled node: the node of this process
    assert replicas(DeployConfig(replicas_per_core=True)) == 3
    cluster_gpus(2, labels=dict([SERVE_NODE_LABEL]))
    gpu_art = _fake_artifact(tmp_path / "g", "fp8")
    assert app_schema(gpu_art, DeployConfig(replicas_per_core=True)).applications[0].args["num_replicas"] == 1
    with pytest.raises(ValueError, match="replicas_per_core must be"):
        DeployConfig(replicas_per_core=1)


@pytest.mark.parametrize("bad", [-1, "many", True])
def test_num_gpus_must_be_a_non_negative_number(bad):
    with pytest.raises(ValueError, match="num_gpus must be"):
        AppConfig(artifact="/a", num_gpus=bad)
    assert AppConfig(artifact="/a", num_gpus="1").num_gpus == 1.0  # `serve run ... num_gpus=1`


def test_artifact_uri_scheme_is_checked_up_front():
    with pytest.raises(ValueError, match="scheme must be one of"):
        ModelUserConfig(artifact="ftp://host/art")
    assert ModelUserConfig(artifact="gs://bucket/art").artifact == "gs://bucket/art"


def test_replica_loads_and_hot_updates_from_s3(tmp_path, monkeypatch):
    """The replica downloads each artifact from the bucket itself (the head's copy is deleted first), serves it,
    and a hot update to another s3:// URI swaps the model."""
    from ray.serve import batching

    from serve_app.replica import ModelServer

    # outside Serve (see test_app.outside_serve): no replica context, a fresh batch queue for this event loop
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda s: None)
    monkeypatch.setattr(ModelServer._batched.set_max_batch_size.__self__, "_queue", None)
    arts = {v: _artifact(tmp_path / v, seed) for v, seed in (("v1", 0), ("v2", 1))}
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)
    scratch = tmp_path / "tmp"  # where the replica's downloads go (models.storage.download_dir: tempfile.mkdtemp)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with moto_server() as env, patched_env(env):
        uris = {v: storage.upload_dir(p, f"s3://tandem-ci/runs/r/{v}") for v, p in arts.items()}
        want = {}
        for v, p in arts.items():
            from models.artifact import load_artifact

            model, _ = load_artifact(p)
            with torch.inference_mode():
                want[v] = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
            for f in (tmp_path / v).iterdir():
                f.unlink()  # nothing local left: the replica must read the bucket

        async def scenario() -> list[np.ndarray]:
            srv = ModelServer(AppConfig(artifact=uris["v1"]).to_dict())
            got = []
            for v in ("v1", "v2"):
                await srv.reconfigure({"artifact": uris[v], "version": v, "controller": "static"})
                assert srv.version == v
                assert not list(scratch.glob("tandem-dl-*"))  # the swap left no copy of either artifact
                probs, _ = await srv.infer(x)
                got.append(np.asarray(probs))
            return got

        got = asyncio.run(scenario())
    assert np.allclose(got[0], want["v1"], atol=1e-5) and np.allclose(got[1], want["v2"], atol=1e-5)
    assert not np.allclose(want["v1"], want["v2"], atol=1e-3)  # the update really changed the model


def _serve_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"artifact": None, "storage": None, "run_name": None, **kw})


def test_serve_finds_a_runs_artifact(tmp_path):
    from tandem.cli_serve import artifact_of

    store = tmp_path / "runs"
    trained = _fake_artifact(store / "r1" / "artifacts" / "trained", "none")
    assert artifact_of(_serve_args(storage=str(store), run_name="r1")) == trained
    chosen = _fake_artifact(store / "r1" / "tune" / "artifact", "int8_ptq")
    assert artifact_of(_serve_args(storage=str(store), run_name="r1")) == chosen  # the sweep's choice first
    assert artifact_of(_serve_args(artifact="s3://b/a")) == "s3://b/a"
    with pytest.raises(ValueError, match="run must exist"):
        artifact_of(_serve_args(storage=str(store), run_name="nope"))
    (store / "empty").mkdir()
    with pytest.raises(ValueError, match="run must hold an artifact"):
        artifact_of(_serve_args(storage=str(store), run_name="empty"))
    with pytest.raises(ValueError, match="either an artifact"):
        artifact_of(_serve_args(artifact="/a", storage=str(store), run_name="r1"))
    with pytest.raises(ValueError, match="needs an artifact"):
        artifact_of(_serve_args(run_name="r1"))


def test_serve_flags_reach_the_deploy_config(tmp_path):
    from tandem.cli import build_parser
    from tandem.cli_serve import artifact_of, deploy_config

    store = tmp_path / "runs"
    trained = _fake_artifact(store / "r" / "artifacts" / "trained", "none")
    args = build_parser().parse_args(["serve", "--storage", str(store), "--run", "r", "--gpus-per-replica", "0.5"])
    assert artifact_of(args) == trained and deploy_config(args).app["num_gpus"] == 0.5
    args = build_parser().parse_args(["serve", "s3://bucket/run/tune/artifact"])
    assert artifact_of(args) == "s3://bucket/run/tune/artifact" and "num_gpus" not in deploy_config(args).app
