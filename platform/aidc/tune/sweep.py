"""Tuner setup: trial resources from the cluster, searchers, schedulers, resume of a killed sweep.

A sweep lives in `<storage>/sweeps/<run.name>/` (Tune's experiment folder, our results beside it).
Running again with the same name (or `--resume`) restores it: finished trials are kept, unfinished and
errored ones continue from their latest checkpoints. Schedulers key on the reported `epochs_done`, not
on Tune's `training_iteration` (which restarts at 0 for a restored trial), and ASHA's rungs are kept
in a file beside the sweep, because Tune does not restore scheduler state (ray-project/ray#30838).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import AsyncHyperBandScheduler

from aidc import storage
from aidc.config import TRIAL_DRIVER_CPU
from aidc.errors import AidcError, ConfigError
from aidc.runtime import DATA_CPUS_ENV, data_cpus, floor_cpus
from aidc.tune.space import SweepSpec, tune_space

logger = logging.getLogger(__name__)

TIME_ATTR = "epochs_done"
RUNGS_FILE = "asha_rungs.json"


class ResumableASHA(AsyncHyperBandScheduler):
    """ASHA whose rung records survive a driver crash: written to a file after each decision, read back
    on the first trial a restored sweep adds (Tune unpickles schedulers as created, rungs empty)."""

    def __init__(self, state_file: str, **kwargs):
        super().__init__(**kwargs)
        self._state_file = state_file
        self._state_loaded = False

    def _load_rungs(self) -> None:
        self._state_loaded = True
        path = Path(self._state_file)
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        for bracket, rungs in zip(self._brackets, saved):
            for (milestone, recorded), (saved_milestone, saved_recorded) in zip(bracket._rungs, rungs):
                if milestone == saved_milestone:
                    recorded.update(saved_recorded)
        logger.info("ASHA: restored %d rung records from %s", sum(len(r) for b in saved for _, r in b), path)

    def _save_rungs(self) -> None:
        data = [[[m, rec] for m, rec in b._rungs] for b in self._brackets]
        tmp = Path(self._state_file + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._state_file)

    def rung_records(self) -> list:
        return [[[m, dict(rec)] for m, rec in b._rungs] for b in self._brackets]

    def on_trial_add(self, tune_controller, trial):
        if not self._state_loaded:
            self._load_rungs()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()


@dataclass
class TrialResources:
    per_trial: dict  # resources of the trial process itself
    cpus_per_trial: float  # including its Train workers
    gpus_per_trial: float
    concurrency: int
    cluster: dict


DATA_CPUS = 1.0  # Ray Data's read/map tasks take a whole CPU each by default


def trial_resources(spec: SweepSpec, cluster: dict, data_reads: bool = False) -> TrialResources:
    """What one trial takes and how many fit at once: every running trial's process and Train workers together,
    plus a CPU for Ray Data's tasks when training reads while it runs (`data_reads`) or on a larger node, so
    that trials never half-start and wait on each other (issue #24)."""
    job, tc = spec.job, spec.job_tune
    res = job.resources
    gpus = cluster.get("GPU", 0)
    use_gpu = gpus > 0 if res.use_gpu == "auto" else res.use_gpu
    workers = res.num_workers if isinstance(res.num_workers, int) else res.num_workers[1]
    cpus = tc.trial_cpus(res)
    if workers == 0:
        per_trial = {"CPU": cpus, **({"GPU": 1} if use_gpu else {}), **res.custom}
        gpus_each = float(use_gpu)
    else:
        per_trial = {"CPU": TRIAL_DRIVER_CPU}
        gpus_each = float(workers if use_gpu else 0)
    total = cluster.get("CPU", 1)
    reserve = DATA_CPUS if data_reads or total > 2 else 0.0
    free_cpus = max(total - reserve, cpus)  # at least one trial, even where that leaves Data less than a CPU
    fit = max(1, math.floor(free_cpus / cpus + 1e-9))
    if gpus_each:
        fit = min(fit, max(1, math.floor(gpus / gpus_each)))
    concurrency = tc.max_concurrent_trials or fit
    return TrialResources(per_trial, cpus, gpus_each, concurrency, cluster)


def with_data_task_cpus(spec: SweepSpec, res: TrialResources, data_reads: bool) -> SweepSpec:
    """Where the running trials leave Ray Data less than a whole CPU (2 CPUs, a trial of 0.2 + 2 x 0.5), its
    read/transform tasks ask for what is left (at least 0.25): at Ray Data's default of one CPU each the first
    read of every trial waits for ever. An explicit resources.data_task_cpus is kept."""
    left = res.cluster.get("CPU", 1) - res.concurrency * res.cpus_per_trial
    if not data_reads or left >= DATA_CPUS or spec.job.resources.data_task_cpus is not None:
        return spec
    cpus = max(0.25, math.floor(left * 4) / 4)
    logger.info("trials leave Ray Data %.2g CPU: its tasks ask for %g CPU each (resources.data_task_cpus)",
                max(left, 0.0), cpus)
    job = spec.job.model_copy(update={"resources": spec.job.resources.model_copy(update={"data_task_cpus": cpus})})
    return dataclasses.replace(spec, job=job)


def current_cluster() -> dict:
    """CPU/GPU totals of the cluster a sweep would run on, without starting Ray when none is running."""
    import ray

    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
        try:
            return dict(ray.cluster_resources())
        finally:
            ray.shutdown()
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def build_scheduler(spec: SweepSpec, sweep_dir: str):
    from ray.tune.schedulers import FIFOScheduler, MedianStoppingRule, PopulationBasedTraining

    tc, epochs = spec.job_tune, spec.job.train.epochs
    if tc.scheduler == "asha":
        storage.ensure_dir(sweep_dir)
        # max_t past the last epoch: ASHA never stops a trial that is about to report its final test metrics
        return ResumableASHA(str(Path(sweep_dir, RUNGS_FILE)), time_attr=TIME_ATTR, max_t=epochs + 1,
                             grace_period=tc.grace_period, reduction_factor=tc.reduction_factor)
    if tc.scheduler == "median":
        return MedianStoppingRule(time_attr=TIME_ATTR, grace_period=tc.grace_period, min_samples_required=2)
    if tc.scheduler == "pbt":
        from aidc.tune.space import to_tune

        return PopulationBasedTraining(
            time_attr=TIME_ATTR, perturbation_interval=tc.perturbation_interval, quantile_fraction=0.5,
            hyperparam_mutations={p: to_tune(s) for p, s in tc.space.items()}, synch=True,
        )
    return FIFOScheduler()


def build_searcher(spec: SweepSpec, concurrency: int):
    tc = spec.job_tune
    if tc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed))
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrency)


def sweep_dir(root: str, name: str) -> str:
    return storage.join(root, "sweeps", name)


def run_sweep(spec: SweepSpec, name: str, resume: bool):
    """Fit (or restore and finish) the sweep; returns Tune's ResultGrid."""
    import ray
    from ray import tune

    from aidc.ops.tuning import TrialStateMetrics
    from aidc.tune.cleanup import ReleaseOrphans
    from aidc.tune.live import LiveStatus
    from aidc.tune.trainable import repair_snapshot_checkpoints, run_trial, trial_payload

    job, tc = spec.job, spec.job_tune
    root = storage.storage_root(job.run.storage)
    path = sweep_dir(root, name)
    exists = tune.Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {name!r} to resume under {path}; run it without --resume first, "
                          "or check run.name and AIDC_STORAGE")
    storage.check_shared(root)  # multi-node: a trial retried on another node resumes from its checkpoints
    reads = sweep_reads(spec)  # opens the dataset's manifest: once
    res = trial_resources(spec, dict(ray.cluster_resources()), data_reads=reads)
    _check_trial_fits(spec, res)
    spec = with_data_task_cpus(spec, res, reads)
    share = not any(p.startswith("data.") for p in tc.space)
    allowed = data_cpus()
    if allowed is not None:  # through the gateway: the trials running at once split what it admitted for Ray Data
        os.environ[DATA_CPUS_ENV] = f"{floor_cpus(allowed / res.concurrency):g}"  # the shared datasets' too
    payload = trial_payload(spec, root, name, share_datasets=share)
    payload["data_cpus"] = os.environ.get(DATA_CPUS_ENV)
    payload["keep_checkpoints"] = None if tc.scheduler == "pbt" else KEEP_CHECKPOINTS
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=payload), res.per_trial)
    # Tune's experiment snapshot (what --resume restores; it also copies result.json to storage) every second.
    # With num_to_keep set Tune forced one every num_to_keep checkpoints of a trial; without it, "auto" waits 10 s
    # or more, and a resume would start each trial further back (and progress on storage would lag as much).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_S))
    logger.info("sweep %s: %s, %s, %d sample(s), %d trial(s) at once, %s per trial",
                name, tc.search, tc.scheduler, tc.num_samples, res.concurrency, res.per_trial)
    if exists:
        logger.info("sweep %s exists in %s: resuming it (finished trials are kept)", name, path)
        repair_snapshot_checkpoints(path)  # a checkpoint the snapshot names may have been pruned since
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=tune_space(job_with_tune(spec)))
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(job_with_tune(spec)),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=tc.num_samples,
                search_alg=build_searcher(spec, res.concurrency), scheduler=build_scheduler(spec, path),
                max_concurrent_trials=res.concurrency,
            ),
            run_config=tune.RunConfig(
                name=name, storage_path=storage.join(root, "sweeps"),
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                # Tune deletes none: each trial prunes its own (TrialReporter; PBT keeps all for exploits).
                # Tune's num_to_keep deletes from the driver between experiment snapshots: a driver killed in
                # between leaves a snapshot naming a deleted checkpoint, and deleting it again on restore raises
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                verbose=0,
                # trials by state as metrics (aidc.ops); what ended trials left reserved released; live status
                callbacks=[TrialStateMetrics(name, job.train.epochs), ReleaseOrphans(), LiveStatus(path)],
            ),
        )
    return tuner.fit()


KEEP_CHECKPOINTS = 2  # per trial: the newest and the one before it (a kill mid-copy of the newest)
SNAPSHOT_S = 1  # Tune's experiment snapshot period (TUNE_GLOBAL_CHECKPOINT_S, which overrides it)


def sweep_reads(spec: SweepSpec) -> bool:
    """Whether trials run Ray Data tasks as they train (each trial preprocesses, or its data is not cached)."""
    from aidc.train.trainer import reads_while_training

    return any(p.startswith("data.") for p in spec.job_tune.space) or reads_while_training(spec.job)


def _check_trial_fits(spec: SweepSpec, res: TrialResources) -> None:
    """A trial process no node can hold would stay PENDING in Tune for ever: stop before any trial starts."""
    from aidc.train.trainer import check_fits

    try:
        check_fits(spec.job, res.per_trial, who="each trial process")
    except AidcError as exc:
        raise ConfigError(f"tune: {exc}") from None


def job_with_tune(spec: SweepSpec):
    return spec.job.model_copy(update={"tune": spec.job_tune})


@dataclass
class SweepOutcome:
    name: str
    directory: str
    records: list
    table: object  # pandas DataFrame, best first
    best: object | None  # TrialRecord
    version: object | None  # RegisteredVersion


def tune_job(spec: SweepSpec, resume: bool = False) -> SweepOutcome:
    """The whole sweep: trials, results files, MLflow parent/child runs, the best model registered."""
    from aidc.data.dataset import open_dataset
    from aidc.train.trainer import default_run_name
    from aidc.tune import results, tracking

    job = spec.job
    if resume and not job.run.name:
        raise ConfigError("--resume needs the sweep's name: add --set run.name=<name> (see aidc sweeps list)")
    name = job.run.name or default_run_name(f"{job.name}-sweep")
    root = storage.storage_root(job.run.storage)
    grid = run_sweep(spec, name, resume)
    records = results.collect(grid, spec.metric)
    directory = sweep_dir(root, name)
    best = results.best_record(records, spec.metric, spec.mode)
    summary = {"name": name, "job": job.name, "search": spec.job_tune.search, "scheduler": spec.job_tune.scheduler,
               "trials": len(records), "statuses": {s: sum(r.status == s for r in records)
                                                    for s in ("completed", "stopped early", "errored")},
               "best_trial": best.trial_id if best else None, "best_params": best.params if best else None}
    table = results.write(records, directory, spec.metric, spec.mode, summary)
    artifacts = [Path(directory, f) for f in ("results.csv", "curves.png", "params.png")]
    uri, parent = tracking.log_sweep(spec, name, records, artifacts)
    version = None
    if best is not None:
        dataset = open_dataset(root, job.name, job.data.version)
        version = tracking.register_best(spec, best, dataset, parent)
        summary.update(registered=version.ref, registered_version=version.version, tracking_uri=uri)
        results.write(records, directory, spec.metric, spec.mode, summary)
    return SweepOutcome(name, directory, records, table, best, version)


def dry_run_lines(spec: SweepSpec) -> list[str]:
    """--dry-run: the resolved space, what one trial takes and how many run at once on the current cluster."""
    from aidc.tune.space import describe_space

    cluster = current_cluster()
    res = trial_resources(spec, cluster, data_reads=sweep_reads(spec))
    tc = spec.job_tune
    workers = spec.job.resources.num_workers
    return [
        f"# sweep: search {tc.search}, scheduler {tc.scheduler}, {tc.num_samples} sample(s), "
        f"{spec.mode} {spec.metric} (keyed on {TIME_ATTR}), best registered as "
        f"{spec.job.registry.model_name}@{tc.register_alias}",
        *(f"#   {line}" for line in describe_space(job_with_tune(spec))),
        f"# trial: {workers} Train worker(s) x {spec.job.resources.cpus_per_worker} CPU"
        f"{' (the loop runs in the trial process)' if workers == 0 else ''}; trial process {res.per_trial}; "
        f"{res.cpus_per_trial:g} CPU + {res.gpus_per_trial:g} GPU per trial in all",
        f"# cluster: {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU -> {res.concurrency} trial(s) at once"
        f"{' (tune.max_concurrent_trials)' if tc.max_concurrent_trials else ''}"
        f"{'; 1 CPU kept for Ray Data tasks' if cluster.get('CPU', 1) > 2 or sweep_reads(spec) else ''}",
    ]
