import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.dataset import (
    DIGITS_SHAPE,
    DataConfig,
    load_tensors,
    prepare_data,
    split_parquet,
    validate_parquet,
    write_parquet,
)


def test_digits_written_and_loaded(tmp_path):
    splits = prepare_data(DataConfig(), tmp_path)
    assert splits.image_shape == DIGITS_SHAPE and splits.num_classes == 10
    assert splits.train.num_rows + splits.test.num_rows == 1797
    ids_tr, x_tr, y_tr = load_tensors(splits.train)
    ids_te, _, _ = load_tensors(splits.test)
    assert x_tr.shape == (splits.train.num_rows, 1, 8, 8) and x_tr.dtype == torch.float32
    assert 0.0 <= x_tr.min() and x_tr.max() <= 1.0
    assert not set(ids_tr.tolist()) & set(ids_te.tolist())
    schema = pq.read_schema(splits.train.path)
    assert schema.field("sample_id").type == pa.int64() and schema.field("label").type == pa.int64()
    assert schema.field("image").type.value_type == pa.float32()


def test_user_parquet_split_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    path = write_parquet(
        tmp_path / "u.parquet", np.arange(200), rng.random((200, 12)), rng.integers(0, 3, 200), (3, 2, 2)
    )
    splits = prepare_data(DataConfig(train_path=path), tmp_path / "w1")
    again = prepare_data(DataConfig(train_path=path), tmp_path / "w2")
    assert splits.image_shape == (3, 2, 2)
    a, _, _ = load_tensors(splits.test)
    b, _, _ = load_tensors(again.test)
    assert torch.equal(a, b) and 10 < len(a) < 80


def _write(path, **cols):
    pq.write_table(pa.table(cols), path)
    return str(path)


GOOD = dict(
    sample_id=pa.array([0, 1], pa.int64()),
    image=pa.array([[0.0] * 4, [1.0] * 4], pa.list_(pa.float32())),
    label=pa.array([0, 1], pa.int64()),
)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(label=None), r"missing column\(s\) \['label'\]"),
        (dict(label=pa.array([0.0, 1.0], pa.float64())), "'label' must be an integer or string type, got double"),
        (dict(image=pa.array([[0.0] * 4, [1.0] * 3], pa.list_(pa.float32()))), "sample_id 1 has 3 .mixed shapes"),
        (dict(image=pa.array([[0.0] * 4, [1.0] * 4], pa.list_(pa.int32()))), "list of float32, float64 or uint8"),
        (
            dict(image=pa.array([[0.0] * 4, [1.0, float("nan"), 0, 0]], pa.list_(pa.float32()))),
            "NaN or inf pixel in the row with sample_id 1",
        ),
        (
            dict(image=pa.array([[float("inf")] * 4, [1.0] * 4], pa.list_(pa.float64()))),
            "NaN or inf pixel in the row with sample_id 0",
        ),
        (dict(image=pa.array([b"\x89PNG broken", b"xx"], pa.binary())), "unreadable image in the row with sample_id 0"),
        (dict(sample_id=pa.array([3, 3], pa.int64())), "unique, 3 appears"),
        (dict(label=pa.array([0, -1], pa.int64())), "labels must be >= 0, got -1 in the row with sample_id 1"),
    ],
)
def test_bad_parquet_is_named(tmp_path, change, message):
    cols = {**GOOD, **change}
    cols = {k: v for k, v in cols.items() if v is not None}
    path = _write(tmp_path / "bad.parquet", **cols)
    with pytest.raises(ValueError, match=message):
        validate_parquet(path)


def test_empty_missing_and_garbage_files(tmp_path):
    empty = _write(tmp_path / "e.parquet", **{k: v.slice(0, 0) for k, v in GOOD.items()})
    with pytest.raises(ValueError, match="no rows"):
        validate_parquet(empty)
    with pytest.raises(ValueError, match="does not exist"):
        validate_parquet(str(tmp_path / "nope.parquet"))
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet"):
        validate_parquet(str(garbage))


def test_image_shape_inference_and_mismatch(tmp_path):
    path = _write(tmp_path / "sq.parquet", **GOOD)
    assert validate_parquet(path).image_shape == (1, 2, 2)
    with pytest.raises(ValueError, match="needs 12 values"):
        validate_parquet(path, image_shape=(3, 2, 2))
    odd = _write(tmp_path / "odd.parquet", **{**GOOD, "image": pa.array([[0.0] * 6] * 2, pa.list_(pa.float32()))})
    with pytest.raises(ValueError, match="not a square"):
        validate_parquet(odd)
    assert validate_parquet(odd, image_shape=(1, 2, 3)).image_shape == (1, 2, 3)


def test_split_of_tiny_file_fails_clearly(tmp_path):
    path = _write(tmp_path / "one.parquet", **{k: v.slice(0, 1) for k, v in GOOD.items()})
    with pytest.raises(ValueError, match="split is empty"):
        split_parquet(path, tmp_path / "out", 0.2)


def test_bad_data_config():
    with pytest.raises(ValueError, match="test_fraction"):
        DataConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="image_shape must be"):
        DataConfig(image_shape=(8, 8))


def test_image_shape_flag_reaches_the_split(tmp_path):
    """A plain pyarrow file of 3x16x16 images (768 values, not a square, no metadata) splits and validates
    with only DataConfig.image_shape given (the split used to validate without it)."""
    from actors.dataset import colour_images

    x, y = colour_images(300)
    table = pa.table(
        {
            "sample_id": pa.array(np.arange(300), pa.int64()),
            "image": pa.array(list(x.reshape(300, -1)), pa.list_(pa.float32())),
            "label": pa.array(y, pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="not a square"):
        prepare_data(DataConfig(train_path=str(tmp_path / "d.parquet")), tmp_path / "w0")
    splits = prepare_data(DataConfig(train_path=str(tmp_path / "d.parquet"), image_shape=(3, 16, 16)), tmp_path)
    assert splits.image_shape == (3, 16, 16) and splits.num_classes == 6
    assert splits.train.num_rows + splits.test.num_rows == 300
    _, xt, _ = load_tensors(splits.train)
    assert xt.shape[1:] == (3, 16, 16)


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_every_image_encoding_decodes_to_the_same_pixels(tmp_path):
    """list<float32>, fixed_size_list<float64>, list<uint8> (scaled by 1/255) and PNG bytes of the same uint8
    RGB pixels load as identical (N, 3, 4, 4) float32 tensors; string labels become sorted class indices."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)  # (N, H, W, C) as an image file holds them
    chw = pixels.transpose(0, 3, 1, 2).reshape(6, -1)
    labels = pa.array(["dog", "cat", "dog", "emu", "cat", "dog"])
    columns = {
        "f32": pa.array(list((chw / 255.0).astype(np.float32)), pa.list_(pa.float32())),
        "f64": pa.FixedSizeListArray.from_arrays(pa.array((chw / 255.0).reshape(-1), pa.float64()), 48),
        "u8": pa.array(list(chw), pa.list_(pa.uint8())),
        "png": pa.array([_png(p) for p in pixels], pa.binary()),
    }
    loaded = {}
    for name, col in columns.items():
        path = _write(tmp_path / f"{name}.parquet", sample_id=pa.array(np.arange(6)), image=col, label=labels)
        info = validate_parquet(path, image_shape=None if name == "png" else (3, 4, 4))
        assert info.image_shape == (3, 4, 4) and info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
        _, x, y = load_tensors(info)
        assert y.tolist() == [1, 0, 1, 2, 0, 1]
        loaded[name] = x
    for name, x in loaded.items():
        torch.testing.assert_close(x, loaded["f32"], rtol=0, atol=1e-6, msg=name)
    mean = torch.tensor(validate_parquet(str(tmp_path / "png.parquet")).channel_mean, dtype=torch.float64)
    torch.testing.assert_close(mean, loaded["f32"].mean((0, 2, 3)).double(), rtol=0, atol=1e-6)


def test_labels_of_two_types_are_refused(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    _write(d / "a.parquet", **GOOD)
    _write(d / "b.parquet", **{**GOOD, "sample_id": pa.array([5, 6], pa.int64()), "label": pa.array(["x", "y"])})
    with pytest.raises(ValueError, match="labels must be of one type across the data, got string labels here"):
        validate_parquet(str(d))


def _image_folder(root, sizes=None, n=8):
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in ("circle", "square"):
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = (sizes or {}).get((name, i), (8, 8))
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_becomes_a_dataset(tmp_path):
    folder = _image_folder(tmp_path / "imgs")
    splits = prepare_data(DataConfig(train_path=str(folder), test_fraction=0.25), tmp_path / "w")
    assert splits.image_shape == (3, 8, 8) and splits.class_names == ["circle", "square"]
    assert splits.train.num_rows + splits.test.num_rows == 16
    _, x, y = load_tensors(splits.train)
    assert x.shape[1:] == (3, 8, 8) and set(y.tolist()) <= {0, 1} and 0 <= x.min() and x.max() <= 1


def test_bad_image_folders_are_named(tmp_path):
    mixed = _image_folder(tmp_path / "mixed", sizes={("square", 3): (8, 9)})
    with pytest.raises(ValueError, match=r"square/3.png: images must all have shape \(3, 8, 8\).*\(3, 8, 9\)"):
        prepare_data(DataConfig(train_path=str(mixed)), tmp_path / "w1")
    corrupt = _image_folder(tmp_path / "corrupt")
    (corrupt / "circle" / "5.png").write_bytes(b"\x89PNG\r\n truncated")
    with pytest.raises(ValueError, match="circle/5.png: unreadable image"):
        prepare_data(DataConfig(train_path=str(corrupt)), tmp_path / "w2")
