"""Fitted transforms. Fitted on the training split only; their state lives in the dataset manifest and
travels with the registered model, so training, batch inference and serving apply the same function."""

from __future__ import annotations

import numpy as np


def fit_scalar_standardizer(values: np.ndarray) -> dict:
    """One mean/std over every value (images: all pixels share a scale)."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std())
    return {"kind": "standardize", "mean": float(v.mean()), "std": std if std > 1e-12 else 1.0}


def fit_table_statistics(train_ds, numeric: list[str], distinct: list[str]) -> tuple[dict, dict[str, list]]:
    """One streaming pass over a Ray dataset: per-column mean/std of `numeric` columns (merged from
    per-block partials with Chan's parallel formula) and the distinct values of `distinct` columns."""
    import json

    import pandas as pd

    def partial(batch: pd.DataFrame) -> pd.DataFrame:
        row = {"n": [len(batch)]}
        for c in numeric:
            v = batch[c].to_numpy(dtype=np.float64)
            row[f"mean:{c}"], row[f"m2:{c}"] = [v.mean() if len(v) else 0.0], [((v - v.mean()) ** 2).sum() if len(v) else 0.0]
        for c in distinct:
            row[f"set:{c}"] = [json.dumps(sorted({x.item() if hasattr(x, "item") else x for x in batch[c].unique()}))]
        return pd.DataFrame(row)

    parts = train_ds.map_batches(partial, batch_format="pandas").to_pandas()
    means, stds = [], []
    for c in numeric:
        n, mean, m2 = 0, 0.0, 0.0
        for nb, mb, m2b in zip(parts["n"], parts[f"mean:{c}"], parts[f"m2:{c}"]):
            if not nb:
                continue
            delta, total = mb - mean, n + nb
            mean, m2, n = mean + delta * nb / total, m2 + m2b + delta**2 * n * nb / total, total
        std = float(np.sqrt(m2 / n)) if n else 1.0
        means.append(float(mean))
        stds.append(std if std > 1e-12 else 1.0)
    values = {c: sorted({v for cell in parts[f"set:{c}"] for v in json.loads(cell)}) for c in distinct}
    return {"kind": "standardize_columns", "columns": numeric, "mean": means, "std": stds}, values


def standardize(values: np.ndarray, state: dict) -> np.ndarray:
    """Apply a fitted standardizer: scalar state, or per-column state along the last axis."""
    mean, std = np.asarray(state["mean"], np.float32), np.asarray(state["std"], np.float32)
    return ((np.asarray(values, dtype=np.float32) - mean) / std).astype(np.float32)


def fit_index_map(values) -> list:
    """Sorted distinct training values; index i+1 in the list, 0 reserved for unseen values."""
    return sorted({v.item() if hasattr(v, "item") else v for v in values})


def apply_index_map(values: np.ndarray, mapping: list) -> np.ndarray:
    """Values -> 1-based indices; values never seen in training -> 0 (handled, never an error)."""
    keys = np.asarray(mapping)
    values = np.asarray(values)
    if len(keys) == 0:
        return np.zeros(len(values), dtype=np.int64)
    if keys.dtype.kind in "iuf" and values.dtype.kind in "iuf":
        pos = np.searchsorted(keys, values)
        pos_c = np.clip(pos, 0, len(keys) - 1)
        return np.where(keys[pos_c] == values, pos_c + 1, 0).astype(np.int64)
    lookup = {k: i + 1 for i, k in enumerate(mapping)}
    return np.fromiter((lookup.get(v.item() if hasattr(v, "item") else v, 0) for v in values), dtype=np.int64,
                       count=len(values))


def augment_images(x: np.ndarray, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """Random shift / rotation / flip of a (n, 1, H, W) batch, vectorised with torch's affine grid."""
    import torch
    from torch.nn import functional as F

    n = len(x)
    if n == 0:
        return x
    h, w = x.shape[-2:]
    angle = np.deg2rad(rng.uniform(-cfg["max_rotate"], cfg["max_rotate"], n))
    tx = rng.integers(-cfg["max_shift"], cfg["max_shift"] + 1, n) * 2.0 / w
    ty = rng.integers(-cfg["max_shift"], cfg["max_shift"] + 1, n) * 2.0 / h
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0) if cfg.get("flip") else np.ones(n)
    theta = np.zeros((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = np.cos(angle) * flip, -np.sin(angle), tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = np.sin(angle) * flip, np.cos(angle), ty
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    grid = F.affine_grid(torch.from_numpy(theta), list(t.shape), align_corners=False)
    # Pad with the image's background (its minimum: pixel 0 after standardization is negative).
    bg = t.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(t - bg, grid, align_corners=False, padding_mode="zeros") + bg
    return out.numpy()
