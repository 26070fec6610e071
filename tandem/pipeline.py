"""The steps after training in `tandem run`: export the trained model as an artifact, the compression sweep,
serving the chosen artifact on the same cluster, a short load test; and the final report with its plots.
Each step calls into its package (models/, tune/, serve_app/); nothing here is an algorithm of its own."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from actors.dataset import DataSplits, load_tensors
from actors.train_local import evaluate


def export_trained(checkpoint: str, spec, splits: DataSplits, out: Path) -> tuple[str, float]:
    """The trained model of a Ray Train checkpoint as an fp32 artifact; returns (path, test accuracy)."""
    from actors.trainer import load_trained
    from models.artifact import save_artifact

    model = load_trained(checkpoint, spec, splits.image_shape, splits.num_classes)
    _, x, y = load_tensors(splits.test)
    _, acc = evaluate(model, x, y)
    save_artifact(
        model,
        out,
        input_shape=splits.image_shape,
        accuracy={"test_accuracy": acc},
        source_checkpoint=checkpoint,
        class_names=splits.class_names,
    )
    return str(out), acc


def sweep(trained_artifact: str, cfg, shared: DataSplits, out: Path, storage_uri: str) -> dict:
    """The pruning x quantization sweep starting from `trained_artifact` (a storage URI), on the data at its
    storage URIs (`shared`); Tune's experiment and the trial artifacts go to `storage_uri`, the report to `out`
    and `storage_uri`. Returns its summary."""
    from actors.dataset import DataConfig
    from tune.baseline import BaselineConfig
    from tune.sweep import SweepConfig, run_sweep

    # trials on any node read the data and the trained model from storage; their cache is node-local
    data = DataConfig(train_path=shared.train.path, test_path=shared.test.path, image_shape=shared.image_shape)
    baseline = BaselineConfig(preset=cfg.preset, checkpoint=trained_artifact, data=data)
    common = dict(storage=storage_uri, gpus_per_trial=cfg.gpus_per_worker or 0.0)
    if cfg.smoke:
        scfg = SweepConfig.smoke(str(out), baseline=baseline, trials=cfg.trials, verbose=1,
                                max_acc_drop_pts=cfg.max_acc_drop, **common)  # fmt: skip
    else:  # FP8 stays in the space only where the trials run it (tune.sweep.sweep_space)
        scfg = SweepConfig(trials=cfg.trials, baseline=baseline, out_dir=str(out), max_acc_drop_pts=cfg.max_acc_drop,
                           **common)  # fmt: skip
    t0 = time.perf_counter()
    res = run_sweep(scfg)
    return {
        "trials": len(res.rows) + res.stopped_early + res.failed,
        "finished": len(res.rows),
        "stopped_early": res.stopped_early,
        "failed": res.failed,
        "baseline_accuracy": res.baseline_accuracy,
        "front": res.front,
        "chosen": res.chosen,
        "artifact": str(res.artifact) if res.artifact else None,
        "serving": res.serving,
        "paths": {k: str(v) for k, v in res.paths.items()},
        "seconds": time.perf_counter() - t0,
    }


def trial_outcomes(tune_summary: dict) -> str:
    """'5 finished, 3 stopped early by ASHA, 0 failed' from a sweep summary."""
    t = tune_summary
    return (
        f"{t.get('finished', t['trials'])} finished, {t.get('stopped_early', 0)} stopped early by ASHA, "
        f"{t.get('failed', 0)} failed"
    )


APP_NAME = "tandem"


def start_serving(port: int, *, embedded: bool) -> str:
    """Starts Serve's controller and HTTP ingress (on the head only) on the connected cluster, deploying nothing;
    returns the HTTP host. Loopback on tandem's own Ray (`embedded`); on a cluster it connected to 0.0.0.0, so
    the head's HAProxy reaches replicas on other nodes, also on nodes that join after this
    (serve_app/placement.py). Where Serve runs already it is left as it is."""
    from ray import serve as ray_serve

    from serve_app.placement import http_host

    host = http_host(embedded)
    ray_serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    return host


def serve(artifact: str, port: int, gpus: float | None = None, *, embedded: bool) -> str:
    """Deploys `artifact` (a storage URI or local path) on Serve on the connected cluster (proxy on the head
    only, started by `start_serving` unless it runs); returns the URL. Each replica fetches the artifact from
    storage onto its own node (serve_app/replica.py), so none reads the head's disk. `gpus`: per replica (None:
    serve_app's default, a GPU where the cluster has one and the artifact's scheme runs on it). `embedded`:
    tandem started this Ray itself (tandem.local_ray.ray_session), which keeps HTTP on loopback."""
    from serve_app.deploy import DeployConfig, serve_artifact

    app: dict = {} if gpus is None else {"num_gpus": gpus}
    host = start_serving(port, embedded=embedded)
    # on tandem's own Ray (one machine) one replica per core: bench/results/serve_replicas.json
    cfg = DeployConfig(host=host, port=port, address="auto", app_name=APP_NAME, app=app, replicas_per_core=embedded)
    print(f"tandem: HTTP ingress on the head at {host}:{port}; replicas listen on {host} of their nodes")
    return serve_artifact(artifact, cfg)


def served_forms(uri: str) -> dict:
    """What serving `uri` serves, for the report: {"artifact": what a CPU replica loads, "serving_set": `uri`
    when it is a serving set (else None), "forms": scheme -> artifact of the set (empty for one artifact)}."""
    from kernels.precision import DeviceCaps
    from models.artifact import read_serving_set
    from serve_app.config import served_artifact

    served = read_serving_set(uri)
    if served is None:
        return {"artifact": uri, "serving_set": None, "forms": {}}
    forms = {scheme: form["artifact"] for scheme, form in served["forms"].items()}
    return {"artifact": served_artifact(uri, DeviceCaps("cpu")), "serving_set": uri, "forms": forms}


def run_artifact(storage_uri: str, name: str) -> str:
    """What a run left in `<storage_uri>/<name>` (tandem/job.py's layout) to serve: the sweep's serving set
    (tune/serving: the measured forms, one picked by each replica's hardware) when the run swept and a trial was
    within the bound, else its chosen model (tune/artifact), else the trained fp32 model."""
    from models import storage
    from models.artifact import SERVING_SET

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"run name must be a non-empty string without '/', got {name!r}")
    run = storage.join(storage_uri, name)
    if not storage.is_dir(run):
        raise ValueError(f"run must exist in the storage, got no {run}")
    for candidate, marker in ((storage.join(run, "tune", "serving"), SERVING_SET),
                              (storage.join(run, "tune", "artifact"), "manifest.json"),
                              (storage.join(run, "artifacts", "trained"), "manifest.json")):  # fmt: skip
        if storage.exists(storage.join(candidate, marker)):
            return candidate
    raise ValueError(f"run must hold an artifact (tune/serving, tune/artifact or artifacts/trained), got none in {run}")


def stop_serving() -> None:
    """Deletes the run's Serve app; shuts Serve down when no other app is left (frees the proxy's port)."""
    from ray import serve as ray_serve

    ray_serve.delete(APP_NAME)
    left = ray_serve.status().applications
    if not left:
        ray_serve.shutdown()
    print(f"tandem: Serve app {APP_NAME!r} deleted" + (f"; other apps keep serving: {sorted(left)}" if left else ""))


def loadtest(url: str, rate: float, seconds: float, out: Path) -> dict:
    """A short sine load (+-50 % around `rate`) against `url`; returns the report dict and writes the PNG."""
    from serve_app.deploy import run_loadtest
    from serve_app.loadgen import LoadConfig
    from serve_app.simulator import Sine

    cfg = LoadConfig(pattern=Sine(rate, 0.5, max(2.0, seconds / 2)), duration_s=seconds, slo_s=0.1)
    report = run_loadtest(url, cfg, str(out))
    print(report.summary())
    return {**report.to_dict(), "plot": str(out)}


def plot_training(history: list[dict], weights: np.ndarray | None, out_dir: Path) -> dict[str, str]:
    """Training curves and the sample-weight histogram as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["loss"] for h in history], marker="o", label="train loss")
    a.plot(epochs, [h["test_loss"] for h in history if "test_loss" in h] or [np.nan] * len(epochs), marker="o",
           label="test loss")  # fmt: skip
    a.set_xlabel("epoch"), a.legend(), a.set_title("loss")
    b.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train")
    b.plot(epochs, [h["test_accuracy"] for h in history], marker="o", label="test")
    b.set_xlabel("epoch"), b.legend(), b.set_title("accuracy")
    fig.tight_layout()
    paths["training_curves"] = str(out_dir / "training_curves.png")
    fig.savefig(paths["training_curves"], dpi=100)
    plt.close(fig)
    if weights is not None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(weights, bins=30, range=(0.5, 3.0))
        ax.set_xlabel("sample weight"), ax.set_ylabel("samples"), ax.set_title("sample weights after training")
        fig.tight_layout()
        paths["weights_histogram"] = str(out_dir / "weights_histogram.png")
        fig.savefig(paths["weights_histogram"], dpi=100)
        plt.close(fig)
    return paths


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_markdown(report: dict, path: Path) -> None:
    """report.md: every figure the run measured, with links to the plots."""
    t = report["train"]
    lines = [
        "# tandem run report",
        "",
        f"- model: `{report['model']}`; data: `{report['data']['train']}` ({report['data']['image_shape']})",
        f"- cluster: {report.get('cluster', {})}",
        f"- total time: {report['seconds']:.1f} s",
        "",
        "## Training",
        "",
        "| epoch | loss | train acc | test acc | samples/s | grad bytes inter/step | grad bytes intra/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in t["history"]:
        lines.append(
            f"| {h['epoch']} | {h['loss']:.4f} | {h['train_accuracy']:.4f} | {h['test_accuracy']:.4f} | "
            f"{h['samples_per_s']:.0f} | {_fmt(h.get('grad_bytes_inter_per_step'))} | "
            f"{_fmt(h.get('grad_bytes_intra_per_step'))} |"
        )
    if t.get("weights_summary"):
        w = t["weights_summary"]
        lines += ["", f"Sample weights: mean {w['mean']:.3f}, min {w['min']:.3f}, max {w['max']:.3f}."]
    if "export" in report:
        lines += ["", f"Trained fp32 artifact: `{report['export']['artifact']}`, test accuracy "
                  f"{report['export']['test_accuracy']:.4f}"]  # fmt: skip
    if "tune" in report:
        tu = report["tune"]
        lines += [
            "",
            "## Compression sweep",
            "",
            f"{tu['trials']} trials ({trial_outcomes(tu)}), baseline accuracy {tu['baseline_accuracy']:.4f}.",
        ]
        if tu.get("paths", {}).get("table"):
            lines += ["", Path(tu["paths"]["table"]).read_text()]
        c = tu.get("chosen")
        lines += [
            "",
            f"Chosen: { ({k: c[k] for k in c if k != 'artifact'} if c else 'none within the accuracy bound') }",
        ]
    if "serve" in report:
        lines += ["", "## Serving", "", f"URL: {report['serve']['url']} (artifact `{report['serve']['artifact']}`)"]
    if "loadtest" in report:
        lt = report["loadtest"]
        lines += [
            "",
            "## Load test",
            "",
            "| p50 ms | p95 ms | p99 ms | throughput /s | SLO attainment | errors |",
            "|---|---|---|---|---|---|",
            f"| {_fmt(lt.get('p50_ms'))} | {_fmt(lt.get('p95_ms'))} | {_fmt(lt.get('p99_ms'))} | "
            f"{_fmt(lt.get('throughput_rps'))} | {_fmt(lt.get('slo_attainment'))} | {_fmt(lt.get('errors'))} |",
        ]
    plots = report.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in plots.items()]
    path.write_text("\n".join(lines) + "\n")
