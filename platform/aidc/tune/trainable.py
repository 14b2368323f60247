"""The Tune trial: one real Ray Train run of the platform's own loop, reporting every epoch to Tune.

Train V2 pattern: a Tune function trainable builds a TorchTrainer (aidc.train.trainer.build_trainer, the
same construction as jobs.train) and fits it. Each epoch's metrics go to Tune together with a Tune
checkpoint that is a copy of the loop's state (weights, optimizer, scheduler, RNG, history). That copy
is what makes the rest work: a restored or retried trial continues from it, and PBT's exploit hands a
donor's copy to a weaker trial, which continues from it under its perturbed hyperparameters.

- `num_workers: 0`: Train's local mode runs the loop in the trial process; the loop calls the reporter.
- `num_workers: N`: N Train workers; a Train callback forwards each report (metrics + the registered
  Train checkpoint) through a queue to the trial, which copies the checkpoint and reports to Tune.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2.api.callback import UserCallback

from aidc import storage
from aidc.config import JobConfig
from aidc.runtime import DATA_CPUS_ENV, bound_data
from aidc.tune.space import apply_params

logger = logging.getLogger(__name__)

ORIGIN = "origin.json"  # in each Tune checkpoint: which trial and epoch the state comes from


def _ages(fs, dirs: list[str]) -> list[tuple[int, str, bool]]:
    """(when its origin.json was written or -1, path, whole) of each checkpoint folder. Whole = the loop's state
    and its origin are both there (a kill mid-copy leaves one of them missing)."""
    import pyarrow.fs as pafs

    from aidc.train.checkpoint import STATE_FILE

    origins = fs.get_file_info([f"{d}/{ORIGIN}" for d in dirs])
    states = fs.get_file_info([f"{d}/{STATE_FILE}" for d in dirs])
    return [(o.mtime_ns if o.type == pafs.FileType.File else -1, d,
             o.type == pafs.FileType.File and st.type == pafs.FileType.File) for d, o, st in zip(dirs, origins, states)]


def _checkpoints(fs, trial_dir: str) -> list[tuple[str, bool]]:
    """(path, whole) of a trial's checkpoint folders, oldest first by when their origin.json was written (not by
    name: after a restore, Tune's counter can name a new checkpoint below older ones)."""
    import pyarrow.fs as pafs

    dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
    return [(d, ok) for _, d, ok in sorted(_ages(fs, dirs))]


def _whole(fs, path: str) -> bool:
    return _ages(fs, [path])[0][2]


def _newest_whole(fs, trial_dir: str) -> str | None:
    """The trial's newest whole checkpoint folder (by age), or None."""
    return next((d for d, ok in reversed(_checkpoints(fs, trial_dir)) if ok), None)


def usable_checkpoint(checkpoint):
    """`checkpoint` if it is whole on storage; else the newest whole checkpoint of the same trial; else None.

    Tune's experiment snapshot can lag the trial directory: a driver killed after a trial's newer checkpoint
    made CheckpointConfig(num_to_keep) delete the one the last snapshot names, but before the next snapshot,
    restores that trial from a checkpoint that is gone (the sweep then lost the trial and registered a missing
    file). aidc's own pruning (prune_checkpoints) can leave the same."""
    from ray import tune

    if checkpoint is None:
        return None
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    if _whole(fs, path):
        return checkpoint
    other = _newest_whole(fs, path.rsplit("/", 1)[0])
    if other is not None:
        logger.warning("checkpoint %s is gone (Tune's snapshot lagged the trial directory): using %s",
                       checkpoint.path, other)
        return tune.Checkpoint(other, filesystem=fs)
    logger.warning("checkpoint %s is gone and its trial has no other whole checkpoint", checkpoint.path)
    return None


def repair_snapshot_checkpoints(sweep_dir: str) -> list[str]:
    """Before a resume: give every checkpoint the last experiment snapshot names, and that is gone, the contents
    of its trial's newest whole checkpoint; returns the folders written.

    Tune restores an unfinished trial from the checkpoint its snapshot names, and refuses one that is gone
    before any trial code runs ("Could not recover from checkpoint as it does not exist on storage anymore":
    the trial errors). The snapshot lags the trial directory, whose own pruning (prune_checkpoints) can remove
    the named checkpoint between two snapshots - a fresh-clone run lost a trial so. The trial then continues
    from its newest state, as usable_checkpoint does inside it. Reads the snapshot with Tune's own Trial
    (from_json_state); best effort: a snapshot it cannot read is left to Tune."""
    import json

    import pyarrow.fs as pafs
    from ray.tune.experiment.trial import Trial

    fs, path = storage.filesystem(sweep_dir)
    states = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                    if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))
    if not states:
        return []
    written = []
    try:
        with fs.open_input_stream(states[-1]) as f:
            trial_data = json.loads(f.read().decode())["trial_data"]
        for json_state, run_metadata in trial_data:
            trial = Trial.from_json_state(json_state, stub=True)
            if trial.status == Trial.TERMINATED:  # finished: Tune restores it no more
                continue
            trial.restore_run_metadata(run_metadata)
            named = trial.checkpoint
            if named is None or _whole(fs, target := named.path.rstrip("/")):
                continue
            newest = _newest_whole(fs, target.rsplit("/", 1)[0])  # never target itself: it is not whole
            if newest is None:
                continue
            logger.warning("sweep snapshot names %s, which is gone: giving it the contents of %s", target, newest)
            fs.create_dir(target)  # (a half-copied one: emptied first)
            fs.delete_dir_contents(target)
            pafs.copy_files(newest, target, source_filesystem=fs, destination_filesystem=fs)
            written.append(target)
    except Exception as exc:  # noqa: BLE001 - Tune's own restore then reports what it finds
        logger.warning("could not check the checkpoints %s names: %s", states[-1], exc)
    return written


def continue_numbering(trial_dir: str) -> None:
    """Name this trial's next checkpoint after its highest-numbered folder. A restored trial's counter comes from
    Tune's snapshot, which can lag the folder (see usable_checkpoint): its new checkpoints would otherwise be
    written over older folders of the same name. Ray's session counter is private API: best effort."""
    try:
        from ray.train._internal.session import get_session

        fs, path = storage.filesystem(trial_dir)
        highest = max((int(d.rsplit("_", 1)[1]) for d, _ in _checkpoints(fs, path)), default=-1)
        session = get_session()
        if session is not None and session.storage.current_checkpoint_index < highest:
            logger.info("trial folder %s holds checkpoint_%06d: continuing the numbering after it", path, highest)
            session.storage.current_checkpoint_index = highest
    except Exception as exc:  # noqa: BLE001 - only names folders; pruning orders by age anyway
        logger.debug("could not align the checkpoint numbering of %s: %s", trial_dir, exc)


class TrialReporter:
    """Turns the loop's reports into Tune results with a Tune checkpoint (the loop's state + its origin)."""

    def __init__(self, trial_id: str, origin: dict | None, trial_dir: str | None = None, keep: int | None = None):
        self.trial_id = trial_id
        self.origin = origin  # set when this run started from a checkpoint (its own, or a PBT donor's)
        self.trial_dir, self.keep = trial_dir, keep  # the trial's directory on storage; checkpoints kept there

    def __call__(self, metrics: dict, directory: str | None) -> None:
        from ray import tune

        final = "best_epoch" in metrics
        if "epoch_time_s" not in metrics and not final:
            return  # a mid-epoch checkpoint report carries no validation metrics: nothing for schedulers
        out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        out = {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
        out["epochs_done"] = int(metrics["epoch"]) + 1  # what schedulers key on, stable across restores
        out["completed"] = int(final)
        if final:  # the final report repeats the last epoch's row: its start_* belong to that epoch
            out = {k: v for k, v in out.items() if not k.startswith("start_")}
        elif self.origin:  # first epoch after starting from a checkpoint: say whose state it was
            out["init_trial"], out["init_epoch"] = self.origin["trial_id"], int(self.origin["epoch"])
            out.update({f"init_{k}": v for k, v in self.origin.get("metrics", {}).items()})
            self.origin = None
        if directory is None:
            tune.report(out)
            return
        with tempfile.TemporaryDirectory() as tmp:
            dst = Path(tmp, "state")
            shutil.copytree(directory, dst)
            val = {k: v for k, v in out.items() if k.startswith("val_") and isinstance(v, float)}
            (dst / ORIGIN).write_text(json.dumps({"trial_id": self.trial_id, "epoch": int(metrics["epoch"]),
                                                  "metrics": val}))
            tune.report(out, checkpoint=tune.Checkpoint.from_directory(str(dst)))
        if self.keep and self.trial_dir:
            prune_checkpoints(self.trial_dir, self.keep)


def prune_checkpoints(trial_dir: str, keep: int) -> None:
    """Delete all but the trial's newest `keep` checkpoints by age (it has just persisted the newest)."""
    fs, path = storage.filesystem(trial_dir)
    for old, _ in _checkpoints(fs, path)[:-keep]:
        try:
            fs.delete_dir(old)
        except OSError as exc:  # another attempt of the trial pruned it first
            logger.debug("could not delete %s: %s", old, exc)


class ForwardToTrial(UserCallback):
    """Train callback (runs in the Train controller): hands rank 0's report and checkpoint to the trial."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))


WORKERS = "__workers__"  # a queue message about the worker group, not a report
WAITING_DIR = "waiting"  # <sweep>/waiting/<trial_id>.json while a trial's workers wait for resources


class WatchWorkerGroup(WorkerGroupCallback):
    """Train callback (in the controller): tells the trial when its worker group asks for resources and when it
    has them, so `aidc sweeps show` can say which trials wait and since when."""

    def __init__(self, queue):
        self.queue = queue

    def before_worker_group_start(self, worker_group_context) -> None:
        self.queue.put((WORKERS, {"workers": worker_group_context.num_workers,
                                  "resources": dict(worker_group_context.resources_per_worker)}))

    def after_worker_group_start(self, worker_group) -> None:
        self.queue.put((WORKERS, None))


def waiting_file(sweep_dir: str, trial_id: str) -> Path:
    return Path(sweep_dir, WAITING_DIR, f"{trial_id}.json")


def _note_waiting(path: Path | None, ask: dict | None) -> None:
    if path is None:
        return
    if ask is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**ask, "since": time.time()}))


def _fit_multi_worker(trainer_factory, reporter: TrialReporter, cfg: JobConfig, waiting: Path | None) -> None:
    """Fit in a thread while this (the trial's) thread reports what the Train callback forwards."""
    from ray.util.queue import Empty, Queue

    from aidc.train.trainer import check_fits, fit as fit_trainer

    check_fits(cfg)  # a worker no node can hold fails this trial at once
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = trainer_factory([ForwardToTrial(queue), WatchWorkerGroup(queue)])
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = fit_trainer(trainer, cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the trial thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="aidc-trial-fit", daemon=True)
    thread.start()
    while True:
        try:
            metrics, checkpoint = queue.get(timeout=0.5)
        except Empty:
            if not thread.is_alive() and queue.empty():
                break
            continue
        if metrics == WORKERS:
            _note_waiting(waiting, checkpoint)
        elif checkpoint is None:
            reporter(metrics, None)
        else:
            with checkpoint.as_directory() as d:
                reporter(metrics, d)
    thread.join()
    _note_waiting(waiting, None)
    if "error" in outcome:
        raise outcome["error"]


def run_trial(params: dict, sweep: dict) -> None:
    """Tune function trainable. `sweep`: the base job config dict, the train-runs path, shared datasets."""
    from ray import tune

    from aidc.train.trainer import build_trainer, ingest_context, prepare_datasets

    trial_id = tune.get_context().get_trial_id()
    if sweep.get("data_cpus"):  # this trial's share of the CPUs the gateway admitted for Ray Data: its own
        os.environ[DATA_CPUS_ENV] = sweep["data_cpus"]  # pipelines', and Train's ingest of the shared datasets
        bound_data()  # (Train takes this process's DataContext for the ingest)
    cfg = JobConfig.model_validate(apply_params(sweep["job"], params))
    if sweep.get("datasets") is None:  # the space changes preprocessing (data.*): this trial's own version
        from aidc.tasks import preprocess

        dv, _ = preprocess(cfg)
        _, manifest, datasets = prepare_datasets(cfg, dv)
    else:
        ingest_context()  # the ingest's order as in jobs.train (prepare_datasets set it in the sweep's driver)
        manifest, datasets = sweep["manifest"], sweep["datasets"]

    # test hook as in jobs.train, from the sweep driver's environment: <file>:<step> kills this trial once
    extras: dict = {"fault_marker": sweep.get("fault_marker")}
    origin = None
    start = usable_checkpoint(tune.get_checkpoint())
    # only a trial that starts from a checkpoint needs a local copy of it: a trial Tune stops early can end
    # without reaching `finally`, and the empty dir made for every trial was left in /tmp (22 after a week)
    workdir = tempfile.mkdtemp(prefix="aidc-trial-") if start is not None else None
    try:
        if start is not None:  # restored/retried trial, or a PBT exploit: continue from this state
            local = start.to_directory(str(Path(workdir, "start")))
            origin = json.loads(Path(local, ORIGIN).read_text())
            extras["init_checkpoint"] = local
            logger.info("trial %s starts from trial %s's epoch %d", trial_id, origin["trial_id"], origin["epoch"])
        trial_dir = storage.join(sweep["sweep_dir"], Path(tune.get_context().get_trial_dir()).name)
        continue_numbering(trial_dir)
        reporter = TrialReporter(trial_id, origin, trial_dir, sweep.get("keep_checkpoints"))
        run_name = f"{trial_id}-{time.strftime('%H%M%S')}"  # one Train run per start of this trial

        def make_trainer(callbacks):
            return build_trainer(cfg, manifest, datasets, run_name=run_name, storage_path=sweep["train_runs"],
                                 callbacks=callbacks, loop_extras=extras)

        if cfg.resources.num_workers == 0:  # the loop itself, in this process (no Train worker group)
            from aidc.train.trainer import loop_config
            from aidc.train.loop import train_loop_per_worker

            train_loop_per_worker({**loop_config(cfg, manifest), **extras, "tune_report": reporter,
                                   "local_datasets": datasets})
        else:
            where = sweep.get("sweep_dir")  # the waiting note is for local/NFS roots (an object store has no status)
            waiting = waiting_file(where, trial_id) if where and not storage.is_uri(where) else None
            _fit_multi_worker(make_trainer, reporter, cfg, waiting)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def trial_payload(spec, root: str, sweep_name: str, share_datasets: bool) -> dict:
    """What every trial receives (through tune.with_parameters: put in the object store once)."""
    payload = {"job": spec.job.model_dump(mode="json"), "fault_marker": os.environ.get("AIDC_FAULT_MARKER"),
               "train_runs": storage.join(root, "sweeps", sweep_name, "train-runs"),
               "sweep_dir": storage.join(root, "sweeps", sweep_name)}
    if share_datasets:
        from aidc.train.trainer import prepare_datasets

        dv, manifest, datasets = prepare_datasets(spec.job)
        payload.update(manifest=manifest, datasets=datasets, dataset_uri=dv.uri)
    return payload
