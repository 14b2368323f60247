"""The preprocessing pipeline: source -> validate -> dedup -> split -> fit on train -> encode ->
versioned Parquet per split (+ rejected rows with reasons) + manifest.json.

Named datasets are small enough to clean in memory; Ray Data then encodes (tokenizes, packs, maps
ids) and writes every split in parallel. Your own tabular files stream end to end through Ray Data
(`preprocess_streaming`), so inputs far larger than memory work.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from aidc import storage
from aidc.data import encryption as encryption_api
from aidc.data.clean import REASON, mark_duplicates, reason_counts
from aidc.ops.data import instrument_preprocess
from aidc.data.dataset import DatasetVersion
from aidc.data.sources import SOURCES, RawData
from aidc.data.split import SPLITS, assign_splits, predefined_splits, time_splits
from aidc.errors import ConfigError, DataError
from aidc.provenance import code_version, now_iso

logger = logging.getLogger(__name__)

# Bump when the pipeline's output for the same input and config changes.
PIPELINE_VERSION = 2
ENCODE_BATCH = 4096
# what data.encryption does to every Parquet file (recorded in the manifest)
ENCRYPTION_SCHEME = "parquet modular encryption: AES-GCM, footer and every column, double-wrapped data keys"


def dataset_fingerprint(source_fingerprint: str, cfg, task) -> str:
    """Same input + same preprocessing settings + same pipeline -> same fingerprint (and version); the task adds
    what else its encoding depends on (Task.fingerprint_settings: a fine-tune's base)."""
    d = cfg.data
    settings = {
        "source": d.source, "path": d.path, "format": d.format, "features": d.features,
        "categorical": d.categorical, "label": d.label, "split": d.split.model_dump(), "clean": d.clean.model_dump(),
        "text": d.text.model_dump(), "augment": d.augment.model_dump(), "task": cfg.task,
        **({"privacy": d.privacy.model_dump()} if d.privacy.scrub else {}),
        **({"encryption": d.encryption.model_dump()} if d.encryption else {}),  # never a plaintext version reused
        **task.fingerprint_settings(cfg),
        "pipeline": PIPELINE_VERSION, "input": source_fingerprint,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def to_ray_dataset(columns: dict[str, np.ndarray], num_blocks: int):
    """A column table as a Ray dataset of `num_blocks` blocks (ndarray columns become tensor columns)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    arrays = {k: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else pa.array(v.tolist() if v.dtype == object else v)
              for k, v in columns.items()}
    table = pa.table(arrays)
    step = max(1, -(-table.num_rows // max(1, num_blocks)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)])


def scrub_personal_data(columns: dict[str, np.ndarray], cfg, task) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """data.privacy.scrub: the task's text columns with personal data replaced by placeholders, on a Ray Data
    stream (a pool of aidc.data.privacy.Scrubber actors), before anything is validated, split or written (the
    rejected rows too); returns the table and the counts per type."""
    from aidc.data.privacy import Scrubber, total

    p, text_columns = cfg.data.privacy, task.text_columns
    n = len(columns["id"])
    part = {"_row": np.arange(n), **{c: columns[c] for c in text_columns}}
    blocks = max(2, min(16, n // 2000))
    done = (to_ray_dataset(part, blocks)
            .map_batches(Scrubber, fn_constructor_kwargs={"types": p.scrub, "columns": text_columns,
                                                          "min_score": p.min_score},
                         batch_format="numpy", batch_size=256, concurrency=(1, 2))
            .to_pandas()
            .sort_values("_row"))
    out = dict(columns)
    for c in text_columns:
        out[c] = done[c].to_numpy(dtype=object)
    return out, total(done[Scrubber.found_column], p.scrub)


def _assign(raw: RawData, cfg) -> np.ndarray:
    s, cols = cfg.data.split, raw.columns
    if s.strategy == "predefined":
        if "origin" not in cols:
            raise ConfigError(f"data.split.strategy: predefined needs a dataset with its own test set; "
                              f"{cfg.data.source} has none: use strategy: hash")
        return predefined_splits(cols["id"], cols["origin"], s.train, s.seed)
    if s.strategy == "group":
        if s.group_column not in cols:
            raise ConfigError(f"data.split.group_column {s.group_column!r} is not a column of {cfg.data.source} "
                              f"(columns: {', '.join(sorted(cols))})")
        groups = cols[s.group_column].astype(str)
        missing = sorted(set(s.test_groups) - set(groups))
        if missing:
            raise ConfigError(f"data.split.test_groups {missing} are not values of {s.group_column} in "
                              f"{cfg.data.source} (values: {', '.join(sorted(set(groups))[:20])})")
        return predefined_splits(cols["id"], np.where(np.isin(groups, s.test_groups), "test", "train"), s.train,
                                 s.seed)
    if s.strategy == "time":
        if "timestamp" not in cols:
            raise ConfigError(f"data.split.strategy: time needs user/timestamp columns; {cfg.data.source} has none")
        return time_splits(cols["user"], cols["timestamp"], s.val, s.test)
    return assign_splits(cols["id"], s.train, s.val, s.seed)


def _take(columns: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[mask] for k, v in columns.items()}


def _parquet(path: str, enc: dict | None = None):
    """The written split at `path` (local or object store) as a pyarrow dataset (decrypting where encrypted)."""
    import pyarrow.dataset as pads

    fs, inner = storage.filesystem(path)
    return pads.dataset(inner, format=encryption_api.reading_format(enc), filesystem=fs)


def _read_columns(path: str, columns: list[str], enc: dict | None = None) -> dict:
    table = _parquet(path, enc).to_table(columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}


def _row_count(path: str, enc: dict | None = None) -> int:
    return _parquet(path, enc).count_rows()


@instrument_preprocess  # rows read/kept/rejected and rows/s as metrics (aidc.ops.data)
def preprocess(cfg, task, root: str | None = None, force: bool = False) -> tuple[DatasetVersion, bool]:
    """Build (or reuse) the dataset version for `cfg`, encoded by its workload `task` (aidc.tasks.get_task(cfg.task):
    the data layer knows no workload of its own); returns (version, reused)."""
    root = storage.storage_root(root or cfg.run.storage)
    if cfg.data.privacy.scrub and not task.text_columns:
        raise ConfigError(f"data.privacy.scrub works on text: task {cfg.task} has no text column; remove "
                          f"data.privacy or use a text workload (text_classification, language_model, causal_lm)")
    enc = cfg.data.encryption and cfg.data.encryption.model_dump()  # {key, kms}, as the manifest records it
    if getattr(task, "streaming", False):
        if enc:
            raise ConfigError("data.encryption covers datasets aidc loads (data.source other than files); your own "
                              "files stream straight to Parquet: encrypt them at their source, or drop data.encryption")
        return preprocess_streaming(cfg, task, root, force)
    if enc and enc["kms"] == "local":  # before anything is written: the key is there, private, away from the data
        encryption_api.master_key(enc["key"], root)
    loader = (getattr(task, "sources", None) or SOURCES).get(cfg.data.source)
    if loader is None:
        raise ConfigError(f"data.source {cfg.data.source!r} does not fit task {cfg.task}")
    raw = loader(cfg)
    fingerprint = dataset_fingerprint(raw.fingerprint, cfg, task)
    dv = DatasetVersion(root, cfg.name, fingerprint[:12])
    if dv.exists() and not force:
        logger.info("dataset %s already exists for this input and config: reusing it", dv.uri)
        return dv, True
    _clear(dv.dir)

    cols, found = raw.columns, None
    if cfg.data.privacy.scrub:
        cols, found = scrub_personal_data(cols, cfg, task)
    n_read = len(cols["id"])
    reasons = np.asarray(task.validate(cols, cfg, raw.meta), dtype=object)
    if cfg.data.clean.dedup:
        reasons = mark_duplicates(task.content_key(cols), cols["id"], reasons)
    splits = _assign(raw, cfg)
    good = reasons == ""
    train_mask = good & (splits == "train")
    if not train_mask.any():
        raise DataError(f"no usable training rows in {cfg.data.source}: {reason_counts(reasons)}")
    state = task.fit(_take(cols, train_mask), cfg, raw.meta)

    split_rows, examples, details = {}, {}, {}
    blocks = max(2, n_read // 20000)
    for s in SPLITS:
        mask = good & (splits == s)
        split_rows[s] = int(mask.sum())
        if not split_rows[s]:
            continue
        sub = _take(cols, mask)
        split_state = {**state, "split": s}  # what encode_batch may do per split (fine-tuning packs train rows)
        (to_ray_dataset(sub, blocks)
         .map_batches(task.encode_batch, fn_kwargs={"state": split_state}, batch_format="numpy",
                      batch_size=ENCODE_BATCH)
         .write_parquet(dv.path(s), **encryption_api.ray_write_kwargs(enc)))
        examples[s] = _row_count(dv.path(s), enc)
        if hasattr(task, "describe_split"):  # from what was written (encoding it again cost a tokenizer pass)
            details[s] = task.describe_split(_read_columns(dv.path(s), task.describe_columns, enc))
    rejected = reason_counts(reasons)
    if rejected:
        rej = _take(cols, ~good)
        rej[REASON] = reasons[~good].astype(str)
        # raw rows: encrypted as the rest
        to_ray_dataset(rej, 1).write_parquet(dv.path("rejected"), **encryption_api.ray_write_kwargs(enc))

    counts = {"read": n_read, "kept": int(good.sum()), "rejected": int((~good).sum()), "rejected_by_reason": rejected,
              "splits": split_rows, "examples": examples, **({"split_details": details} if details else {}),
              **({"personal_data_scrubbed": found} if found is not None else {})}
    extra = {"encryption": {**enc, "scheme": ENCRYPTION_SCHEME}} if enc else {}
    _finish(dv, cfg, fingerprint, counts, task.features(raw.meta, state), state,
            {"name": cfg.data.source, "description": raw.description, "fingerprint": raw.fingerprint,
             "terms": raw.terms},
            {k: f"{v.dtype}{list(v.shape[1:]) if v.ndim > 1 else ''}" for k, v in cols.items()}, extra)
    return dv, False


def _finish(dv, cfg, fingerprint, counts, features, state, source, schema, extra: dict | None = None) -> None:
    assert counts["read"] == counts["kept"] + sum(counts["rejected_by_reason"].values()), "accounting must balance"
    dv.write_manifest({
        "name": cfg.name, "version": dv.version, "fingerprint": fingerprint, "created_at": now_iso(),
        "code_version": code_version(), "task": cfg.task, "source": source, "schema": schema, "counts": counts,
        "features": features, "transform": state, "config": cfg.model_dump(mode="json"), **(extra or {}),
    })
    logger.info("wrote dataset %s to %s", dv.uri, dv.dir)


def preprocess_streaming(cfg, task, root: str, force: bool) -> tuple[DatasetVersion, bool]:
    """Your own tabular files, streamed: read -> clean -> [dedup] -> split by content hash -> one
    partitioned Parquet write; the fit then streams over the training split."""
    import pyarrow.fs as pafs
    import ray.data

    from aidc.data.readers import check_tabular_header, input_files_fingerprint

    d = cfg.data
    if d.split.strategy != "hash":
        raise ConfigError(f"data.split.strategy: {d.split.strategy} needs the whole table; your own tabular files "
                          "stream and split by a hash of each row: use strategy: hash")
    columns = task.columns(cfg)
    check_tabular_header(d.path, d.format, columns)
    input_fp, files = input_files_fingerprint(d.path)
    fingerprint = dataset_fingerprint(input_fp, cfg, task)
    dv = DatasetVersion(root, cfg.name, fingerprint[:12])
    if dv.exists() and not force:
        logger.info("dataset %s already exists for this input and config: reusing it", dv.uri)
        return dv, True
    _clear(dv.dir)

    readers = {"csv": ray.data.read_csv, "parquet": ray.data.read_parquet,
               "jsonl": lambda p: ray.data.read_json(p, lines=True)}
    ds = readers[d.format](d.path).select_columns(columns)
    split = d.split

    def clean_and_split(batch):
        import pandas as pd

        batch = task.clean_batch(batch, cfg)
        # A seeded 64-bit hash of each row's content: identical rows land in the same split (so dedup
        # can keep one), and the same row always gets the same split, whatever the file order.
        keys = pd.util.hash_pandas_object(batch[columns], index=False, hash_key=f"aidc{split.seed:012d}"[:16])
        u = keys.to_numpy(dtype=np.uint64) / float(2**64)
        names = np.where(u < split.train, "train", np.where(u < split.train + split.val, "val", "test"))
        batch["split"] = np.where(batch[REASON].to_numpy() == "", names, "rejected")
        if d.clean.dedup:
            batch["_key"] = keys.to_numpy(dtype=np.uint64)
        return batch

    ds = ds.map_batches(clean_and_split, batch_format="pandas")
    if d.clean.dedup:  # identical rows hash to the same split; keep one per group, reject the rest
        def keep_one(group):
            dup = np.arange(len(group)) > 0
            group.loc[dup & (group["split"] != "rejected").to_numpy(), REASON] = "duplicate row"
            group.loc[dup, "split"] = "rejected"
            return group.drop(columns=["_key"])

        ds = ds.groupby("_key").map_groups(keep_one, batch_format="pandas")
    staged = storage.join(dv.dir, "_staged")
    ds.write_parquet(staged, partition_cols=["split"])
    fs, _ = storage.filesystem(dv.dir)
    for s in (*SPLITS, "rejected"):
        src = storage.filesystem(storage.join(staged, f"split={s}"))[1]
        if fs.get_file_info(src).type != pafs.FileType.NotFound:
            fs.move(src, storage.filesystem(dv.path(s))[1])
    fs.delete_dir(storage.filesystem(staged)[1])

    split_rows = {s: (_row_count(dv.path(s)) if storage.exists(dv.path(s)) else 0) for s in SPLITS}
    if not split_rows["train"]:
        raise DataError(f"no usable training rows in {d.path}")
    rejected = {}
    if storage.exists(dv.path("rejected")):
        reasons = ray.data.read_parquet(dv.path("rejected")).select_columns([REASON]).to_pandas()[REASON]
        rejected = {str(k): int(v) for k, v in reasons.value_counts().sort_index().items()}
    kept = sum(split_rows.values())
    state = task.fit(ray.data.read_parquet(dv.path("train")), cfg, {})
    counts = {"read": kept + sum(rejected.values()), "kept": kept, "rejected": sum(rejected.values()),
              "rejected_by_reason": rejected, "splits": split_rows, "examples": split_rows}
    _finish(dv, cfg, fingerprint, counts, task.features({}, state), state,
            {"name": "files", "description": f"{len(files)} {d.format} file(s) at {d.path}", "fingerprint": input_fp,
             "terms": None}, {c: "numeric" if c in d.features else "categorical/label" for c in columns})
    return dv, False


def _clear(path: str) -> None:
    """Remove a half-written version (no manifest) before writing it again."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)


def summary_lines(dv: DatasetVersion, reused: bool) -> list[str]:
    m = dv.manifest()
    c = m["counts"]
    lines = [
        f"dataset {dv.uri} ({'reused: same input and config' if reused else 'new version'}) at {dv.dir}",
        f"  rows read {c['read']} = kept {c['kept']} + rejected {c['rejected']}",
        "  splits (rows): " + ", ".join(f"{k} {v}" for k, v in c["splits"].items()),
    ]
    if c.get("examples") and c["examples"] != c["splits"]:
        lines.append("  training examples: " + ", ".join(f"{k} {v}" for k, v in c["examples"].items()))
    for s, detail in c.get("split_details", {}).items():
        lines.append(f"  {s}: " + ", ".join(f"{k} {v}" for k, v in detail.items()))
    for reason, n in c["rejected_by_reason"].items():
        lines.append(f"  rejected {n}: {reason}")
    if m.get("encryption"):
        lines.append(f"  encrypted at rest: key {m['encryption']['key']!r} (kms {m['encryption']['kms']}; "
                     f"{m['encryption']['scheme']})")
    if "personal_data_scrubbed" in c:
        lines.append("  personal data replaced by placeholders: " +
                     ", ".join(f"{k} {v}" for k, v in c["personal_data_scrubbed"].items()))
    state = json.dumps(m["transform"])
    lines.append(f"  fitted transform: {state[:300]}{'...' if len(state) > 300 else ''}")
    return lines
