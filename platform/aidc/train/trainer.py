"""The Ray Train driver: datasets from a versioned dataset, a TorchTrainer, the result."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass

from aidc import storage
from aidc.data.dataset import DatasetVersion, open_dataset
from aidc.data.split import SPLITS
from aidc.errors import ConfigError, ResourcesUnavailable
from aidc.runtime import bound_data, cluster_has_gpus, describe_resources, start_timeout_s
from aidc.tasks import get_task
from aidc.train.telemetry import track_training_run
from aidc.train import privacy
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
    dv = dv or open_dataset(storage.storage_root(cfg.run.storage), cfg.name, cfg.data.version)
    manifest = dv.manifest()
    wanted = set(cfg.data.privacy.scrub)
    scrubbed = set(manifest["counts"].get("personal_data_scrubbed", {}))
    if wanted - scrubbed:  # never train on raw personal data the config says is scrubbed
        raise ConfigError(f"data.privacy.scrub names {sorted(wanted - scrubbed)}, but dataset {dv.uri} was made "
                          f"without scrubbing them; preprocess again with this config (python -m jobs.preprocess "
                          f"--config ...) or pin a scrubbed version with data.version")
    if cfg.data.encryption and not manifest.get("encryption"):  # nor on plaintext the config says is encrypted
        raise ConfigError(f"data.encryption names key {cfg.data.encryption.key!r}, but dataset {dv.uri} is not "
                          "encrypted; preprocess again with this config or pin an encrypted version with data.version")
    task = get_task(cfg.task)
    state = manifest["transform"]
    data_ctx = ingest_context()
    cpus = cfg.resources.data_task_cpus  # None: Ray Data's default (a whole CPU per task)
    bound = bound_data(data_ctx)  # through the gateway: the CPUs admitted for Ray Data (a trial's share in a sweep)
    if bound is not None and (cpus or 1.0) > bound:
        cpus = bound  # a task larger than the bound would never start
    task_cpus = {} if cpus is None else {"num_cpus": cpus}
    datasets = {
        s: dv.read(s, ray_remote_args=task_cpus).map_batches(
            task.transform_batch, fn_kwargs={"state": state, "training": s == "train"}, batch_format="numpy",
            **task_cpus)
        for s in SPLITS
    }
    if caches(cfg, dv):  # read + transform once (train-time augmentation stays per epoch); epochs then stream
        datasets = {s: ds if s == "train" and augments(manifest) else ds.materialize() for s, ds in datasets.items()}
    return dv, manifest, datasets


def ingest_context():
    """This process's Ray Data context, set for training ingest. Ray Train copies the context of the process that
    builds the trainer into its ingest (a Tune trial given the sweep's shared datasets sets it here too)."""
    import ray.data

    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # epochs are the progress; keep job logs readable
    data_ctx.execution_options.preserve_order = True  # same seed, same batches: resumed runs match uninterrupted ones
    return data_ctx


def caches(cfg, dv: DatasetVersion) -> bool:
    """Whether training holds the transformed splits in Ray's object store (data.cache) rather than reading them."""
    cache = cfg.data.cache
    if cache == "auto" and dv.encryption:  # decrypted blocks in the object store could spill to disk in the clear
        return False
    return dv.size_bytes() <= cfg.data.cache_max_mb * 2**20 if cache == "auto" else bool(cache)


def augments(manifest: dict) -> bool:
    return bool(manifest["transform"].get("augment", {}).get("enabled"))


def reads_while_training(cfg) -> bool:
    """Whether training runs Ray Data read/transform tasks (they need CPUs of their own) or only takes cached
    blocks: uncached, augmented on the stream, or not preprocessed yet."""
    from aidc.errors import DataError

    try:
        dv = open_dataset(storage.storage_root(cfg.run.storage), cfg.name, cfg.data.version)
        return not caches(cfg, dv) or augments(dv.manifest())
    except DataError:
        return True


def use_gpus(cfg) -> bool:
    return cluster_has_gpus() if cfg.resources.use_gpu == "auto" else cfg.resources.use_gpu


def loop_config(cfg, manifest: dict) -> dict:
    """The train loop's config: the resolved job, the dataset's features and training-split size."""
    train_rows = manifest["counts"].get("examples", manifest["counts"]["splits"])["train"]
    return {
        "job": cfg.model_dump(mode="json"),
        "features": manifest["features"],
        "train_rows": train_rows,
        "fault_marker": os.environ.get("AIDC_FAULT_MARKER"),  # test hook: <file>:<step> kills a worker once
        # DP-SGD: sample rate, steps and the noise that spends train.privacy.epsilon (refused if it cannot)
        **({"privacy": privacy.plan(cfg, train_rows, manifest["features"])} if cfg.train.privacy else {}),
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
    resources_per_worker = worker_resources(cfg, use_gpu)
    # Ray Train reads its start bound from this process's environment and hands it to the controller it starts
    elastic = isinstance(res.num_workers, tuple)
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s(res.start_timeout_s, elastic))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(cfg, manifest), **(loop_extras or {})},
        dataset_config=ray.train.DataConfig(datasets_to_split=splits_to_shard(res.num_workers)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker,
            elastic_resize_monitor_interval_s=res.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            # Ray retries a worker group that cannot start without end by default (controller_failure_limit -1):
            # a fixed-size run's attempt fails at the bound instead (a Tune trial then counts a failure); an
            # elastic run retries with the workers that fit, as often as it may fail.
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   controller_failure_limit=cfg.run.max_failures if elastic else 0),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute=get_task(cfg.task).primary_metric,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks or None,
        ),
        datasets=datasets,
    )


def splits_to_shard(num_workers) -> list[str] | str:
    """The splits Ray Train deals out in parts to the workers (its DataConfig.datasets_to_split).

    Ray Train starts a SplitCoordinator actor for each split it shards, in every run, also for a single worker
    (streaming_split(1)): a process of its own (~2.4 CPU-s here) that every epoch's first batch waits on. One
    worker reads the splits whole instead; more (or an elastic group, whose size changes) share them out.
    """
    return [] if num_workers in (0, 1) else "all"


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # ray.train.v2._internal.constants


def worker_resources(cfg, use_gpu: bool) -> dict:
    return {"CPU": cfg.resources.cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **cfg.resources.custom}


def fit(trainer, cfg):
    """trainer.fit(); a worker group that could not start within the bound becomes ResourcesUnavailable, naming
    what it asked for and what the cluster has free."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    try:
        return trainer.fit()
    except ControllerError as exc:
        if not isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
            raise
        waited = float(os.environ[START_TIMEOUT_ENV])
        raise start_failure(cfg, f"could not start within {waited:g} s (resources.start_timeout_s)") from exc


def check_fits(cfg, asked: dict | None = None, who: str | None = None) -> None:
    """Fail at once, not after the start bound, when no node could ever hold one worker (or, with `asked`, that
    bundle) and no autoscaler can add one."""
    import ray

    from aidc.runtime import cluster_can_grow

    asked = asked or worker_resources(cfg, use_gpus(cfg))
    fits = any(all(node["Resources"].get(k, 0) >= v for k, v in asked.items() if v > 0)
               for node in ray.nodes() if node.get("Alive"))
    if not fits and not cluster_can_grow():
        raise start_failure(cfg, "can never start on this cluster", asked, who)


def start_failure(cfg, what: str, asked: dict | None = None, who: str | None = None) -> ResourcesUnavailable:
    """The error of `who` asking `asked` each (default: the config's worker group) that `what` (could not ...)."""
    import ray

    res = cfg.resources
    asked = asked or worker_resources(cfg, use_gpus(cfg))
    who = who or f"{res.num_workers if isinstance(res.num_workers, int) else res.num_workers[0]} worker(s)"
    total, free = ray.cluster_resources(), ray.available_resources()
    missing = [k for k in asked if total.get(k, 0) < asked[k]]
    node_most = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k in asked:
                node_most[k] = max(node_most.get(k, 0), node["Resources"].get(k, 0))
    too_big = [k for k in asked if k not in missing and node_most.get(k, 0) < asked[k]]
    why = (f"; no node has {', '.join(repr(k) for k in missing)}" if missing else
           f"; no single node has {', '.join(f'{k} {asked[k]:g}' for k in too_big)}" if too_big else
           "; the rest is held by other work (trials, Serve replicas, jobs)")
    keys = [k for k in ("CPU", "GPU") if k in total or k in asked] + [k for k in asked if k not in ("CPU", "GPU")]
    have = describe_resources({k: free.get(k, 0) for k in keys})
    return ResourcesUnavailable(
        f"{who} x {{{describe_resources(asked)}}} {what}: the cluster has {have} free of "
        f"{describe_resources({k: total.get(k, 0) for k in keys})}{why}. Fix: lower resources.num_workers or "
        "resources.cpus_per_worker, drop or change resources.custom, free the cluster, or wait longer with "
        "--set resources.start_timeout_s=<s>")


@track_training_run  # live MLflow metrics per epoch; run outcomes as metrics (aidc.train.telemetry)
def run_training(cfg, loop_extras: dict | None = None) -> TrainOutcome:
    from aidc.train import checkpoint as ckpt

    root = storage.storage_root(cfg.run.storage)
    if cfg.eval.robustness is not None:  # refused before anything trains, not at registration
        from aidc.tasks.robustness import check_supported

        check_supported(get_task(cfg.task))
    storage.check_shared(root)  # multi-node: checkpoints must be readable wherever a worker restarts
    if cfg.resources.num_workers != 0:
        check_fits(cfg)
    dv, manifest, datasets = prepare_datasets(cfg)
    run_name = cfg.run.name or default_run_name(cfg.name)
    logger.info(
        "training %s on dataset %s with %s worker(s) (%s), run %s",
        cfg.name, dv.uri, cfg.resources.num_workers, "GPU" if use_gpus(cfg) else "CPU", run_name,
    )
    trainer = build_trainer(cfg, manifest, datasets, run_name=run_name, storage_path=storage.join(root, "runs"),
                            loop_extras=loop_extras)  # e.g. aidc.compress's init weights, masks, teacher
    result = fit(trainer, cfg)
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
