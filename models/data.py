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
encoded images (their decoded shape).

An image folder (a local directory or storage URI, one subfolder of PNG/JPEG files per class) is not copied: the
driver lists its file names and writes them as an *image index* (a small parquet of sample_id, path, label whose
metadata names the folder, the image shape, the class names and the normalization stats). Ray Data's
`read_images` reads and decodes the files on the workers (actors/weighted_stream.py); `load_tensors` reads them in
process. sample_id = position in the sorted listing (+ 2**40 for a separate test folder), label = the subfolder.

Validation reads the files batch by batch (the driver never holds the table) and stops, naming the file and
the row's sample_id, at: NaN/inf pixels, undecodable images, images of another size, null values, labels of two
types, duplicate ids.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

SHAPE_KEY = b"tandem.image_shape"
ROOT_KEY = b"tandem.image_root"
"""Index metadata: the image folder (path or URI) the index's paths are in."""
INDEX_KEY = b"tandem.image_index"
"""Index metadata: JSON {"class_names": [...], "mean": [...], "std": [...]}."""
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
    images_root: str | None = None
    """Set for an image folder: `path` is its image index, the images are files under this folder or URI."""


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
    p = Path(path).expanduser()  # `--data=~/x.parquet` reaches us unexpanded (no shell expands after '=')
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
    files = parquet_files(path)
    try:
        first = pq.read_schema(files[0])
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{files[0]}: not a readable parquet file ({e})") from None
    if ROOT_KEY in (first.metadata or {}):
        return _index_info(path, files, image_shape, class_names)
    scan = _Scan(path, image_shape)
    for f in files:
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
    # torch is imported here, not with the module: Ray Data's decode tasks import this module in every worker
    # process they start, and importing torch costs each of them ~1.7 s of CPU for nothing they use
    import torch

    if info.images_root is not None:
        from models import storage

        table = read_index(info.path)
        fs, _ = storage.resolve(info.images_root)
        images = np.empty((table.num_rows, *info.image_shape), np.float32)
        for i, p in enumerate(table.column("path").to_pylist()):
            with fs.open_input_file(p) as f:
                images[i] = decode_image(f.read())
        return (
            torch.from_numpy(table.column("sample_id").to_numpy().astype(np.int64)),
            torch.from_numpy(images),
            torch.from_numpy(encode_labels(table.column("label"), info.class_names)),
        )
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
    train_src, test_src = cfg.train_path, cfg.test_path
    if train_src is not None and is_image_folder(train_src):
        fraction = cfg.test_fraction if test_src is None else 0.0
        train_src, split_test, classes = index_image_folder(
            train_src, data_dir / "images.index.parquet", image_shape=cfg.image_shape, test_fraction=fraction
        )
        if test_src is None:
            test_src = split_test
        elif is_image_folder(test_src):
            test_src, _, _ = index_image_folder(
                test_src, data_dir / "images_test.index.parquet", image_shape=cfg.image_shape, start_id=1 << 40,
                class_names=classes,
            )  # fmt: skip
    elif test_src is not None and is_image_folder(test_src):
        raise ValueError(f"test_path {test_src} is an image folder, train_path {train_src} is not: use one kind")
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


def _test_mask(ids: np.ndarray, test_fraction: float) -> np.ndarray:
    """True for the held-out ids: a splitmix64-style mix of the id, then a uniform draw in [0, 1) (stable when rows
    are added or reordered)."""
    h = (ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)
    return (h.astype(np.float64) / float(1 << 53)) < test_fraction


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
                is_test = _test_mask(ids, test_fraction)
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
_STATS_SAMPLE = 256
"""Images decoded in full on the driver for the normalization stats (evenly spaced over the listing): the rest
of the folder is only header-checked there and decoded by Ray Data on the workers."""


def is_image_folder(path: str) -> bool:
    """A directory (local path or storage URI) with a subfolder per class and no parquet files of its own."""
    from pyarrow import fs as pafs

    from models import storage

    try:
        fs, base = storage.resolve(path)
        if fs.get_file_info(base).type != pafs.FileType.Directory:
            return False
        entries = fs.get_file_info(pafs.FileSelector(base))
    except (OSError, ValueError):
        return False
    if any(e.type == pafs.FileType.File and e.path.endswith(".parquet") for e in entries):
        return False
    return any(e.type == pafs.FileType.Directory for e in entries)


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(class names = the sorted subfolder names, [(file path in the folder's filesystem, class name)] sorted by
    class then file name). Only names are read."""
    from pyarrow import fs as pafs

    from models import storage

    fs, base = storage.resolve(root)
    base = base.rstrip("/")
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    classes, files = set(), []
    for e in entries:
        parts = e.path[len(base) :].strip("/").split("/")
        if e.type == pafs.FileType.Directory and len(parts) == 1:
            classes.add(parts[0])
        elif e.type == pafs.FileType.File and len(parts) == 2:
            files.append((e.path, parts[0]))
    files.sort(key=lambda f: (f[1], f[0]))
    if not files:
        raise ValueError(f"{root}: no image files in its class subfolders {sorted(classes)}")
    odd = [p for p, _ in files if not p.lower().endswith(_IMAGE_SUFFIXES)]
    if odd:
        raise ValueError(f"{root}: files must be PNG or JPEG images, got {odd[:3]}")
    return sorted(classes | {c for _, c in files}), files


def _channels(img) -> int:
    """Channels `decode_image` gives this PIL image (L 1, RGB 3, RGBA 4; others converted to RGB or RGBA)."""
    if img.mode in ("L", "RGB", "RGBA"):
        return {"L": 1, "RGB": 3, "RGBA": 4}[img.mode]
    return 4 if "A" in img.getbands() else 3


def index_image_folder(
    root: str,
    out: str | os.PathLike,
    *,
    image_shape: tuple[int, int, int] | None = None,
    test_fraction: float = 0.0,
    start_id: int = 0,
    class_names: list[str] | None = None,
) -> tuple[str, str | None, list[str]]:
    """Lists image folder `root` and writes its image index to `out` (with test_fraction > 0, the held-out ids by
    the same hash as `split_parquet` to `out`'s sibling `*_test.index.parquet`); returns (index, test index or
    None, class names). Every file's header is read (an unreadable file or one of another size or channel count
    stops the run here, named); the normalization stats come from up to 256 fully decoded files."""
    import io
    import json

    from PIL import Image

    from models import storage

    root = storage.local_path(root) or root.rstrip("/")  # absolute: workers may run in another directory
    classes, files = list_image_folder(root)
    if class_names is not None:
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"{root}: classes {unknown[:5]} are not among the training classes {class_names}")
        classes = list(class_names)
    fs, _ = storage.resolve(root)
    shape = None
    sample = set(np.linspace(0, len(files) - 1, min(_STATS_SAMPLE, len(files))).round().astype(int).tolist())
    sums = sq = 0.0
    pixels = 0
    for i, (path, _) in enumerate(files):
        try:
            with fs.open_input_file(path) as f:
                data = f.read() if i in sample else f.read(1 << 16)
                try:
                    img = Image.open(io.BytesIO(data))
                except Exception:  # a header past the first 64 KiB (a large JPEG EXIF block): read it all
                    data = data + f.read()
                    img = Image.open(io.BytesIO(data))
            with img:
                got = (_channels(img), img.size[1], img.size[0])
            if i in sample:
                pix = decode_image(data).astype(np.float64)
                sums, sq = sums + pix.sum((1, 2)), sq + np.square(pix).sum((1, 2))
                pixels += pix.shape[1] * pix.shape[2]
        except Exception as e:  # PIL raises many types for a bad file; all mean "unreadable"
            raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
        if shape is None:
            shape = got
            if image_shape is not None and tuple(image_shape) != shape:
                raise ValueError(f"{path}: image_shape {tuple(image_shape)} given, the images decode to {shape}")
        elif got != shape:
            raise ValueError(f"{path}: images must all have shape {shape}, this one decodes to {got} (mixed shapes)")
        if (i + 1) % 5000 == 0:
            print(f"tandem: checked {i + 1}/{len(files)} images in {root}", flush=True)
    mean = sums / pixels
    std = np.sqrt(np.maximum(sq / pixels - mean * mean, 0.0))
    meta = {
        ROOT_KEY: root.encode(),
        SHAPE_KEY: ",".join(map(str, shape)).encode(),
        INDEX_KEY: json.dumps({"class_names": classes, "mean": mean.tolist(), "std": std.tolist()}).encode(),
    }
    ids = np.arange(start_id, start_id + len(files), dtype=np.int64)
    table = pa.table(
        {"sample_id": ids, "path": [p for p, _ in files], "label": [c for _, c in files]}
    ).replace_schema_metadata(meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if test_fraction <= 0.0:
        pq.write_table(table, out)
        return str(out), None, classes
    is_test = _test_mask(ids, test_fraction)
    test_out = out.with_name(out.name.replace(".index.parquet", "") + "_test.index.parquet")
    for name, mask in (("train", ~is_test), ("test", is_test)):
        if not mask.any():
            raise ValueError(f"{root}: the {name} split is empty; use more images or another test_fraction")
    pq.write_table(table.filter(pa.array(~is_test)), out)
    pq.write_table(table.filter(pa.array(is_test)), test_out)
    return str(out), str(test_out), classes


def read_index(path: str) -> pa.Table:
    """(sample_id, path, label) of an image index (a file or a directory of them, local or a storage URI)."""
    from models import storage

    fs, p = storage.resolve(path)
    return pq.read_table(p, filesystem=fs, columns=["sample_id", "path", "label"])


def _index_info(
    path: str, files: list[str], image_shape: tuple[int, int, int] | None, class_names: tuple[str, ...] | None
) -> DatasetInfo:
    import json

    schema = pq.read_schema(files[0])
    meta = json.loads(schema.metadata[INDEX_KEY])
    shape = tuple(int(v) for v in schema.metadata[SHAPE_KEY].decode().split(","))
    if image_shape is not None and tuple(image_shape) != shape:
        raise ValueError(f"{path}: image_shape {tuple(image_shape)} given, the images decode to {shape}")
    names = tuple(meta["class_names"]) if class_names is None else tuple(class_names)
    table = read_index(path)
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    unknown = sorted(set(table.column("label").to_pylist()) - set(names))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not among the training classes {list(names)}")
    return DatasetInfo(
        path=path,
        num_rows=table.num_rows,
        image_shape=shape,
        num_classes=len(names),
        class_names=names,
        channel_mean=tuple(meta["mean"]),
        channel_std=tuple(meta["std"]),
        images_root=schema.metadata[ROOT_KEY].decode(),
    )
