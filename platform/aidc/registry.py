"""Model versions, aliases and integrity manifests in the MLflow Model Registry.

A registered version is a folder of plain files: weights as safetensors, the model/transform
description as JSON, the resolved job config, and a sha256 manifest of them all. Loading rebuilds
the model through aidc.models and refuses files whose hashes do not match (no pickle involved).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aidc import storage
from aidc.storage import sha256_file
from aidc.errors import IntegrityError, RegistryError
from aidc.security.signing import SIGNATURE, record_registration, sign_model_dir, verify_or_refuse

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
SPEC = "model.json"
CONFIG = "config.yaml"
MANIFEST = "MANIFEST.sha256.json"


def tracking_uri(explicit: str | None = None, root: str | None = None) -> str:
    """An explicit URI, else $MLFLOW_TRACKING_URI, else a SQLite file under the storage root."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = storage.storage_root(root)
    storage.ensure_dir(root)
    return f"sqlite:///{root}/mlflow.db"


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; keep the environment as it was, or a later
    tracking_uri() for another storage root (another job or test module in this process) would land here."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _client(uri: str):
    from mlflow import MlflowClient

    _set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, root: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri:
        location = Path(root, "mlartifacts").as_uri()  # not ./mlruns of whatever cwd a job has
    return client.create_experiment(name, artifact_location=location)


def write_manifest(directory: Path) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}  # model.sig signs the manifest, not vice versa
    (directory / MANIFEST).write_text(json.dumps(files, indent=2))
    return files


def verify_manifest(directory: Path) -> None:
    path = directory / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{directory} has no {MANIFEST}: not an aidc model, or it was tampered with")
    expected = json.loads(path.read_text())
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    if present != set(expected):
        raise IntegrityError(
            f"model files in {directory} differ from its manifest: "
            f"missing {sorted(set(expected) - present)}, unexpected {sorted(present - set(expected))}"
        )
    for name, digest in expected.items():
        actual = sha256_file(directory / name)
        if actual != digest:
            raise IntegrityError(f"{name} in {directory} fails its sha256 check ({actual[:12]} != {digest[:12]}); "
                                "refusing to load a modified model")


def export_model_dir(directory: Path, *, state_dict: dict, spec: dict, config_yaml: str) -> dict:
    """Write a self-describing model folder (weights, spec, config, manifest)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # Clones: tied weights (GPT head = token embedding) share storage, which safetensors refuses.
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}, str(directory / WEIGHTS))
    (directory / SPEC).write_text(json.dumps(spec, indent=2))
    (directory / CONFIG).write_text(config_yaml)
    return write_manifest(directory)


@dataclass
class RegisteredVersion:
    name: str
    version: str
    alias: str
    run_id: str
    tracking_uri: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"


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
    from aidc.tasks import get_task
    from aidc.train import checkpoint as ckpt

    root = storage.storage_root(cfg.run.storage)
    uri = tracking_uri(cfg.run.tracking_uri, root)
    client = _client(uri)
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
        extra_artifacts = [*extra_artifacts, *files]
        evaluated = {k: v for k, v in outcome.metrics.items() if k not in before}  # logged with the run below
        spec["metrics"] = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
        model_dir = Path(tmp, "model")
        hashes = task.write_model_dir(model_dir, state["model"], spec, cfg, model=final)
        del final
        sign_model_dir(model_dir)  # model-signing over every file (aidc.security.signing)

        exp_id = _experiment_id(client, cfg.run.experiment, root)
        run_tags = {"aidc.dataset": outcome.dataset.uri,
                    **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
        from aidc.ops.training import find_live_run

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

    return _new_version(client, uri, cfg.registry.model_name, alias, run, f"aidc {cfg.task} model",
                        {"dataset": outcome.dataset.uri,
                         **({"weights_sha256": hashes[WEIGHTS]} if WEIGHTS in hashes else {}),
                         "train_run": outcome.run_name, **(tags or {})})


def _new_version(client, uri: str, name: str, alias: str, run, description: str, tags: dict) -> RegisteredVersion:
    """A new version of `name` (created if new) from the run's `model/` artifacts, with `alias` moved to it."""
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description=description)
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags)
    client.set_registered_model_alias(name, alias, mv.version)
    logger.info("registered %s version %s as @%s", name, mv.version, alias)
    record_registration(name, str(mv.version), alias)  # audit log
    return RegisteredVersion(name, str(mv.version), alias, run.info.run_id, uri)


def register_model_dir(model_dir: Path, name: str, alias: str, *, uri: str | None = None, root: str | None = None,
                       experiment: str = "imports", run_name: str | None = None, tags: dict | None = None,
                       description: str = "imported model") -> RegisteredVersion:
    """Register a folder written by `export_model_dir` (e.g. a converted Hugging Face checkpoint) as a new
    version of `name`, pointing `alias` at it: the same files, manifest and MLflow records as `register`."""
    verify_manifest(model_dir)
    sign_model_dir(model_dir)  # model-signing over every file (aidc.security.signing)
    root = storage.storage_root(root)
    uri = tracking_uri(uri, root)
    client = _client(uri)
    run = client.create_run(_experiment_id(client, experiment, root), run_name=run_name or f"import-{name}")
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    weights = json.loads((model_dir / MANIFEST).read_text()).get(WEIGHTS)  # none: a sharded Hugging Face folder
    return _new_version(client, uri, name, alias, run, description,
                        {**({"weights_sha256": weights} if weights else {}), **(tags or {})})


_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


def resolve(ref: str, uri: str):
    """'name@alias', 'name/3' or 'name' (the newest version) -> MLflow ModelVersion."""
    m = _REF.match(ref or "")
    if not m:
        raise RegistryError(f"bad model reference {ref!r}; use name@alias (digits-cnn@champion) or name/version")
    client = _client(uri)
    name = m["name"]
    try:
        if m["alias"]:
            return client.get_model_version_by_alias(name, m["alias"])
        if m["version"]:
            return client.get_model_version(name, m["version"])
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise RegistryError(f"model {name!r} has no versions in {uri}")
        return max(versions, key=lambda v: int(v.version))
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(
            f"model {ref!r} not found in registry {uri}: {str(exc).splitlines()[0]}. "
            f"{_MAKES.get(m['alias'], _MAKES[None])} or check the name/alias and AIDC_STORAGE."
        ) from None


# the alias jobs.compress registers each method's version under (unless compress.alias says otherwise)
COMPRESSED_ALIAS = {"int8": "int8", "prune": "pruned", "distill": "distilled"}
# which command makes a version with this alias (the hint of a failed lookup)
_MAKES = {None: "Train one first (python -m jobs.train --config ...)",
          "tuned": "Run a sweep first (python -m jobs.tune --config ...)",
          **{alias: f"Make it first (python -m jobs.compress --config ... --set compress.method={method})"
             for method, alias in COMPRESSED_ALIAS.items()}}


def read_spec(ref: str, uri: str) -> tuple[object, dict]:
    """A version's model.json alone, unverified: what the version is (to route it), without downloading its
    weights. Whatever then loads the version fetches it with fetch(), which verifies every file."""
    import mlflow

    mv = resolve(ref, uri)
    _set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{mv.source.rstrip('/')}/{SPEC}", dst_path=tmp)
        return mv, json.loads(Path(path).read_text())


def fetch(ref: str, uri: str, dst: str | None = None) -> tuple[object, Path]:
    """Download a registered version's files and verify its signature (trusted keys) and sha256 manifest."""
    import mlflow

    mv = resolve(ref, uri)
    _set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=dst or tempfile.mkdtemp()))
    verify_or_refuse(local, f"{mv.name}/{mv.version}", then=verify_manifest)  # signature, then sha256 manifest
    return mv, local
