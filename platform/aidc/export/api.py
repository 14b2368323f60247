"""`aidc model export REF --format onnx|edge|hf --out DIR`: fetch through the registry, write, check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aidc.errors import RegistryError

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "edge", "hf")


def export_model(ref: str, fmt: str, out: str | Path, uri: str | None = None, root: str | None = None) -> dict:
    """Export `ref`; returns what was written and its parity figures."""
    from aidc import storage
    from aidc.compress.compare import test_rows
    from aidc.registry import MANIFEST, WEIGHTS, tracking_uri
    from aidc.tasks.loaded import loaded_on_cpu

    if fmt not in FORMATS:
        raise RegistryError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    root = storage.storage_root(root)
    uri = tracking_uri(uri, root)
    with loaded_on_cpu(ref, uri) as (loaded, directory):  # registry fetch: signature and manifest checks
        weights_sha256 = json.loads((directory / MANIFEST).read_text())[WEIGHTS]
    out = Path(out)
    source = {"ref": ref, "name": loaded.name, "version": loaded.version, "weights_sha256": weights_sha256}
    if fmt == "hf":
        from aidc.hf.gpt2 import export_hf

        export_hf(loaded.model.state_dict(), loaded.spec, out)
        return {"format": fmt, "out": str(out), **source}
    rows = test_rows(loaded.spec, root)
    if fmt == "edge":
        from aidc.export.edge import write_edge_bundle

        parity = write_edge_bundle(loaded, rows, out, source)
    else:
        from aidc.export.onnx_export import export_onnx, onnx_parity

        export_onnx(loaded, rows, out / "model.onnx")
        parity = onnx_parity(loaded, out / "model.onnx", rows)
    return {"format": fmt, "out": str(out), **source, **parity}
