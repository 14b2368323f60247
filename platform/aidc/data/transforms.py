"""Fitted transforms. Fitted on the training split only; their state lives in the dataset
manifest and travels with the registered model, so training, batch inference and serving
apply exactly the same function."""

from __future__ import annotations

import numpy as np


def fit_standardizer(train_ds, column: str) -> dict:
    """Scalar mean/std of every value of `column` over a Ray dataset (one streaming pass)."""

    def partial_sums(batch: dict) -> dict:
        x = batch[column].astype(np.float64)
        return {"n": [x.size], "s": [x.sum()], "ss": [np.square(x).sum()]}

    totals = train_ds.map_batches(partial_sums, batch_format="numpy").sum(["n", "s", "ss"])
    n, s, ss = totals["sum(n)"], totals["sum(s)"], totals["sum(ss)"]
    if not n:
        raise ValueError(f"cannot fit a standardizer on an empty training split (column {column!r})")
    mean = s / n
    std = float(np.sqrt(max(ss / n - mean**2, 0.0)))
    return {"kind": "standardize", "column": column, "mean": float(mean), "std": std if std > 1e-12 else 1.0}


def standardize(values: np.ndarray, state: dict) -> np.ndarray:
    return ((np.asarray(values, dtype=np.float32) - state["mean"]) / state["std"]).astype(np.float32)
