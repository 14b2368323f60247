"""Image classification (digits, MNIST): standardized pixels -> CNN -> class probabilities."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aidc.data.transforms import fit_standardizer, standardize
from aidc.errors import RequestError
from aidc.models import MODELS
from aidc.tasks.base import Task


class ImageClassification(Task):
    name = "image_classification"
    feature_column = "image"

    def fit(self, train_ds) -> dict:
        return {"standardize": fit_standardizer(train_ds, self.feature_column)}

    def features(self, raw) -> dict:
        shape = list(raw.columns[self.feature_column].shape[1:])
        return {"image_shape": shape, "num_classes": raw.num_classes, "raw_range": list(raw.feature_range)}

    def transform_batch(self, batch: dict, state: dict) -> dict:
        x = standardize(batch[self.feature_column], state["standardize"])
        out = {"x": x[:, None, :, :]}  # (n, 1, H, W): one grey channel
        if "label" in batch:
            out["y"] = np.asarray(batch["label"], dtype=np.int64)
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = dict(model_cfg)
        arch = cfg.pop("arch")
        height, width = features["image_shape"]
        return MODELS[arch](in_channels=1, image_size=height, num_classes=features["num_classes"], **cfg)

    def loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, y)

    def eval_sums(self, outputs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        return {
            "loss_sum": float(F.cross_entropy(outputs.float(), y, reduction="sum")),
            "correct": float((outputs.argmax(dim=1) == y).sum()),
            "count": float(len(y)),
        }

    def metrics_from_sums(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        n = max(sums["count"], 1.0)
        return {f"{prefix}_loss": sums["loss_sum"] / n, f"{prefix}_accuracy": sums["correct"] / n}

    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        height, width = features["image_shape"]
        lo, hi = features["raw_range"]
        if not isinstance(instances, list):
            raise RequestError("'instances' must be a list of images", field="instances")
        if not instances:
            raise RequestError("'instances' is empty: send at least one image", field="instances")
        if len(instances) > max_batch:
            raise RequestError(
                f"batch of {len(instances)} images is over the limit of {max_batch}; split it into smaller requests",
                status=413, field="instances",
            )
        out = np.empty((len(instances), height, width), dtype=np.float32)
        for i, inst in enumerate(instances):
            where = f"instances[{i}]"
            flat = _flatten_numbers(inst, where, height, width)
            out[i] = np.asarray(flat, dtype=np.float32).reshape(height, width)
        bad = np.argwhere((out < lo) | (out > hi))
        if len(bad):
            i, r, c = bad[0]
            raise RequestError(
                f"instances[{i}] pixel ({r},{c}) = {out[i, r, c]:g} is outside the trained range {lo:g}..{hi:g}",
                field=f"instances[{i}]",
            )
        return out

    def predict(self, model: nn.Module, x: torch.Tensor) -> list[dict]:
        probs = torch.softmax(model(x).float(), dim=1).cpu().numpy()
        return [{"class": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]


def _flatten_numbers(inst: Any, where: str, height: int, width: int) -> list[float]:
    """Accept an image as H rows of W numbers or as H*W numbers; say exactly what is wrong otherwise."""
    expected = f"{height} rows of {width} numbers or a flat list of {height * width}"
    if not isinstance(inst, list):
        raise RequestError(f"{where} must be a list ({expected}), got {type(inst).__name__}", field=where)
    if inst and all(isinstance(row, list) for row in inst):
        if len(inst) != height or any(len(row) != width for row in inst):
            shape = f"{len(inst)}x{'/'.join(sorted({str(len(r)) for r in inst}))}"
            raise RequestError(f"{where} has shape {shape}; expected {expected}", field=where)
        flat = [v for row in inst for v in row]
    else:
        if len(inst) != height * width:
            raise RequestError(f"{where} has {len(inst)} values; expected {expected}", field=where)
        flat = inst
    for j, v in enumerate(flat):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"{where} value #{j} is {v!r}, not a number", field=where)
        if not math.isfinite(v):
            raise RequestError(f"{where} value #{j} is {v}; NaN and infinity are not allowed", field=where)
    return flat
