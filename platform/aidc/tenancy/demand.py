"""What a submitted job will hold: from the Jobs API's `entrypoint_*` fields, or an aidc job config's `resources`.

- `ray job submit --entrypoint-num-cpus 2 --entrypoint-num-gpus 1 --entrypoint-memory ... --entrypoint-resources
  '{"accelerator_type:A100": 0.001}'`: those, as declared (Ray itself reserves them for the driver).
- `--metadata-json '{"cpus": "8", "gpus": "2", "gpu_type": "A100"}'`: the job's whole demand (driver, actors and
  tasks together) where the driver's reservation is not all it holds; the entrypoint flags then reserve only for
  the driver, within it.
- `python -m jobs.train|jobs.tune|jobs.batch_infer --config F [--set a.b=v ...]` with no such flags: the config is
  read from the uploaded working dir (the package the gateway keeps) and its `resources` section gives the demand:
  workers x (cpus_per_worker, one GPU each when use_gpu, or `auto` on a cluster with GPUs), plus one data task's
  CPUs for Ray Data; a sweep, that times tune.max_concurrent_trials (required through the gateway); batch
  inference, its `batch_infer` actor pool (actors x cpus_per_actor, GPUs likewise) plus a CPU for reads and writes.
- Anything else: 1 CPU, and the submitter is told to declare more with `--entrypoint-num-cpus`.
"""

from __future__ import annotations

import math
import posixpath
import shlex
import tempfile
import zipfile
from pathlib import Path

from aidc.cluster import accelerator_types
from aidc.errors import ConfigError
from aidc.runtime import floor_cpus, gpu_share
from aidc.tenancy.model import Demand

AIDC_JOBS = ("jobs.train", "jobs.tune", "jobs.batch_infer")
GIB = 1 << 30
EPS = 1e-9


def parse_entrypoint(entrypoint: str) -> tuple[str | None, str | None, list[str]]:
    """(aidc job module or None, --config path, --set overrides) of `python -m jobs.x --config F --set a=b`."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError as exc:
        raise ConfigError(f"entrypoint is not a valid shell command line ({exc}): {entrypoint!r}") from None
    if "-m" not in argv:
        return None, None, []
    i = argv.index("-m")
    module = argv[i + 1] if i + 1 < len(argv) else None
    if module not in AIDC_JOBS:
        return None, None, []
    config, overrides, rest = None, [], argv[i + 2:]
    for k, arg in enumerate(rest):
        nxt = rest[k + 1] if k + 1 < len(rest) else None
        if arg == "--config":
            config = nxt
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--set" and nxt:
            overrides.append(nxt)
        elif arg.startswith("--set="):
            overrides.append(arg.split("=", 1)[1])
        elif arg in ("&&", ";", "|", "||"):
            break
    return module, config, overrides


def declared(request: dict) -> Demand | None:
    """The driver's reservation from --entrypoint-* flags, or None if none."""
    cpus, gpus = request.get("entrypoint_num_cpus"), request.get("entrypoint_num_gpus")
    memory, resources = request.get("entrypoint_memory"), request.get("entrypoint_resources") or {}
    if not any((cpus, gpus, memory, resources)):
        return None
    if not isinstance(resources, dict):
        raise ConfigError("entrypoint_resources must be a mapping of resource name to amount")
    kinds = accelerator_types(resources)
    if len(kinds) > 1:
        raise ConfigError(f"entrypoint_resources names several accelerator types {kinds}: ask for one")
    try:
        return Demand(cpus=float(cpus or 0), gpus=float(gpus or 0), gpu_type=kinds[0] if kinds else None,
                      memory_gb=float(memory or 0) / GIB)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"entrypoint_num_cpus/gpus/memory must be numbers >= 0: {exc}".splitlines()[0]) from None


MAX_CONFIG_BYTES = 1 << 20


def _read_member(package: Path, config: str) -> str:
    """The text of one file of the working-dir zip (only that member; no path outside the working dir)."""
    config = posixpath.normpath(config)  # ./jobs/configs/x.yaml is jobs/configs/x.yaml
    if config.startswith("/") or ".." in Path(config).parts:
        raise ConfigError(f"--config {config!r}: give a path inside the working dir (e.g. jobs/configs/mnist.yaml)")
    try:
        with zipfile.ZipFile(package) as z:
            names = set(z.namelist())
            top = {n.split("/", 1)[0] for n in names}
            member = config if config in names else next(
                (f"{t}/{config}" for t in sorted(top) if f"{t}/{config}" in names), None)
            if member is None:
                raise ConfigError(f"config {config!r} is not in the uploaded working dir; paths are relative to "
                                  "--working-dir (e.g. jobs/configs/mnist.yaml)")
            if z.getinfo(member).file_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config {config!r} is over {MAX_CONFIG_BYTES} bytes")
            return z.read(member).decode("utf-8")
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"the working-dir package {package.name} is not a readable zip: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {config!r} is not UTF-8 text") from None


def from_config(module: str, config: str, overrides: list[str], package: Path | None,
                cluster_gpus: float = 0) -> Demand:
    """Demand of an aidc job from its config inside the working-dir package (a zip)."""
    import aidc.tasks  # noqa: F401 - registers the workloads and datasets a job config is checked against
    from aidc.config import load_config

    if package is None:
        raise ConfigError(f"{module} --config {config}: the gateway cannot read the config without the working dir; "
                          "submit with --working-dir . (or declare the demand, see the README)")
    text = _read_member(package, config)
    with tempfile.TemporaryDirectory(prefix="aidc-demand-") as tmp:
        path = Path(tmp) / Path(config).name
        path.write_text(text)
        try:
            cfg = load_config(path, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{module} --config {config}: {exc.message.replace(str(path), config)}") from None
    if module == "jobs.batch_infer":  # a Ray Data pipeline: the actor pool, and one CPU for its read/write tasks
        b = cfg.batch_infer
        use_gpu = b.use_gpu is True or (b.use_gpu == "auto" and cluster_gpus)
        cpus = b.actors * b.cpus_per_actor + 1.0
        each = b.gpus_per_actor or gpu_share(int(cluster_gpus) or 1, b.actors)  # as aidc.batch places them
        return Demand(cpus=cpus, gpus=b.actors * each if use_gpu else 0.0, data_cpus=cpus)
    res = cfg.resources
    workers = res.num_workers[1] if isinstance(res.num_workers, tuple) else res.num_workers
    data = res.data_task_cpus or 1.0
    per_trial_cpus = max(1.0, workers * res.cpus_per_worker) if workers else 1.0
    use_gpu = res.use_gpu is True or (res.use_gpu == "auto" and cluster_gpus > 0)
    gpus = float(max(workers, 1)) if use_gpu else 0.0
    if module == "jobs.tune" and cfg.tune is not None:
        trials = cfg.tune.max_concurrent_trials
        if not trials:
            raise ConfigError("jobs.tune through the gateway needs tune.max_concurrent_trials (how many trials run "
                              "at once is what the sweep holds): add --set tune.max_concurrent_trials=2")
        cpus = cfg.tune.trial_cpus(res) * trials + data  # as aidc.tune.sweep sizes a trial
        return Demand(cpus=cpus, gpus=gpus * trials, data_cpus=data)  # the trials split `data` (aidc.tune.sweep)
    return Demand(cpus=per_trial_cpus + data, gpus=gpus, data_cpus=data)


def from_metadata(metadata: dict) -> Demand | None:
    """A job's whole demand declared in its metadata (`--metadata-json '{"cpus": "4", "gpus": "2", "gpu_type":
    "A100"}'`): what its driver and every actor and task hold together; None if not declared."""
    keys = {"cpus", "gpus", "gpu_type", "memory_gb"} & set(metadata)
    if not keys:
        return None
    try:
        return Demand(cpus=float(metadata.get("cpus", 0)), gpus=float(metadata.get("gpus", 0)),
                      gpu_type=metadata.get("gpu_type") or None, memory_gb=float(metadata.get("memory_gb", 0)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata cpus/gpus/memory_gb must be numbers (as strings), e.g. '{{\"gpus\": \"2\"}}': "
                          f"{exc}") from None


def job_demand(request: dict, package: Path | None, cluster_gpus: float = 0) -> Demand:
    """The demand of a submit request (see the module docstring); ConfigError says what cannot be read."""
    total = from_metadata(request.get("metadata") or {})
    explicit = declared(request)
    if total is not None:
        if explicit is not None and (explicit.cpus > total.cpus or explicit.gpus > total.gpus):
            raise ConfigError(f"the driver's reservation ({explicit.short()}) is more than the job's whole declared "
                              f"demand ({total.short()}): raise metadata cpus/gpus")
        return total
    if explicit is not None:
        return explicit
    module, config, overrides = parse_entrypoint(request.get("entrypoint") or "")
    if module and config:
        return from_config(module, config, overrides, package, cluster_gpus)
    return Demand(cpus=1.0)


def data_allowance(demand: Demand, request: dict) -> float | None:
    """What the job's Ray Data tasks may hold at once (aidc.runtime's AIDC_DATA_CPUS): an aidc training job's or
    sweep's data share, else what the driver's reservation leaves of the whole demand; None where it leaves
    nothing (the job's tasks then count against it as they run)."""
    if demand.data_cpus is not None:
        return demand.data_cpus
    left = demand.cpus - float(request.get("entrypoint_num_cpus") or 0)
    return left if left > 0 else None


def bundle(cpus: float, gpus: float = 0.0, gpu_type: str | None = None) -> dict:
    """One resource bundle for Ray's autoscaler: CPUs and GPUs rounded down to Ray's step, a GPU type as Ray's
    `accelerator_type:<type>` resource; empty resources where it holds nothing."""
    one = {"CPU": floor_cpus(cpus), "GPU": floor_cpus(gpus)}
    if gpus and gpu_type:
        one[f"accelerator_type:{gpu_type}"] = 0.001
    return {"resources": {k: v for k, v in one.items() if v > 0}}


def bundles(demand: Demand) -> list[dict]:
    """`demand` as resource bundles for Ray's autoscaler (`request_cluster_resources`, which packs them onto whole
    nodes and grows nothing if any bundle fits no node): one per GPU with a CPU (its type as Ray's
    `accelerator_type:<type>` resource), the other CPUs one per bundle. Small shapes any node of the kind holds, so
    the ask is never infeasible for its shape; where a job's processes land is Ray's to decide when it runs.
    Memory is left out (node types need not declare it)."""
    gpus, cpus = demand.gpus, demand.cpus
    out = []
    n = math.ceil(gpus - EPS) if gpus > EPS else 0
    for _ in range(n):
        out.append(bundle(min(1.0, cpus / n), gpus / n, demand.gpu_type))
    left = cpus - (n * floor_cpus(min(1.0, cpus / n)) if n else 0.0)
    while left > EPS:
        out.append(bundle(min(1.0, left)))
        left -= 1.0
    return [b for b in out if b["resources"]]


def with_run_name(entrypoint: str, run_name: str) -> str:
    """An aidc training entrypoint that names its run, so a preempted job resumes from its checkpoint when run
    again; other entrypoints, and ones that already name the run, are returned as they are."""
    module, _, overrides = parse_entrypoint(entrypoint)
    chained = any(op in shlex.split(entrypoint) for op in ("&&", ";", "|", "||"))
    if module != "jobs.train" or chained or any(o.startswith("run.name=") for o in overrides):
        return entrypoint
    return f"{entrypoint} --set run.name={shlex.quote(run_name)}"


__all__ = ["bundle", "bundles", "data_allowance", "declared", "from_config", "job_demand", "parse_entrypoint", "with_run_name"]
