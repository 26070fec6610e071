"""Dataset preparation: the bundled default (scikit-learn's handwritten digits) written as parquet, a user's parquet
or image folder, and the checks the data must pass before any training starts. Ray-free: local training, Ray
Data's decode stage on the workers, the sweep and Serve tests share these functions.

Schema (one row per sample):
    sample_id  integer                             unique id, used by the sample-weight store
    image      list or fixed_size_list of float32, float64 or uint8 [C*H*W], row-major C, H, W (uint8 is
               scaled by 1/255), or binary: an encoded PNG/JPEG (decoded to C = 1 grey, 3 RGB, 4 RGBA; / 255)
    label      integer class index in [0, num_classes), or string class name (classes = the sorted names of
               the training split, recorded as `class_names`)
The image shape is stored in the parquet schema metadata under b"tandem.image_shape" ("C,H,W"); a user file
without it must be given `image_shape`, holds square single-channel images (length a perfect square), or
encoded images (their decoded shape). An image folder (one subfolder of PNG/JPEG files per class) is written
as such a parquet (encoded bytes, string labels) without decoding it on the driver twice.

Validation reads the files batch by batch (the driver never holds the table) and stops, naming the file and
the row's sample_id, at: NaN/inf pixels, undecodable images, images of another size, null values, labels of two
types, duplicate ids.
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
                raise ValueError(f"image_shape must be three positive ints (C, H, W), got {self.image_shape!r}")
            self.image_shape = shape


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    path: str
    num_rows: int
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    """Class names by index when the labels are strings (index i = i-th sorted name of the training split)."""
    channel_mean: tuple[float, ...] | None = None
    """Per-channel pixel mean over the rows (after decoding and scaling), computed during validation."""
    channel_std: tuple[float, ...] | None = None
    """Per-channel pixel standard deviation over the rows."""


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

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes by index (string labels), else None."""
        return None if self.train.class_names is None else list(self.train.class_names)


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
        raise ValueError(f"{path}: image_shape {shape} needs {math.prod(shape)} values per image, rows have {length}")
    return shape


_PIXEL_TYPES = {pa.float32(): 1.0, pa.float64(): 1.0, pa.uint8(): 1.0 / 255.0}


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_large_list(t)


def _is_encoded(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _image_kind(t: pa.DataType, where: str) -> str:
    if _is_encoded(t):
        return "encoded"
    if _is_list(t) and t.value_type in _PIXEL_TYPES:
        return "list"
    raise ValueError(
        f"{where}: column 'image' must be a list of float32, float64 or uint8, or binary (encoded PNG/JPEG), got {t}"
    )


def decode_image(data: bytes) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] of one encoded PNG/JPEG (C = 1 grey, 3 RGB, 4 RGBA; others become RGB)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_images(column: pa.Array | pa.ChunkedArray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C, H, W) float32 from an image column of any supported type (validated beforehand)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    n = len(column)
    if _is_encoded(column.type):
        out = np.empty((n, *image_shape), dtype=np.float32)
        for i, data in enumerate(column.to_pylist()):
            out[i] = decode_image(data)
        return out
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    scale = _PIXEL_TYPES[column.type.value_type]
    images = np.asarray(flat, dtype=np.float32).reshape(n, *image_shape)
    return images * np.float32(scale) if scale != 1.0 else images


def encode_labels(column: pa.Array | pa.ChunkedArray, class_names: tuple[str, ...] | None) -> np.ndarray:
    """(N,) int64 class indices: integer labels as they are, string labels by their index in `class_names`."""
    if class_names is None:
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[v] for v in column.to_pylist()], dtype=np.int64)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


class _Scan:
    """Running checks and statistics over the record batches of one dataset."""

    def __init__(self, path: str, image_shape: tuple[int, int, int] | None):
        self.path, self.given = path, image_shape
        self.shape: tuple[int, int, int] | None = None
        self.rows = 0
        self.ids: list[np.ndarray] = []
        self.label_kind: str | None = None
        self.names: set[str] = set()
        self.max_label = -1
        self.sums = self.sq = None

    def file(self, f: str, schema: pa.Schema) -> str:
        expected = {
            "sample_id": "integer",
            "image": "list of float32/float64/uint8 or binary",
            "label": "integer or string",
        }
        missing = [c for c in expected if c not in schema.names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; expected columns {expected}, found {schema.names}")
        if not pa.types.is_integer(schema.field("sample_id").type):
            raise ValueError(f"{f}: column 'sample_id' must be an integer type, got {schema.field('sample_id').type}")
        ltype = schema.field("label").type
        kind = "string" if _is_string(ltype) else "int" if pa.types.is_integer(ltype) else None
        if kind is None:
            raise ValueError(f"{f}: column 'label' must be an integer or string type, got {ltype}")
        if self.label_kind is not None and kind != self.label_kind:
            raise ValueError(
                f"{f}: labels must be of one type across the data, got {kind} labels here and {self.label_kind} "
                "labels in an earlier file"
            )
        self.label_kind = kind
        return _image_kind(schema.field("image").type, f)

    def batch(self, f: str, b: pa.RecordBatch, kind: str, schema: pa.Schema) -> None:
        ids = b.column("sample_id").to_numpy(zero_copy_only=False)
        for col in ("sample_id", "image", "label"):
            if b.column(col).null_count:
                row = _first(np.asarray(b.column(col).is_null()))
                raise ValueError(f"{f}: null {col} in the row with sample_id {ids[row]}")
        if kind == "list":
            lengths = pc.list_value_length(b.column("image")).to_numpy(zero_copy_only=False)
            if self.shape is None:
                if lengths[0] == 0:
                    raise ValueError(f"{f}: empty image in the row with sample_id {ids[0]}")
                self.shape = _shape_from(schema, int(lengths[0]), self.given, f)
            size = math.prod(self.shape)
            if (lengths != size).any():
                row = _first(lengths != size)
                raise ValueError(
                    f"{f}: images must all have {size} values (shape {self.shape}), the row with sample_id "
                    f"{ids[row]} has {lengths[row]} (mixed shapes)"
                )
            images = decode_images(b.column("image"), self.shape)
        else:
            images = self._decode(f, b.column("image"), ids)
        bad = ~np.isfinite(images.reshape(len(images), -1)).all(1)
        if bad.any():
            raise ValueError(f"{f}: NaN or inf pixel in the row with sample_id {ids[_first(bad)]}")
        labels = b.column("label")
        if self.label_kind == "int":
            lab = labels.to_numpy(zero_copy_only=False)
            if (lab < 0).any():
                row = _first(lab < 0)
                raise ValueError(f"{f}: labels must be >= 0, got {lab[row]} in the row with sample_id {ids[row]}")
            self.max_label = max(self.max_label, int(lab.max()))
        else:
            self.names.update(labels.to_pylist())
        self.ids.append(ids.astype(np.int64))
        self.rows += len(ids)
        per_channel = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64)
        s, q = per_channel.sum(1), np.square(per_channel).sum(1)
        self.sums = s if self.sums is None else self.sums + s
        self.sq = q if self.sq is None else self.sq + q

    def _decode(self, f: str, column: pa.Array, ids: np.ndarray) -> np.ndarray:
        out = []
        for i, data in enumerate(column.to_pylist()):
            try:
                img = decode_image(data)
            except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable"
                raise ValueError(
                    f"{f}: unreadable image in the row with sample_id {ids[i]} ({type(e).__name__}: {e})"
                ) from None
            if self.shape is None:
                self.shape = tuple(img.shape)
                if self.given is not None and self.given != self.shape:
                    raise ValueError(f"{f}: image_shape {self.given} given, the images decode to {self.shape}")
            if tuple(img.shape) != self.shape:
                raise ValueError(
                    f"{f}: images must all have shape {self.shape}, the row with sample_id {ids[i]} decodes to "
                    f"{tuple(img.shape)} (mixed shapes)"
                )
            out.append(img)
        return np.stack(out) if out else np.empty((0, *self.shape), np.float32)


def validate_parquet(
    path: str, image_shape: tuple[int, int, int] | None = None, class_names: tuple[str, ...] | None = None
) -> DatasetInfo:
    """Checks columns, dtypes, image sizes, pixel values, labels and emptiness, streaming over the files;
    raises ValueError naming the problem (and the row's sample_id). String labels are numbered by their sorted
    names, or by `class_names` (the training split's) when given."""
    scan = _Scan(path, image_shape)
    for f in parquet_files(path):
        try:
            pf = pq.ParquetFile(f)
            kind = scan.file(f, pf.schema_arrow)
            for b in pf.iter_batches(batch_size=4096, columns=["sample_id", "image", "label"]):
                scan.batch(f, b, kind, pf.schema_arrow)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{f}: not a readable parquet file ({e})") from None
    if scan.rows == 0:
        raise ValueError(f"{path}: no rows")
    ids = np.concatenate(scan.ids)
    if len(np.unique(ids)) != len(ids):
        dup = ids[np.flatnonzero(np.bincount(np.unique(ids, return_inverse=True)[1]) > 1)[0]] if len(ids) else None
        raise ValueError(f"{path}: sample_id values must be unique, {dup} appears more than once")
    if scan.label_kind == "string":
        names = tuple(sorted(scan.names)) if class_names is None else tuple(class_names)
        unknown = sorted(scan.names - set(names))
        if unknown:
            raise ValueError(f"{path}: labels {unknown[:5]} are not among the training classes {list(names)}")
        num_classes = len(names)
    else:
        if class_names is not None:
            raise ValueError(f"{path}: labels must be strings like the training split's, got integers")
        names, num_classes = None, scan.max_label + 1
    n = scan.rows * math.prod(scan.shape[1:])
    mean = scan.sums / n
    std = np.sqrt(np.maximum(scan.sq / n - mean * mean, 0.0))
    return DatasetInfo(
        path=path,
        num_rows=scan.rows,
        image_shape=scan.shape,
        num_classes=num_classes,
        class_names=names,
        channel_mean=tuple(float(v) for v in mean),
        channel_std=tuple(float(v) for v in std),
    )


def load_tensors(info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sample_ids (N,), images (N, C, H, W) float32, labels (N,)) of a validated dataset."""
    ids, images, labels = [], [], []
    for f in parquet_files(info.path):
        table = pq.read_table(f, columns=["sample_id", "image", "label"])
        ids.append(table.column("sample_id").to_numpy().astype(np.int64))
        images.append(decode_images(table.column("image"), info.image_shape))
        labels.append(encode_labels(table.column("label"), info.class_names))
    return (
        torch.from_numpy(np.concatenate(ids)),
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
    )


def prepare_data(cfg: DataConfig, workdir: str | os.PathLike) -> DataSplits:
    """Validates (or writes, for the default digits; converts, for an image folder) the train and test data;
    nothing is trained on bad data."""
    data_dir = Path(workdir) / "data"
    train_src = cfg.train_path
    if train_src is not None and is_image_folder(train_src):
        train_src = image_folder_to_parquet(train_src, data_dir / f"{Path(train_src).name}.parquet")
    test_src = cfg.test_path
    if test_src is not None and is_image_folder(test_src):
        test_src = image_folder_to_parquet(test_src, data_dir / f"{Path(test_src).name}_test.parquet", start_id=1 << 40)
    if train_src is None:
        train_path, test_path = write_digits(data_dir, cfg.test_fraction)
    elif test_src is None:
        train_path, test_path = split_parquet(train_src, data_dir, cfg.test_fraction, image_shape=cfg.image_shape)
    else:
        train_path, test_path = train_src, test_src
    train = validate_parquet(train_path, cfg.image_shape)
    test = validate_parquet(test_path, cfg.image_shape or train.image_shape, class_names=train.class_names)
    if test.image_shape != train.image_shape:
        raise ValueError(f"train and test image shapes differ: {train.image_shape} vs {test.image_shape}")
    return DataSplits(train=train, test=test)


def split_parquet(
    path: str, out_dir: str | os.PathLike, test_fraction: float, image_shape: tuple[int, int, int] | None = None
) -> tuple[str, str]:
    """Deterministic split by a hash of sample_id (stable when rows are added or reordered), streamed batch by
    batch; `image_shape` (C, H, W) as for `validate_parquet` (both halves record it in their metadata)."""
    info = validate_parquet(path, image_shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(out / f"{Path(path).stem}_{name}.parquet") for name in ("train", "test")]
    meta = {SHAPE_KEY: ",".join(map(str, info.image_shape)).encode()}
    writers: list[pq.ParquetWriter] = []
    counts = [0, 0]
    try:
        for f in parquet_files(path):
            for b in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=["sample_id", "image", "label"]):
                table = pa.Table.from_batches([b])
                ids = table.column("sample_id").to_numpy().astype(np.int64)
                # splitmix64-style mix of the id, then a uniform draw in [0, 1)
                h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
                is_test = (h.astype(np.float64) / float(1 << 53)) < test_fraction
                if not writers:
                    schema = table.schema.with_metadata(meta)
                    writers = [pq.ParquetWriter(p, schema) for p in paths]
                for i, mask in enumerate((~is_test, is_test)):
                    part = table.filter(pa.array(mask))
                    counts[i] += part.num_rows
                    writers[i].write_table(part.cast(writers[i].schema))
    finally:
        for w in writers:
            w.close()
    for name, n in zip(("train", "test"), counts, strict=True):
        if n == 0:
            raise ValueError(f"{path}: the {name} split is empty; use more rows or another test_fraction")
    return paths[0], paths[1]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_image_folder(path: str) -> bool:
    """A local directory with one subfolder per class (and no parquet files of its own)."""
    p = Path(path)
    return p.is_dir() and not any(p.glob("*.parquet")) and any(c.is_dir() for c in p.iterdir())


def image_folder_to_parquet(folder: str, out: str | os.PathLike, start_id: int = 0, rows_per_batch: int = 512) -> str:
    """Writes an image folder (`folder/<class name>/<file>.png|.jpg`) as tandem parquet: the encoded bytes as they
    are (decoded where the data is read: Ray Data's workers, or the local loader), string labels = the
    subfolder names, sample_id = start_id + position in sorted path order. Every file is opened once here so
    that an unreadable file or one of another size stops the run now, named."""
    root = Path(folder)
    classes = sorted(c.name for c in root.iterdir() if c.is_dir())
    files = [(f, c) for c in classes for f in sorted((root / c).iterdir()) if f.is_file()]
    if not files:
        raise ValueError(f"{folder}: no image files in its class subfolders {classes}")
    odd = [str(f) for f, _ in files if f.suffix.lower() not in _IMAGE_SUFFIXES]
    if odd:
        raise ValueError(f"{folder}: files must be PNG or JPEG images, got {odd[:3]}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("sample_id", pa.int64()), ("image", pa.binary()), ("label", pa.string())])
    shape = None
    with pq.ParquetWriter(out, schema) as writer:
        for i in range(0, len(files), rows_per_batch):
            chunk = files[i : i + rows_per_batch]
            blobs = []
            for f, _ in chunk:
                data = f.read_bytes()
                try:
                    got = decode_image(data).shape
                except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable"
                    raise ValueError(f"{f}: unreadable image ({type(e).__name__}: {e})") from None
                if shape is None:
                    shape = got
                elif got != shape:
                    raise ValueError(
                        f"{f}: images must all have shape {shape}, this one decodes to {got} (mixed shapes)"
                    )
                blobs.append(data)
            ids = np.arange(start_id + i, start_id + i + len(chunk), dtype=np.int64)
            writer.write_table(
                pa.table(
                    {"sample_id": ids, "image": pa.array(blobs, pa.binary()), "label": [c for _, c in chunk]},
                    schema=schema,
                )  # fmt: skip
            )
    return str(out)
