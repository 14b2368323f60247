"""Row accounting: every rejected row is kept with its reason and counted, nothing silently lost."""

from __future__ import annotations

import numpy as np

REASON = "reject_reason"


def mark_duplicates(keys: np.ndarray, ids: np.ndarray, reasons: np.ndarray) -> np.ndarray:
    """Reject later copies of a row (by content key) among rows not already rejected; keep the first id."""
    out = reasons.copy()
    first: dict = {}
    for i in np.argsort(ids, kind="stable"):
        if out[i]:
            continue
        k = keys[i]
        if k in first:
            out[i] = f"duplicate of row {first[k]}"
        else:
            first[k] = ids[i]
    return out


def reason_counts(reasons: np.ndarray) -> dict[str, int]:
    """Counts per reason; duplicates are one reason however many originals they copy."""
    r = np.array(["duplicate row" if str(x).startswith("duplicate of row") else str(x) for x in reasons if x],
                 dtype=object)
    if not len(r):
        return {}
    values, counts = np.unique(r.astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
