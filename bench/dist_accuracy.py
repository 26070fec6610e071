"""Distributed training is as good as local: Ray Train's test accuracy minus the local loop's, in points, on the same
data, model, epochs and batch size (issue 13, item 4).

Datasets, each written as a user would (plain parquet, rows grouped by class, which is what once made every
worker read the same classes):
    colour    the generated 3x16x16 colour set, 6 classes, 1083 rows (866 train)
    digits    scikit-learn's bundled 8x8 digits (the project's own split)
    mnist1d   MNIST-1D (1x1x40 signals, the `mnist1d` package; skipped when it is not installed)
Model: the `small` preset, 8 epochs, batch 64 per worker, 4 Ray Train workers on an embedded one-node Ray
(`--quick`: `tiny`, 2 epochs, 2 workers, fewer rows; writes no results).

Keys: `dist_vs_local_acc_delta_pts` (the worst dataset's dist - local, goal >= -1.0), and per dataset
`<name>_local_acc`, `<name>_dist_acc`, `<name>_delta_pts`, `<name>_seconds`.
Writes bench/results/dist_accuracy.json (not with --quick).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench._common import print_table, write_result


def _write_sorted(path: Path, x: np.ndarray, y: np.ndarray, ids: np.ndarray) -> str:
    """Rows grouped by class (as written class by class), plain list<float32> images, no tandem metadata."""
    order = np.argsort(y, kind="stable")
    table = pa.table(
        {
            "sample_id": pa.array(ids[order], pa.int64()),
            "image": pa.array(list(x[order].reshape(len(x), -1).astype(np.float32)), pa.list_(pa.float32())),
            "label": pa.array(y[order], pa.int64()),
        }
    )
    pq.write_table(table, path)
    return str(path)


def _arrays(name: str, quick: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(train x, train y, test x, test y, image shape) of a dataset."""
    if name == "colour":
        from models.data import colour_images

        n = 400 if quick else 1083
        x, y = colour_images(n, seed=1)
        cut = int(0.8 * n)
        return x[:cut], y[:cut], x[cut:], y[cut:], (3, 16, 16)
    if name == "digits":
        from models.data import DataConfig, load_tensors, prepare_data

        with tempfile.TemporaryDirectory(prefix="bench-dist-digits-") as d:
            splits = prepare_data(DataConfig(), d)
            _, x, y = load_tensors(splits.train)
            _, xt, yt = load_tensors(splits.test)
        return x.numpy(), y.numpy(), xt.numpy(), yt.numpy(), (1, 8, 8)
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = (1000 if quick else 4000), 42
        d = make_dataset(args)
        x, xt = (np.asarray(a, np.float32).reshape(len(a), 1, 1, -1) for a in (d["x"], d["x_test"]))
        return x, np.asarray(d["y"]), xt, np.asarray(d["y_test"]), (1, 1, x.shape[-1])
    raise ValueError(f"dataset must be colour, digits or mnist1d, got {name!r}")


def run_one(name: str, quick: bool, work: Path) -> dict:
    from actors.trainer import DistConfig, TrainJob, fit_distributed
    from actors.weighted_stream import StreamConfig
    from kernels.precision import PrecisionConfig
    from models.data import DataConfig, load_tensors, prepare_data
    from models.factory import ModelSpec
    from models.training import TrainConfig, fit_local

    x, y, xt, yt, shape = _arrays(name, quick)
    work.mkdir(parents=True, exist_ok=True)
    train = _write_sorted(work / "train.parquet", x, y, np.arange(len(y)))
    test = _write_sorted(work / "test.parquet", xt, yt, np.arange(len(y), len(y) + len(yt)))
    splits = prepare_data(DataConfig(train_path=train, test_path=test, image_shape=shape), work)
    cfg = TrainConfig(epochs=2 if quick else 8, batch_size=64, precision=PrecisionConfig(train_dtype="fp32"))
    spec = ModelSpec(preset="tiny" if quick else "small")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    _, xtr, ytr = load_tensors(splits.train)
    _, xte, yte = load_tensors(splits.test)
    local = fit_local(spec.build(splits.image_shape, splits.num_classes), (xtr, ytr), (xte, yte), cfg)
    t1 = time.perf_counter()
    job = TrainJob(
        model=spec,
        train=cfg,
        dist=DistConfig(num_workers=2 if quick else 4, cpus_per_worker=1.0, name=f"dist-accuracy-{name}"),
        stream=StreamConfig(weighted=False),
    )
    res = fit_distributed(job, splits, str(work / "ray"))
    dist_acc = float(res.history[-1]["test_accuracy"])
    out = {
        "dataset": name,
        "local_acc": float(local.test_accuracy),
        "dist_acc": dist_acc,
        "delta_pts": 100.0 * (dist_acc - local.test_accuracy),
        "local_seconds": t1 - t0,
        "dist_seconds": time.perf_counter() - t1,
    }
    print(f"{name}: local {out['local_acc']:.4f}, distributed {dist_acc:.4f} ({out['delta_pts']:+.2f} points)",
          flush=True)  # fmt: skip
    return out


def main(quick: bool, datasets: tuple[str, ...] = ("colour", "digits", "mnist1d")) -> dict:
    import importlib.util

    import ray

    if "mnist1d" in datasets and importlib.util.find_spec("mnist1d") is None:
        print("dist_accuracy: the mnist1d package is not installed; MNIST-1D skipped")
        datasets = tuple(d for d in datasets if d != "mnist1d")
    started = not ray.is_initialized()
    if started:
        # a new cluster of its own ("local"), never one another process left running; logical CPUs: 4 workers + Ray
        # Data on a small machine
        ray.init(address="local", num_cpus=8, include_dashboard=False)
    rows = []
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dist-accuracy-") as tmp:
            for name in datasets:
                rows.append(run_one(name, quick, Path(tmp) / name))
    finally:
        if started:
            ray.shutdown()
    print_table(rows, title="distributed vs local test accuracy")
    result = {
        "dist_vs_local_acc_delta_pts": min(r["delta_pts"] for r in rows),
        **{f"{r['dataset']}_{k}": r[k] for r in rows for k in ("local_acc", "dist_acc", "delta_pts")},
        **{f"{r['dataset']}_seconds": r["local_seconds"] + r["dist_seconds"] for r in rows},
        "config": {
            "model": "tiny" if quick else "small",
            "epochs": 2 if quick else 8,
            "batch_size": 64,
            "workers": 2 if quick else 4,
            "datasets": list(datasets),
        },  # fmt: skip
        "seconds": time.perf_counter() - t0,
    }
    print(f"dist_vs_local_acc_delta_pts {result['dist_vs_local_acc_delta_pts']:+.2f} (goal >= -1.0), "
          f"{result['seconds']:.0f} s")  # fmt: skip
    if not quick:
        print(f"wrote {write_result('dist_accuracy', result)}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 epochs, 2 workers; writes no results")
    parser.add_argument("--datasets", default="colour,digits,mnist1d", help="comma-separated subset")
    a = parser.parse_args()
    main(a.quick, tuple(a.datasets.split(",")))
