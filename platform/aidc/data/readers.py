"""File readers with errors that name the file and the position or column, never a bare traceback.

Small raw files (the named datasets) are parsed here into numpy/pyarrow; large tabular inputs are
read by Ray Data itself (see sources.py), after `check_tabular_header` has looked at their first rows.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from aidc import storage
from aidc.errors import DataError

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_bytes(path: str | Path, allow_empty: bool = False) -> bytes:
    """A file's bytes, local or remote; an empty file is an error unless `allow_empty` (a row-per-file source
    rejects it as a row instead)."""
    fs, inner = storage.filesystem(str(path))
    try:
        with fs.open_input_stream(inner, compression=None) as f:  # we gunzip ourselves, to report truncation
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if not data and not allow_empty:
        raise DataError(f"{path}: the file is empty")
    return data


def gunzip(path: str | Path, data: bytes) -> bytes:
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError) as exc:
        if isinstance(exc, OSError) and "runcated" not in str(exc):
            raise DataError(f"{path}: corrupt gzip data: {exc}") from None
        # Find how far the stream got, for the message.
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        got = len(d.decompress(data))
        raise DataError(
            f"{path}: truncated gzip: the compressed stream ends after {len(data)} bytes "
            f"({got} bytes unpacked); download it again"
        ) from None
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt gzip data: {exc}") from None


def read_idx(path: str | Path, expect_dims: int | None = None) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array."""
    data = gunzip(path, read_bytes(path))
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in IDX_DTYPES:
        raise DataError(
            f"{path}: wrong IDX magic 0x{data[:4].hex()} at byte 0; expected 0x000008NN "
            "(0x00000801 labels, 0x00000803 images). Is this an MNIST-format file?"
        )
    if expect_dims is not None and ndim != expect_dims:
        raise DataError(f"{path}: IDX file has {ndim} dimensions at byte 3; expected {expect_dims}")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[dtype_code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header says {dims} ({expected} bytes of data) but the file has "
            f"{len(data) - header} bytes after the {header}-byte header"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    data = gunzip(path, read_bytes(path))
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}, byte {exc.start}: not valid {encoding} text") from None


def read_delimited(
    path: str | Path,
    columns: list[str],
    delimiter: str = ",",
    header: bool = True,
    types: dict[str, pa.DataType] | None = None,
) -> pa.Table:
    """A CSV/TSV file as a pyarrow table with exactly `columns`; bad quotes and rows are reported by line."""
    data = gunzip(path, read_bytes(path))
    read_opts = pacsv.ReadOptions(column_names=None if header else columns, block_size=1 << 26)
    parse_opts = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False,
                                    newlines_in_values=False)
    convert = pacsv.ConvertOptions(column_types=types or {}, strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read_opts, parse_options=parse_opts,
                               convert_options=convert)
    except pa.ArrowInvalid as exc:
        msg = str(exc)
        raise DataError(f"{path}: {msg.splitlines()[0]}{_line_hint(data, msg)}") from None
    _check_unterminated_quotes(path, data, table)
    if header and table.column_names != columns:
        missing = [c for c in columns if c not in table.column_names]
        extra = [c for c in table.column_names if c not in columns]
        if missing:
            raise DataError(
                f"{path}: wrong column names in the header: missing {missing}, found {table.column_names} "
                f"(unexpected {extra}); expected {columns}"
            )
        table = table.select(columns)
    return table


def _check_unterminated_quotes(path, data: bytes, table: pa.Table) -> None:
    """With newlines_in_values off, a value holding a newline can only come from a quote never closed."""
    import pyarrow.compute as pc

    for name in table.column_names:
        col = table.column(name)
        if not pa.types.is_string(col.type):
            continue
        hits = pc.match_substring(col, "\n")
        if pc.any(hits).as_py():
            value = col.filter(hits)[0].as_py()
            pos = data.find(b'"' + value.split("\n")[0].encode())
            line = data[:pos].count(b"\n") + 1 if pos >= 0 else "?"
            raise DataError(f"{path}: line {line}, column {name!r}: unterminated quote (a '\"' is never closed)")


def _line_hint(data: bytes, msg: str) -> str:
    """Arrow names the row content, not the line; find the line number of the offending row."""
    import re

    m = re.search(r"got \d+: (.*)$", msg.splitlines()[0]) or re.search(r"in CSV column #\d+: '(.*)'", msg)
    if not m:
        return ""
    snippet = m.group(1)[:40].encode()
    pos = data.find(snippet)
    newline = b"\n"
    return f" (line {data[:pos].count(newline) + 1})" if pos >= 0 else ""


def check_tabular_header(path: str, fmt: str, columns: list[str]) -> None:
    """Fail fast, naming the file, when a CSV/JSONL/Parquet input lacks the configured columns."""
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(path)
    ds_format = {"csv": "csv", "parquet": "parquet", "jsonl": "json"}[fmt]
    try:
        dataset = pads.dataset(inner, format=ds_format, filesystem=fs)
        files = dataset.files
        if not files:
            raise DataError(f"{path}: no {fmt} files found")
        first = files[0]
        if fs.get_file_info(first).size == 0:
            raise DataError(f"{first}: the file is empty")
        names = pads.dataset(first, format=ds_format, filesystem=fs).schema.names
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot read as {fmt}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{first}: missing column(s) {missing}; the file has {names}. Fix data.columns in the config")


def with_scheme(path: str, files: list[str]) -> list[str]:
    """input_files_fingerprint's file paths as readable URIs again (s3://, gs:// kept from `path`)."""
    scheme = path.split("://")[0] if storage.is_uri(path) else None
    return [f"{scheme}://{f}" if scheme else f for f in files]


def input_files_fingerprint(path: str) -> tuple[str, list[str]]:
    """Identity of a file input: every file's path, size and modification time (no full re-read)."""
    fs, inner = storage.filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File]
    elif info.type == pafs.FileType.File:
        infos = [info]
    else:
        raise DataError(f"data.path {path} not found")
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        h.update(f"{i.path}|{i.size}|{i.mtime_ns}\n".encode())
    return h.hexdigest(), [i.path for i in infos]
