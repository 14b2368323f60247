"""Capacity planning before a job runs: per-worker peak memory, step time, wall-clock, cost and energy of a
training job on each node type of a cluster, and the smallest change that makes a plan that cannot fit fit.

Memory per worker, from the model built on the meta device (no memory, no weights):
- parameters: fp32 master weights (autocast keeps them fp32); FSDP2 shards them over the workers and
  all-gathers one block at a time (two while the next is prefetched);
- gradients: fp32, sharded under FSDP2; DDP adds its bucket copy of them;
- optimizer state: AdamW's two fp32 moments per parameter, sharded under FSDP2;
- activations: what autograd saves for backward in one micro-batch, counted by autograd itself on the
  meta device (`saved_tensors_hooks`; weights excluded), attention as the device's kernel saves it (a fused
  kernel: q, k, v, output; CPU with attention dropout runs the math path and keeps the seq x seq weights),
  plus backward's working set (two blocks' activation gradients), halved at 16-bit precision; with
  activation checkpointing a block keeps only its input, and one block is live again in its recompute;
- per-sample gradients (DP-SGD, train.privacy): Opacus keeps each sample's fp32 gradient of every trained
  weight until it clips them: the largest Poisson batch a run meets (batch + 4 sqrt(batch)) x trained x 4;
- framework: the CUDA context and allocator reserve on a GPU, a first step's own rise on CPU (calibrated;
  on CPU the figure is the process's peak RSS rise over its RSS before the model was built).

Step time: aten operators x a per-operator cost (eager dispatch, kernel launch) + FLOPs (torch's
FlopCounterMode, forward + backward; checkpointing adds a forward) over the device's peak FLOP/s at the
precision times an efficiency (MFU) + activation bytes written and read over an effective memory bandwidth
- the three coefficients fitted by `benchmarks.plan_calibrate` per device kind - plus the gradient
all-reduce (DDP) or all-gathers + reduce-scatter (FSDP2) over the interconnect, not overlapped (an upper
bound). Devices come from `aidc.io/*` node labels in cluster.yaml (Ray node labels: strings) or, where
absent, from the catalogue below keyed by the accelerator (label `aidc.io/accelerator`, else the
instance type).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import aidc.tasks  # noqa: F401 - registers the workloads (configs are validated here)
from aidc.cluster import accelerator_types
from aidc.errors import ConfigError

GIB = 2**30

# Public spec-sheet figures (dense tensor-core TFLOP/s; memory as the device reports it; per-GPU NVLink or
# PCIe bandwidth one way, GB/s; board power, W). Overridable per node type with aidc.io/* labels.
ACCELERATORS: dict[str, dict] = {
    "H200": {"memory_gib": 139.8, "tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "link_gbps": 450.0,
             "watts": 700.0},
    "H100-80GB": {"memory_gib": 79.1, "tflops": {"fp32": 67.0, "bf16": 989.0, "fp16": 989.0}, "link_gbps": 450.0,
                  "watts": 700.0},
    "A100-80GB": {"memory_gib": 79.2, "tflops": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "link_gbps": 300.0,
                  "watts": 400.0},
    "A100-40GB": {"memory_gib": 39.4, "tflops": {"fp32": 19.5, "bf16": 312.0, "fp16": 312.0}, "link_gbps": 300.0,
                  "watts": 400.0},
    "L4": {"memory_gib": 22.0, "tflops": {"fp32": 30.3, "bf16": 121.0, "fp16": 121.0}, "link_gbps": 32.0,
           "watts": 72.0},
    "T4": {"memory_gib": 14.6, "tflops": {"fp32": 8.1, "fp16": 65.0}, "link_gbps": 16.0, "watts": 70.0},
}
INSTANCE_ACCELERATOR = {"p5e": "H200", "p5en": "H200", "p5": "H100-80GB", "p4de": "A100-80GB", "p4d": "A100-40GB",
                        "g6": "L4", "g6e": None, "g4dn": "T4", "a3": "H100-80GB", "a2-ultragpu": "A100-80GB",
                        "a2-highgpu": "A100-40GB", "g2": "L4"}
# Efficiency (model FLOPs utilisation) and framework memory until benchmarks.plan_calibrate has measured
# them for a device: typical figures for small dense models in eager PyTorch.
DEFAULT_MFU = {"gpu": 0.35, "cpu": 1.0}  # cpu: vs the nominal CPU_GFLOPS_PER_CORE; measured on this machine class
DEFAULT_PER_OP_US = {"gpu": 8.0, "cpu": 36.0}  # eager dispatch + kernel launch per aten operator
DEFAULT_MEMORY_GBPS = {"gpu": 1000.0, "cpu": 2.2}  # effective bandwidth of activation traffic
GPU_FRAMEWORK_GIB = 1.0  # CUDA context + allocator slack
CPU_FRAMEWORK_GIB = 0.08  # a first training step's own rise (autograd engine, kernels' buffers): measured
CPU_GFLOPS_PER_CORE = {"fp32": 60.0, "bf16": 120.0, "fp16": 60.0}  # AVX-512 FMA at ~2 GHz, x2 with AMX/BF16
NETWORK_GBPS = 12.5  # between nodes when no label says (100 Gb/s Ethernet)
LABEL = "aidc.io/"
BACKWARD_BLOCKS = 2  # blocks' worth of activation gradients live at backward's peak (see model_shape)


@dataclass
class Device:
    """What one worker runs on: a GPU, or a share of a CPU node."""

    node_type: str
    kind: str  # "gpu" | "cpu"
    name: str
    memory_gib: float
    tflops: dict[str, float]
    link_gbps: float  # between workers of one node
    network_gbps: float  # between nodes
    watts: float
    per_node: int  # workers one node holds
    usd_per_hour: float | None = None  # per node


@dataclass
class Memory:
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    framework: float
    per_sample: float = 0.0  # DP-SGD (train.privacy): Opacus keeps every sample's gradient of the trained weights

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.framework + self.per_sample


@dataclass
class Plan:
    device: Device
    workers: int
    memory: Memory  # bytes per worker
    budget: float  # bytes per worker the device allows (headroom taken off)
    step_s: float
    compute_s: float
    comm_s: float
    tokens_per_step: int | None  # samples for non-token models
    unit: str
    steps: int | None
    hours: float | None
    usd: float | None
    kwh: float | None
    nodes: int
    fixes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget


@dataclass
class Shape:
    """What the planner needs of the model: sizes from the meta-device build, one micro-batch's saves and
    its training FLOPs (forward + backward, counted by torch's FlopCounterMode)."""

    params: int
    largest_block: int  # parameters of the largest FSDP unit (a block), all-gathered at once
    saved_fp32: float  # bytes autograd saves for one micro-batch at fp32
    saved_ckpt_fp32: float  # the same with activation checkpointing
    flops: float  # one micro-batch, forward + backward
    flops_ckpt: float  # the same with activation checkpointing (a second forward per block)
    ops: int  # aten operators one micro-batch dispatches (forward + backward): eager mode pays per operator
    ops_ckpt: int
    tokens_per_sample: int  # 1 for non-sequence models
    unit: str
    trainable: int | None = None  # parameters that train (LoRA: the adapters); None: all of them

    @property
    def trained(self) -> int:
        return self.params if self.trainable is None else self.trainable


# --- the model's shape --------------------------------------------------------------------------------------

def read_manifest(cfg) -> dict | None:
    """The job's preprocessed dataset's manifest (features, counts), or None before preprocessing."""
    from aidc import storage
    from aidc.data.dataset import open_dataset
    from aidc.errors import DataError

    try:
        return open_dataset(storage.storage_root(cfg.run.storage), cfg.name, cfg.data.version).manifest()
    except DataError:
        return None


def planning_features(cfg, manifest: dict | None) -> dict:
    """The features that size the model: the dataset's (its `manifest`), else what the config and the source
    say."""
    from aidc.tasks import get_task

    if manifest is not None:
        return manifest["features"]
    features = get_task(cfg.task).planning_features(cfg)  # before preprocessing: what config and source say
    if features is not None:
        return features
    raise ConfigError(f"cannot size model {cfg.model.arch} before its dataset exists: run "
                      f"`python -m jobs.preprocess --config <this config>` first (the data sizes the model)")


class _Attention:
    """F.scaled_dot_product_attention as the target device runs it in training. A fused kernel (CUDA's flash
    or memory-efficient attention; on CPU, flash attention without dropout) saves its inputs and output; the
    math path (CPU with attention dropout) saves the seq x seq weights too - as the meta device's own path."""

    def __init__(self, real, kind: str):
        self.real, self.kind = real, kind

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        import torch

        if self.kind == "cpu" and dropout_p > 0:
            return self.real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

        class Fused(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                out = torch.empty_like(q)
                ctx.save_for_backward(q, k, v, out)
                return out

            @staticmethod
            def backward(ctx, g):  # never run: the meta pass only counts
                return g, g, g

        return Fused.apply(q, k, v)


def call_model(model, inputs: tuple | dict):
    """The model's output tensor (logits) for sample inputs: positional, or keywords (transformers' models)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, tuple) else out


def _tokens(inputs: tuple | dict):
    return inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]


def _saved_bytes(model, inputs: tuple, kind: str) -> float:
    """Bytes autograd saves for backward in one forward pass (each tensor once)."""
    import torch
    from torch.nn import functional as F

    saved: dict[int, int] = {}
    weights = {id(p) for p in model.parameters()}  # saved for backward too, but counted as parameters

    def pack(t):
        if id(t) not in weights and id(getattr(t, "_base", None)) not in weights:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _Attention(real, kind)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call_model(model, inputs)
        # the loss: cross-entropy saves the logits' log-softmax (fp32) beside the logits themselves
        saved[-1] = out.numel() * 4
    finally:
        F.scaled_dot_product_attention = real
    return float(sum(saved.values()))


def model_shape(cfg, kind: str = "cpu", features: dict | None = None) -> Shape:
    """Parameters, saved activations and FLOPs of the job's model on a `kind` ("cpu"/"gpu") device, built on
    the meta device (nothing allocated). `features`: the model's sizes, when the caller has them."""
    import torch

    from aidc.tasks import get_task
    from aidc.train.parallel import blocks_of

    features = features if features is not None else planning_features(cfg, read_manifest(cfg))
    task = get_task(cfg.task)
    job = cfg.model_dump(mode="json")
    with torch.device("meta"):
        model = task.planning_model(job, features)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = blocks_of(model)
    largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params)
    inputs = task.planning_inputs(features, cfg.train.batch_size)
    checkpointable = bool(blocks) and _checkpointing(model, False)
    saved, (flops, ops) = _saved_bytes(model, inputs, kind), _flops(model, inputs)
    saved_ckpt, flops_ckpt, ops_ckpt = saved, flops, ops
    if checkpointable:
        _checkpointing(model, True)
        width = job["model"].get("d_model") or model.config.hidden_size
        # torch's checkpoint keeps each block's input (outside autograd's saved tensors: added here)
        kept = _saved_bytes(model, inputs, kind) + len(blocks) * _tokens(inputs).numel() * width * 4
        block = max(0.0, saved - kept) / len(blocks)  # one block's activations
        # backward's working set: the block being differentiated (its activations' gradients) and the
        # next; under checkpointing also the block recomputed (measured: benchmarks.plan_calibrate)
        saved += BACKWARD_BLOCKS * block
        saved_ckpt = kept + (BACKWARD_BLOCKS + 1) * block
        flops_ckpt, ops_ckpt = _flops(model, inputs)
    tokens, unit = (_tokens(inputs).shape[1], "tokens") if task.counts_tokens else (1, "samples")
    return Shape(params, largest, saved, saved_ckpt, flops, flops_ckpt, ops, ops_ckpt, tokens, unit,
                 None if trainable == params else trainable)


def _checkpointing(model, on: bool) -> bool:
    """Turn activation checkpointing on/off (aidc's models: an attribute; transformers': non-reentrant, as
    CausalLM.build_model sets it); False where the model has none."""
    if getattr(model, "activation_checkpointing", None) is not None:
        model.activation_checkpointing = on
        return True
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    new = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.x names it so
    if on and new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
    return True


def _flops(model, inputs: tuple) -> tuple[float, int]:
    """FLOPs (torch's FlopCounterMode) and aten operators of one forward + backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Ops(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Ops.n += 1
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False) as counter, Ops():
        out = call_model(model, inputs)
        out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), Ops.n


# --- the cluster's devices ------------------------------------------------------------------------------------

def catalogue_name(text: str, memory_gib: float | None = None) -> str | None:
    """The catalogue's entry for a GPU name as Ray ("A100", "H200") or CUDA ("NVIDIA A100-SXM4-80GB") gives it.
    Several sizes of one model: the one the name or `memory_gib` says, else the smallest (a plan that refuses
    is safer than one that lets a job run out of memory)."""
    import re

    t = text.upper()
    found = [n for n in ACCELERATORS if re.search(rf"(?<![A-Z0-9]){n.split('-')[0]}(?![A-Z0-9])", t)]
    if len(found) > 1:
        sized = [n for n in found if "-" in n and n.split("-")[1].rstrip("B") in t]
        if sized:
            return sized[0]
        if memory_gib is not None:
            return min(found, key=lambda n: abs(ACCELERATORS[n]["memory_gib"] - memory_gib))
        return min(found, key=lambda n: ACCELERATORS[n]["memory_gib"])
    return found[0] if found else None


def _accelerator(spec: dict) -> str | None:
    labels = spec.get("labels") or {}
    if labels.get(LABEL + "accelerator"):
        return labels[LABEL + "accelerator"]
    itype = str((spec.get("node_config") or {}).get("InstanceType") or (spec.get("node_config") or {}).get(
        "machineType") or "")
    family = itype.split(".")[0]
    for prefix in sorted(INSTANCE_ACCELERATOR, key=len, reverse=True):
        if family == prefix or itype.startswith(prefix + "-"):
            return INSTANCE_ACCELERATOR[prefix]
    return None


def _num(labels: dict, key: str, default, node_type: str):
    raw = labels.get(LABEL + key)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"node type {node_type}: label {LABEL}{key}={raw!r} is not a number") from None


def _cpu_device(node_type: str, cpus: float, memory_gib: float, per_node: int, network_gbps: float = NETWORK_GBPS,
                watts: float | None = None, price: float | None = None) -> Device:
    """A worker's share of a CPU node: its cores and RAM divided among the `per_node` workers it holds."""
    cores = cpus / per_node
    return Device(node_type, "cpu", f"{cores:g} CPU", memory_gib / per_node,
                  {p: g * cores / 1000 for p, g in CPU_GFLOPS_PER_CORE.items()}, 20.0, network_gbps,
                  10.0 * cores if watts is None else watts, per_node, price)


def devices(raw_cluster: dict, workers_cpus: float, use_gpu) -> list[Device]:
    """The worker devices each node type offers a job (GPUs, or CPU nodes when the job runs on CPUs)."""
    out = []
    head = raw_cluster.get("head_node_type")
    for name, spec in (raw_cluster.get("available_node_types") or {}).items():
        res = spec.get("resources") or {}
        labels = spec.get("labels") or {}
        gpus = int(res.get("GPU", 0))
        price = _num(labels, "usd-per-hour", None, name)
        network = _num(labels, "network-gbps", NETWORK_GBPS, name)
        if gpus and use_gpu is not False:
            acc = _accelerator(spec)
            base = ACCELERATORS.get(acc or "")
            mem = _num(labels, "device-memory-gib", base and base["memory_gib"], name)
            if mem is None:
                raise ConfigError(f"node type {name}: GPU {acc or 'unknown'} is not in aidc's catalogue "
                                  f"({', '.join(ACCELERATORS)}); set labels {LABEL}accelerator to one of them, or "
                                  f"{LABEL}device-memory-gib, {LABEL}tflops-bf16, {LABEL}tflops-fp32")
            base = base or {"tflops": {}, "link_gbps": 16.0, "watts": 300.0}
            tflops = {p: _num(labels, f"tflops-{p}", base["tflops"].get(p), name) for p in ("fp32", "bf16", "fp16")}
            out.append(Device(name, "gpu", acc or "GPU", mem, {k: v for k, v in tflops.items() if v},
                              _num(labels, "interconnect-gbps", base["link_gbps"], name), network,
                              _num(labels, "device-watts", base["watts"], name), gpus, price))
        elif use_gpu is not True and name != head and res.get("CPU"):
            cpus = float(res["CPU"])
            per_node = max(1, int(cpus // max(workers_cpus, 1e-9)))
            out.append(_cpu_device(name, cpus, float(res.get("memory", cpus * 4 * GIB)) / GIB, per_node, network,
                                   _num(labels, "device-watts", None, name), price))
    return out


def local_device(workers: int, workers_cpus: float) -> Device:
    """The machine this runs on (a local Ray): its GPU, else its RAM shared by the workers."""
    import os

    import psutil
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        name = catalogue_name(props.name, props.total_memory / GIB) or props.name
        base = ACCELERATORS.get(name, {"tflops": {"fp32": 20.0, "bf16": 100.0}, "link_gbps": 16.0, "watts": 300.0})
        return Device("local", "gpu", name, props.total_memory / GIB, base["tflops"], base["link_gbps"],
                      NETWORK_GBPS, base["watts"], torch.cuda.device_count())
    return _cpu_device("local", float(os.cpu_count() or 1), psutil.virtual_memory().total / GIB, max(1, workers))


def running_cluster_devices(cfg) -> list[Device]:
    """The devices of the Ray cluster this process is connected to (jobs.train's check before workers start):
    its GPUs by the accelerator type Ray detected, else its CPU nodes' memory shared by the workers each
    holds. Empty when the GPU type is not in the catalogue (nothing to check against)."""
    import ray

    total = ray.cluster_resources()
    if total.get("GPU", 0) > 0 and cfg.resources.use_gpu is not False:
        kinds = accelerator_types(total)
        if not kinds:
            return [local_device(planned_workers(cfg), cfg.resources.cpus_per_worker)] if _local_cuda() else []
        out = []
        for kind in kinds:
            name = catalogue_name(kind)
            if name:
                base = ACCELERATORS[name]
                out.append(Device("cluster", "gpu", name, base["memory_gib"], base["tflops"], base["link_gbps"],
                                  NETWORK_GBPS, base["watts"], int(total["GPU"])))
        return out
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    if not nodes:
        return []
    node = min(nodes, key=lambda n: n["Resources"].get("memory", 0))
    cpus = node["Resources"]["CPU"]
    per_node = max(1, min(planned_workers(cfg), int(cpus // max(cfg.resources.cpus_per_worker, 1e-9)) or 1))
    import psutil

    # Ray's `memory` resource is 70 % of a node's RAM by default; this node's own RAM when it is the only one
    ram = psutil.virtual_memory().total if len(nodes) == 1 else node["Resources"].get("memory", 0) / 0.7
    return [_cpu_device("cluster", cpus, ram / GIB, per_node)]


def _local_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- the plan --------------------------------------------------------------------------------------------------

def planned_precision(cfg, device: Device) -> str:
    p = cfg.train.precision
    if p == "auto":
        return "bf16" if device.kind == "gpu" and "bf16" in device.tflops else "fp32"
    return p


def poisson_peak(batch: int) -> float:
    """The largest Poisson-sampled batch (DP-SGD) a run meets, for memory: a mean-`batch` Poisson draw exceeds
    batch + 4 sqrt(batch) about once in 30,000 steps."""
    return batch + 4 * math.sqrt(batch)


def memory(shape: Shape, *, workers: int, parallelism: str, precision: str, checkpointing: bool,
           framework_bytes: float, per_sample_batch: float = 0.0) -> Memory:
    """Bytes per worker (see the module docstring for what each part holds)."""
    fsdp = parallelism == "fsdp" and workers > 1
    n = workers if fsdp else 1
    params = shape.params * 4 / n + (2 * shape.largest_block * 4 if fsdp else 0)
    # gradients and Adam's two moments of the parameters that train only (LoRA: the adapters)
    grads = shape.trained * 4 / n + (0 if fsdp or workers <= 1 else shape.trained * 4)  # DDP's bucket copy
    optim = shape.trained * 8 / n
    saved = shape.saved_ckpt_fp32 if checkpointing else shape.saved_fp32
    act = saved * (0.5 if precision in ("bf16", "fp16") else 1.0)
    # DP-SGD: a per-sample gradient of each trained weight (grad_sample, fp32) for every sample of the batch
    return Memory(params, grads, optim, act, framework_bytes, per_sample=per_sample_batch * shape.trained * 4)


def plan_for(cfg, shape: Shape, device: Device, *, headroom: float = 0.1, train_rows: int | None = None,
             mfu: float | None = None) -> Plan:
    workers = planned_workers(cfg)
    precision = planned_precision(cfg, device)
    ckpt = bool(getattr(cfg.model, "activation_checkpointing", False))
    coef = coefficients(device)
    private = cfg.train.privacy is not None
    peak_batch = poisson_peak(cfg.train.batch_size) if private else 0.0
    mem = memory(shape, workers=workers, parallelism=cfg.train.parallelism, precision=precision,
                 checkpointing=ckpt, framework_bytes=coef["framework_bytes"], per_sample_batch=peak_batch)
    if private:  # activations grow with the batch too: the largest Poisson batch's
        mem.activations *= peak_batch / cfg.train.batch_size
    micro = cfg.train.batch_size
    per_step = micro * cfg.train.grad_accum_steps  # samples per optimizer step per worker
    tokens = per_step * shape.tokens_per_sample
    flops = (shape.flops_ckpt if ckpt else shape.flops) * cfg.train.grad_accum_steps
    ops = (shape.ops_ckpt if ckpt else shape.ops) * cfg.train.grad_accum_steps
    peak = device.tflops.get(precision) or device.tflops.get("fp32") or 1.0
    traffic = shape.saved_fp32 * (2 if ckpt else 1) * cfg.train.grad_accum_steps  # activations written + read
    compute = (ops * coef["per_op_s"] + flops / (peak * 1e12 * (mfu or coef["mfu"]))
               + traffic / (coef["memory_gbps"] * 1e9))
    nodes = math.ceil(workers / device.per_node)
    bw = (device.link_gbps if nodes == 1 else min(device.link_gbps, device.network_gbps)) * 1e9
    ring = 2 * (workers - 1) / workers if workers > 1 else 0.0
    fsdp = cfg.train.parallelism == "fsdp" and workers > 1
    # DDP all-reduces the trained gradients; FSDP all-gathers the parameters twice (forward, backward) and
    # reduce-scatters the trained gradients, each half an all-reduce's traffic
    comm = ring * ((2 * shape.params + shape.trained) / 2 if fsdp else shape.trained) * 4 / bw
    step = compute + comm
    steps = None
    if train_rows is not None:
        per_epoch = math.ceil(train_rows / (micro * max(1, workers))) // cfg.train.grad_accum_steps or 1
        if cfg.train.max_steps_per_epoch:
            per_epoch = min(per_epoch, cfg.train.max_steps_per_epoch)
        steps = per_epoch * cfg.train.epochs
    hours = steps * step / 3600 if steps is not None else None
    usd = hours * nodes * device.usd_per_hour if hours is not None and device.usd_per_hour is not None else None
    kwh = hours * workers * device.watts / 1000 if hours is not None else None
    budget = device.memory_gib * GIB * (1 - headroom)
    return Plan(device, workers, mem, budget, step, compute, comm, tokens * workers, shape.unit, steps, hours, usd,
                kwh, nodes)


def calibration_key(device: Device) -> str:
    return "cpu" if device.kind == "cpu" else device.name


def _calibration_path(storage_root: str | None = None) -> str:
    from aidc import storage

    return storage.join(storage.storage_root(storage_root), "plan", "calibration.json")


def calibration(device: Device, storage_root: str | None = None) -> dict:
    """What benchmarks.plan_calibrate measured for this kind of device ({"mfu", "framework_gib"}), else {}."""
    import json

    from aidc import storage

    path = _calibration_path(storage_root)
    try:
        table = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    except (OSError, ValueError):
        table = {}
    return table.get(calibration_key(device)) or {}


def coefficients(device: Device) -> dict:
    """The step-time and memory coefficients for this kind of device: what benchmarks.plan_calibrate recorded
    (one read of the calibration file), else the defaults. Keys: mfu, per_op_s, memory_gbps, framework_bytes."""
    cal = calibration(device)
    framework_gib = GPU_FRAMEWORK_GIB if device.kind == "gpu" else CPU_FRAMEWORK_GIB
    return {"mfu": float(cal.get("mfu") or DEFAULT_MFU[device.kind]),
            "per_op_s": float(cal.get("per_op_us") or DEFAULT_PER_OP_US[device.kind]) / 1e6,
            "memory_gbps": float(cal.get("memory_gbps") or DEFAULT_MEMORY_GBPS[device.kind]),
            "framework_bytes": float(cal.get("framework_gib") or framework_gib) * GIB}


def record_calibration(key: str, storage_root: str | None = None, **measured) -> str:
    import datetime
    import json

    from aidc import storage

    path = _calibration_path(storage_root)
    table = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    table[key] = {**measured, "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    storage.ensure_dir(storage.join(storage.storage_root(storage_root), "plan"))
    storage.write_text(path, json.dumps(table, indent=1, sort_keys=True))
    return path


def planned_workers(cfg) -> int:
    n = cfg.resources.num_workers
    n = n[1] if isinstance(n, tuple | list) else n
    return max(1, int(n))


def with_fixes(cfg, shape_of, plan: Plan, others: list[Plan], **kw) -> Plan:
    """Name the smallest change that makes a plan that cannot fit fit: one change at a time first (FSDP2,
    activation checkpointing, a smaller micro-batch with the same global batch, more workers), then the
    fewest of them together; each candidate is planned again. Also a node type where it fits as it is."""
    if plan.fits:
        return plan
    workers = planned_workers(cfg)
    has_ckpt = hasattr(cfg.model, "activation_checkpointing") and not cfg.model.activation_checkpointing
    private = cfg.train.privacy is not None  # DP-SGD: no FSDP, no accumulation (config refuses both)
    fsdp = {"train.parallelism": "fsdp"} if cfg.train.parallelism == "ddp" and not private else {}
    steps = []  # (label, overrides), cumulative order: the cheapest first
    if fsdp and workers > 1:
        steps.append(("--set train.parallelism=fsdp", fsdp))
    if has_ckpt:
        steps.append(("--set model.activation_checkpointing=true", {"model.activation_checkpointing": True}))
    b, acc = cfg.train.batch_size, cfg.train.grad_accum_steps
    batches = []
    while b > 1:
        b, acc = max(1, b // 2), acc * (1 if private else 2)
        if private:  # a smaller expected batch (the noise is planned again for it)
            batches.append((f"--set train.batch_size={b}", {"train.batch_size": b}))
            continue
        batches.append((f"--set train.batch_size={b} --set train.grad_accum_steps={acc}",
                        {"train.batch_size": b, "train.grad_accum_steps": acc}))
    more = [(f"--set resources.num_workers={n}", {"resources.num_workers": n, **fsdp}) for n in
            (workers * 2, workers * 4, workers * 8, workers * 16) if n <= 1024]

    def fits(overrides: dict) -> bool:
        alt = _override(cfg, overrides)
        return plan_for(alt, shape_of(alt, plan.device.kind), plan.device, **kw).fits

    found = next((label for label, o in steps + batches[:1] + more[:1] if fits(o)), None)
    if found is None:  # together: FSDP + checkpointing, then more workers, then smaller micro-batches
        base, labels = {}, []
        for label, o in steps:
            base, labels = {**base, **o}, labels + [label]
        for label, o in [("", {})] + more:
            for blabel, bo in [("", {})] + batches:
                combo = {**base, **o, **bo}
                if combo and fits(combo):
                    found = " ".join(x for x in labels + [label, blabel] if x)
                    break
            if found:
                break
    if found:
        plan.fixes.append(found + (" (FSDP2 shards them)" if "num_workers" in found and fsdp else ""))
    plan.fixes += [f"run on node type {o.device.node_type} ({o.device.name}, predicted "
                   f"{o.memory.total / GIB:.1f} of {o.budget / GIB:.1f} GiB)" for o in others if o.fits][:1]
    return plan


def _override(cfg, overrides: dict):
    from aidc.config import validate

    raw = cfg.model_dump(mode="json")
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = raw
        for key in path:
            node = node[key]
        node[last] = value
    return validate(raw)


def _train_rows(manifest: dict | None) -> int | None:
    if manifest is None:
        return None
    counts = manifest["counts"]
    return counts.get("examples", counts["splits"])["train"]


def make_plans(cfg, cluster_path: str | Path | None = None, headroom: float | None = None,
               devs: list[Device] | None = None) -> list[Plan]:
    """A plan per node type of the cluster that could run the job (this machine with no cluster; `devs`: these
    devices)."""
    from functools import lru_cache

    from aidc.cluster import load_cluster_yaml, prepare_and_validate

    manifest = read_manifest(cfg)
    features = planning_features(cfg, manifest)

    @lru_cache(maxsize=None)
    def shape_of_batch(batch_size: int, kind: str) -> Shape:
        return model_shape(_override(cfg, {"train.batch_size": batch_size}), kind, features)

    def shape_of(c, kind: str) -> Shape:  # the shape depends on the micro-batch and the device kind only
        return shape_of_batch(c.train.batch_size, kind)

    rows = _train_rows(manifest)
    headroom = cfg.train.plan_headroom if headroom is None else headroom
    if devs is None and cluster_path is None:
        devs = [local_device(planned_workers(cfg), cfg.resources.cpus_per_worker)]
    elif devs is None:
        raw = load_cluster_yaml(cluster_path)
        prepare_and_validate(raw, str(cluster_path))
        devs = devices(raw, cfg.resources.cpus_per_worker, cfg.resources.use_gpu)
        if not devs:
            raise ConfigError(f"{cluster_path}: no node type can run this job (resources.use_gpu="
                              f"{cfg.resources.use_gpu}); add a worker node type with GPUs or CPUs")
    plans = [plan_for(cfg, shape_of(cfg, d.kind), d, headroom=headroom, train_rows=rows) for d in devs]
    return [with_fixes(cfg, shape_of, p, [o for o in plans if o is not p], headroom=headroom, train_rows=rows)
            for p in plans]


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB / 100 else f"{b / 2**20:.1f} MiB"


def format_plans(cfg, plans: list[Plan]) -> str:
    method = "" if cfg.train.method == "full" else f" {cfg.train.method}"
    shape_line = f"plan for {cfg.name} ({cfg.model.arch}{method}, {cfg.train.parallelism}, batch {cfg.train.batch_size}" \
                 f" x accum {cfg.train.grad_accum_steps}, {planned_workers(cfg)} worker(s))"
    lines = [shape_line]
    for p in plans:
        m = p.memory
        verdict = "fits" if p.fits else "DOES NOT FIT"
        lines.append(f"  {p.device.node_type} ({p.device.name}, {p.device.memory_gib:.1f} GiB per worker): "
                     f"{_gib(m.total)} peak per worker of {_gib(p.budget)} allowed - {verdict}")
        lines.append(f"    parameters {_gib(m.parameters)}, gradients {_gib(m.gradients)}, optimizer "
                     f"{_gib(m.optimizer)}, activations {_gib(m.activations)}, framework {_gib(m.framework)}"
                     + (f", per-sample gradients (DP-SGD) {_gib(m.per_sample)}" if m.per_sample else ""))
        rate = p.tokens_per_step / p.step_s if p.step_s else 0.0
        lines.append(f"    step {p.step_s * 1000:.1f} ms (compute {p.compute_s * 1000:.1f} ms, communication "
                     f"{p.comm_s * 1000:.1f} ms), {rate:,.0f} {p.unit}/s on {p.workers} worker(s), {p.nodes} node(s)")
        if p.hours is not None:
            cost = f", ${p.usd:,.2f}" if p.usd is not None else " (no aidc.io/usd-per-hour label: no cost)"
            lines.append(f"    {p.steps} steps: {p.hours * 60:.1f} min{cost}, {p.kwh:.3f} kWh")
        else:
            lines.append("    wall-clock: preprocess the dataset first (its size gives the steps)")
        for fix in p.fixes:
            lines.append(f"    fix: {fix}")
    return "\n".join(lines)


def refuse_if_unfit(cfg, plans: list[Plan]) -> None:
    """jobs.train: a job predicted not to fit on the cluster it runs on stops here (exit 2), naming the fix."""
    bad = [p for p in plans if not p.fits]
    if not bad or cfg.train.plan == "warn":
        return
    p = bad[0]
    fix = "; or ".join(p.fixes) or "a device with more memory"
    raise ConfigError(f"the plan does not fit: {_gib(p.memory.total)} per worker predicted on {p.device.name} "
                      f"({p.device.node_type}), {_gib(p.budget)} allowed (parameters {_gib(p.memory.parameters)}, "
                      f"gradients {_gib(p.memory.gradients)}, optimizer {_gib(p.memory.optimizer)}, activations "
                      f"{_gib(p.memory.activations)}"
                      + (f", per-sample gradients {_gib(p.memory.per_sample)}" if p.memory.per_sample else "")
                      + f"). Fix: {fix}. To run anyway: --set train.plan=warn")
