"""ONNX export of tensor models (CNN, MLP, text classifier, recommender), checked against onnxruntime.

The graph takes the model-ready tensors that `Task.transform_batch` produces (pixels standardized, ids
mapped, text tokenized) and returns the model's raw output (logits, or ratings before clamping); the
fitted preprocessing travels beside it in an edge bundle (aidc.export.edge). Exported with PyTorch's
TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and handles these small models;
torch 2.13 warns that it is deprecated in favour of the torch.export-based one.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aidc.errors import RegistryError

logger = logging.getLogger(__name__)

OPSET = 17
OUTPUT = "output"


class _TaskGraph(nn.Module):
    """Positional tensors -> the task's forward over the named batch (what the ONNX graph computes)."""

    def __init__(self, task, model: nn.Module, names: list[str]):
        super().__init__()
        self.task, self.model, self.names = task, model, names

    def forward(self, *tensors):
        return self.task.forward(self.model, dict(zip(self.names, tensors)))


def _no_op(module, args):
    return None


def model_inputs(loaded, rows: dict) -> dict[str, np.ndarray]:
    """Model-ready input arrays (no labels) of raw or stored rows, through the training-time transform."""
    batch = loaded.task.transform_batch(rows, loaded.spec["transform"])
    return {k: np.ascontiguousarray(v) for k, v in batch.items() if k != "y"}


def export_onnx(loaded, example_rows: dict, path: Path) -> list[str]:
    """Write `loaded`'s model as ONNX at `path` (batch dimension dynamic); returns the input names."""
    task = loaded.task
    if not task.onnx_export:
        from aidc.tasks import TASKS

        covered = ", ".join(name for name, t in TASKS.items() if t.onnx_export)
        hint = f" ({task.export_hint})" if task.export_hint else ""
        raise RegistryError(f"ONNX export covers {covered}; this is a {task.name} model{hint}")
    if loaded.spec.get("quantization"):
        raise RegistryError("this is an int8 version (PyTorch dynamic quantization); export its float source "
                            f"version ({loaded.spec.get('compression', {}).get('source')}) instead")
    model = loaded.model.cpu().eval()
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            mod.register_forward_pre_hook(_no_op)  # keep the exportable path, not the fused fast path
    inputs = model_inputs(loaded, {k: v[:8] for k, v in example_rows.items()})
    names = list(inputs)
    graph = _TaskGraph(loaded.task, model, names).eval()
    axes = {n: {0: "batch"} for n in [*names, OUTPUT]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(graph, tuple(torch.from_numpy(inputs[n]) for n in names), str(path), dynamo=False,
                          input_names=names, output_names=[OUTPUT], dynamic_axes=axes, opset_version=OPSET)
    return names


def onnx_parity(loaded, path: Path, rows: dict, batch_size: int = 256) -> dict:
    """Run the ONNX file with onnxruntime and the torch model on the same rows; the largest difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    n = len(next(iter(rows.values())))
    worst = 0.0
    for i in range(0, n, batch_size):
        inputs = model_inputs(loaded, {k: v[i:i + batch_size] for k, v in rows.items()})
        with torch.no_grad():
            ref = loaded.task.forward(loaded.model, {k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        got = session.run([OUTPUT], inputs)[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    return {"rows": n, "max_abs_diff": worst}
