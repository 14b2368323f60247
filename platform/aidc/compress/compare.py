"""Side-by-side figures of registered versions: size on disk, parameters, CPU latency, test-split metric."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

EVAL_BATCH = 256


def test_rows(spec: dict, root: str) -> dict:
    from aidc.data.dataset import open_dataset

    if not spec.get("dataset"):
        from aidc.errors import DataError

        raise DataError("this version records no dataset (imported?): no test split to score it on")
    name, _, version = spec["dataset"].partition("@")
    return open_dataset(root, name, version or None).read_numpy("test")


def _batches(task, state: dict, rows: dict, size: int):
    n = len(next(iter(rows.values())))
    for i in range(0, n, size):
        batch = task.transform_batch({k: v[i:i + size] for k, v in rows.items()}, state)
        yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def test_metrics(loaded, rows: dict) -> dict:
    """The task's metrics of a loaded model on the test split (computed in this process)."""
    task, sums = loaded.task, {}
    with torch.inference_mode():
        for batch in _batches(task, loaded.spec["transform"], rows, EVAL_BATCH):
            for k, v in task.eval_sums(task.forward(loaded.model, batch), batch).items():
                sums[k] = sums.get(k, 0.0) + v
    return task.metrics_from_sums(sums, "test")


def _latency_batch(loaded, rows: dict, batch_size: int) -> dict:
    n = len(next(iter(rows.values())))
    idx = np.arange(batch_size) % n
    return next(_batches(loaded.task, loaded.spec["transform"], {k: v[idx] for k, v in rows.items()}, batch_size))


def latency_p50_ms(models: list, rows: list[dict], batch_size: int, runs: int = 40) -> list[float]:
    """Median forward latency of each model, measured interleaved (one call of each per round), so load
    from other processes on a shared machine hits every model alike."""
    batches = [_latency_batch(m, r, batch_size) for m, r in zip(models, rows)]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(runs + 3):
            for j, (m, batch) in enumerate(zip(models, batches)):
                t = time.perf_counter()
                m.task.forward(m.model, batch)
                if i >= 3:  # warm-up first
                    times[j].append((time.perf_counter() - t) * 1000)
    return [statistics.median(t) for t in times]


def figures(loaded, directory: Path, rows: dict) -> dict:
    """Size, parameters and the task's quality metric on the test split of one loaded version."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    quality = loaded.task.quality_metric
    qlayers = [m for m in loaded.model.modules() if isinstance(m, QLinear)]  # packed: not in parameters()
    qtensors = [m.weight().int_repr() for m in qlayers] + [m.bias() for m in qlayers if m.bias() is not None]
    tensors = [*loaded.model.parameters(), *qtensors]
    return {
        "version": f"{loaded.name}/{loaded.version}",
        "compression": (loaded.spec.get("compression") or {}).get("method", "-"),
        "size_bytes": sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file()),
        "parameters": sum(t.numel() for t in tensors),
        "nonzero_parameters": sum(int((t != 0).sum()) for t in tensors),
        "metric": quality, "value": test_metrics(loaded, rows)[quality],
        # eval.robustness, as recorded when the version was registered (aidc.tasks.robustness)
        "robustness": {k: v for k, v in loaded.spec.get("metrics", {}).items() if k.startswith("robust_accuracy_")},
    }


def compare(refs: list[str], uri: str, root: str) -> list[dict]:
    """Figures of each version, with CPU latency p50 at batch 1 and 32 measured side by side."""
    from aidc.tasks.loaded import loaded_on_cpu

    with contextlib.ExitStack() as stack:
        loaded = [stack.enter_context(loaded_on_cpu(ref, uri)) for ref in refs]
        rows = [test_rows(m.spec, root) for m, _ in loaded]
        out = [figures(m, d, r) for (m, d), r in zip(loaded, rows)]  # (reads each folder's sizes)
    for bs in (1, 32):
        for f, ms in zip(out, latency_p50_ms([m for m, _ in loaded], rows, bs)):
            f[f"latency_p50_ms_b{bs}"] = ms
    return out


def format_comparison(fa: dict, fb: dict) -> list[str]:
    """Two versions side by side; the last column is b relative to a."""
    def ratio(x, y):
        return f"{y / x:.2f}x" if x else "-"

    rows = [("version", fa["version"], fb["version"], ""),
            ("compression", fa["compression"], fb["compression"], ""),
            ("size on disk (KiB)", f"{fa['size_bytes'] / 1024:.1f}", f"{fb['size_bytes'] / 1024:.1f}",
             ratio(fa["size_bytes"], fb["size_bytes"])),
            ("parameters", f"{fa['parameters']:,}", f"{fb['parameters']:,}", ratio(fa["parameters"], fb["parameters"])),
            ("nonzero parameters", f"{fa['nonzero_parameters']:,}", f"{fb['nonzero_parameters']:,}",
             ratio(fa["nonzero_parameters"], fb["nonzero_parameters"])),
            ("latency p50 batch 1 (ms)", f"{fa['latency_p50_ms_b1']:.3f}", f"{fb['latency_p50_ms_b1']:.3f}",
             ratio(fb["latency_p50_ms_b1"], fa["latency_p50_ms_b1"]) + " speed"),
            ("latency p50 batch 32 (ms)", f"{fa['latency_p50_ms_b32']:.3f}", f"{fb['latency_p50_ms_b32']:.3f}",
             ratio(fb["latency_p50_ms_b32"], fa["latency_p50_ms_b32"]) + " speed"),
            (f"{fa['metric']} (test split)", f"{fa['value']:.4f}", f"{fb['value']:.4f}",
             f"{fb['value'] - fa['value']:+.4f}")]
    ra, rb = fa.get("robustness", {}), fb.get("robustness", {})
    for key in sorted({*ra, *rb}, key=lambda k: (float(k.rpartition("_eps")[2]), k)):
        a, b = ra.get(key), rb.get(key)
        attack, _, eps = key.removeprefix("robust_accuracy_").partition("_eps")
        rows.append((f"accuracy under {attack} eps {eps}",
                     "-" if a is None else f"{a:.4f}", "-" if b is None else f"{b:.4f}",
                     f"{b - a:+.4f}" if a is not None and b is not None else ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
