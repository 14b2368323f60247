"""Read cluster.yaml (a Ray cluster-launcher config): validate it with Ray's own schema and
validation code, check aidc's security policy, and summarise node types and GPUs."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aidc.errors import ConfigError


@dataclass
class NodeType:
    name: str
    cpus: float | None  # None: detected when Ray starts on the node (local provider)
    gpus: float | None
    memory_gib: float | None
    min_workers: int
    max_workers: int
    is_head: bool = False


@dataclass
class ClusterSummary:
    name: str
    provider: str
    node_types: list[NodeType]
    max_workers: int
    warnings: list[str] = field(default_factory=list)

    @property
    def detected_at_start(self) -> bool:
        return any(t.gpus is None for t in self.node_types)

    @property
    def gpus_at_full_scale(self) -> float | None:
        if self.detected_at_start:
            return None
        return sum((t.gpus or 0) * (1 if t.is_head else t.max_workers) for t in self.node_types)


def load_cluster_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"cluster config {path} not found; pass a path, e.g. `aidc cluster validate cluster.yaml`")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a cluster config is a mapping (cluster_name, provider, ...)")
    return raw


def _schema_errors(config: dict) -> list[str]:
    """Every schema violation, each named by its field path (Ray stops at the first)."""
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.path)):
        loc = ".".join(str(p) for p in err.path) or "(top level)"
        errors.append(f"{loc}: {err.message}")
    return errors


def prepare_and_validate(raw: dict, source: str = "cluster config") -> dict:
    """Run Ray's own pipeline (translate legacy fields -> prepare -> validate); return the prepared config."""
    from ray.autoscaler._private.util import prepare_config, translate_trivial_legacy_config, validate_config

    config = copy.deepcopy(raw)
    problems = []
    if "provider" not in config or not isinstance(config.get("provider"), dict) or "type" not in config["provider"]:
        raise ConfigError(f"{source}: provider.type is required (aws, gcp, azure, local, ...)")
    try:
        translate_trivial_legacy_config(config)
        prepared = prepare_config(config)
    except (Exception, SystemExit) as exc:  # Ray's cli_logger.abort raises SystemExit-like errors
        raise ConfigError(f"{source}: rejected by Ray while preparing it: {exc}") from None
    problems.extend(_schema_errors(prepared))
    if not problems:
        try:
            validate_config(prepared)
        except Exception as exc:
            problems.append(str(exc).splitlines()[0])
    if problems:
        raise ConfigError(f"{source}: invalid cluster config\n" + "\n".join(f"  {p}" for p in problems))
    return prepared


def _policy_warnings(raw: dict) -> list[str]:
    """aidc's security policy for start commands (see RAY-NOTES: token auth, dashboard, metrics)."""
    head = " ".join(raw.get("head_start_ray_commands", []))
    workers = " ".join(raw.get("worker_start_ray_commands", []))
    warnings = []
    if "--dashboard-host=127.0.0.1" not in head and "--dashboard-host 127.0.0.1" not in head:
        warnings.append("head_start_ray_commands: add --dashboard-host=127.0.0.1 so the dashboard is not public")
    for key, cmds in (("head_start_ray_commands", head), ("worker_start_ray_commands", workers)):
        if cmds and "RAY_AUTH_MODE=token" not in cmds:
            warnings.append(f"{key}: prefix `ray start` with RAY_AUTH_MODE=token to turn on token authentication")
        if cmds and not re.search(r"--metrics-export-port[= ]\d+", cmds):
            warnings.append(f"{key}: pin --metrics-export-port=<port> so a firewall can keep metrics private")
    return warnings


def summarize(raw: dict, prepared: dict) -> ClusterSummary:
    provider = raw["provider"]["type"]
    head_type = prepared.get("head_node_type")
    types = []
    for name, spec in prepared.get("available_node_types", {}).items():
        res = spec.get("resources") or {}
        detected = provider == "local"
        mem = res.get("memory")
        if detected:
            # The local provider runs head and workers as one internal node type; show both roles.
            ips = raw["provider"].get("worker_ips") or []
            types.append(NodeType("head", None, None, None, 1, 1, is_head=True))
            types.append(NodeType("worker", None, None, None, min(len(ips), spec.get("min_workers", len(ips))),
                                  len(ips)))
            continue
        types.append(
            NodeType(
                name=name,
                cpus=None if detected else float(res.get("CPU", 0)),
                gpus=None if detected else float(res.get("GPU", 0)),
                memory_gib=None if detected or mem is None else mem / 2**30,
                min_workers=int(spec.get("min_workers", 0)),
                max_workers=int(spec.get("max_workers", prepared.get("max_workers", 0))),
                is_head=name == head_type,
            )
        )
    return ClusterSummary(
        name=raw.get("cluster_name", "default"),
        provider=provider,
        node_types=types,
        max_workers=int(prepared.get("max_workers", 0)),
        warnings=_policy_warnings(raw),
    )


def inspect_cluster(path: str | Path) -> ClusterSummary:
    raw = load_cluster_yaml(path)
    return summarize(raw, prepare_and_validate(raw, str(path)))


def format_summary(summary: ClusterSummary) -> str:
    def num(v: float | None) -> str:
        return "detected at start" if v is None else f"{v:g}"

    lines = [f"cluster {summary.name!r} (provider: {summary.provider}, max_workers: {summary.max_workers})"]
    lines.append(f"  {'node type':<14} {'role':<7} {'CPUs':>17} {'GPUs':>17} {'min':>4} {'max':>4}")
    for t in summary.node_types:
        role = "head" if t.is_head else "worker"
        lo, hi = ("1", "1") if t.is_head else (str(t.min_workers), str(t.max_workers))
        lines.append(f"  {t.name:<14} {role:<7} {num(t.cpus):>17} {num(t.gpus):>17} {lo:>4} {hi:>4}")
    total = summary.gpus_at_full_scale
    lines.append(f"  total GPUs at full scale: {'detected at start' if total is None else f'{total:g}'}")
    for w in summary.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)


def accelerator_types(resources: dict) -> list[str]:
    """The GPU types a Ray resource mapping names (`accelerator_type:A100` -> A100)."""
    return [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]


def _node_kinds(config: dict) -> tuple[list[tuple[str, dict, int, bool]], int] | None:
    """An autoscaling config's node kinds as (type name, resources in full_scale's terms, how many at most, is the
    head) and the cluster's max_workers; None where a node type does not declare its resources."""
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        return None
    head, cap = config.get("head_node_type"), int(config.get("max_workers", 10 ** 6))
    nodes = []
    for name, spec in types.items():
        res = (spec or {}).get("resources")
        if not isinstance(res, dict) or "CPU" not in res:
            return None
        kinds = accelerator_types(res)
        have = {"CPU": float(res["CPU"])}
        if "memory" in res:
            have["memory"] = float(res["memory"])
        if res.get("GPU"):
            have[f"GPU:{kinds[0] if kinds else ''}"] = float(res["GPU"])
        if name == head:
            nodes.append((name, have, 1, True))
        # as Ray's autoscaler v2 counts: a type without max_workers launches none (the head's type may launch
        # workers too)
        nodes.append((name, have, min(int((spec or {}).get("max_workers", 0)), cap), False))
    return nodes, cap


def _reach(nodes: list[tuple[str, dict, int, bool]], cap: int) -> dict[str, float]:
    """Each resource of `nodes` (each kind up to its count; the head always), with at most `cap` worker nodes (the
    largest first per resource: an upper bound), and `workers`: how many worker nodes."""
    out: dict[str, float] = {}
    for key in {k for _, have, _, _ in nodes for k in have}:
        left = cap
        for _, have, most, is_head in sorted(nodes, key=lambda n: (not n[3], -n[1].get(key, 0.0))):
            n = most if is_head else max(0, min(most, left))
            left -= 0 if is_head else n
            out[key] = out.get(key, 0.0) + n * have.get(key, 0.0)
    if any("memory" not in have for _, have, _, _ in nodes):
        out.pop("memory", None)  # not declared by every node type: unknown
    out = {k: v for k, v in out.items() if v or not k.startswith("GPU:")}  # a type that launches none adds none
    out["workers"] = float(max(0, min(cap, sum(most for _, _, most, is_head in nodes if not is_head))))
    return out


def full_scale(config: dict) -> dict[str, float] | None:
    """What a cluster can reach as its autoscaler grows it (an autoscaling config: cluster.yaml, or the
    ~/ray_bootstrap_config.yaml `ray up` leaves on the head): CPUs, `memory` (bytes) and GPUs per accelerator type
    (`GPU:<type>` from a node type's `accelerator_type:<type>` resource; `GPU:` for GPUs of no declared type) of the
    head plus every worker type at its max_workers (none where unset, as Ray's autoscaler v2 counts), each resource
    bounded by the cluster's max_workers (the largest nodes first: an upper bound, so a job is never refused that
    some mix of nodes could hold), and `workers`: how many worker nodes at most. None where a node type does not
    declare its resources (the local provider's, or a cloud's detected at launch): the reach is then unknown."""
    kinds = _node_kinds(config)
    return None if kinds is None else _reach(*kinds)


def growth_room(config: dict, alive_workers: list[dict]) -> dict[str, float] | None:
    """What the autoscaler can still add to the nodes alive (`alive_workers`: each alive worker node's Ray
    resources), in full_scale's terms: every worker type up to its max_workers less its nodes alive, at most the
    cluster's max_workers less every worker alive (`workers`: how many nodes it can still launch; 0: none, and a
    job waiting for a type whose nodes are all up waits for no node). A node alive counts for the type whose
    declared resources it has (of several alike, the one with the most room left); one of no declared type only
    against max_workers. None where the reach is unknown."""
    kinds = _node_kinds(config)
    if kinds is None:
        return None
    types = {name: ((config["available_node_types"][name] or {})["resources"], most)
             for name, _, most, is_head in kinds[0] if not is_head}
    alive = dict.fromkeys(types, 0)
    for res in alive_workers:
        # what a type declares, and its GPUs and GPU type whether declared or not (a CPU type is not a GPU node)
        like = [name for name, (want, _) in types.items()
                if all(abs(float(res.get(k, 0.0)) - float(want.get(k, 0.0))) < 1e-6
                       for k in {*want, "GPU", *(k for k in res if k.startswith("accelerator_type:"))} - {"memory"})]
        if like:
            alive[max(like, key=lambda name: types[name][1] - alive[name])] += 1
    room = [(name, have, max(0, most - alive[name]), False) for name, have, most, is_head in kinds[0] if not is_head]
    return _reach(room, kinds[1] - len(alive_workers))


def default_cluster_path() -> str:
    return os.environ.get("AIDC_CLUSTER_CONFIG", "cluster.yaml")
