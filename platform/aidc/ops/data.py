"""Data accounting metrics: rows read / kept / rejected by reason per dataset, and preprocessing rows/s.

`@instrument_preprocess` on the preprocessing entry records a built (not reused) dataset version's
manifest counts through the cluster's metrics actor (a preprocessing job exits right after).
"""

from __future__ import annotations

import functools
import time

from aidc.ops.durable import durable_inc, durable_set


def record_dataset(dataset: str, counts: dict, seconds: float) -> None:
    """One dataset version's accounting (manifest `counts`) and how long it took to build."""
    durable_inc("aidc_data_rows_read_total", counts["read"], dataset=dataset)
    durable_inc("aidc_data_rows_kept_total", counts["kept"], dataset=dataset)
    for reason, n in counts.get("rejected_by_reason", {}).items():
        durable_inc("aidc_data_rows_rejected_total", n, dataset=dataset, reason=reason)
    durable_set("aidc_data_rows_per_second", counts["read"] / max(seconds, 1e-9), dataset=dataset)


def instrument_preprocess(preprocess):
    """Decorator of `preprocess(cfg, ...) -> (DatasetVersion, reused)`."""

    @functools.wraps(preprocess)
    def wrapper(cfg, *args, **kwargs):
        start = time.perf_counter()
        dv, reused = preprocess(cfg, *args, **kwargs)
        if not reused:
            record_dataset(cfg.name, dv.manifest()["counts"], time.perf_counter() - start)
        return dv, reused

    return wrapper
