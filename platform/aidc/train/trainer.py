"""The Ray Train driver: datasets from a versioned dataset, a TorchTrainer, the result."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass

from aidc import storage
from aidc.data.dataset import DatasetVersion, open_dataset
from aidc.data.split import SPLITS
from aidc.runtime import cluster_has_gpus
from aidc.tasks import get_task
from aidc.train.loop import train_loop_per_worker

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_name: str
    dataset: DatasetVersion
    metrics: dict
    checkpoint_path: str
    history: list
    resumes: list


def default_run_name(job_name: str) -> str:
    return f"{job_name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_training(cfg) -> TrainOutcome:
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from aidc.train import checkpoint as ckpt

    root = storage.storage_root(cfg.run.storage)
    dv = open_dataset(root, cfg.name, cfg.data.version)
    manifest = dv.manifest()
    task = get_task(cfg.task)
    state = manifest["transform"]
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # epochs are the progress; keep job logs readable
    data_ctx.execution_options.preserve_order = True  # same seed, same batches: resumed runs match uninterrupted ones
    datasets = {
        s: dv.read(s).map_batches(task.transform_batch, fn_kwargs={"state": state, "training": s == "train"},
                                  batch_format="numpy")
        for s in SPLITS
    }
    cache = cfg.data.cache
    if cache == "auto":
        cache = dv.size_bytes() <= cfg.data.cache_max_mb * 2**20
    if cache:  # read + transform once (train-time augmentation stays per epoch); epochs then stream from memory
        datasets = {s: ds if s == "train" and state.get("augment", {}).get("enabled") else ds.materialize()
                    for s, ds in datasets.items()}

    res = cfg.resources
    use_gpu = cluster_has_gpus() if res.use_gpu == "auto" else res.use_gpu
    resources_per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    run_name = cfg.run.name or default_run_name(cfg.name)
    logger.info(
        "training %s on dataset %s with %s worker(s) (%s), run %s",
        cfg.name, dv.uri, res.num_workers, "GPU" if use_gpu else "CPU", run_name,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "features": manifest["features"],
            "train_rows": manifest["counts"].get("examples", manifest["counts"]["splits"])["train"],
            "fault_marker": os.environ.get("AIDC_FAULT_MARKER"),  # test hook: <file>:<step> kills a worker once
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.join(root, "runs"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=task.primary_metric,
                checkpoint_score_order="min",
            ),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        final = ckpt.load(d)  # the final checkpoint holds every epoch's metrics
    return TrainOutcome(run_name, dv, dict(result.metrics), result.checkpoint.path, final["history"], final["resumes"])


def describe_model(cfg) -> None:
    """--dry-run: build the model from the config (no cluster) and print its size."""
    from aidc.data.sources import SOURCES
    from aidc.errors import DataError

    task = get_task(cfg.task)
    try:  # the features (vocabulary, shapes) come from the dataset's manifest
        features = open_dataset(storage.storage_root(cfg.run.storage), cfg.name, cfg.data.version).manifest()["features"]
    except DataError:
        if cfg.data.source != "digits":
            print("# model not built: preprocess the dataset first (its vocabulary/shapes size the model)")
            return
        features = task.features(SOURCES["digits"](cfg).meta, {})
    model = task.build_model(cfg.model.model_dump(mode="json"), features)
    params = sum(p.numel() for p in model.parameters())
    print(f"# model {cfg.model.arch}: {params:,} parameters; features {features}")
