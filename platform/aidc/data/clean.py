"""Row validation: every rejected row is kept with its reason and counted, nothing silently lost."""

from __future__ import annotations

import numpy as np

REASON = "reject_reason"


def validate_features(batch: dict, column: str, lo: float, hi: float, num_classes: int) -> dict:
    """Add a `reject_reason` column: '' for good rows, else why the row cannot be used."""
    x = batch[column].reshape(len(batch[column]), -1).astype(np.float64)
    y = batch["label"]
    reason = np.full(len(y), "", dtype=object)
    reason[(y < 0) | (y >= num_classes)] = f"label outside 0..{num_classes - 1}"
    reason[((x < lo) | (x > hi)).any(axis=1)] = f"{column} value outside {lo:g}..{hi:g}"
    reason[~np.isfinite(x).all(axis=1)] = f"{column} has NaN or infinite values"
    return {**batch, REASON: reason}


def reason_counts(reasons: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(reasons[reasons != ""].astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
