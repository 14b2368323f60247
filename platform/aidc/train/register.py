"""A finished training run as a registered model version: its MLflow run (params, per-epoch metrics, curves,
artifacts), the task's evaluation after training, and the signed model folder under an alias.

Orchestration over the registry (aidc.registry holds the versions, manifests and MLflow plumbing): it reads the
run's checkpoint (aidc.train.checkpoint) and asks the workload (aidc.tasks) to evaluate and write the model.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from aidc import storage
from aidc.registry import (WEIGHTS, RegisteredVersion, experiment_id, find_live_run, mlflow_client, new_version,
                           tracking_uri)
from aidc.security.signing import sign_model_dir
from aidc.tasks import get_task
from aidc.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def plot_curves(history: list[dict], path: Path) -> Path:
    """A PNG of the per-epoch training curves (losses, and the validation metrics besides loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    metrics = sorted({k for h in history for k, v in h.items()
                      if k.startswith("val_") and k != "val_loss" and isinstance(v, (int, float))})
    fig, axes = plt.subplots(1, 1 + bool(metrics), figsize=(11 if metrics else 6, 4), squeeze=False)
    for key in ("train_loss", "val_loss"):
        axes[0][0].plot(epochs, [h.get(key) for h in history], marker="o", label=key)
    axes[0][0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0][0].legend()
    for key in metrics:
        axes[0][-1].plot(epochs, [h.get(key) for h in history], marker="o", label=key)
    if metrics:
        axes[0][-1].set(xlabel="epoch", title="validation metrics")
        axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def register(cfg, outcome, extra_artifacts: list[Path] = (), alias: str | None = None,
             parent_run_id: str | None = None, spec_extra: dict | None = None,
             tags: dict | None = None) -> RegisteredVersion:
    """Log the run (params, per-epoch metrics, artifacts) and register its final model under an alias.

    alias: default cfg.registry.alias; parent_run_id: log the run as a child of that run (a sweep's);
    spec_extra: more model.json entries (e.g. how a compressed version was made); tags: more version tags.
    """
    alias = alias or cfg.registry.alias
    root = storage.storage_root(cfg.run.storage)
    uri = tracking_uri(cfg.run.tracking_uri, root)
    client = mlflow_client(uri)
    manifest = outcome.dataset.manifest()
    with tempfile.TemporaryDirectory() as tmp:
        from ray.train import Checkpoint

        with Checkpoint(outcome.checkpoint_path).as_directory() as d:
            state = ckpt.load(d)
        if state.get("best"):  # the registered weights are the best epoch's (what test metrics scored)
            state["model"] = state["best"]["model"]
        spec = {
            "task": cfg.task,
            "model": cfg.model.model_dump(mode="json"),
            "features": manifest["features"],
            "transform": manifest["transform"],
            "dataset": outcome.dataset.uri,
            "dataset_fingerprint": manifest["fingerprint"],
            **(spec_extra or {}),
        }
        task = get_task(cfg.task)
        before = set(outcome.metrics)
        files, final = task.after_training(cfg, outcome, state["model"], Path(tmp))
        if cfg.eval.robustness is not None:  # accuracy under FGSM/PGD (ART), recorded with the version
            from aidc.tasks.robustness import robustness

            net = task.build_model(spec["model"], spec["features"])
            net.load_state_dict(state["model"])
            outcome.metrics.update(robustness(task, net, spec["features"], spec["transform"],
                                              outcome.dataset.read_numpy("test"), cfg.eval.robustness))
        extra_artifacts = [*extra_artifacts, *files]
        evaluated = {k: v for k, v in outcome.metrics.items() if k not in before}  # logged with the run below
        spec["metrics"] = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
        if cfg.train.privacy is not None:  # DP-SGD: the plan it trained under and the ε its accountant counted
            from aidc.train.privacy import plan

            train_rows = manifest["counts"].get("examples", manifest["counts"]["splits"])["train"]
            spec["privacy"] = {**plan(cfg, train_rows), "epsilon_spent": outcome.metrics["epsilon"]}
        model_dir = Path(tmp, "model")
        hashes = task.write_model_dir(model_dir, state["model"], spec, cfg, model=final)
        del final
        sign_model_dir(model_dir)  # model-signing over every file (aidc.security.signing)

        exp_id = experiment_id(client, cfg.run.experiment, root)
        run_tags = {"aidc.dataset": outcome.dataset.uri,
                    **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        live = find_live_run(client, exp_id, outcome.run_name)  # the run the loop logged epochs into, live
        if live is not None and client.list_artifacts(live.info.run_id, "model"):
            live = None  # it already holds a registered version: a second registration gets a run of its own
        run = live or client.create_run(exp_id, run_name=outcome.run_name, tags=run_tags)
        run_id = run.info.run_id
        for k, v in (run_tags if live else {}).items():
            client.set_tag(run_id, k, v)
        for k, v in _flatten(cfg.model_dump(mode="json")).items():
            client.log_param(run_id, k, str(v)[:500])
        for row in ([] if live else outcome.history):  # a live run has every epoch's metrics already
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    client.log_metric(run_id, k, float(v), step=int(row["epoch"]))
        for k, v in evaluated.items():
            client.log_metric(run_id, k, float(v))
        client.log_artifacts(run_id, str(model_dir), artifact_path="model")
        client.log_artifact(run_id, str(plot_curves(outcome.history, Path(tmp, "curves.png"))))
        client.log_dict(run_id, {"resumes": outcome.resumes}, "resumes.json")  # restarts, with elastic resizes
        for path in extra_artifacts:
            client.log_artifact(run_id, str(path))
        client.set_terminated(run_id)

    return new_version(client, uri, cfg.registry.model_name, alias, run, f"aidc {cfg.task} model",
                        {"dataset": outcome.dataset.uri,
                         **({"weights_sha256": hashes[WEIGHTS]} if WEIGHTS in hashes else {}),
                         "train_run": outcome.run_name, **(tags or {})})
