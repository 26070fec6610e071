"""models/storage.py: one URI layer over pyarrow.fs for local paths, file:// and a real S3-compatible server."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from models import storage
from tests._moto import moto_server, patched_env


def _tree(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 4)
    return {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 4}


def _read_tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("form", ["path", "file"])
def test_local_round_trip(tmp_path, form):
    files = _tree(tmp_path / "src")
    base = str(tmp_path / "store") if form == "path" else f"file://{tmp_path / 'store'}"
    fs, path = storage.resolve(base)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "store")
    dest = storage.join(base, "run-1", "artifact")
    assert storage.upload_dir(tmp_path / "src", dest) == dest
    assert storage.is_dir(dest) and not storage.is_remote(dest)
    # a local URI is read in place; with `local` it is copied
    assert storage.download_dir(dest) == str(tmp_path / "store" / "run-1" / "artifact")
    copy = storage.download_dir(dest, tmp_path / "copy")
    assert _read_tree(tmp_path / "copy") == files and copy == str(tmp_path / "copy")
    storage.write_text(storage.join(base, "run-1", "report.json"), '{"ok": 1}')
    assert storage.read_text(storage.join(base, "run-1", "report.json")) == '{"ok": 1}'
    assert not storage.exists(storage.join(base, "run-2"))


def test_local_paths_become_absolute_for_every_process(tmp_path, monkeypatch):
    """A run's storage as a Ray worker elsewhere must read it: `~` expanded and relative paths resolved here;
    URIs unchanged. RunConfig applies it (the default `~/tandem-runs` reached the workers literally)."""
    from tandem.job import RunConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("~/tandem-runs") == str(tmp_path / "home" / "tandem-runs")
    assert storage.absolute("runs/a") == str(tmp_path / "runs" / "a")
    for uri in ("s3://bucket/p", "gs://b/p", "file:///x/y"):
        assert storage.absolute(uri) == uri
    assert RunConfig().storage == str(tmp_path / "home" / "tandem-runs")
    with pytest.raises(TypeError, match="non-empty string"):
        storage.absolute("")


def test_bad_uris(tmp_path):
    with pytest.raises(ValueError, match="scheme must be one of"):
        storage.resolve("ftp://host/x")
    with pytest.raises(TypeError, match="non-empty string"):
        storage.resolve("")
    with pytest.raises(ValueError, match="must be relative"):
        storage.join(str(tmp_path), "../escape")
    with pytest.raises(ValueError, match="must name a bucket"):
        storage.resolve("s3://")
    with pytest.raises(FileNotFoundError, match="no such file in storage"):
        storage.read_bytes(str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        storage.download_dir(str(tmp_path / "missing"))


def test_s3_round_trip_on_moto_server(tmp_path):
    files = _tree(tmp_path / "src")
    with moto_server(bucket="tandem-ci") as env, patched_env(env):
        base = "s3://tandem-ci/runs"
        fs, path = storage.resolve(base)
        assert fs.type_name == "s3" and path == "tandem-ci/runs"
        assert storage.is_remote(base) and storage.local_path(base) is None
        dest = storage.join(base, "r1", "artifact")
        storage.upload_dir(tmp_path / "src", dest)
        names = {i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file}
        assert names == {"tandem-ci/runs/r1/artifact/a.txt", "tandem-ci/runs/r1/artifact/sub/b.bin"}
        local = storage.download_dir(dest)
        assert _read_tree(__import__("pathlib").Path(local)) == files
        # a replica's copy of an artifact lives while it loads, then goes (swap or shutdown leave none behind)
        with storage.local_copy(dest) as copy:
            assert copy != local and _read_tree(__import__("pathlib").Path(copy)) == files
        assert not os.path.exists(copy)
        with storage.local_copy(str(tmp_path / "src")) as here:  # a local directory is read in place, and kept
            assert here == str(tmp_path / "src")
        assert _read_tree(tmp_path / "src") == files
        storage.write_bytes(storage.join(base, "r1", "w.npz"), b"\x00\x01")
        assert storage.read_bytes(storage.join(base, "r1", "w.npz")) == b"\x00\x01"
        assert storage.fs_uri(fs, "tandem-ci/runs/r1") == "s3://tandem-ci/runs/r1"
        assert storage.exists(dest) and not storage.exists(storage.join(base, "nope"))
