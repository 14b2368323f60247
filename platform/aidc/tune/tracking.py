"""MLflow for a sweep: one parent run, a child run per trial (parameters, per-epoch metrics, status), and
the best trial's model registered like jobs.train does, as a child of the sweep's run."""

from __future__ import annotations

import logging
from pathlib import Path

from aidc import storage
from aidc.registry import experiment_id, mlflow_client, tracking_uri
from aidc.train.register import register
from aidc.tune.results import TrialRecord

logger = logging.getLogger(__name__)


def log_sweep(spec, name: str, records: list[TrialRecord], artifacts: list[Path]) -> tuple[str, str]:
    """Parent + child runs; returns (tracking URI, parent run id)."""
    root = storage.storage_root(spec.job.run.storage)
    uri = tracking_uri(spec.job.run.tracking_uri, root)
    client = mlflow_client(uri)
    exp_id = experiment_id(client, spec.job.run.experiment, root)
    tc = spec.job_tune
    parent = client.create_run(exp_id, run_name=f"sweep-{name}", tags={"aidc.sweep": name, "aidc.kind": "sweep"})
    pid = parent.info.run_id
    for k, v in {"search": tc.search, "scheduler": tc.scheduler, "num_samples": tc.num_samples, "metric": spec.metric,
                 "mode": spec.mode, **{f"space.{p}": s.model_dump(exclude_none=True) for p, s in tc.space.items()}}.items():
        client.log_param(pid, k, str(v)[:500])
    for t in records:
        child = client.create_run(exp_id, run_name=f"{name}/{t.trial_id}",
                                  tags={"mlflow.parentRunId": pid, "aidc.sweep": name, "aidc.trial_status": t.status})
        cid = child.info.run_id
        for k, v in t.params.items():
            client.log_param(cid, k, str(v)[:500])
        for row in t.epoch_rows:
            for k, v in row.items():
                if isinstance(v, (int, float)) and (k.startswith(("val_", "train_loss", "start_")) or k == "lr"):
                    client.log_metric(cid, k, float(v), step=int(row["epochs_done"]))
        for k, v in t.final.items():
            if k.startswith("test_") and isinstance(v, (int, float)):
                client.log_metric(cid, k, float(v))
        client.set_terminated(cid, status="FAILED" if t.status == "errored" else "FINISHED")
    for path in artifacts:
        client.log_artifact(pid, str(path))
    client.set_terminated(pid)
    return uri, pid


def register_best(spec, best: TrialRecord, dataset, parent_run_id: str):
    """Register the best trial's model (its best epoch's weights) as registry.model_name@register_alias."""
    from aidc.config import JobConfig
    from aidc.train import checkpoint as ckpt
    from aidc.train.trainer import TrainOutcome
    from aidc.tune.space import apply_params

    cfg = JobConfig.model_validate(apply_params(spec.job.model_dump(mode="json"), best.params))
    state = ckpt.load(best.checkpoint_path)
    metrics = best.final or (best.epoch_rows[-1] if best.epoch_rows else {})
    outcome = TrainOutcome(best.trial_id, dataset, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                           best.checkpoint_path, state["history"], state["resumes"])
    return register(cfg, outcome, alias=spec.job_tune.register_alias, parent_run_id=parent_run_id)
