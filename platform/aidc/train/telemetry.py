"""Training telemetry: Prometheus gauges per step/epoch and live MLflow metrics per epoch, from rank 0.

The loop calls a `TrainTelemetry` (one line per hook); `run_training` is wrapped by `track_training_run`,
which counts each run's outcome; `loop_extras=LIVE_MLFLOW` (jobs.train) turns live MLflow logging on. The
live MLflow run is found again by its tag `aidc.train_run` (a restarted worker continues the same run), and
`aidc.train.register` logs the model into that same run, so the MLflow UI shows the curves while training
and the model after it.
"""

from __future__ import annotations

import functools
import logging
import os
import time

from aidc import registry, storage
from aidc.ops import metrics
from aidc.ops.energy import GpuEnergy

logger = logging.getLogger(__name__)
# loop_extras that turn on live MLflow logging (jobs.train passes them; rank 0 opens the MLflow run, ~1-2 s)
LIVE_MLFLOW = {"mlflow_live": True}


def _tracking(job: dict):
    """(MLflow client, tracking URI, experiment id) of the job's registry."""
    root = storage.storage_root(job["run"].get("storage"))
    uri = registry.tracking_uri(job["run"].get("tracking_uri"), root)
    client = registry.mlflow_client(uri)
    return client, uri, registry.experiment_id(client, job["run"]["experiment"], root)


# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s, vendor data sheets); AIDC_GPU_PEAK_TFLOPS overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0}


def peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of one GPU by its name ('NVIDIA H200' -> 989e12), or None when unknown."""
    if os.environ.get("AIDC_GPU_PEAK_TFLOPS"):
        return float(os.environ["AIDC_GPU_PEAK_TFLOPS"]) * 1e12
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in device_name.upper()), None)


def model_flops_utilization(params: int, tokens_per_s: float, peak_total: float) -> float:
    """MFU with the 6N FLOPs-per-token estimate (forward + backward, attention term left out)."""
    return 6.0 * params * tokens_per_s / peak_total


class TrainTelemetry:
    """Hooks the training loop calls; everything is a no-op except on rank 0, and never raises."""

    def __init__(self, config: dict, rank: int, resumed: bool = False, model=None, world: int = 1):
        self.on = rank == 0
        job = config["job"]
        self.job = job["name"]
        self.mfu_scale = self._mfu_scale(job, model, world) if self.on else None
        self.run = self._run_name(in_tune_function=config.get("local_datasets") is not None)
        self.labels = {"job": self.job, "run": self.run}
        self.client = self.run_id = None
        self.energy = GpuEnergy() if self.on else None
        if not self.on:
            return
        metrics.set_gauge("aidc_train_running", 1, **self.labels)
        metrics.set_gauge("aidc_train_last_step_timestamp_seconds", time.time(), **self.labels)
        if resumed:
            metrics.inc("aidc_train_restarts_total", **self.labels)
        if config.get("mlflow_live"):
            self._start_mlflow(job)

    @staticmethod
    def _mfu_scale(job: dict, model, world: int) -> float | None:
        """6N / (peak FLOP/s of all workers) for language models on known GPUs (tokens/s times it = MFU)."""
        try:
            import torch

            if model is None or job.get("task") != "language_model" or not torch.cuda.is_available():
                return None
            peak = peak_flops(torch.cuda.get_device_name())
            params = sum(p.numel() for p in model.parameters())
            return model_flops_utilization(params, 1.0, peak * world) if peak else None
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def _run_name(in_tune_function: bool) -> str:
        try:
            if in_tune_function:  # a num_workers: 0 Tune trial runs the loop in its own function
                import ray.tune

                return ray.tune.get_context().get_trial_name()
            import ray.train

            return ray.train.get_context().get_experiment_name()
        except Exception:  # noqa: BLE001 - a loop called directly (unit tests)
            return "local"

    def _start_mlflow(self, job: dict) -> None:
        try:
            self.client, _, exp_id = _tracking(job)
            run = registry.find_live_run(self.client, exp_id, self.run)
            if run is None:
                run = self.client.create_run(exp_id, run_name=self.run, tags={registry.RUN_TAG: self.run,
                                                                             "aidc.status": "training"})
            self.run_id = run.info.run_id
            logger.info("logging live metrics to MLflow run %s (%s)", self.run_id, self.run)
        except Exception as exc:  # noqa: BLE001 - tracking problems must not stop training
            logger.warning("live MLflow logging is off for this run: %s", exc)
            self.client = None

    def step(self, step: int) -> None:
        if self.on:
            metrics.set_gauge("aidc_train_step", step, **self.labels)
            metrics.set_gauge("aidc_train_last_step_timestamp_seconds", time.time(), **self.labels)

    def epoch(self, row: dict) -> None:
        """One finished epoch's metrics (the loop's history row): gauges, and a point per metric in MLflow."""
        if not self.on:
            return
        metrics.set_gauge("aidc_train_epoch", row["epoch"] + 1, **self.labels)
        metrics.set_gauge("aidc_train_samples_per_second", row.get("samples_per_s", 0.0), **self.labels)
        for split in ("train", "val"):
            if f"{split}_loss" in row:
                metrics.set_gauge("aidc_train_loss", row[f"{split}_loss"], split=split, **self.labels)
        if self.mfu_scale:  # a language model's samples are tokens
            metrics.set_gauge("aidc_train_model_flops_utilization_ratio",
                              self.mfu_scale * row.get("samples_per_s", 0.0), **self.labels)
        kwh = self.energy.kwh() if self.energy else None
        if kwh is not None:
            metrics.set_gauge("aidc_train_gpu_energy_kwh", kwh, **self.labels)
        if self.client is None:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            values = {**{k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not
                         isinstance(v, bool) and k not in ("epoch", "step")}, **({"gpu_energy_kwh": kwh} if kwh else {})}
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["epoch"])) for k, v in values.items()])
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not log epoch %s to MLflow: %s", row.get("epoch"), exc)

    def finish(self) -> None:
        if self.on:
            metrics.set_gauge("aidc_train_running", 0, **self.labels)


def observe_checkpoint_save(job: str, seconds: float) -> None:
    metrics.observe("aidc_train_checkpoint_save_seconds", seconds, job=job)


def track_training_run(run_training):
    """Decorator of the Train driver: each run's outcome counted (completed/errored) where Prometheus sees it."""

    @functools.wraps(run_training)
    def wrapper(cfg, *args, **kwargs):
        from aidc.ops.durable import durable_inc

        try:
            outcome = run_training(cfg, *args, **kwargs)
        except Exception:
            durable_inc("aidc_train_runs_total", job=cfg.name, outcome="errored")
            raise
        durable_inc("aidc_train_runs_total", job=cfg.name, outcome="completed")
        return outcome

    return wrapper
