"""The Serve app: request parsing (no Ray), then one app on the shared Ray: /predict and OIP against the model run
locally, every bad input's 4xx, a hot update under load, admission control's 503s, metrics on the node endpoint."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.request
from dataclasses import asdict

import httpx
import numpy as np
import pytest
import torch
from _serve import GOOD, eager_form, free_port, haproxy_cluster, start_load

from serve_app.app import build_app
from serve_app.config import AppConfig, ModelUserConfig
from serve_app.deploy import DeployConfig, hot_update, serve_artifact, update_user_configs
from serve_app.loadgen import LoadConfig
from serve_app.protocol import BadRequest, instances_to_array, parse_infer, parse_json
from serve_app.simulator import Constant

SHAPE = (1, 8, 8)

# ----------------------------------------------------------------------------------------------- no Ray


def test_app_config_checks():
    with pytest.raises(ValueError, match="unknown"):
        AppConfig.from_dict({"artifact": "/a", "replicas": 2})
    with pytest.raises(ValueError, match="controller must be one of"):
        AppConfig(artifact="/a", controller="pid")
    with pytest.raises(ValueError, match="batching config keys"):
        AppConfig(artifact="/a", batching={"slo": 0.1})
    with pytest.raises(ValueError, match="max_wait_s"):
        ModelUserConfig(artifact="/a", batching={"slo_s": 0.01, "max_wait_s": 0.02})
    cfg = AppConfig.from_dict({"artifact": "/a", "num_replicas": "2", "batching": '{"max_batch_size": 32}'})
    assert cfg.num_replicas == 2 and cfg.max_ongoing_requests() == 32 + 256  # strings as `serve run` passes them
    with pytest.raises(ValueError, match="max_queued_requests"):
        AppConfig(artifact="/a", max_queued_requests=0)
    with pytest.raises(ValueError, match="canary"):
        AppConfig(artifact="/a", canary={"weight": 0.5})
    with pytest.raises(ValueError, match="weight"):
        AppConfig(artifact="/a", canary={"artifact": "/b", "weight": 2})


def test_proxy_side_bound_reaches_the_deployment(monkeypatch):
    # Serve's own caller-side bound: the proxy answers 503 + Retry-After itself once this many wait for a replica.
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    bounded = {"artifact": "/a", "max_queued_requests": "16"}
    d = build_app(bounded)._bound_deployment._deployment_config
    assert d.max_queued_requests == 16 and d.backpressure_config.retry_after_s == 1
    assert build_app({"artifact": "/a"})._bound_deployment._deployment_config.max_queued_requests == -1
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # no proxy queue to bound: not applied
    assert build_app(bounded)._bound_deployment._deployment_config.max_queued_requests == -1


def test_serve_config_yaml_is_valid():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    import serve_app

    text = (Path(serve_app.__file__).parent / "serve_config.yaml").read_text()
    schema = ServeDeploySchema(**yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app" and schema.http_options.host == "127.0.0.1"
    AppConfig.from_dict(app.args)


@pytest.mark.parametrize(
    "instances, shape",
    [([[[0.5] * 8] * 8], (1, 1, 8, 8)), ([[0.5] * 64] * 3, (3, 1, 8, 8)), ([[[[1] * 8] * 8]] * 2, (2, 1, 8, 8))],
)
def test_instances_accepted_layouts(instances, shape):
    x = instances_to_array(instances, SHAPE, 64)
    assert x.shape == shape and x.dtype == np.float32


BAD_INSTANCES = [
    ({"instances": "abc"}, "non-empty list"),
    ({"instances": []}, "non-empty list"),
    ({"instances": [[0.5] * 63]}, "shape"),
    ({"instances": [[0.5] * 64, [0.5] * 63]}, "rectangular"),
    ({"instances": [["0.5"] * 64]}, "numbers"),
    ({"instances": [[True] * 64]}, "numbers"),
    ({"instances": [[{"a": 1}] * 64]}, "numbers"),
    ({"instances": [[1e39] * 64]}, "finite"),
    ({"instances": [[0.5] * 64] * 65}, "at most 64"),
]


@pytest.mark.parametrize("body, message", BAD_INSTANCES)
def test_bad_instances_raise_422(body, message):
    with pytest.raises(BadRequest, match=message) as e:
        instances_to_array(body["instances"], SHAPE, 64)
    assert e.value.status == 422


def test_parse_json_limits():
    with pytest.raises(BadRequest, match="at most 10 bytes") as e:
        parse_json(b"{" + b" " * 20 + b"}", 10)
    assert e.value.status == 413
    with pytest.raises(BadRequest, match="JSON object"):
        parse_json(b"[1]", 100)
    assert parse_json(b'{"a": NaN}', 100)["a"] != 0  # NaN parses; the array check refuses it later


def oip_to_array(req: dict, shape=SHAPE, max_instances: int = 64) -> np.ndarray:
    return parse_infer(json.dumps(req).encode(), None, shape, max_instances, 1 << 20).x


def test_oip_layouts():
    req = {"inputs": [{"name": "input", "shape": [2, 64], "datatype": "UINT8", "data": [[3] * 64, [4] * 64]}]}
    x = oip_to_array(req)
    assert x.shape == (2, 1, 8, 8) and x[1, 0, 7, 7] == 4
    with pytest.raises(BadRequest, match="int numbers"):  # an integer datatype with float data
        oip_to_array({"inputs": [{**req["inputs"][0], "data": [0.5] * 128}]})


# ------------------------------------------------------------------------------------------ the live app


def trained_artifact(path, workdir) -> tuple[str, torch.Tensor]:
    """A `tiny` CNN trained briefly on the digits, saved as an fp32 artifact; returns (path, test images)."""
    from actors.dataset import DataConfig, load_tensors, prepare_data
    from actors.train_local import TrainConfig, fit_local
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    splits = prepare_data(DataConfig(), workdir)
    _, x, y = load_tensors(splits.train)
    _, xt, yt = load_tensors(splits.test)
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: two OpenMP threads made this 3-4x slower under load
    try:
        fit = fit_local(model, (x, y), (xt, yt), TrainConfig(epochs=1, batch_size=32))
    finally:
        torch.set_num_threads(threads)
    save_artifact(model, path, input_shape=SHAPE, accuracy={"test_accuracy": fit.test_accuracy})
    return str(path), xt


@pytest.fixture(scope="module")
def served(_ray_clusters, tmp_path_factory):
    """The app on the shared one-node Ray, deployed declaratively on a free loopback port; two artifacts."""
    from ray import serve

    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    haproxy_cluster(_ray_clusters)
    root = tmp_path_factory.mktemp("serve")
    art1, test_images = trained_artifact(root / "v1", root / "work")
    torch.manual_seed(1)
    art2 = str(root / "v2")
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), art2, input_shape=SHAPE)
    cfg = DeployConfig(port=free_port(), app={"version": "v1", "max_body_bytes": 65536, "max_instances": 32})
    url = serve_artifact(art1, cfg)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield {"url": url, "cfg": cfg, "art1": art1, "art2": art2, "images": test_images, "client": client}
    serve.shutdown()


def local_predictions(artifact: str, x: torch.Tensor) -> torch.Tensor:
    from models.artifact import load_artifact

    model, _ = load_artifact(artifact)
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)


def test_predict_and_oip_match_the_local_model(ray_local, served):
    c, x = served["client"], served["images"][:48]
    want = local_predictions(served["art1"], x)
    got_classes, got_probs = [], []
    for chunk in x.split(16):
        r = c.post("/predict", json={"instances": chunk.tolist()})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == "v1" and body["model"] == "tandem"
        got_classes += body["classes"]
        got_probs += body["probabilities"]
    assert got_classes == want.argmax(1).tolist() and len(set(got_classes)) > 1
    torch.testing.assert_close(torch.tensor(got_probs), want, rtol=0, atol=1e-5)

    req = {"id": "r1", "inputs": [{"name": "input", "shape": [16, 64], "datatype": "FP32",
                                   "data": x[:16].flatten().tolist()}]}  # fmt: skip
    r = c.post("/v2/models/tandem/infer", json=req)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1" and r.json()["model_version"] == "v1"
    assert out["class"]["data"] == want[:16].argmax(1).tolist() and out["class"]["shape"] == [16]
    assert out["probabilities"]["shape"] == [16, 10] and out["probabilities"]["datatype"] == "FP32"
    torch.testing.assert_close(torch.tensor(out["probabilities"]["data"]).view(16, 10), want[:16], rtol=0, atol=1e-5)


def test_oip_health_and_metadata(ray_local, served):
    c = served["client"]
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get("/v2/models/tandem/ready").json()["ready"] is True
    assert c.get("/v2").json()["name"] == "tandem"
    meta = c.get("/v2/models/tandem").json()
    assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8] and meta["versions"] == ["v1"]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "class"}
    r = c.get("/v2/models/resnet")
    assert r.status_code == 404 and "model must be 'tandem'" in r.json()["error"]


OIP = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
BAD_REQUESTS = [
    ("/predict", b'{"instances": [[0.5, 0.5]', 400, "must be JSON"),
    ("/predict", b"\xff\xfe", 400, "must be JSON"),
    ("/predict", b"[1, 2]", 400, "JSON object"),
    ("/predict", json.dumps({"inputs": []}).encode(), 422, "non-empty list"),
    ("/predict", json.dumps({"instances": [[0.5] * 10]}).encode(), 422, "shape"),
    ("/predict", json.dumps({"instances": [["a"] * 64]}).encode(), 422, "numbers"),
    ("/predict", b'{"instances": [[NaN, 0.5]]}', 422, "finite"),
    ("/predict", b'{"instances": [[Infinity]]}', 422, "finite"),
    ("/predict", json.dumps({"instances": [[0.5] * 64] * 33}).encode(), 422, "at most 32"),
    ("/predict", json.dumps({"instances": [[0.5] * 64] * 2, "pad": "x" * 70000}).encode(), 413, "at most 65536"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [{**OIP, "shape": [1, 3, 8, 8]}]}).encode(), 422, "shape"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [{**OIP, "datatype": "BYTES"}]}).encode(), 422, "datatype"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [{**OIP, "data": [0.5] * 63}]}).encode(), 422, "prod(shape)"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [{**OIP, "data": [None] * 64}]}).encode(), 422, "numbers"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [OIP, OIP]}).encode(), 400, "exactly one"),
    ("/v2/models/tandem/infer", json.dumps({"inputs": [{"name": "input"}]}).encode(), 400, "missing"),
    ("/v2/models/other/infer", json.dumps({"inputs": [OIP]}).encode(), 404, "model must be"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS, ids=[f"{s}-{m}" for _, _, s, m in BAD_REQUESTS])
def test_bad_input_gets_4xx_and_the_replica_keeps_serving(ray_local, served, path, body, status, message):
    c = served["client"]
    r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert c.post("/predict", json=GOOD).status_code == 200


def test_pickle_is_never_loaded(ray_local, served):
    import pickle

    evil = pickle.dumps({"instances": [[0.5] * 64]})
    r = served["client"].post("/predict", content=evil, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]  # a JSON route takes JSON only
    r = served["client"].post("/predict", content=evil, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "must be JSON" in r.json()["error"]


def test_hot_update_under_load_loses_nothing(ray_local, served, generator):
    c, cfg = served["client"], served["cfg"]
    replica = c.get("/v2/models/tandem").json()["parameters"]["replica"]
    load = LoadConfig(pattern=Constant(40.0), duration_s=6.0, timeout_s=10.0)
    result = start_load(generator, served["url"], load, SHAPE)  # in its own niced process (conftest.generator)
    time.sleep(0.3 + 1.5)
    hot_update(served["art1"], cfg, served["art2"], "v2")
    deadline, version = time.monotonic() + 20, "v1"
    while version != "v2" and time.monotonic() < deadline:
        version = c.post("/predict", json=GOOD).json()["version"]
        time.sleep(0.05)
    report = result.result(timeout=60)
    assert version == "v2"
    assert report.sent > 100 and report.ok == report.sent, report.status_counts  # zero failed, no 503s
    meta = c.get("/v2/models/tandem").json()
    assert meta["versions"] == ["v2"] and meta["parameters"]["replica"] == replica  # reconfigured, not restarted


def test_admission_control_answers_503_with_retry_after(ray_local, served):
    """A tight SLO and a short queue: with a backlog, requests are refused at once with Retry-After, and the
    request that finds the queue empty is served. The SLO stays well above the event loop's lag: at an SLO of
    0.2 ms a loaded CI machine's loop lag alone exceeded half of it, and the replica refused every request, as its
    liveness rule says it should (ModelServer.infer)."""
    c, cfg = served["client"], served["cfg"]
    strict = {"slo_s": 0.02, "max_wait_s": 0.0, "initial_wait_s": 0.0, "max_queue_len": 8}
    user = asdict(cfg.app_config(served["art1"]).model_user_config())
    update_user_configs(served["art1"], cfg, {"Model": {**user, "artifact": served["art2"], "version": "v2",
                                                        "batching": strict, "update_grace_s": 0}})  # fmt: skip
    deadline = time.monotonic() + 20
    while c.get("/v2/models/tandem").json()["parameters"]["slo_s"] != strict["slo_s"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=served["url"], timeout=30) as ac:
            return await asyncio.gather(*(ac.post("/predict", json=GOOD) for _ in range(120)))

    rs = asyncio.run(burst())
    shed = [r for r in rs if r.status_code == 503]
    assert {r.status_code for r in rs} <= {200, 503} and shed and len(shed) < len(rs)
    assert all(int(r.headers["retry-after"]) >= 1 and "overloaded" in r.json()["error"] for r in shed)
    hot_update(served["art1"], cfg, served["art2"], "v2")  # default batching again
    assert c.post("/predict", json=GOOD).status_code == 200


def test_cancelled_requests_leave_the_queue(ray_local, served, outside_serve):
    """Ray drops a request cancelled while it waits for a batch; the replica's queue count must drop it too,
    or admission control would go on refusing on a phantom backlog."""
    from serve_app.replica import ModelServer

    async def scenario() -> int:
        srv = ModelServer(AppConfig(artifact=served["art1"]).to_dict())
        await srv.reconfigure(
            {"artifact": served["art1"], "controller": "static", "batching": {"initial_wait_s": 0.05}}
        )
        x = np.zeros((1, *SHAPE), np.float32)
        tasks = [asyncio.create_task(srv.infer(x)) for _ in range(3)]
        await asyncio.sleep(0.005)  # all three queued, the batch still waiting to fill
        assert srv.rec.queue_len == 3
        tasks[0].cancel()
        tasks[1].cancel()
        probs, _ = await tasks[2]
        assert probs.shape == (1, 10)
        return srv.rec.queue_len

    assert asyncio.run(scenario()) == 0
    assert ModelServer._batched.set_max_batch_size.__self__._queue is not None  # a wait: through Serve's queue


def test_with_no_wait_requests_skip_serves_batch_queue_and_a_cancelled_one_leaves_the_queue(
    ray_local, served, outside_serve
):
    """With no batch wait (SLOModel's setting), a request goes straight to the model queue: Serve's batch queue
    would hand it on unchanged, at a cost. One cancelled while it waits there for the forward thread is skipped and
    leaves the queue count."""
    from serve_app.replica import ModelServer

    async def scenario() -> int:
        srv = ModelServer(AppConfig(artifact=served["art1"]).to_dict())
        await srv.reconfigure({"artifact": served["art1"], "controller": "static", "batching": {"initial_wait_s": 0}})
        x = np.zeros((1, *SHAPE), np.float32)
        gate = threading.Event()
        busy = asyncio.get_running_loop().run_in_executor(srv._executor, gate.wait)  # the forward thread is busy
        first = asyncio.create_task(srv.infer(x))
        await asyncio.sleep(0.02)  # taken as a batch; its forward waits for the thread
        behind = [asyncio.create_task(srv.infer(x)) for _ in range(2)]
        await asyncio.sleep(0.02)
        assert len(srv._model_queue) == 2 and srv.rec.queue_len == 2
        behind[0].cancel()
        await asyncio.sleep(0.01)
        assert srv.rec.queue_len == 1
        gate.set()
        await busy
        (p1, _), (p2, _) = await first, await behind[1]
        assert p1.shape == p2.shape == (1, 10) and behind[0].cancelled()
        return srv.rec.queue_len

    assert asyncio.run(scenario()) == 0
    assert ModelServer._batched.set_max_batch_size.__self__._queue is None  # never through Serve's batch queue


def test_admission_refuses_nothing_in_the_grace_after_an_update(served, outside_serve):
    """The backlog that built up while Serve reconfigured the replica (it routes nothing to a replica being
    updated) is admitted for `update_grace_s`; after that the same burst is shed."""
    from serve_app.replica import ModelServer, Overloaded

    strict = {"slo_s": 0.0002, "max_wait_s": 0.0, "initial_wait_s": 0.0, "max_queue_len": 4}

    async def scenario() -> list[int]:
        # One event loop for both bursts (see outside_serve).
        srv = ModelServer(AppConfig(artifact=served["art1"]).to_dict())
        x = np.zeros((1, *SHAPE), np.float32)
        shed = []
        for grace_s in (30.0, 0.0):
            await srv.reconfigure({"artifact": served["art1"], "batching": strict, "update_grace_s": grace_s})
            rs = await asyncio.gather(*(srv.infer(x) for _ in range(40)), return_exceptions=True)
            assert all(isinstance(r, (tuple, Overloaded)) for r in rs), rs
            shed.append(sum(isinstance(r, Overloaded) for r in rs))
        return shed

    in_grace, after = asyncio.run(scenario())
    assert in_grace == 0 and after > 0
    with pytest.raises(ValueError, match="update_grace_s"):
        ModelUserConfig.from_dict({"artifact": served["art1"], "update_grace_s": -1})


@pytest.mark.parametrize("form", ["CompiledInference", "OneDNNInference", "ScriptedInference"])
def test_a_hot_update_of_the_same_shape_keeps_the_fp32_form(ray_local, outside_serve, tmp_path, monkeypatch, form):
    """A hot update to a model of the same architecture and shapes keeps the fp32 form chosen at the first load
    (no compile and timing of both forms beside the serving loop: the update-time stall of issue 16) and runs
    with its own weights; a model of other shapes gets the form chosen again."""
    import models.fuse
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model
    from serve_app.replica import ModelServer

    if form == "OneDNNInference" and not models.fuse.onednn_available():
        pytest.skip("this PyTorch has no oneDNN fused conv ops")
    chose = []

    def fastest(model, example, batch_sizes):  # the choice, without timing the others: `form` for the test
        chose.append(tuple(example.shape))
        if form == "OneDNNInference":
            return models.fuse.OneDNNInference(model, example, batch_sizes), {}
        if form == "ScriptedInference":
            return models.fuse.ScriptedInference(models.fuse.inference_module(model), example), {}
        return models.fuse.CompiledInference(models.fuse.inference_module(model)), {}

    monkeypatch.setattr(models.fuse, "fastest_inference_module", fastest)
    monkeypatch.setattr(models.fuse.CompiledInference, "forward", lambda self, x: self.folded(x))
    arts = {}
    for name, seed, classes in (("a", 0, 10), ("b", 1, 10), ("c", 2, 5)):
        torch.manual_seed(seed)
        model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=classes))
        arts[name] = str(tmp_path / name)
        save_artifact(model, arts[name], input_shape=SHAPE)
    x = np.random.default_rng(0).random((3, *SHAPE), dtype=np.float32)

    async def scenario() -> list[tuple[int, str, np.ndarray]]:
        srv = ModelServer(AppConfig(artifact=arts["a"]).to_dict())
        seen = []
        for name in ("a", "b", "c"):
            await srv.reconfigure({"artifact": arts[name], "version": name, "controller": "static"})
            probs, version = await srv.infer(x)
            seen.append((len(chose), version, probs, type(srv.model).__name__))
        return seen

    seen = asyncio.run(scenario())
    assert [(n, v, f) for n, v, _, f in seen] == [(1, "a", form), (1, "b", form), (2, "c", form)]
    for (_, _, probs, _), name in zip(seen, "abc", strict=True):  # each model's own weights
        np.testing.assert_allclose(probs, local_predictions(arts[name], torch.from_numpy(x)).numpy(), atol=1e-5)


def test_the_replica_runs_the_fp32_form_the_sweep_recorded(ray_local, outside_serve, tmp_path, monkeypatch):
    """An artifact whose manifest records the fp32 form the sweep timed on a machine like this one is served in
    that form, its oneDNN plans as recorded, with nothing timed (serve_app.form_choice.from_manifest); a record
    from other threads (another machine's, in effect) is not trusted: the replica times the forms itself."""
    import models.fuse
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model
    from serve_app.replica import ModelServer

    if not models.fuse.onednn_available():
        pytest.skip("this PyTorch has no oneDNN fused conv ops")
    timed = []

    def fastest(model, example, batch_sizes):  # timing the forms: counted, and the eager form for the test
        timed.append(tuple(batch_sizes))
        return models.fuse.inference_module(model), {}

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("tiny", in_channels=1)).eval()
    example = torch.rand(1, *SHAPE)
    form = models.fuse.OneDNNInference(model, example, (1, 4))
    monkeypatch.setattr(models.fuse, "fastest_inference_module", fastest)
    arts = {}
    for name, threads in (("here", 1), ("elsewhere", 2)):
        arts[name] = str(tmp_path / name)
        record = models.fuse.inference_form_record(form, (1, 4), threads=threads)
        save_artifact(model, arts[name], input_shape=SHAPE, inference_form=record)
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)

    async def scenario() -> list:
        seen = []
        for name in ("here", "elsewhere"):  # one event loop: Serve's batch queue is bound to the first
            srv = ModelServer(AppConfig(artifact=arts[name], torch_threads=1).to_dict())
            await srv.reconfigure({"artifact": arts[name], "version": name, "controller": "static"})
            probs, _ = await srv.infer(x)
            seen.append((len(timed), srv.model, probs))
        return seen

    (n_here, served, probs), (n_elsewhere, other, _) = asyncio.run(scenario())
    assert n_here == 0 and isinstance(served, models.fuse.OneDNNInference)
    assert served.batch_sizes == [1, 4] and served.choices == form.choices
    np.testing.assert_allclose(probs, local_predictions(arts["here"], torch.from_numpy(x)).numpy(), atol=1e-5)
    assert n_elsewhere == 1 and not isinstance(other, models.fuse.OneDNNInference)


def test_a_loaded_model_is_frozen_out_of_the_garbage_collectors_full_collections(
    ray_local, outside_serve, tmp_path, monkeypatch
):
    """After a load the model's objects sit in gc's permanent generation, which full collections never walk (a
    compiled model leaves ~0.6 M tracked objects, a 0.3-0.8 s pause of the serving loop per full collection)."""
    import gc

    import models.fuse
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model
    from serve_app.replica import ModelServer

    monkeypatch.setattr(models.fuse, "fastest_inference_module", eager_form)
    arts = {}
    for name in ("a", "b"):
        arts[name] = str(tmp_path / name)
        save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1)), arts[name], input_shape=SHAPE)

    def collected(obj) -> bool:  # in a generation a collection walks
        return any(o is obj for g in range(3) for o in gc.get_objects(generation=g))

    async def scenario() -> list[bool]:
        srv = ModelServer(AppConfig(artifact=arts["a"]).to_dict())
        seen = []
        for name in ("a", "b"):  # the first load, then a hot update
            await srv.reconfigure({"artifact": arts[name], "version": name, "controller": "static"})
            weight = next(srv.model.parameters())
            seen += [gc.is_tracked(obj) and not collected(obj) for obj in (srv.model, weight)]
        return seen

    gc.unfreeze()
    try:
        assert asyncio.run(scenario()) == [True, True, True, True]
    finally:
        gc.unfreeze()


def test_a_hot_update_returns_at_once_and_the_old_model_serves_until_the_swap(
    ray_local, outside_serve, tmp_path, monkeypatch
):
    """In a Serve replica (background_updates) `reconfigure` of a hot update returns at once and the current model
    serves while the new one loads (here held 2 s by the test hook); then it is swapped in. A load that fails
    leaves the current model serving; of two updates in a row only the last lands."""
    import models.fuse
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model
    from serve_app.replica import ModelServer
    from serve_app.served import LOAD_DELAY_KEY

    # the served form as is (the form choice is test_a_hot_update_of_the_same_shape_keeps_the_fp32_form's)
    monkeypatch.setattr(models.fuse, "fastest_inference_module", eager_form)
    arts = {}
    for seed, (name, classes) in enumerate((("a", 10), ("b", 10), ("c", 5))):  # "c": other shapes, a new form
        torch.manual_seed(seed)
        arts[name] = str(tmp_path / name)
        model = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=classes))
        save_artifact(model, arts[name], input_shape=SHAPE)
    x = np.zeros((1, *SHAPE), np.float32)

    def user(name: str, **extra) -> dict:
        return {"artifact": arts.get(name, str(tmp_path / name)), "version": name, "controller": "static", **extra}

    async def scenario() -> None:
        srv = ModelServer(AppConfig(artifact=arts["a"]).to_dict(), background_updates=True)
        await srv.reconfigure(user("a"))  # start-up: loaded before it returns
        assert srv.version == "a"
        t0 = time.monotonic()
        await srv.reconfigure(user("b", **{LOAD_DELAY_KEY: 2.0}))
        returned_s = time.monotonic() - t0
        served_meanwhile = [(await srv.infer(x))[1] for _ in range(3)]
        await srv.settled()
        assert returned_s < 1.0 and served_meanwhile == ["a"] * 3  # the load sleeps 2 s before it starts
        assert (await srv.infer(x))[1] == "b" and srv.user.artifact == arts["b"]

        await srv.reconfigure(user("missing"))  # fails in the background: "b" serves on
        await srv.settled()
        assert (await srv.infer(x))[1] == "b" and srv.user.artifact == arts["b"]

        await srv.reconfigure(user("a", **{LOAD_DELAY_KEY: 0.5}))
        await asyncio.sleep(0.1)  # "a" is loading
        await srv.reconfigure(user("c"))  # supersedes it: "a" is dropped when its load ends, then "c" loads
        await srv.settled()
        probs, version = await srv.infer(x)
        assert version == "c" and probs.shape == (1, 5) and srv.user.artifact == arts["c"]

    asyncio.run(scenario())


def test_fx_traces_in_another_thread_never_break_a_forward(ray_local, outside_serve):
    """torch.fx patches nn.Module.__call__ process-wide while it traces (a hot update's loader thread traces the
    oneDNN form while the old model serves): the replica's forward passes and models.fuse's traces take one lock
    (models.fuse.FX_TRACE_LOCK), so no forward goes through the tracer (without it: NameError "module is not
    installed as a submodule", a 500)."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import find_chains
    from serve_app.replica import ModelServer

    srv = ModelServer(AppConfig(artifact="/a").to_dict())
    srv.model, srv.version = build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)).eval(), "v"

    class Deep(torch.nn.Module):  # fx-traceable (not a plain Sequential, which find_chains reads without tracing)
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ReLU() for _ in range(300))

        def forward(self, x):
            for m in self.layers:
                x = m(x)
            return x

    # long enough to trace (~20 ms per trace, three per find_chains) that the GIL passes to the forwards
    # mid-trace: without the lock every forward failed (300 of 300)
    other = Deep()
    stop, traced, outs = threading.Event(), [], []

    def trace() -> None:
        while not stop.is_set():
            traced.append(find_chains(other))
            time.sleep(0.001)  # lets the forwards in between traces

    tracer = threading.Thread(target=trace)
    tracer.start()
    try:
        x = np.zeros((2, *SHAPE), np.float32)
        deadline = time.monotonic() + 60
        while (len(traced) < 5 or len(outs) < 100) and time.monotonic() < deadline:
            outs.append(srv._forward([x]))
    finally:
        stop.set()
        tracer.join()
    assert len(traced) >= 5 and len(outs) >= 100  # traces and forwards interleaved
    assert all(p.shape == (2, 10) and v == "v" for ((p, v),) in outs)


def test_the_load_delay_hook_is_checked_and_not_part_of_the_config():
    from serve_app.served import LOAD_DELAY_KEY, normalize, split_load_delay

    base = {"artifact": "/a", "version": "v"}
    assert split_load_delay({**base, LOAD_DELAY_KEY: 3}) == (base, 3.0)
    assert (
        normalize({**base, LOAD_DELAY_KEY: 3})
        == normalize(base)
        == json.loads(json.dumps(asdict(ModelUserConfig(**base))))
    )
    with pytest.raises(ValueError, match=f"{LOAD_DELAY_KEY} must be a number of seconds"):
        split_load_delay({**base, LOAD_DELAY_KEY: -1})


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_metrics_reach_the_node_endpoint(ray_local, served):
    port = ray_local.nodes()[0]["MetricsExportPort"]
    wanted = [
        r'ray_tandem_serve_requests_total\{[^}]*deployment="Model"[^}]*status="200"',
        r'ray_tandem_serve_errors_total\{[^}]*status="422"',
        r"ray_tandem_serve_batch_size_bucket\{",
        r'ray_tandem_serve_model_version\{[^}]*version="v2"[^}]*\} 1',
        r"ray_tandem_serve_max_batch_size\{",
        r"ray_tandem_serve_replica_rss_bytes\{",
    ]
    deadline, missing = time.monotonic() + 40, wanted
    while missing and time.monotonic() < deadline:  # Ray exports every ~5-10 s
        served["client"].post("/predict", json=GOOD)
        text = scrape(port)
        missing = [w for w in wanted if not re.search(w, text)]
        time.sleep(1)
    assert not missing


def test_node_mutex_lets_one_holder_in_at_a_time():
    """A deployment's replicas on a node load a hot update one after another (ModelServer._prepare_in_turn): the
    second holder of a name waits until the first leaves, another name does not wait, and a block that raised
    leaves the mutex free."""
    from serve_app.replica import node_mutex

    name = f"test/{time.monotonic_ns()}"
    entered: list[float] = []

    def second() -> None:
        with node_mutex(name, poll_s=0.01):
            entered.append(time.monotonic())

    with node_mutex(name):
        t = threading.Thread(target=second)
        t.start()
        with node_mutex(name + "/other", poll_s=0.01):
            pass  # no wait: another name
        time.sleep(0.3)
        assert entered == []  # still waiting
        left = time.monotonic()
    t.join(5)
    assert entered and entered[0] >= left
    with pytest.raises(RuntimeError), node_mutex(name):
        raise RuntimeError("load failed")
    t0 = time.monotonic()
    with node_mutex(name, poll_s=0.01):
        assert time.monotonic() - t0 < 0.5  # freed by the failed block
