"""Differentially private training (train.privacy): DP-SGD with Opacus on Ray Train workers.

What Opacus gives: per-sample gradients (GradSampleModule), per-sample clipping plus Gaussian noise
(DPOptimizer; DistributedDPOptimizer across DDP workers, noise added once, on rank 0), Poisson sampling
(UniformWithReplacementSampler) and the RDP accountant. What aidc adds around it:

- The plan, made on the driver before any worker starts (`plan`): the sample rate q of the whole run's batch
  (batch_size x workers / training rows), the steps, and the noise multiplier that spends exactly the target ε
  by the last epoch; a target it cannot reach is refused with the reason.
- Poisson sampling needs random access to the whole split at every step (a stream cannot give an independent
  subsample each step), so each worker holds its own shard in memory (`Shard`) and samples it with the run's
  q: every row of the dataset is in a step's batch with probability q, on whichever worker holds it.
- nn.MultiheadAttention has no per-sample gradient in Opacus; the text transformer trains with the same
  attention built from nn.Linear layers in its place (`_SelfAttention`), whose state dict reads and writes
  nn.MultiheadAttention's layout, so checkpoints and the registered model are the plain architecture (served,
  exported, quantized as usual).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from aidc.errors import ConfigError

logger = logging.getLogger(__name__)

ACCOUNTANT = "rdp"  # Opacus's RDP accountant: the ε of every epoch and of the plan come from the same one
# RDP orders it optimises over: Opacus's defaults (up to 63) and on to 255, where large ε at small sample
# rates find their optimum (Opacus warns "optimal order is the largest alpha" otherwise: a looser ε)
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 256))


def plan(cfg, train_rows: int, features: dict | None = None) -> dict:
    """The DP-SGD plan of a run: sample rate, steps, noise multiplier for the target (ε, δ); refuses one that
    cannot be met (a ConfigError naming why and what to change). With the dataset's features, the model is
    built and checked here too, on the driver, before any worker starts."""
    from opacus.accountants.utils import get_noise_multiplier

    p, tc = cfg.train.privacy, cfg.train
    world = max(1, cfg.resources.num_workers)
    if features is not None:
        from aidc.tasks import get_task

        check_model(private_model(get_task(cfg.task).build_model(cfg.model.model_dump(mode="json"), features)))
    if train_rows < world:
        raise ConfigError(f"train.privacy: {train_rows} training rows cannot give each of {world} workers a shard; "
                          "use fewer workers")
    if p.delta >= 1 / train_rows:
        raise ConfigError(f"train.privacy.delta {p.delta:g} is not below 1/rows ({1 / train_rows:.2g} for "
                          f"{train_rows} training rows): a δ that large allows leaking a whole row. Fix: set delta "
                          f"below {1 / train_rows:.2g} (1e-5 is usual for tens of thousands of rows)")
    batch = tc.batch_size * world
    if batch >= train_rows:
        raise ConfigError(f"a step's batch ({tc.batch_size} x {world} worker(s) = {batch}) covers all {train_rows} "
                          "training rows, so sampling gives no privacy amplification. Fix: lower "
                          "train.batch_size or resources.num_workers")
    q = batch / train_rows
    steps_per_epoch = max(1, train_rows // batch)
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    steps = steps_per_epoch * tc.epochs
    try:
        sigma = get_noise_multiplier(target_epsilon=p.epsilon, target_delta=p.delta, sample_rate=q, steps=steps,
                                     accountant=ACCOUNTANT, alphas=ALPHAS)
    except ValueError as exc:  # Opacus: no noise multiplier up to its bound reaches the target
        raise ConfigError(
            f"train.privacy.epsilon {p.epsilon:g} cannot be reached in {tc.epochs} epoch(s) of {steps_per_epoch} "
            f"steps at sample rate {q:.3g} ({exc}). Fix: raise epsilon, train fewer epochs, or lower the "
            "batch size (a smaller sample rate spends less per step)") from exc
    logger.info("DP-SGD: target ε %.3g, δ %.2g: noise multiplier %.4f, sample rate %.4g, %d steps", p.epsilon,
                p.delta, sigma, q, steps)
    return {"noise_multiplier": sigma, "sample_rate": q, "steps_per_epoch": steps_per_epoch, "steps": steps,
            "epsilon": p.epsilon, "delta": p.delta, "max_grad_norm": p.max_grad_norm, "accountant": ACCOUNTANT}


def check_model(model: nn.Module) -> None:
    """Refuse a model Opacus cannot train privately, naming the layers (e.g. BatchNorm mixes the samples of a
    batch, so no per-sample gradient exists)."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        fix = " Fix: model.norm: group (GroupNorm instead of BatchNorm)" if any(
            "BatchNorm" in str(p) for p in problems) else ""
        raise ConfigError("train.privacy: this model cannot be trained with DP-SGD: "
                          + "; ".join(sorted({str(p).split(". ")[0] for p in problems})) + "." + fix)


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention's computation with q/k/v/out as separate nn.Linear layers (Opacus has their
    per-sample gradients) and scaled_dot_product_attention (no weights) between; its state dict is
    nn.MultiheadAttention's. (Opacus's DPMultiheadAttention mixes up heads with batch_first=True in 1.6.)"""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("train.privacy: attention with separate key/value widths or extra key/value biases "
                              "has no DP form in aidc")
        self.num_heads, self.dropout, self.batch_first = mha.num_heads, mha.dropout, mha.batch_first
        kw = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        self.q, self.k, self.v = (nn.Linear(e, e, bias=bias, **kw) for _ in range(3))
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None, **kw)
        # nn.TransformerEncoder(Layer) then keeps to its plain path (its fused kernel reads these fields)
        self.in_proj_bias, self._qkv_same_embed_dim = None, False
        self._register_state_dict_hook(_as_mha_layout)
        self._register_load_state_dict_pre_hook(_from_mha_layout)
        self.load_state_dict(mha.state_dict())

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, t, e = query.shape
        h = self.num_heads
        q, k, v = (proj(x).view(b, -1, h, e // h).transpose(1, 2)
                   for proj, x in ((self.q, query), (self.k, key), (self.v, value)))
        mask = None  # True = may attend (scaled_dot_product_attention's bool convention)
        if key_padding_mask is not None:  # nn.TransformerEncoderLayer hands it as a float mask, -inf = padded
            pad = torch.isneginf(key_padding_mask) if key_padding_mask.is_floating_point() else key_padding_mask
            mask = ~pad.view(b, 1, 1, -1)
        if attn_mask is not None:
            keep = ~torch.isneginf(attn_mask) if attn_mask.is_floating_point() else ~attn_mask
            mask = keep if mask is None else mask & keep
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, t, e))
        return (out if self.batch_first else out.transpose(0, 1)), None


_QKV = ("q", "k", "v")


def _as_mha_layout(module, state, prefix, local_metadata):
    for kind in ("weight", "bias"):
        parts = [state.pop(f"{prefix}{q}.{kind}", None) for q in _QKV]
        if parts[0] is not None:
            state[f"{prefix}in_proj_{kind}"] = torch.cat(parts)
    return state


def _from_mha_layout(state, prefix, *args):
    for kind in ("weight", "bias"):
        whole = state.pop(f"{prefix}in_proj_{kind}", None)
        if whole is not None:
            for q, part in zip(_QKV, whole.chunk(3)):
                state[f"{prefix}{q}.{kind}"] = part


def private_model(model: nn.Module) -> nn.Module:
    """The model with every nn.MultiheadAttention in DP form (same weights, same state-dict layout), checked."""
    for module in model.modules():
        if getattr(module, "inplace", False):  # an in-place op on a hooked layer's output breaks its backward
            module.inplace = False
    for name, child in list(model.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(model, name, _SelfAttention(child))
        else:
            private_model(child)
    return model


def new_secret() -> int:
    """The run's secret: where its noise and Poisson samples come from. Drawn from the OS (never from train.seed,
    which is in the config and the registry: noise anyone can recompute protects nothing); kept only in the
    run's checkpoints, so a resumed run draws the same noise and batches as it would have."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def derive(secret: int, *what) -> int:
    """A seed for one use of the secret (the noise of step n, the samples of epoch e on rank r)."""
    digest = hashlib.blake2b(repr((secret, *what)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def share_secret(secret: int | None, distributed: bool) -> int:
    """Rank 0's secret on every rank (a resumed run's comes from its checkpoint on every rank alike)."""
    if secret is None:
        secret = new_secret()
        if distributed:
            import torch.distributed as dist

            box = [secret]
            dist.broadcast_object_list(box, src=0)
            secret = box[0]
    return secret


def make_private(model: nn.Module, optimizer, dp: dict, batch_size: int, distributed: bool, device):
    """(GradSampleModule, DPOptimizer, accountant) of a run: Opacus's parts, wired as its PrivacyEngine does,
    with the run's sample rate (not one worker's) for the accountant. The optimizer's noise generator is
    seeded per step from the run's secret (`derive`)."""
    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        model = DPDDP(model)  # same initial weights everywhere; gradients are reduced by the optimizer
    model = GradSampleModule(model, loss_reduction="mean")
    optimizer = (DistributedDPOptimizer if distributed else DPOptimizer)(
        optimizer, noise_multiplier=dp["noise_multiplier"], max_grad_norm=dp["max_grad_norm"],
        expected_batch_size=batch_size, loss_reduction="mean", generator=torch.Generator(device=device))
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=dp["sample_rate"]))
    return model, optimizer, accountant


class Shard:
    """A worker's training shard in memory, sampled the DP-SGD way: each step's batch holds each row with
    probability q (Opacus's UniformWithReplacementSampler), seeded from the run's secret per epoch and worker
    so a resumed epoch draws the same batches."""

    def __init__(self, shard, device):
        columns: dict[str, list] = {}
        for batch in shard.iter_torch_batches(batch_size=4096):
            for k, v in batch.items():
                columns.setdefault(k, []).append(v)
        if not columns:
            raise ConfigError("train.privacy: a worker got no training rows; use fewer workers")
        self.columns = {k: torch.cat(v) for k, v in columns.items()}
        self.rows = len(next(iter(self.columns.values())))
        self.device = device

    def batches(self, sample_rate: float, steps: int, seed: int):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        generator = torch.Generator().manual_seed(seed)
        for idx in UniformWithReplacementSampler(num_samples=self.rows, sample_rate=sample_rate, steps=steps,
                                                 generator=generator):
            index = torch.as_tensor(idx, dtype=torch.long)
            yield {k: v[index].to(self.device) for k, v in self.columns.items()}


def epsilon(accountant, delta: float) -> float:
    eps = accountant.get_epsilon(delta, alphas=ALPHAS) if accountant.history else 0.0
    return eps if math.isfinite(eps) else float("inf")
