"""How a model is spread over workers and which precision it runs in: the one place that applies
DDP or FSDP2 (`fully_shard`), autocast and the grad scaler, and gathers full state for checkpoints."""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from aidc.models.state import has_frozen, load_trained

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision actually used: GPUs get bf16 where supported; CPUs fp32 unless asked otherwise."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        logger.warning("precision fp16 needs a GPU (grad scaler); using bf16 autocast on %s", device.type)
        return "bf16"
    return requested


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device):
    """fp16 needs loss scaling; bf16/fp32 do not (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def parallelize(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP through Ray Train's prepare_model (gloo on CPU, NCCL on GPU), or FSDP2 over each block then the root."""
    import ray.train.torch

    if strategy == "ddp" or not is_distributed():
        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    model = ray.train.torch.prepare_model(model, parallel_strategy=None)  # device placement only
    for block in blocks_of(model):
        fully_shard(block)
    fully_shard(model)
    return model


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (FSDP's units; what activation checkpointing recomputes), each once: aidc's GPT
    .blocks, its encoders' .encoder.layers; Hugging Face decoders .layers (Llama, Qwen2, Mistral: model.layers)
    or .h (GPT-2: transformer.h), also inside a PEFT wrapper."""
    found, seen = [], set()
    for module in model.modules():
        blocks = (getattr(module, "blocks", None) or getattr(getattr(module, "encoder", None), "layers", None)
                  or getattr(module, "layers", None) or getattr(module, "h", None))
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                if id(block) not in seen:
                    seen.add(id(block))
                    found.append(block)
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: Opacus's GradSampleModule (._module), then DDP or Opacus's DPDDP (.module)."""
    for wrapper in ("_module", "module"):
        model = getattr(model, wrapper, model)
    return model


def full_state(model: nn.Module, optimizer, strategy: str) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on CPU (a collective under FSDP: every rank calls it); of the trained
    parameters only where some are frozen (a LoRA checkpoint holds the adapters, not a copy of the base)."""
    frozen = has_frozen(model)
    if strategy == "fsdp" and is_distributed():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=frozen)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    inner = unwrap(model)
    trained = {n for n, p in inner.named_parameters() if p.requires_grad} if frozen else None
    # clone(): on CPU, .cpu() returns the live tensor itself, and a snapshot must not follow training.
    model_sd = {k: v.detach().cpu().clone() for k, v in inner.state_dict().items() if trained is None or k in trained}
    return model_sd, copy.deepcopy(optimizer.state_dict())


def load_full_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict | None, strategy: str) -> None:
    frozen = has_frozen(model)
    if strategy == "fsdp" and is_distributed():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # With cpu_offload the full state lives on rank 0 only (full_state): rank 0 broadcasts it.
        # It also rewrites the dict it is given (into DTensors): hand it copies, keep the caller's intact.
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not frozen)
        set_model_state_dict(model, dict(model_sd), options=opts)
        if optim_sd is not None:
            set_optimizer_state_dict(model, optimizer, copy.deepcopy(optim_sd), options=opts)
        return
    load_trained(unwrap(model), model_sd)
    if optim_sd is not None:
        optimizer.load_state_dict(optim_sd)


def no_sync(model: nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce on micro-steps that are not the last of an accumulation."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
