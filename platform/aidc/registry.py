"""Model versions, aliases and integrity manifests in the MLflow Model Registry.

A registered version is a folder of plain files: weights as safetensors, the model/transform
description as JSON, the resolved job config, and a sha256 manifest of them all. Loading rebuilds
the model through aidc.models and refuses files whose hashes do not match (no pickle involved).
"""

from __future__ import annotations

import contextlib
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


def mlflow_client(uri: str):
    """An MLflow client of `uri` (the environment's MLFLOW_TRACKING_URI left as it was)."""
    from mlflow import MlflowClient

    _set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str, root: str) -> str:
    """The id of MLflow experiment `name`, created (its artifacts under the storage root) when new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri:
        location = Path(root, "mlartifacts").as_uri()  # not ./mlruns of whatever cwd a job has
    return client.create_experiment(name, artifact_location=location)


# the tag of the MLflow run a training run logs into while it trains (aidc.train.telemetry); registration logs
# the model into that same run (aidc.train.register)
RUN_TAG = "aidc.train_run"


def find_live_run(client, exp_id: str, run_name: str):
    """The MLflow run a live training run logs into (tag aidc.train_run), or None."""
    runs = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
    return runs[0] if runs else None


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


def new_version(client, uri: str, name: str, alias: str, run, description: str, tags: dict) -> RegisteredVersion:
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
    client = mlflow_client(uri)
    run = client.create_run(experiment_id(client, experiment, root), run_name=run_name or f"import-{name}")
    client.log_artifacts(run.info.run_id, str(model_dir), artifact_path="model")
    client.set_terminated(run.info.run_id)
    weights = json.loads((model_dir / MANIFEST).read_text()).get(WEIGHTS)  # none: a sharded Hugging Face folder
    return new_version(client, uri, name, alias, run, description,
                        {**({"weights_sha256": weights} if weights else {}), **(tags or {})})


_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


def resolve(ref: str, uri: str):
    """'name@alias', 'name/3' or 'name' (the newest version) -> MLflow ModelVersion."""
    m = _REF.match(ref or "")
    if not m:
        raise RegistryError(f"bad model reference {ref!r}; use name@alias (digits-cnn@champion) or name/version")
    client = mlflow_client(uri)
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


@contextlib.contextmanager
def fetched(ref: str, uri: str):
    """fetch() into a temp dir removed on exit, for whatever reads the files into memory and keeps nothing on
    disk: a bare fetch() left every download in /tmp (each tensors-app load of a multiplexed model, evicted and
    loaded again, left another copy; ~1,900 in /tmp after a few weeks of test runs)."""
    with tempfile.TemporaryDirectory(prefix="aidc-model-", ignore_cleanup_errors=True) as tmp:
        yield fetch(ref, uri, dst=tmp)
