"""One place that turns a URI (local path, s3://, gs://) into a pyarrow filesystem, and finds the storage root."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

STORAGE_ENV = "AIDC_STORAGE"
DEFAULT_STORAGE = "~/.aidc"


def storage_root(override: str | None = None) -> str:
    """The root under which datasets, checkpoints and the model registry live.

    Order: an explicit setting, then `$AIDC_STORAGE`, then `~/.aidc`. Local paths are made
    absolute, because Ray jobs run in an unpacked working dir, not where you typed the command.
    """
    root = override or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE
    if is_uri(root):
        return root.rstrip("/")
    return str(Path(root).expanduser().resolve())


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(root: str, *parts: str) -> str:
    if is_uri(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an object-store URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    local = path[len("file://"):] if path.startswith("file://") else path
    return pafs.LocalFileSystem(), str(Path(local).expanduser().resolve())


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename)."""
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{inner}.tmp-{os.getpid()}"
        Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, inner)
        return
    with fs.open_output_stream(inner) as f:
        f.write(text.encode("utf-8"))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_dir(path: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner, recursive=True)
