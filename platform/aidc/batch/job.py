"""Batch inference: a registered model scores a dataset split or your own files on a Ray Data actor pool.

    input (split or files) ──Ray Data read──▶ BatchPredictor actors (one model copy each) ──▶ staged Parquet,
    partitioned by status ──▶ predictions/ (key + prediction columns) and rejected/ (key, reason, input)
    + manifest.json (model version, input fingerprint, counts: rows in = predicted + rejected)

The model version is resolved once in the driver and pinned (name/version), so every actor loads the
same version even if the alias moves while the job runs; each actor loads it through the registry
(`aidc.serving.load_model`: manifest and signature checks, load metrics).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging

from aidc import storage
from aidc.data import encryption
from aidc.batch.predictor import INPUT, REASON, STATUS, BatchPredictor
from aidc.errors import ConfigError, DataError
from aidc.provenance import code_version, now_iso
from aidc.tasks import get_task
from aidc.registry import MANIFEST as MODEL_MANIFEST
from aidc.registry import SPEC, WEIGHTS, fetched, tracking_uri

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def model_ref(cfg) -> str:
    return cfg.batch_infer.model or f"{cfg.registry.model_name}@{cfg.registry.alias}"


def _read_input(cfg, spec: dict, root: str):
    """(Ray dataset, whether it is a preprocessed split, input description with its fingerprint)."""
    import ray.data

    b = cfg.batch_infer
    task = get_task(spec["task"])
    if b.path and b.format in FILE_FORMATS:
        return _read_files(b, task, spec)
    if b.path:
        from aidc.data.readers import input_files_fingerprint
        from aidc.data.readers import check_tabular_header

        try:
            check_tabular_header(b.path, b.format, [b.key, *get_task(spec["task"]).batch_inputs(spec["features"])])
        except DataError as exc:
            raise DataError(f"{exc} (batch_infer scores the columns the model was trained on, plus "
                            f"batch_infer.key: {b.key!r})") from None
        fingerprint, files = input_files_fingerprint(b.path)
        io = {"ray_remote_args": {"num_cpus": b.io_cpus}}
        readers = {"csv": ray.data.read_csv, "parquet": ray.data.read_parquet,
                   "jsonl": lambda p, **kw: ray.data.read_json(p, lines=True, **kw)}
        return readers[b.format](b.path, **io), False, {"path": b.path, "format": b.format, "files": len(files),
                                                  "fingerprint": fingerprint}
    if get_task(spec["task"]).batch_on_vllm:
        raise ConfigError("batch_infer on a language model takes a file of prompts: set batch_infer.path and "
                          "batch_infer.format (a 'prompt' column per row)")
    from aidc.data.dataset import open_dataset

    dv = open_dataset(root, cfg.name, cfg.data.version)
    m = dv.manifest()
    if m["task"] != spec["task"]:
        raise ConfigError(f"dataset {dv.uri} is a {m['task']} dataset but the model is a {spec['task']} model; "
                          "set batch_infer.model to a model trained on it, or score your own files with path")
    return dv.read(b.split, ray_remote_args={"num_cpus": b.io_cpus}), True, {
        "dataset": dv.uri, "split": b.split, "fingerprint": m["fingerprint"],
        **({"encryption": dv.encryption} if dv.encryption else {})}


FILE_FORMATS = ("wav",)  # batch_infer.format values where each file is one input row


def _read_files(b, task, spec: dict):
    """A folder of files (e.g. wav recordings), one row each: {key: the file's path, input column: its bytes}.
    Every file is read, so one that is not a usable recording is a rejected row with its reason."""
    import ray.data

    from aidc.data.readers import input_files_fingerprint, with_scheme

    if b.format != task.batch_file_format:
        takes = (f"files of format {task.batch_file_format} (one recording per file)" if task.batch_file_format
                 else "csv, parquet or jsonl rows")
        raise ConfigError(f"batch_infer.format {b.format} does not fit a {spec['task']} model, which scores "
                          f"{takes}; set batch_infer.format: {task.batch_file_format or 'csv'}")
    column = task.input_column
    if b.key == column:
        raise ConfigError(f"batch_infer.key {b.key!r} is the column that holds each file's contents; name the key "
                          "column otherwise (default: id)")
    fingerprint, files = input_files_fingerprint(b.path)
    if not files:
        raise DataError(f"batch_infer.path {b.path} holds no files to score")
    uris = with_scheme(b.path, sorted(files))

    def rows(batch):
        return {b.key: batch["path"], column: batch["bytes"]}

    # the listed files themselves: Ray's directory listing would skip names starting with "." or "_"
    ds = ray.data.read_binary_files(uris, include_paths=True, ray_remote_args={"num_cpus": b.io_cpus})
    return ds.map_batches(rows, batch_format="numpy", num_cpus=b.io_cpus), False, {
        "path": b.path, "format": b.format, "files": len(files), "fingerprint": fingerprint}


def _gpus_per_actor(b) -> float:
    """0 without GPUs; else the configured share (checked to fit), or gpu_share of the cluster's GPUs."""
    import ray

    from aidc.runtime import gpu_share, share_fits

    if b.use_gpu is False:
        return 0.0
    total = int(ray.cluster_resources().get("GPU", 0))
    if total == 0:
        if b.use_gpu == "auto":
            return 0.0
        # use_gpu: true on a cluster without GPUs: the actors would wait for ever
        raise ConfigError("batch_infer.use_gpu is true but the cluster has no GPUs; set use_gpu: auto (GPUs when "
                          "there are some) or false")
    if b.gpus_per_actor is None:
        return gpu_share(total, b.actors)
    if not share_fits(total, b.actors, b.gpus_per_actor):
        raise ConfigError(f"batch_infer.gpus_per_actor={b.gpus_per_actor:g} for {b.actors} actors does not fit on "
                          f"{total} GPU(s) (a fraction is placed within one GPU); use "
                          f"{gpu_share(total, b.actors):.4g} or leave it unset, or fewer actors")
    return b.gpus_per_actor


def _rewrite(src: str, dst: str, columns: list[str], enc: dict | None = None) -> int:
    """Stream the staged files of one status into `dst` keeping `columns`; returns the row count. Outputs of an
    encrypted dataset stay encrypted under its key."""
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(src)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        return 0
    data = pads.dataset(inner, format=encryption.reading_format(enc), filesystem=fs)
    rows = data.count_rows()
    if rows:
        pads.write_dataset(data.scanner(columns=columns), storage.filesystem(dst)[1], format="parquet",
                           filesystem=fs, basename_template="part-{i}.parquet", existing_data_behavior="error",
                           file_options=encryption.file_options(enc))
    return rows


def run_batch_inference(cfg, run_id: str | None = None) -> dict:
    """Score the configured input with the configured model; returns the written manifest."""
    import ray.data

    b = cfg.batch_infer
    root = storage.storage_root(cfg.run.storage)
    uri = tracking_uri(cfg.run.tracking_uri, root)
    with fetched(model_ref(cfg), uri) as (mv, directory):  # verified here too: fail before any actor starts
        spec = json.loads((directory / SPEC).read_text())
        weights_sha256 = json.loads((directory / MODEL_MANIFEST).read_text())[WEIGHTS]
    if not get_task(spec["task"]).batch_outputs:
        raise ConfigError(f"{mv.name}/{mv.version} is a {spec['task']} model, which batch inference does not score")
    pinned = f"{mv.name}/{mv.version}"
    ds, from_split, source = _read_input(cfg, spec, root)
    run_id = run_id or f"{cfg.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out = b.output or storage.join(root, "predictions", cfg.name, run_id)
    fs, out_inner = storage.filesystem(out)
    if storage.exists(storage.join(out, MANIFEST)):
        raise ConfigError(f"{out} already holds a batch inference result; choose another batch_infer.output")
    gpus = _gpus_per_actor(b)  # a bad GPU setting fails here, before anything is deleted
    for part in ("_staged", "predictions", "rejected"):  # what an interrupted run left behind (no manifest)
        if storage.exists(storage.join(out, part)):
            fs.delete_dir(storage.filesystem(storage.join(out, part))[1])
    logger.info("scoring %s with %s on %d actor(s) (%s) into %s", source, pinned, b.actors,
                f"{gpus:g} GPU each" if gpus else "CPU", out)
    options = {"batch_size": b.batch_size, "max_tokens": b.max_tokens, "temperature": b.temperature,
               "top_p": b.top_p, "seed": b.seed, "stop": list(b.stop)}
    staged = storage.join(out, "_staged")
    enc = source.get("encryption")  # an encrypted dataset's scores and rejected rows are written under its key
    ray.data.DataContext.get_current().enable_progress_bars = False
    (ds.map_batches(BatchPredictor, fn_constructor_kwargs={"ref": pinned, "tracking_uri": uri, "key": b.key,
                                                      "from_split": from_split, "options": options,
                                                      "task": spec["task"]},
                    compute=ray.data.ActorPoolStrategy(size=b.actors), num_cpus=b.cpus_per_actor,
                    num_gpus=gpus, batch_size=b.batch_size, batch_format="pandas")
       .write_parquet(staged, partition_cols=[STATUS], ray_remote_args={"num_cpus": b.io_cpus},
                      **encryption.ray_write_kwargs(enc)))
    predicted = _rewrite(storage.join(staged, f"{STATUS}=predicted"), storage.join(out, "predictions"),
                         ["key", *(n for n, _ in get_task(spec["task"]).batch_outputs)], enc)
    rejected = _rewrite(storage.join(staged, f"{STATUS}=rejected"), storage.join(out, "rejected"),
                        ["key", REASON, INPUT], enc)
    by_reason = {}
    if rejected:
        import pyarrow.dataset as pads

        reasons = pads.dataset(storage.filesystem(storage.join(out, "rejected"))[1], format=encryption.reading_format(enc),
                               filesystem=fs).to_table(columns=[REASON])[REASON].value_counts()
        by_reason = {str(r["values"]): int(r["counts"]) for r in reasons.to_pylist()}
    fs.delete_dir(storage.filesystem(staged)[1])
    counts = {"rows_in": predicted + rejected, "predicted": predicted, "rejected": rejected,
              "rejected_by_reason": dict(sorted(by_reason.items()))}
    assert counts["rows_in"] == predicted + sum(by_reason.values()), "accounting must balance"
    manifest = {"run_id": run_id, "created_at": now_iso(), "code_version": code_version(),
                "model": {"name": mv.name, "version": str(mv.version), "ref": model_ref(cfg), "task": spec["task"],
                          "weights_sha256": weights_sha256},
                "input": source, "key": b.key, "counts": counts, "output": out,
                **({"encryption": enc} if enc else {}),
                "settings": b.model_dump(mode="json")}
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    c, m = manifest["counts"], manifest["model"]
    lines = [f"scored {manifest['input'].get('dataset') or manifest['input']['path']} with {m['name']} version "
             f"{m['version']} ({m['task']}) into {manifest['output']}",
             f"  rows in {c['rows_in']} = predicted {c['predicted']} + rejected {c['rejected']}"]
    lines += [f"  rejected {n}: {reason}" for reason, n in c["rejected_by_reason"].items()]
    return lines
