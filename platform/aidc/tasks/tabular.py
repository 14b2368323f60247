"""Tabular classification from your own files: per-column standardization + category index maps -> MLP.

Rows stream through Ray Data (never all in memory); the fit runs as streaming aggregations over the
training split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from torch import nn

from aidc.config import ModelSchema
from aidc.data.transforms import apply_index_map, fit_index_map, fit_table_statistics, standardize
from aidc.models import MODELS
from aidc.errors import RequestError
from aidc.tasks.base import CLASSIFICATION_OUTPUTS, Classification, classification_tensors, tensor_spec


def _as_float(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values with NaN for missing, mask of present values that are not numbers)."""
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(series), dtype=bool)
    raw = pd.Series(series.to_numpy(dtype=object, na_value=None), dtype=object)
    num = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    present = raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    return num, np.isnan(num) & present


class MLPConfig(ModelSchema):
    arch: Literal["mlp"] = Field(..., description="Multi-layer perceptron for tabular data.")
    hidden: list[int] = Field([128, 64], min_length=1, description="Width of each hidden layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer.")
    embed_dim: int = Field(8, ge=1, description="Embedding width of each categorical column.")


class TabularClassification(Classification):
    name = "tabular_classification"
    model_schemas = (MLPConfig,)
    private_training = True
    input_column = "rows"
    quality_metric = "test_accuracy"
    onnx_export = True
    batch_outputs = CLASSIFICATION_OUTPUTS
    streaming = True

    def check_config(self, cfg) -> None:
        d = cfg.data
        if d.source == "files" and (not d.label or not (d.features or d.categorical)):
            raise ValueError("source: files needs label and features/categorical for tabular_classification; e.g. "
                             "features: [x1, x2], label: y")

    @staticmethod
    def columns(cfg) -> list[str]:
        return [*cfg.data.features, *cfg.data.categorical, cfg.data.label]

    def clean_batch(self, batch: pd.DataFrame, cfg) -> pd.DataFrame:
        """Coerce types, fill or reject nulls, reject bad labels; adds `reject_reason` (streaming, vectorised)."""
        d = cfg.data
        out = {}
        reason = np.full(len(batch), "", dtype=object)

        def reject(mask: np.ndarray, why: str) -> None:
            reason[mask & (reason == "")] = why

        for col in d.features:
            num, bad_type = _as_float(batch[col])
            missing = np.isnan(num) & ~bad_type
            if d.clean.nulls == "fill":
                num = np.where(missing, d.clean.fill_value, num)
            else:
                reject(missing, f"{col} is missing")
            reject(bad_type, f"{col} is not a number")
            reject(np.isinf(num), f"{col} is infinite")
            out[col] = num
        for col in d.categorical:
            values = batch[col].to_numpy(dtype=object, na_value=None)
            missing = pd.isna(values)
            if d.clean.nulls == "fill":
                values = np.where(missing, "<missing>", values)
            else:
                reject(missing, f"{col} is missing")
            out[col] = values.astype(str)
        label, bad = _as_float(batch[d.label])
        bad = bad | np.isnan(label) | (label < 0) | (label != np.round(label))
        reject(bad, f"{d.label} is not a non-negative integer class")
        out[d.label] = np.where(bad, -1, label).astype(np.int64)
        out["reject_reason"] = reason
        return pd.DataFrame(out)

    def fit(self, train_ds, cfg, meta: dict) -> dict:
        d = cfg.data
        numeric, distinct = fit_table_statistics(train_ds, d.features, [*d.categorical, d.label])
        cats = {c: fit_index_map(distinct[c]) for c in d.categorical}
        return {"numeric": numeric, "categorical": cats, "label": d.label,
                "classes": sorted(int(v) for v in distinct[d.label])}

    def features(self, meta: dict, state: dict) -> dict:
        return {"numeric": state["numeric"]["columns"], "categorical": list(state["categorical"]),
                "cardinalities": [len(v) for v in state["categorical"].values()],
                "num_classes": len(state["classes"])}

    def transform_batch(self, batch: dict, state: dict, training: bool = False) -> dict:
        num = state["numeric"]
        cols = num["columns"]
        n = len(batch[cols[0]] if cols else batch[next(iter(state["categorical"]))])
        x = standardize(np.stack([np.asarray(batch[c], np.float64) for c in cols], axis=1), num) if cols \
            else np.zeros((n, 0), np.float32)
        cat = np.stack([apply_index_map(np.asarray(batch[c]).astype(str), m) for c, m in state["categorical"].items()],
                       axis=1) if state["categorical"] else np.zeros((n, 0), np.int64)
        out = {"x": x, "cat": cat}
        if state["label"] in batch:
            out["y"] = apply_index_map(np.asarray(batch[state["label"]]), state["classes"]) - 1
        return out

    def build_model(self, model_cfg: dict, features: dict) -> nn.Module:
        cfg = {k: v for k, v in model_cfg.items() if k != "arch"}
        return MODELS["mlp"](len(features["numeric"]), features["cardinalities"], features["num_classes"], **cfg)

    def forward(self, model, batch):
        return model(batch["x"], batch["cat"])

    def planning_inputs(self, features: dict, batch: int) -> tuple:
        import torch

        cats = len(features.get("categorical", []))
        return (torch.zeros(batch, len(features["numeric"]), device="meta"),
                torch.zeros(batch, cats, device="meta", dtype=torch.long) if cats else None)

    def batch_inputs(self, features: dict) -> list[str]:
        return [*features["numeric"], *features["categorical"]]

    def parse_batch_columns(self, batch, features: dict, reasons: np.ndarray) -> dict:
        """Numeric columns as finite floats, categorical ones as text; a missing value rejects its row."""
        out = {}
        for c in features["numeric"]:
            v = pd.to_numeric(batch[c], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            reasons[(~np.isfinite(v)) & (reasons == "")] = f"{c} is missing or not a finite number"
            out[c] = v
        for c in features["categorical"]:
            v = batch[c].to_numpy(dtype=object)
            reasons[pd.isna(v) & (reasons == "")] = f"{c} is missing"
            out[c] = v.astype(str)
        keep = reasons == ""
        return {k: v[keep] for k, v in out.items()}

    def batch_prediction(self, prediction: dict, transform: dict) -> dict:
        return {**prediction, "class": transform["classes"][prediction["class"]]}  # the label value, as served

    def tensor_signature(self, features: dict) -> dict:
        """One input per column: numeric ones FP32, categorical ones BYTES (index-mapped server-side)."""
        return {"inputs": [*(tensor_spec(c, "FP32", [-1]) for c in features["numeric"]),
                           *(tensor_spec(c, "BYTES", [-1]) for c in features["categorical"])],
                "outputs": [tensor_spec("probabilities", "FP32", [-1, features["num_classes"]]),
                            tensor_spec("class", "INT64", [-1])]}  # class = the label value, not its index

    def check_tensor_inputs(self, inputs: dict[str, np.ndarray], features: dict,
                            parameters: dict | None = None) -> None:
        for c in features["numeric"]:
            if not np.isfinite(inputs[c]).all():
                raise RequestError(f"input {c!r} has NaN or infinite values; send finite numbers", field=c)

    def infer_tensors(self, model, batch, state):
        out = classification_tensors(self.forward(model, batch))
        out["class"] = np.asarray(state["classes"], dtype=np.int64)[out["class"]]
        return out
