"""Edge bundle: the ONNX model, the fitted preprocessing state and a runner needing only numpy + onnxruntime.

    <out>/model.onnx       the network (aidc.export.onnx_export), batch dimension dynamic
    <out>/preprocess.json  task, features and the transform fitted at preprocessing (as in model.json)
    <out>/run.py           aidc/export/edge_runner.py: the same transform in numpy, then onnxruntime
    <out>/SOURCE.json      which registered version it came from, its weights' sha256, the ONNX parity check
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from aidc.errors import RegistryError
from aidc.export.onnx_export import export_onnx, onnx_parity

RUNNER = Path(__file__).with_name("edge_runner.py")


def write_edge_bundle(loaded, rows: dict, out: Path, source: dict) -> dict:
    tok = loaded.spec["transform"].get("tokenizer")
    if tok and tok["kind"] != "char":
        raise RegistryError("the numpy-only edge runner has no BPE tokenizer; export this text model with "
                            "--format onnx and tokenize with the `tokenizers` package, or train it with "
                            "data.text.tokenizer: char")
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(loaded, rows, out / "model.onnx")
    parity = onnx_parity(loaded, out / "model.onnx", rows)
    meta = {**{k: loaded.spec[k] for k in ("task", "features", "transform")},
            **loaded.task.edge_extras(loaded.spec["transform"])}
    (out / "preprocess.json").write_text(json.dumps(meta))
    shutil.copyfile(RUNNER, out / "run.py")
    (out / "SOURCE.json").write_text(json.dumps({**source, "onnx_parity": parity}, indent=2))
    return parity
