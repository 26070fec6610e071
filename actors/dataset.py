"""Dataset preparation: the bundled default (scikit-learn's handwritten digits) written as parquet, and the checks a
user's parquet must pass before any training starts.

Schema (one row per sample):
    sample_id  int64                              unique id, used by the sample-weight store
    image      fixed_size_list<float32>[C*H*W]     (or list<float32> of one constant length), row-major C, H, W
    label      int64                              class index in [0, num_classes)
The image shape is stored in the parquet schema metadata under b"tandem.image_shape" ("C,H,W"); a user file without
it must be given `image_shape`, or holds square single-channel images (length a perfect square).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

SHAPE_KEY = b"tandem.image_shape"
DIGITS_SHAPE = (1, 8, 8)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the data comes from."""

    train_path: str | None = None
    """A parquet file (or directory of parquet files) to train on; None = the bundled digits data."""
    test_path: str | None = None
    """Held-out parquet; None with a user train_path = a deterministic split of it by sample_id."""
    image_shape: tuple[int, int, int] | None = None
    """(C, H, W) when the parquet metadata does not say."""
    test_fraction: float = 0.2
    """Share of samples held out when splitting."""

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.test_path is not None and self.train_path is None:
            raise ValueError("test_path needs train_path too")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) != 3 or any(not isinstance(v, int) or v < 1 for v in shape):
                raise ValueError(
                    f"image_shape must be three positive ints (C, H, W), got {self.image_shape!r}"
                )
            self.image_shape = shape


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    path: str
    num_rows: int
    image_shape: tuple[int, int, int]
    num_classes: int


@dataclass(frozen=True, slots=True)
class DataSplits:
    train: DatasetInfo
    test: DatasetInfo

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)


def _table(ids: np.ndarray, images: np.ndarray, labels: np.ndarray, shape: tuple[int, int, int]) -> pa.Table:
    n, size = images.shape
    flat = pa.array(images.astype(np.float32).reshape(-1), type=pa.float32())
    image_col = pa.FixedSizeListArray.from_arrays(flat, size)
    table = pa.table(
        {"sample_id": pa.array(ids, pa.int64()), "image": image_col, "label": pa.array(labels, pa.int64())}
    )
    return table.replace_schema_metadata({SHAPE_KEY: ",".join(map(str, shape)).encode()})


def write_parquet(path: str | os.PathLike, ids, images, labels, image_shape: tuple[int, int, int]) -> str:
    """Writes samples in tandem's schema; `images` is (N, C*H*W) or (N, C, H, W)."""
    images = np.asarray(images).reshape(len(images), -1)
    if images.shape[1] != math.prod(image_shape):
        raise ValueError(f"images must have {math.prod(image_shape)} values each, got {images.shape[1]}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(_table(np.asarray(ids), images, np.asarray(labels), tuple(image_shape)), path)
    return str(path)


def write_digits(out_dir: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0) -> tuple[str, str]:
    """scikit-learn's bundled 8x8 digits (1797 samples, offline), pixel values scaled to [0, 1], a stratified
    deterministic split; returns (train_path, test_path)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.data.astype(np.float32) / 16.0
    ids = np.arange(len(images), dtype=np.int64)
    tr, te = train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=digits.target)
    out = Path(out_dir)
    train = write_parquet(out / "digits_train.parquet", ids[tr], images[tr], digits.target[tr], DIGITS_SHAPE)
    test = write_parquet(out / "digits_test.parquet", ids[te], images[te], digits.target[te], DIGITS_SHAPE)
    return train, test


def colour_images(n: int, image_shape: tuple[int, int, int] = (3, 16, 16), num_classes: int = 6, seed: int = 0):
    """A generated colour set like a user's small photo data: (images (n, C, H, W) float32 in [0, 1], labels (n,)).
    Class k is a grating at angle pi k / num_classes of random phase and frequency, tinted with a random colour
    per sample, plus pixel noise: learnable by a small CNN in a few epochs, not by colour alone."""
    c, h, w = image_shape
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    angle = np.pi * labels / num_classes  # (n,)
    freq = rng.uniform(0.5, 1.0, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy  # (n, H, W)
    pattern = 0.5 + 0.5 * np.sin(freq[:, None, None] * proj + phase[:, None, None])
    tint = rng.uniform(0.3, 1.0, (n, c, 1, 1))
    images = tint * pattern[:, None] + 0.15 * rng.standard_normal((n, c, h, w))
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)


def parquet_files(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"parquet path does not exist: {path}")
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        if not files:
            raise ValueError(f"directory {path} holds no *.parquet files")
        return files
    return [str(p)]


def _shape_from(schema: pa.Schema, length: int, given: tuple[int, int, int] | None, path: str):
    meta = (schema.metadata or {}).get(SHAPE_KEY)
    if given is not None:
        shape = given
    elif meta is not None:
        try:
            shape = tuple(int(v) for v in meta.decode().split(","))
        except ValueError:
            raise ValueError(f"{path}: metadata {SHAPE_KEY.decode()} must be 'C,H,W', got {meta!r}") from None
    else:
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(
                f"{path}: image length {length} is not a square and the file has no {SHAPE_KEY.decode()} "
                "metadata; pass image_shape=(C, H, W)"
            )
        shape = (1, side, side)
    if math.prod(shape) != length:
        raise ValueError(
            f"{path}: image_shape {shape} needs {math.prod(shape)} values per image, rows have {length}"
        )
    return shape


def validate_parquet(path: str, image_shape: tuple[int, int, int] | None = None) -> DatasetInfo:
    """Checks columns, dtypes, image sizes and emptiness; raises ValueError naming the problem."""
    files = parquet_files(path)
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    schema = table.schema
    expected = {"sample_id": "int64", "image": "list of float32", "label": "int64"}
    missing = [c for c in expected if c not in schema.names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {missing}; expected columns {expected}, found {schema.names}"
        )
    for col in ("sample_id", "label"):
        if schema.field(col).type != pa.int64():
            raise ValueError(f"{path}: column {col!r} must be int64, got {schema.field(col).type}")
    itype = schema.field("image").type
    if not (
        pa.types.is_list(itype) or pa.types.is_fixed_size_list(itype) or pa.types.is_large_list(itype)
    ) or (itype.value_type != pa.float32()):
        raise ValueError(f"{path}: column 'image' must be a list of float32, got {itype}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    lengths = pc.list_value_length(table.column("image"))
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if lo != hi or lo is None or lo == 0:
        raise ValueError(f"{path}: images must all have the same non-zero length, got lengths {lo}..{hi}")
    if (
        table.column("image").null_count
        or table.column("label").null_count
        or table.column("sample_id").null_count
    ):
        raise ValueError(f"{path}: null values in sample_id, image or label")
    labels = table.column("label")
    if pc.min(labels).as_py() < 0:
        raise ValueError(f"{path}: labels must be >= 0, got min {pc.min(labels).as_py()}")
    if pc.count_distinct(table.column("sample_id")).as_py() != table.num_rows:
        raise ValueError(f"{path}: sample_id values must be unique")
    shape = _shape_from(schema, lo, image_shape, path)
    return DatasetInfo(
        path=path, num_rows=table.num_rows, image_shape=shape, num_classes=pc.max(labels).as_py() + 1
    )


def load_tensors(info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample_ids (N,), images (N, C, H, W) float32, labels (N,)) of a validated dataset."""
    table = pa.concat_tables([pq.read_table(f) for f in parquet_files(info.path)], promote_options="default")
    flat = pc.list_flatten(table.column("image")).to_numpy(zero_copy_only=False)
    images = torch.from_numpy(np.array(flat, dtype=np.float32)).view(-1, *info.image_shape)
    ids = torch.from_numpy(table.column("sample_id").to_numpy().copy())
    labels = torch.from_numpy(table.column("label").to_numpy().copy())
    return ids, images, labels


def prepare_data(cfg: DataConfig, workdir: str | os.PathLike) -> DataSplits:
    """Validates (or writes, for the default digits) the train and test parquet; nothing is trained on bad data."""
    if cfg.train_path is None:
        train_path, test_path = write_digits(Path(workdir) / "data", cfg.test_fraction)
    elif cfg.test_path is None:
        train_path, test_path = split_parquet(
            cfg.train_path, Path(workdir) / "data", cfg.test_fraction, image_shape=cfg.image_shape
        )
    else:
        train_path, test_path = cfg.train_path, cfg.test_path
    train = validate_parquet(train_path, cfg.image_shape)
    test = validate_parquet(test_path, cfg.image_shape or train.image_shape)
    if test.image_shape != train.image_shape:
        raise ValueError(f"train and test image shapes differ: {train.image_shape} vs {test.image_shape}")
    return DataSplits(train=train, test=test)


def split_parquet(
    path: str, out_dir: str | os.PathLike, test_fraction: float, image_shape: tuple[int, int, int] | None = None
) -> tuple[str, str]:
    """Deterministic split by a hash of sample_id (stable when rows are added or reordered); `image_shape`
    (C, H, W) as for `validate_parquet` (both halves record it in their metadata)."""
    info = validate_parquet(path, image_shape)
    table = pa.concat_tables([pq.read_table(f) for f in parquet_files(path)], promote_options="default")
    ids = table.column("sample_id").to_numpy()
    # splitmix64-style mix of the id, then a uniform draw in [0, 1)
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    is_test = (h.astype(np.float64) / float(1 << 53)) < test_fraction
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {SHAPE_KEY: ",".join(map(str, info.image_shape)).encode()}
    paths = []
    for name, mask in (("train", ~is_test), ("test", is_test)):
        part = table.filter(pa.array(mask)).replace_schema_metadata(meta)
        if part.num_rows == 0:
            raise ValueError(f"{path}: the {name} split is empty; use more rows or another test_fraction")
        paths.append(str(out / f"{Path(path).stem}_{name}.parquet"))
        pq.write_table(part, paths[-1])
    return paths[0], paths[1]
