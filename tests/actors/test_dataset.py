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
        (dict(label=pa.array([0.0, 1.0], pa.float64())), "'label' must be int64, got double"),
        (dict(image=pa.array([[0.0] * 4, [1.0] * 3], pa.list_(pa.float32()))), "same non-zero length"),
        (dict(image=pa.array([[0.0] * 4, [1.0] * 4], pa.list_(pa.float64()))), "list of float32"),
        (dict(sample_id=pa.array([3, 3], pa.int64())), "unique"),
        (dict(label=pa.array([0, -1], pa.int64())), "labels must be >= 0"),
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
    odd = _write(
        tmp_path / "odd.parquet", **{**GOOD, "image": pa.array([[0.0] * 6] * 2, pa.list_(pa.float32()))}
    )
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
