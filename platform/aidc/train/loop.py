"""The per-worker training loop: one function for every workload, parametrised by its task.

A plain function of a config dict. Ray Train runs it on each worker (DDP over gloo on CPU, NCCL on
GPU, or FSDP2); with `num_workers=0` it runs in the driver. Checkpoints hold everything needed to
continue exactly: model, optimizer, scheduler, RNG, step within the epoch, history and best model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch

import ray.train
import ray.train.torch
from aidc.train.hooks import training_hooks
from aidc.train.telemetry import TrainTelemetry
from aidc.runtime import torch_device
from aidc.tasks import get_task
from aidc.train import checkpoint as ckpt
from aidc.train import privacy
from aidc.train.parallel import (autocast, full_state, grad_scaler, is_distributed, load_full_state, no_sync,
                                 parallelize, resolve_precision)

logger = logging.getLogger(__name__)


def _all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def evaluate(model, task, shard, batch_size: int, device, prefix: str, precision: str) -> dict[str, float]:
    """Task metrics over this worker's shard, summed across all workers."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad(), autocast(precision, device):
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            for k, v in task.eval_sums(task.forward(model, batch), batch).items():
                sums[k] = sums.get(k, 0.0) + v
    return task.metrics_from_sums(_all_reduce_sums(sums, device), prefix)


# The primary metric a mid-epoch checkpoint reports (it has no validation score): the worst, so Ray keeps epoch
# checkpoints first. Finite: Ray Train saves its checkpoint list as JSON, where inf came back as null, and a run
# resumed by name then failed in Ray's controller ("unsupported operand type(s) for *: 'float' and 'NoneType'").
MID_EPOCH_SCORE = 1e300


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _maybe_inject_fault(marker: str | None, step: int) -> None:
    """Test hook for fault tolerance: `<file>:<step>` kills this worker process once, at that step."""
    if not marker:
        return
    path, _, at = marker.rpartition(":")
    if step == int(at) and Path(path).exists():
        Path(path).unlink()
        logger.warning("fault injection: worker exiting at step %d", step)
        os._exit(1)


def _until_the_controller_has_it() -> None:
    """Return once Ray Train's controller has taken this worker's last report (and the checkpoint in it).

    `ray.train.report` returns when the checkpoint is on storage and the report is in the worker's result
    queue (one deep); the controller takes it at its next poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
    default). A worker that died before that poll took its report with it, and the restart continued from the
    checkpoint before: a fresh-clone CI run's FSDP kill at step 13 resumed from step 5, not 10 (Ray's own
    TODO in worker.poll_status: "two phase commit"). Waiting here makes a reported checkpoint the one a
    restart continues from, for at most one poll per checkpoint (the next report would wait for that poll
    anyway: the queue holds one). Every rank waits: the controller keeps a report once every rank's is in.
    """
    try:  # Ray's internal context (2.60): without it, Ray's own behaviour
        from ray.train.v2._internal.execution.context import get_train_context
        result_queue = get_train_context().get_result_queue()
    except (ImportError, AttributeError, RuntimeError):
        return
    result_queue.join()


def apply_hyperparameters(optimizer, scheduler, tc: dict) -> None:
    """Continue another run's state under this config: its weights and optimizer moments, this lr/weight decay.

    A PBT exploit restarts a trial from a better trial's checkpoint with perturbed hyperparameters;
    the LR schedule keeps its position (step) and applies it to the new peak lr.
    """
    scheduler.base_lrs = [tc["lr"]] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = tc["lr"]
        group["weight_decay"] = tc["weight_decay"]
        group["lr"] = tc["lr"] * factor(scheduler.last_epoch)


def train_loop_per_worker(config: dict) -> None:
    job, features = config["job"], config["features"]
    tc = job["train"]
    task = get_task(job["task"])
    # A num_workers: 0 Tune trial calls this loop directly in its own process, with its datasets
    # (ray.train's per-worker API is not available inside a Tune function).
    local = config.get("local_datasets")
    if local is None:
        ctx = ray.train.get_context()
        world, rank = ctx.get_world_size(), ctx.get_world_rank()
        device = ray.train.torch.get_device()
    else:
        world, rank = 1, 0
        device = torch_device()  # a num_workers: 0 trial uses a GPU only when Ray gave it one
    dp = config.get("privacy")  # DP-SGD's plan (aidc.train.privacy.plan), made on the driver
    # DP-SGD trains in fp32: its per-sample gradients and noise are accounted as exact
    precision = "fp32" if dp else resolve_precision(tc["precision"], device)
    strategy = tc["parallelism"]

    torch.manual_seed(tc["seed"])
    model = task.adapt(task.build_model(job["model"], features), job).to(device)  # e.g. LoRA-wrapped
    if dp:
        model = privacy.private_model(model)
        privacy.check_model(model)
    compute_loss, after_step = training_hooks(config, task, model, device)  # pruning/distillation: aidc.compress
    if dp:  # per-sample gradients, clipping and noise (Opacus) in place of DDP's gradient all-reduce
        model, optimizer, accountant = privacy.make_private(
            model, torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"]), dp,
            tc["batch_size"], distributed=local is None and is_distributed(), device=device)
    else:
        if local is None:
            model = parallelize(model, strategy, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    micro_per_epoch = max(1, config["train_rows"] // (tc["batch_size"] * max(world, 1)))
    if tc["max_steps_per_epoch"]:
        micro_per_epoch = min(micro_per_epoch, tc["max_steps_per_epoch"] * tc["grad_accum_steps"])
    if dp:
        micro_per_epoch = dp["steps_per_epoch"]  # the steps the accountant planned for, on every worker
    steps_per_epoch = max(1, micro_per_epoch // tc["grad_accum_steps"])
    total_steps = steps_per_epoch * tc["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total_steps, max(1, int(total_steps * tc["warmup_fraction"])), tc["min_lr_ratio"]))
    scaler = grad_scaler(precision, device)

    state = {"epoch": 0, "step": 0, "micro_in_epoch": 0, "history": [], "best": None, "finished": False,
             "resumes": [], "privacy": [], "dp_secret": None}  # DP-SGD: the accountant's history, the secret
    # Where this run continues from: its own latest checkpoint (Ray Train's, or its own numbered ones for
    # num_workers: 0, see checkpoint.numbered), else a state to start from under this config (a Tune trial's
    # restore or a PBT donor's, passed as init_checkpoint).
    resume_from = ray.train.get_checkpoint() if local is None else None
    local_dir = config.get("local_checkpoint_dir")
    kept = ckpt.numbered(local_dir) if local_dir and resume_from is None else []
    start_from = None if resume_from or kept else config.get("init_checkpoint")
    # FSDP checkpoints sharded (checkpoint.save_sharded): each rank writes its own shards and nothing is
    # gathered, except the final best model once, for the registry
    sharded = strategy == "fsdp" and local is None and is_distributed()

    def restore(d) -> dict:
        saved = ckpt.load(d)
        if saved.get("sharded"):
            if not sharded:
                raise RuntimeError("this checkpoint is sharded (an FSDP run's): continue it with "
                                   "train.parallelism: fsdp on one or more workers")
            best = ckpt.load_sharded(d, model, optimizer, with_best=saved["best"] is not None)
            if best is not None:
                saved["best"]["model"] = best
            return saved
        load_full_state(model, optimizer, saved["model"], saved["optimizer"], strategy)
        if sharded and saved["best"] is not None:  # a gathered checkpoint continued sharded: keep the best as shards
            current = ckpt.sharded_model_state(model)
            load_full_state(model, optimizer, saved["best"]["model"], None, strategy)
            saved["best"]["model"] = ckpt.sharded_model_state(model)
            ckpt.set_sharded_model(model, current)
        return saved

    def best_snapshot() -> dict:
        """The best model as this run keeps it: this rank's shards (sharded) or the full state on CPU."""
        return ckpt.sharded_model_state(model) if sharded else full_state(model, optimizer, strategy)[0]

    saved = None
    if resume_from:
        with resume_from.as_directory() as d:
            saved = restore(d)
    elif kept or start_from:
        saved = restore(kept[-1] if kept else start_from)
    if saved:
        scheduler.load_state_dict(saved["scheduler"])
        ckpt.set_rng_state(saved["rng"])
        state = {k: saved.get(k, v) for k, v in state.items()}
        if dp:
            accountant.history = [tuple(h) for h in state["privacy"]]
        # world sizes before/after: an elastic run's resize shows as a resume with a different world size
        state["resumes"].append({"epoch": state["epoch"], "step": state["step"], "world_size": world,
                                 "from_world_size": saved.get("world_size", world)})
        if start_from:
            apply_hyperparameters(optimizer, scheduler, tc)
            state["finished"] = state["epoch"] >= tc["epochs"]
        if rank == 0:
            logger.info("resuming at epoch %d, step %d", state["epoch"], state["step"])

    telemetry = TrainTelemetry(config, rank, resumed=bool(resume_from or kept), model=model, world=world)  # aidc.ops
    tune_report = config.get("tune_report")  # a num_workers: 0 Tune trial reports straight to Tune

    def report(metrics: dict, final: bool = False) -> None:
        """Report metrics with a checkpoint: every rank's shards (sharded), or the full state gathered and
        written by rank 0 (gathering state is collective)."""
        if dp:
            state["privacy"] = list(accountant.history)  # what the checkpoint's steps spent
        if sharded and not final:
            best = state["best"]
            with tempfile.TemporaryDirectory() as d:
                ckpt.save_sharded(d, model, optimizer, best and best["model"], {
                    **state, "best": best and {k: v for k, v in best.items() if k != "model"},
                    "scheduler": scheduler.state_dict(), "world_size": world}, job, rank)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            _until_the_controller_has_it()
            return
        model_sd, optim_sd = full_state(model, optimizer, strategy)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint, d = None, tmp
            if rank == 0:
                d = str(ckpt.next_numbered(local_dir)) if local_dir else tmp
                ckpt.save(d, {"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                              **state, "world_size": world}, job)
                checkpoint = ray.train.Checkpoint.from_directory(d)
                if local_dir:
                    ckpt.prune_numbered(local_dir, tc["keep_checkpoints"])
            if tune_report:
                tune_report(metrics, d)
            else:
                ray.train.report(metrics, checkpoint=checkpoint)
                _until_the_controller_has_it()

    shards = {s: ray.train.get_dataset_shard(s) if local is None else local[s].iterator()
              for s in ("train", "val", "test")}
    held = privacy.Shard(shards["train"], device) if dp else None  # Poisson sampling draws from the whole shard
    if dp:
        state["dp_secret"] = privacy.share_secret(state["dp_secret"], local is None and is_distributed())
    bs, accum = tc["batch_size"], tc["grad_accum_steps"]
    primary = task.primary_metric
    stale = 0 if state["best"] is None else state["epoch"] - 1 - state["best"]["epoch"]
    # Where a started-from state stands on this worker's data before any training under the new config.
    start_metrics = ({f"start_{primary}": evaluate(model, task, shards["val"], bs * 4, device, "val", precision)[primary]}
                     if start_from else {})

    while state["epoch"] < tc["epochs"] and not state["finished"]:
        epoch = state["epoch"]
        model.train()
        t0, seen, loss_sum, micro, first_batch_s = time.perf_counter(), 0, 0.0, 0, None
        skip = state["micro_in_epoch"]  # resuming mid-epoch: pass over what was already trained on
        batches = held.batches(dp["sample_rate"], micro_per_epoch, privacy.derive(state["dp_secret"], epoch, rank)) \
            if dp else shards["train"].iter_torch_batches(
                batch_size=bs, device=device, local_shuffle_buffer_size=bs * 8,
                local_shuffle_seed=tc["seed"] * 1000 + epoch, prefetch_batches=2)
        for batch in batches:
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t0  # the data pipeline's start-up for this epoch
            if micro < skip:
                micro += 1
                continue
            if micro >= micro_per_epoch:  # equal step counts on every worker; drain (never abandon) the split
                continue
            last_micro = (micro + 1) % accum == 0
            with no_sync(model, not last_micro), autocast(precision, device):
                loss = compute_loss(model, batch)
            scaler.scale(loss / accum).backward()
            micro += 1
            rows = task.count(batch)
            seen += rows
            loss_sum += float(loss.detach()) if rows else 0.0  # a Poisson batch may be empty (its step still adds noise)
            if not last_micro:
                continue
            if tc["grad_clip"] and not dp:  # DP-SGD clips each sample's gradient (train.privacy.max_grad_norm)
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc["grad_clip"])
            if dp:  # this step's noise, from the run's secret (rank 0 adds it)
                optimizer.generator.manual_seed(privacy.derive(state["dp_secret"], "noise", state["step"]))
            scaler.step(optimizer)
            after_step()
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            telemetry.step(state["step"])
            state["micro_in_epoch"] = micro
            _maybe_inject_fault(config.get("fault_marker"), state["step"])
            every = tc["checkpoint_every_steps"]
            if every and state["step"] % every == 0 and micro < micro_per_epoch:
                report({"epoch": epoch, "step": state["step"], "train_loss": loss_sum / max(micro - skip, 1),
                        "lr": scheduler.get_last_lr()[0], primary: MID_EPOCH_SCORE})
        elapsed = time.perf_counter() - t0
        metrics = {
            "epoch": epoch, "step": state["step"], "train_loss": loss_sum / max(micro - skip, 1),
            "lr": scheduler.get_last_lr()[0], "samples_per_s": seen * world / max(elapsed, 1e-9),
            "epoch_time_s": elapsed, "first_batch_s": first_batch_s or 0.0, "precision": precision, "world_size": world,
            **evaluate(model, task, shards["val"], bs * 4, device, "val", precision), **start_metrics,
            # the ε spent so far (the accountant's, at the run's δ) and the noise that spends it
            **({"epsilon": privacy.epsilon(accountant, dp["delta"]), "noise_multiplier": dp["noise_multiplier"]}
               if dp else {}),
        }
        start_metrics = {}
        state["history"].append(metrics)
        if state["best"] is None or metrics[primary] < state["best"]["value"] - tc["early_stopping_min_delta"]:
            state["best"] = {"epoch": epoch, "value": metrics[primary], "model": best_snapshot()}
            stale = 0
        else:
            stale += 1
        patience = tc["early_stopping_patience"]
        if patience and stale >= patience:
            state["finished"] = True
            if rank == 0:
                logger.info("early stopping after epoch %d: no better %s for %d epochs", epoch, primary, patience)
        state["epoch"], state["micro_in_epoch"] = epoch + 1, 0
        if rank == 0:
            logger.info("epoch %d/%d step %d train_loss %.4f %s %.4f", epoch + 1, tc["epochs"], state["step"],
                        metrics["train_loss"], primary, metrics[primary])
        report(metrics)
        telemetry.epoch(metrics)

    # Final: the best weights, scored once on the held-out test split, are the run's result.
    if sharded:
        ckpt.set_sharded_model(model, state["best"]["model"])
        state["best"]["model"] = full_state(model, optimizer, strategy)[0]  # gathered once, for the registry
    else:
        load_full_state(model, optimizer, state["best"]["model"], None, strategy)
    final = {**state["history"][-1], "best_epoch": state["best"]["epoch"], primary: state["best"]["value"],
             "resumes": len(state["resumes"]),
             **evaluate(model, task, shards["test"], bs * 4, device, "test", precision)}
    state["finished"] = True
    report(final, final=True)
    telemetry.finish()
