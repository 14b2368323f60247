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
from aidc.ops.training import track_training_run
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


def prepare_datasets(cfg, dv: DatasetVersion | None = None) -> tuple[DatasetVersion, dict, dict]:
    """The dataset version, its manifest and the transformed Ray Datasets of every split (cached when small)."""
    import ray.data

    dv = dv or open_dataset(storage.storage_root(cfg.run.storage), cfg.name, cfg.data.version)
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
    return dv, manifest, datasets


def use_gpus(cfg) -> bool:
    return cluster_has_gpus() if cfg.resources.use_gpu == "auto" else cfg.resources.use_gpu


def loop_config(cfg, manifest: dict) -> dict:
    """The train loop's config: the resolved job, the dataset's features and training-split size."""
    return {
        "job": cfg.model_dump(mode="json"),
        "features": manifest["features"],
        "train_rows": manifest["counts"].get("examples", manifest["counts"]["splits"])["train"],
        "fault_marker": os.environ.get("AIDC_FAULT_MARKER"),  # test hook: <file>:<step> kills a worker once
    }


def build_trainer(cfg, manifest: dict, datasets: dict, *, run_name: str, storage_path: str,
                  callbacks: list | None = None, loop_extras: dict | None = None):
    """The TorchTrainer of one training run: jobs.train fits it directly; each Tune trial builds and fits one.

    loop_extras go into the loop's config (a Tune trial passes the checkpoint to start from and its reporter).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    res = cfg.resources
    if res.num_workers == 0:  # Ray Train's local mode persists no checkpoint: the loop keeps its own
        loop_extras = {"local_checkpoint_dir": storage.join(storage_path, run_name, "local_checkpoints"),
                       **(loop_extras or {})}
    use_gpu = use_gpus(cfg)
    resources_per_worker = {"CPU": res.cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **res.custom}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(cfg, manifest), **(loop_extras or {})},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
            elastic_resize_monitor_interval_s=res.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=get_task(cfg.task).primary_metric,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )


@track_training_run  # live MLflow metrics per epoch; run outcomes as metrics (aidc.ops.training)
def run_training(cfg, loop_extras: dict | None = None) -> TrainOutcome:
    from aidc.train import checkpoint as ckpt

    root = storage.storage_root(cfg.run.storage)
    storage.check_shared(root)  # multi-node: checkpoints must be readable wherever a worker restarts
    dv, manifest, datasets = prepare_datasets(cfg)
    run_name = cfg.run.name or default_run_name(cfg.name)
    logger.info(
        "training %s on dataset %s with %s worker(s) (%s), run %s",
        cfg.name, dv.uri, cfg.resources.num_workers, "GPU" if use_gpus(cfg) else "CPU", run_name,
    )
    trainer = build_trainer(cfg, manifest, datasets, run_name=run_name, storage_path=storage.join(root, "runs"),
                            loop_extras=loop_extras)  # e.g. aidc.compress's init weights, masks, teacher
    result = trainer.fit()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        final = ckpt.load(d)  # the final checkpoint holds every epoch's metrics
    outcome = TrainOutcome(run_name, dv, dict(result.metrics), result.checkpoint.path, final["history"],
                           final["resumes"])
    for r in resizes(outcome.resumes):
        logger.info("run %s resized %d -> %d workers at epoch %d, step %d", run_name, r["from_world_size"],
                    r["world_size"], r["epoch"], r["step"])
    return outcome


def resizes(resumes: list) -> list:
    """The restarts that changed the worker count (an elastic run's shrinks and growths), in order."""
    return [r for r in resumes if r.get("from_world_size") not in (None, r.get("world_size"))]


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
