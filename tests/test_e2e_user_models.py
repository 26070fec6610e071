"""A user's torchvision-style model through the whole job: `tandem run --smoke --model tests.models.tv_models:...`
on a 3-channel parquet written with plain pyarrow (no tandem metadata, so `--image-shape` is needed): trained on
Ray Train, exported, pruned and quantized in the sweep, the chosen artifact served and load-tested, and `/predict`
on some rows equal to the chosen artifact's prediction loaded here with the artifact loader.

Sized for CI (2 cores): 128 rows, 1 epoch (accuracy is not what is tested here: --max-acc-drop 100), one sweep
trial without fine-tuning, and the replica's batch cap at 2: each INT8 batch bucket (a power of two) is an inductor
compile of several seconds. Loading the artifact compiles buckets 1 and 32 (the probe: the 26 test rows, padded),
the warm-up adds 2 (a cap of 64 would add 2, 4, 8, 16, 64), and `/predict` sends 20 rows, which run padded in the
already compiled bucket 32.
MobileNetV2 takes a shorter path to training: one simulated node and one Ray Train worker (ResNet-18 runs the
distributed one, 2 workers on 2 simulated nodes); every step after training is the same for both."""

import json
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.artifact import load_artifact
from models.data import colour_images
from tandem import pipeline
from tandem.cli import main
from tandem.local_ray import free_port
from tune.space import SearchSpace
from tune.sweep import SweepConfig

SHAPE = (3, 16, 16)
SINGLES = 6
"""Single-image /predict requests sent one after another right after the deploy, before the 20-row one."""
FIRST_SLACK, FIRST_MARGIN_S = 5.0, 0.5
"""The first of them may take FIRST_SLACK times the median of the others plus FIRST_MARGIN_S (see the test)."""


def _user_parquet(path, n: int, seed: int) -> np.ndarray:
    """A user's file as the README describes it: sample_id, image as list<float32> (C*H*W), integer label."""
    x, y = colour_images(n, SHAPE, 4, seed=seed)
    images = pa.array([row.reshape(-1) for row in x], type=pa.list_(pa.float32()))
    pq.write_table(pa.table({"sample_id": np.arange(n, dtype=np.int64), "image": images, "label": y}), path)
    return x


@pytest.mark.timeout(900)
# torchvision's layer structure at a fraction of the width (--model-args), so each run fits minutes on 2 cores
@pytest.mark.parametrize(
    "fn, args, cluster",
    [("resnet18", {"width": 16}, []), ("mobilenet_v2", {"width_mult": 0.5}, ["--nodes", "1", "--workers", "1"])],
)
def test_user_model_run_through_serving(fn, args, cluster, tmp_path, _ray_clusters, monkeypatch, record_property):
    _ray_clusters.shutdown()  # the job starts its own embedded cluster
    x = _user_parquet(tmp_path / "d.parquet", 128, seed=5)
    rows = x[:20]  # padded to the INT8 bucket 32, compiled when the replica loaded the artifact (docstring)
    served: dict = {}
    singles: list[float] = []  # seconds per single-image request, in order
    loadtest = pipeline.loadtest

    def post(url: str, x: np.ndarray) -> dict:
        body = json.dumps({"instances": x.tolist()}).encode()
        req = urllib.request.Request(f"{url}/predict", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def predict_then_loadtest(url, *args, **kwargs):  # the app lives only while the job runs: ask it here
        for i in range(SINGLES):  # single images first, one at a time: the first is the replica's first request
            t0 = time.perf_counter()
            post(url, rows[i : i + 1])
            singles.append(time.perf_counter() - t0)
        served.update(post(url, rows))
        return loadtest(url, *args, **kwargs)

    monkeypatch.setattr(pipeline, "loadtest", predict_then_loadtest)
    from dataclasses import replace

    from serve_app import deploy

    serve_artifact = deploy.serve_artifact

    def small_cap(path, cfg):  # fewer INT8 buckets to compile in the replica's warm-up (module docstring)
        batching = {"max_batch_size": 2, "initial_batch_size": 2}
        return serve_artifact(path, replace(cfg, app={**cfg.app, "batching": batching}))

    monkeypatch.setattr(deploy, "serve_artifact", small_cap)
    smoke = SweepConfig.smoke

    def pruned_int8(*args, **kwargs):  # the hard case is what gets served: a pruned user model, compiled INT8
        space = SearchSpace(prune_ratio=(0.2, 0.3), quant=("int8_ptq",), finetune_epochs=(0, 0), calib_size=(32,))
        # pipeline.sweep's smoke path does not pass --max-acc-drop on (default 1 point): a 2-epoch model may lose more
        return smoke(*args, **{**kwargs, "space": space, "max_acc_drop_pts": 100.0})

    monkeypatch.setattr(SweepConfig, "smoke", pruned_int8)
    store = tmp_path / "runs"
    rc = main(["run", "--smoke", "--model", f"tests.models.tv_models:{fn}", "--model-args", json.dumps(args),
               "--data", str(tmp_path / "d.parquet"), "--image-shape", ",".join(map(str, SHAPE)),
               "--precision", "fp32", "--lr", "0.05", "--epochs", "1", "--trials", "1", "--max-acc-drop", "100",
               "--load-rate", "10", "--load-seconds", "1", "--serve-port", str(free_port()),
               "--storage", str(store), "--name", "u", *cluster])  # fmt: skip
    assert rc == 0
    report = json.loads((store / "u" / "report.json").read_text())
    assert report["model"] == f"tests.models.tv_models:{fn}" and "skipped" not in report
    assert len(report["preflight"]["fused"]) >= 17, report["preflight"]  # every conv of both models has a BN
    assert report["tune"]["finished"] >= 1 and report["tune"]["chosen"] is not None, report["tune"]
    chosen = report["serve"]["artifact"]
    model, manifest = load_artifact(chosen)
    assert manifest["architecture"] == "user"
    assert (
        manifest["model_spec"]["user"] == f"tests.models.tv_models:{fn}"
        and manifest["model_spec"]["user_kwargs"] == args
    )
    assert len(manifest["model_spec"]["input_mean"]) == 3  # normalized by the training data's statistics
    assert manifest["quantization"]["scheme"] == "int8_ptq" and 0.2 <= manifest["pruning"]["ratio"] <= 0.3
    with torch.no_grad():
        logits = model(torch.from_numpy(rows))
    assert served["classes"] == logits.argmax(1).tolist(), (served, manifest["quantization"], manifest["pruning"])
    probs = torch.softmax(logits.float(), 1).numpy()
    np.testing.assert_allclose(np.asarray(served["probabilities"]), probs, atol=2e-2)
    # The replica is warm when it reports ready: its first request is no slower than the ones after it, give or
    # take a loaded machine. Its INT8 graphs warmed up on other tensors than it served (normal vs inference
    # tensors: a dynamo recompile) made the first request take ~1.6 s against 8-11 ms after it (quiet machine).
    # Measured with the fix (first / median of the next 5): 18 / 6 ms and 468 / 21 ms (load 12-25) for
    # resnet18, 47 / 32 ms for mobilenet; the bound leaves room for the second, not for the cold path.
    record_property("single_image_latencies_s", singles)  # in the junit XML (--junitxml), for choosing the bound
    first, rest = singles[0], float(np.median(singles[1:]))
    assert first <= FIRST_SLACK * rest + FIRST_MARGIN_S, singles
    # load-tested: every request answered or refused by admission control, none failed. How many make the SLO
    # depends on the machine (a 2-core runner under other load timed all out in 2 s), so it is not asserted here
    lt = report["loadtest"]
    assert lt["sent"] > 0 and lt["errors"] == 0, lt
