"""The preprocessing pipeline: source -> validate -> split -> fit on train -> versioned Parquet + manifest."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from aidc import storage
from aidc.data.clean import REASON, reason_counts, validate_features
from aidc.data.dataset import DatasetVersion
from aidc.data.sources import SOURCES
from aidc.data.split import SPLITS, assign_splits
from aidc.provenance import code_version, now_iso

logger = logging.getLogger(__name__)

# Bump when the pipeline's output for the same input and config changes.
PIPELINE_VERSION = 1


def dataset_fingerprint(source_fingerprint: str, cfg) -> str:
    """Same input + same preprocessing settings + same pipeline -> same fingerprint (and version)."""
    settings = {
        "source": cfg.data.source,
        "split": cfg.data.split.model_dump(),
        "task": cfg.task,
        "pipeline": PIPELINE_VERSION,
        "input": source_fingerprint,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _to_ray_dataset(columns: dict[str, np.ndarray], num_blocks: int):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    arrays = {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v) for k, v in columns.items()}
    table = pa.table(arrays)
    step = max(1, -(-table.num_rows // num_blocks))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def _select(ds, column: str, value: str, drop: tuple[str, ...] = ()):
    def keep(batch: dict) -> dict:
        mask = batch[column] == value
        return {k: v[mask] for k, v in batch.items() if k not in drop}

    return ds.map_batches(keep, batch_format="numpy")


def preprocess(cfg, root: str | None = None, force: bool = False) -> tuple[DatasetVersion, bool]:
    """Build (or reuse) the dataset version for `cfg`; returns (version, reused)."""
    from aidc.tasks import get_task

    task = get_task(cfg.task)
    root = storage.storage_root(root or cfg.run.storage)
    raw = SOURCES[cfg.data.source]()
    fingerprint = dataset_fingerprint(raw.fingerprint, cfg)
    dv = DatasetVersion(root, cfg.name, fingerprint[:12])
    if dv.exists() and not force:
        logger.info("dataset %s already exists for this input and config: reusing it", dv.uri)
        return dv, True
    _clear(dv.dir)

    lo, hi = raw.feature_range
    split = cfg.data.split
    n_read = len(raw.columns["id"])

    def label_rows(batch: dict) -> dict:
        batch = validate_features(batch, task.feature_column, lo, hi, raw.num_classes)
        return {**batch, "split": assign_splits(batch["id"], split.train, split.val, split.seed)}

    ds = _to_ray_dataset(raw.columns, num_blocks=4).map_batches(label_rows, batch_format="numpy").materialize()
    labels = ds.select_columns([REASON, "split"]).to_pandas()
    reasons = labels[REASON].to_numpy(dtype=object)
    good = reasons == ""
    split_counts = {s: int(((labels["split"] == s).to_numpy() & good).sum()) for s in SPLITS}

    kept = _select(ds, REASON, "", drop=(REASON,))
    for s in SPLITS:
        if split_counts[s]:
            _select(kept, "split", s, drop=("split",)).write_parquet(dv.path(s))
    rejected_counts = reason_counts(reasons)
    if rejected_counts:
        ds.filter(lambda row: row[REASON] != "").write_parquet(dv.path("rejected"))

    state = task.fit(ray_read_split(dv, "train")) if split_counts["train"] else None
    if state is None:
        from aidc.errors import DataError

        raise DataError(f"no usable training rows in {cfg.data.source}: every row was rejected ({rejected_counts})")

    n_kept = int(good.sum())
    manifest = {
        "name": cfg.name,
        "version": dv.version,
        "fingerprint": fingerprint,
        "created_at": now_iso(),
        "code_version": code_version(),
        "task": cfg.task,
        "source": {"name": cfg.data.source, "description": raw.description, "fingerprint": raw.fingerprint},
        "schema": {k: f"{v.dtype}{list(v.shape[1:]) if v.ndim > 1 else ''}" for k, v in raw.columns.items()},
        "counts": {
            "read": n_read,
            "kept": n_kept,
            "rejected": n_read - n_kept,
            "rejected_by_reason": rejected_counts,
            "splits": split_counts,
        },
        "features": task.features(raw),
        "transform": state,
        "config": cfg.model_dump(mode="json"),
    }
    assert manifest["counts"]["read"] == n_kept + sum(rejected_counts.values()), "row accounting must balance"
    dv.write_manifest(manifest)
    logger.info("wrote dataset %s to %s", dv.uri, dv.dir)
    return dv, False


def ray_read_split(dv: DatasetVersion, split: str):
    import ray.data

    return ray.data.read_parquet(dv.path(split))


def _clear(path: str) -> None:
    """Remove a half-written version (no manifest) before writing it again."""
    fs, inner = storage.filesystem(path)
    import pyarrow.fs as pafs

    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def summary_lines(dv: DatasetVersion, reused: bool) -> list[str]:
    m = dv.manifest()
    c = m["counts"]
    lines = [
        f"dataset {dv.uri} ({'reused: same input and config' if reused else 'new version'}) at {dv.dir}",
        f"  rows read {c['read']} = kept {c['kept']} + rejected {c['rejected']}",
        "  splits: " + ", ".join(f"{k} {v}" for k, v in c["splits"].items()),
    ]
    for reason, n in c["rejected_by_reason"].items():
        lines.append(f"  rejected {n}: {reason}")
    lines.append(f"  fitted transform: {json.dumps(m['transform'])}")
    return lines
