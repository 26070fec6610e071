"""Run storage addressed by one URI: a local path, `file://...`, `s3://bucket/prefix` or `gs://bucket/prefix`.

Everything a later step or another node reads (prepared data, Ray Train checkpoints, the Tune experiment, artifacts,
weight-store snapshots, reports) is written under a run's storage URI, through `pyarrow.fs`, so the same code runs
on one machine (a directory) and on a cluster that shares nothing but the network (an object store). Ray-free.

S3-compatible stores (MinIO, moto_server, Ceph) are reached through the endpoint in `AWS_ENDPOINT_URL`, the
variable boto and the AWS CLI read too; credentials come from the usual AWS_* variables or the instance profile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

SCHEMES = ("file", "s3", "gs", "gcs")


def is_remote(uri: str) -> bool:
    """True for an object-store URI (s3://, gs://); False for a local path or file:// URI."""
    check(uri)
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str | None:
    """The absolute local path of a local URI (path or file://), None for an object store."""
    check(uri)
    if uri.startswith("file://"):
        return os.path.abspath(uri[len("file://") :])
    if "://" in uri:
        return None
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str) -> str:
    """`uri` as every process reads the same place by it: a local path made absolute here (`~` expanded,
    relative to this process's directory), since a Ray worker runs elsewhere and expands nothing (the default
    `~/tandem-runs` reached the workers as that literal string); file:// and object-store URIs as they are."""
    check(uri)
    return uri if "://" in uri else local_path(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of `uri`; the path is what `pyarrow.fs` and Ray's `storage_filesystem` take."""
    local = local_path(uri)
    if local is not None:
        return pafs.LocalFileSystem(), local
    scheme, rest = uri.split("://", 1)
    path = rest.strip("/")
    if not path:
        raise ValueError(f"storage URI must name a bucket, got {uri!r}")
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            # an S3-compatible server: no region lookup against AWS, plain http where the endpoint says so
            fs = pafs.S3FileSystem(
                endpoint_override=endpoint,
                scheme="https" if endpoint.startswith("https") else "http",
                region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            )
            return fs, path
    fs, fs_path = pafs.FileSystem.from_uri(uri)
    return fs, fs_path.strip("/")


def join(uri: str, *parts: str) -> str:
    """`uri` with path components appended ('/'-separated for every scheme)."""
    check(uri)
    out = uri.rstrip("/")
    for p in parts:
        if not isinstance(p, str) or not p or p.startswith("/") or ".." in p.split("/"):
            raise ValueError(f"path parts must be relative, non-empty strings without '..', got {p!r}")
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def write_bytes(uri: str, data: bytes) -> str:
    """Writes one (small) file, creating its parent directories; returns `uri`."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file in storage: {uri}") from None


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def upload_dir(local: str | os.PathLike, uri: str) -> str:
    """Copies the local directory `local` to `uri` (files overwritten, nothing deleted); returns `uri`."""
    src = Path(local)
    if not src.is_dir():
        raise ValueError(f"local must be an existing directory, got {str(local)!r}")
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(src) == path:
        return uri  # already there
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def upload_file(local: str | os.PathLike, uri: str) -> str:
    """Copies one local file to `uri`; returns `uri`."""
    return write_bytes(uri, Path(local).read_bytes())


def download_dir(uri: str, local: str | os.PathLike | None = None) -> str:
    """A local directory holding the files under `uri`: the directory itself when `uri` is local and `local` is
    None, else a copy in `local` (default: a fresh temporary directory). What Serve replicas and Tune trials call
    before loading an artifact from storage."""
    here = local_path(uri)
    if here is not None and local is None:
        if not os.path.isdir(here):
            raise FileNotFoundError(f"no such directory: {uri}")
        return here
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no such directory in storage: {uri}")
    dest = Path(local) if local is not None else Path(tempfile.mkdtemp(prefix="tandem-dl-"))
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(dest)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """`download_dir(uri)` for the block: a copy it made (a remote `uri`) is removed when the block ends, the
    directory itself (a local `uri`) is left alone. For readers that load everything into memory, as a Serve
    replica loading an artifact: its copy goes as soon as the model is loaded, so none is left behind when the
    replica swaps artifacts or shuts down (Ray SIGKILLs replicas, so no cleanup at exit could be relied on)."""
    path = download_dir(uri)
    try:
        yield path
    finally:
        if path != local_path(uri):
            shutil.rmtree(path, ignore_errors=True)


def download_file(uri: str, local: str | os.PathLike | None = None) -> str:
    """A local path holding the file `uri` (itself when local and `local` is None)."""
    here = local_path(uri)
    if here is not None and local is None:
        if not os.path.isfile(here):
            raise FileNotFoundError(f"no such file: {uri}")
        return here
    dest = Path(local) if local is not None else Path(tempfile.mkdtemp(prefix="tandem-dl-")) / uri.rsplit("/", 1)[-1]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(read_bytes(uri))
    return str(dest)


def fs_uri(fs: pafs.FileSystem, path: str) -> str:
    """The URI of `path` inside `fs` (the inverse of `resolve`), e.g. for a checkpoint Ray returns as a path."""
    name = fs.type_name
    if name == "local":
        return path
    if name == "s3":
        return f"s3://{path}"
    if name == "gcs":
        return f"gs://{path}"
    raise ValueError(f"filesystem must be local, s3 or gcs, got {name!r}")


def check(uri: object) -> None:
    """Raises TypeError/ValueError unless `uri` is a local path or a URI of a supported scheme (no I/O)."""
    if not isinstance(uri, str) or not uri:
        raise TypeError(f"storage URI must be a non-empty string, got {uri!r}")
    if "://" in uri and uri.split("://", 1)[0] not in SCHEMES:
        raise ValueError(f"storage URI scheme must be one of {list(SCHEMES)} or a local path, got {uri!r}")
