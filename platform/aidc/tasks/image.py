"""Image classification (digits, MNIST): standardized pixels (+ augmentation when training) -> CNN."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
from pydantic import Field
import torch
from torch import nn

from aidc.config import ModelSchema, refuse_private
from aidc.data.transforms import augment_images, fit_scalar_standardizer, standardize
from aidc.errors import RequestError
from aidc.models import MODELS
from aidc.tasks.base import (CLASSIFICATION_OUTPUTS, Classification, Table, classification_tensors, jsonable, row_hashes,
                             tensor_spec)


class CNNConfig(ModelSchema):
    arch: Literal["cnn"] = Field("cnn", description="Convolutional image classifier.")
    channels: list[int] = Field([32, 64], min_length=1, description="Output channels of each conv block.")
    hidden: int = Field(128, ge=1, description="Width of the hidden fully connected layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier head.")
    norm: Literal["batch", "group"] = Field(
        "batch", description="Normalization after each conv: batch (BatchNorm) or group (GroupNorm; per-sample, "
        "what train.privacy needs).")


class ImageClassification(Classification):
    name = "image_classification"
    model_schemas = (CNNConfig,)
    private_training = True
    input_column = "image"
    quality_metric = "test_accuracy"
    onnx_export = True
    batch_outputs = CLASSIFICATION_OUTPUTS

    def check_config(self, cfg) -> None:
        if cfg.train.privacy is not None and cfg.model.norm == "batch":
            refuse_private("needs per-sample normalization: BatchNorm mixes a batch's samples. Fix: model.norm: group")

    def validate(self, table: Table, cfg, meta: dict) -> np.ndarray:
        x = table["image"].reshape(len(table["image"]), -1).astype(np.float64)
        y = table["label"]
        lo, hi = meta["raw_range"]
        reason = np.full(len(y), "", dtype=object)
        reason[(y < 0) | (y >= meta["num_classes"])] = f"label outside 0..{meta['num_classes'] - 1}"
        reason[((x < lo) | (x > hi)).any(axis=1)] = f"pixel value outside {lo:g}..{hi:g}"
        reason[~np.isfinite(x).all(axis=1)] = "pixel is NaN or infinite"
        return reason

    def content_key(self, table: Table) -> np.ndarray:
        return row_hashes(table["image"])

    def fit(self, train: Table, cfg, meta: dict) -> dict:
        return {"standardize": fit_scalar_standardizer(train["image"]), "augment": cfg.data.augment.model_dump()}

    def features(self, meta: dict, state: dict) -> dict:
        return {"image_shape": list(meta["image_shape"]), "num_classes": meta["num_classes"],
                "raw_range": list(meta["raw_range"])}

    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        x = standardize(batch["image"], state["standardize"])[:, None, :, :]  # (n, 1, H, W)
        if training and state["augment"]["enabled"]:
            x = augment_images(x, state["augment"], np.random.default_rng())
        out = {"x": x}
        if "label" in batch:
            out["y"] = np.asarray(batch["label"], dtype=np.int64)
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
        return MODELS["cnn"](in_channels=1, image_size=features["image_shape"][0],
                             num_classes=features["num_classes"], **cfg)

    def attack_space(self, model: nn.Module, features: dict, transform: dict):
        """Pixels scaled to 0..1 over the raw range (an eps of 0.1 is a tenth of 0..255 for MNIST), standardized
        inside the module as the served model's inputs are."""
        lo, hi = features["raw_range"]
        return _UnitPixels(model, lo, hi, transform["standardize"]), \
            lambda images: ((np.asarray(images, np.float32) - lo) / (hi - lo))[:, None, :, :]

    def planning_features(self, cfg) -> dict | None:
        if cfg.data.source == "mnist":
            return {"image_shape": [28, 28], "num_classes": 10}
        if cfg.data.source == "digits":
            from aidc.data.sources import load_digits

            return self.features(load_digits(cfg).meta, {})
        return None

    def planning_inputs(self, features: dict, batch: int) -> tuple:
        return (torch.zeros(batch, 1, *features["image_shape"], device="meta"),)  # (n, 1, H, W)

    def batch_instance(self, row: dict) -> Any:
        v = jsonable(row[self.input_column])
        if isinstance(v, str):  # CSV cells hold images as JSON arrays
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if isinstance(v, list) and v and isinstance(v[0], np.ndarray):
            v = [x.tolist() for x in v]
        return v

    def parse_instances(self, instances: Any, features: dict, max_batch: int) -> np.ndarray:
        height, width = features["image_shape"]
        lo, hi = features["raw_range"]
        check_batch(instances, max_batch, "images")
        out = np.empty((len(instances), height, width), dtype=np.float32)
        for i, inst in enumerate(instances):
            out[i] = np.asarray(_flatten_numbers(inst, f"instances[{i}]", height, width), np.float32).reshape(
                height, width)
        bad = np.argwhere((out < lo) | (out > hi))
        if len(bad):
            i, r, c = bad[0]
            raise RequestError(
                f"instances[{i}] pixel ({r},{c}) = {out[i, r, c]:g} is outside the trained range {lo:g}..{hi:g}",
                field=f"instances[{i}]",
            )
        return out

    def predict(self, model: nn.Module, batch: dict) -> list[dict]:
        probs = torch.softmax(model(batch["x"]).float(), dim=1).cpu().numpy()
        return [{"class": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]} for p in probs]

    def tensor_signature(self, features: dict) -> dict:
        height, width = features["image_shape"]
        return {"inputs": [tensor_spec("image", "FP32", [-1, height, width])],
                "outputs": [tensor_spec("probabilities", "FP32", [-1, features["num_classes"]]),
                            tensor_spec("class", "INT64", [-1])]}

    def check_tensor_inputs(self, inputs: dict[str, np.ndarray], features: dict,
                            parameters: dict | None = None) -> None:
        lo, hi = features["raw_range"]
        x = inputs["image"]
        bad = np.argwhere(~np.isfinite(x) | (x < lo) | (x > hi))
        if len(bad):
            i, r, c = bad[0]
            raise RequestError(f"image[{i}] pixel ({r},{c}) = {x[i, r, c]:g} is outside the trained range "
                               f"{lo:g}..{hi:g}", field="image")

    def infer_tensors(self, model: nn.Module, batch: dict, state: dict) -> dict[str, np.ndarray]:
        return classification_tensors(model(batch["x"]))


def check_batch(instances: Any, max_batch: int, what: str) -> None:
    if not isinstance(instances, list):
        raise RequestError(f"'instances' must be a list of {what}", field="instances")
    if not instances:
        raise RequestError(f"'instances' is empty: send at least one of the {what}", field="instances")
    if len(instances) > max_batch:
        raise RequestError(
            f"batch of {len(instances)} {what} is over the limit of {max_batch}; split it into smaller requests",
            status=413, field="instances",
        )


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


class _UnitPixels(nn.Module):
    """The classifier on pixels scaled to 0..1: back to the raw range, standardized as in training."""

    def __init__(self, model: nn.Module, lo: float, hi: float, standardizer: dict):
        super().__init__()
        self.model, self.lo, self.span = model, float(lo), float(hi - lo)
        self.mean, self.std = float(standardizer["mean"]), float(standardizer["std"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((self.lo + x * self.span - self.mean) / self.std)
