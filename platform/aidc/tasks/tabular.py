"""Tabular classification from your own files: per-column standardization + category index maps -> MLP.

Rows stream through Ray Data (never all in memory); the fit runs as streaming aggregations over the
training split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn
from torch.nn import functional as F

from aidc.data.transforms import apply_index_map, fit_column_standardizer, fit_index_map, standardize
from aidc.models import MODELS
from aidc.tasks.base import Task, classification_metrics, classification_sums, row_hashes


class TabularClassification(Task):
    name = "tabular_classification"
    input_column = "rows"
    streaming = True

    @staticmethod
    def columns(cfg) -> list[str]:
        return [*cfg.data.features, *cfg.data.categorical, cfg.data.label]

    def clean_batch(self, batch: pd.DataFrame, cfg) -> pd.DataFrame:
        """Coerce types, fill or reject nulls, reject bad labels; adds `reject_reason` (streaming)."""
        d = cfg.data
        # Ray may hand Arrow-backed dtypes, whose NA handling differs from numpy's: start from plain objects.
        batch = pd.DataFrame({c: pd.Series(batch[c].to_numpy(dtype=object, na_value=None), dtype=object)
                              for c in batch.columns})
        reason = np.full(len(batch), "", dtype=object)
        for col in d.features:
            raw = batch[col]
            num = pd.to_numeric(raw, errors="coerce").astype("float64")
            bad_type = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
            if d.clean.nulls == "fill":
                num = num.where(~num.isna() | bad_type, d.clean.fill_value)
            reason[(num.isna() & ~bad_type).to_numpy() & (reason == "")] = f"{col} is missing"
            reason[bad_type.to_numpy() & (reason == "")] = f"{col} is not a number"
            reason[np.isinf(num.fillna(0.0).to_numpy(dtype=np.float64)) & (reason == "")] = f"{col} is infinite"
            batch[col] = num.astype("float64")
        for col in d.categorical:
            missing = batch[col].isna().to_numpy()
            if d.clean.nulls == "fill":
                batch[col] = batch[col].astype(object).where(~missing, "<missing>")
            else:
                reason[missing & (reason == "")] = f"{col} is missing"
            batch[col] = batch[col].astype(str)
        label = pd.to_numeric(batch[d.label], errors="coerce").astype("float64")
        bad_label = (label.isna() | (label < 0) | (label != label.round())).to_numpy()
        reason[bad_label & (reason == "")] = f"{d.label} is not a non-negative integer class"
        batch[d.label] = label.fillna(-1).astype("int64")
        batch["reject_reason"] = reason
        return batch

    def content_key(self, table) -> np.ndarray:
        return row_hashes(*[np.asarray(v) for v in table.values()])

    def fit(self, train_ds, cfg, meta: dict) -> dict:
        d = cfg.data
        cats = {c: fit_index_map(train_ds.unique(c)) for c in d.categorical}
        classes = sorted(int(v) for v in train_ds.unique(d.label))
        return {"numeric": fit_column_standardizer(train_ds, d.features), "categorical": cats,
                "label": d.label, "classes": classes}

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

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs, batch["y"])

    def eval_sums(self, outputs, batch):
        return classification_sums(outputs, batch["y"], outputs.shape[1])

    def metrics_from_sums(self, sums, prefix):
        return classification_metrics(sums, prefix, sum(1 for k in sums if k.startswith("tp")))
