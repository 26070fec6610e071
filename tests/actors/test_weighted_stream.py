"""The weighted Ray Data stage: rows repeated by the store's draw, streamed, with the unbiased loss scale."""

import numpy as np
import pytest

from actors.dataset import DataConfig, prepare_data
from actors.weight_store import SampleWeightStore
from actors.weighted_stream import StreamConfig, build_eval_stream, build_stream, read_sample_ids


@pytest.mark.timeout(180)
def test_stream_follows_the_draw(ray_local, tmp_path):
    ray = ray_local
    splits = prepare_data(DataConfig(), tmp_path)
    ids = read_sample_ids(splits.train)
    store = ray.remote(SampleWeightStore).remote(ids, None, 0)
    weights = np.where(ids % 2 == 0, 3.0, 0.5)  # even ids six times as likely
    state = ray.get(store.state.remote())
    state["weights"] = weights[np.argsort(ids)]
    ray.get(store.load_state.remote(state))
    ray.get(store.begin_epoch.remote(0, 5000))
    ds = build_stream(splits.train, StreamConfig(unbiased=True, block_rows=256), store)
    seen_ids, scales = [], []
    for batch in ds.iter_batches(batch_size=512, batch_format="numpy"):
        assert batch["image"].shape[1:] == (1, 8, 8) and batch["image"].dtype == np.float32
        seen_ids.append(batch["sample_id"])
        scales.append(batch["loss_scale"])
    seen = np.concatenate(seen_ids)
    assert len(seen) == 5000  # exactly the epoch size drawn
    counts, _ = ray.get(store.counts_for.remote(ids))
    got = np.bincount(np.searchsorted(np.sort(ids), seen), minlength=len(ids))
    np.testing.assert_array_equal(got, counts[np.argsort(ids)])
    even_share = np.isin(seen, ids[ids % 2 == 0]).mean()
    n_even = (ids % 2 == 0).sum()
    expected = 3.0 * n_even / (3.0 * n_even + 0.5 * (len(ids) - n_even))
    assert abs(even_share - expected) < 0.03  # ~6 sigma at n = 5000
    scale = np.concatenate(scales)
    mean_w = weights.mean()
    np.testing.assert_allclose(scale[np.isin(seen, ids[ids % 2 == 0])], mean_w / 3.0, rtol=1e-5)


def test_uniform_stream_needs_no_store(ray_local, tmp_path):
    """A small parquet dataset is decoded here, not by Ray Data's read (whose file listing starts 32 actors), and
    streams every row once, exactly as the local loader decodes it."""
    from models.data import load_tensors

    splits = prepare_data(DataConfig(), tmp_path)
    ds = build_stream(splits.train, StreamConfig(weighted=False), None)
    rows = ds.take_all()
    assert "Read" not in ds.stats(), ds.stats()
    ids, x, _ = load_tensors(splits.train)
    assert sorted(int(r["sample_id"]) for r in rows) == sorted(ids.tolist())
    by_id = {int(i): k for k, i in enumerate(ids)}
    for r in rows[:50]:
        np.testing.assert_array_equal(r["image"], x[by_id[int(r["sample_id"])]].numpy())
    with pytest.raises(ValueError, match="needs the sample-weight store"):
        build_stream(splits.train, StreamConfig(), None)


def test_eval_stream_scores_like_the_tensors(ray_local, tmp_path):
    """The test set scored through Ray Data (decoded on the workers) gives the accuracy and loss of the tensors."""
    import os

    import torch
    import torch.distributed as dist

    from actors.trainer import _evaluate
    from actors.weighted_stream import build_eval_stream
    from models.data import load_tensors
    from models.factory import ModelSpec

    splits = prepare_data(DataConfig(), tmp_path)
    torch.manual_seed(0)
    model = ModelSpec(preset="tiny").build(splits.image_shape, splits.num_classes)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        _, x, y = load_tensors(splits.test)
        want = _evaluate(model, (x, y), 0, 1, torch.device("cpu"))
        got = _evaluate(model, build_eval_stream(splits.test).iterator(), 0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert got[0] == pytest.approx(want[0], abs=1e-12) and got[1] == pytest.approx(want[1], rel=1e-6)
    assert 0.0 < want[0] < 1.0


def _png_folder(root, n=24, shape=(3, 8, 8)):
    """n PNGs (written with Pillow) in three class subfolders; returns their float images by class/file."""
    from PIL import Image

    from models.data import colour_images

    x, y = colour_images(n, image_shape=shape, num_classes=3, seed=3)
    names = ("ant", "bee", "cat")
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / names[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _check_image_stream(splits, ds):
    """The stream reads the files with Ray Data's read_images and yields what the local loader decodes."""
    from models.data import load_tensors

    got = ds.take_all()
    assert "ReadImage" in ds.stats() and "ReadParquet" not in ds.stats(), ds.stats()
    ids, x, y = load_tensors(splits.train)
    by_id = {int(i): k for k, i in enumerate(ids)}
    assert sorted(r["sample_id"] for r in got) == sorted(by_id)
    for r in got:
        k = by_id[int(r["sample_id"])]
        assert r["label"] == y[k] and r["image"].shape == (3, 8, 8)
        np.testing.assert_allclose(r["image"], x[k].numpy(), atol=1e-6)


@pytest.mark.timeout(180)
def test_image_folder_is_read_by_ray_data(ray_local, tmp_path):
    """An image folder is listed on the driver (only file names go into the index, no image bytes) and read by
    Ray Data's read_images on the workers, ids and labels joined by path."""
    import pyarrow.parquet as pq

    folder = _png_folder(tmp_path / "imgs")
    splits = prepare_data(DataConfig(train_path=str(folder), test_fraction=0.25), tmp_path / "w")
    assert splits.train.images_root == str(folder) and splits.class_names == ["ant", "bee", "cat"]
    assert splits.train.num_rows + splits.test.num_rows == 24
    for f in (tmp_path / "w").rglob("*.parquet"):  # only indexes: file names, never the images
        assert "image" not in pq.read_schema(f).names, f
    _check_image_stream(splits, build_stream(splits.train, StreamConfig(weighted=False, global_shuffle=False)))
    ids = read_sample_ids(splits.train)
    assert len(ids) == splits.train.num_rows and len(np.intersect1d(ids, read_sample_ids(splits.test))) == 0


@pytest.mark.timeout(180)
def test_image_folder_on_s3(ray_local, tmp_path, monkeypatch):
    """The same folder on an S3 server (moto): validated from the bucket (no download), streamed by Ray Data."""
    from models import storage
    from tests._moto import moto_server

    folder = _png_folder(tmp_path / "imgs")
    with moto_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        storage.upload_dir(folder, "s3://tandem-ci/imgs")
        splits = prepare_data(DataConfig(train_path="s3://tandem-ci/imgs", test_fraction=0.25), tmp_path / "w")
        assert splits.train.images_root == "s3://tandem-ci/imgs" and splits.image_shape == (3, 8, 8)
        assert not (tmp_path / "w" / "input").exists()
        # Ray Data's workers reach the same server through the filesystem object (its endpoint travels with it)
        _check_image_stream(splits, build_eval_stream(splits.train))


@pytest.mark.timeout(180)
def test_small_parquet_on_s3_is_decoded_from_the_bucket(ray_local, tmp_path, monkeypatch):
    """A run's training split on an object store (its layout: a directory of parquet files) is read from the bucket
    by the driver's one read, as a cluster run that shares only the bucket does."""
    from dataclasses import replace
    from pathlib import Path

    from models import storage
    from models.data import parquet_files
    from tests._moto import moto_server

    splits = prepare_data(DataConfig(), tmp_path)
    with moto_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        for f in parquet_files(splits.train.path):
            storage.upload_file(f, f"s3://tandem-ci/run/data/train/{Path(f).name}")
        info = replace(splits.train, path="s3://tandem-ci/run/data/train")
        ds = build_stream(info, StreamConfig(weighted=False, global_shuffle=False), None)
        ids = sorted(int(r["sample_id"]) for r in ds.take_all())
    assert "Read" not in ds.stats() and ids == sorted(read_sample_ids(splits.train).tolist())
