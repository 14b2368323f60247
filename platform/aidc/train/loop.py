"""The per-worker training loop: one function for every workload, parametrised by its task.

It is a plain function of a config dict. Ray Train runs it on each worker (DDP over gloo on
CPU, NCCL on GPU); with `num_workers=0` it runs in the driver, which unit tests use.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time

import torch

import ray.train
import ray.train.torch
from aidc.tasks import get_task
from aidc.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def _all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def evaluate(model, task, shard, batch_size: int, device, prefix: str) -> dict[str, float]:
    """Task metrics over this worker's shard, summed across all workers."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            for k, v in task.eval_sums(task.forward(model, batch), batch).items():
                sums[k] = sums.get(k, 0.0) + v
    return task.metrics_from_sums(_all_reduce_sums(sums, device), prefix)


def warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_loop_per_worker(config: dict) -> None:
    job, features, train_rows = config["job"], config["features"], config["train_rows"]
    train_cfg = job["train"]
    task = get_task(job["task"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    device = ray.train.torch.get_device()

    torch.manual_seed(train_cfg["seed"])
    model = ray.train.torch.prepare_model(task.build_model(job["model"], features).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"])
    steps_per_epoch = max(1, train_rows // (train_cfg["batch_size"] * max(world, 1)))
    total_steps = steps_per_epoch * train_cfg["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup_steps=max(1, total_steps // 20))
    )

    start_epoch, step, history = 0, 0, []
    resume_from = ray.train.get_checkpoint()
    if resume_from:
        with resume_from.as_directory() as d:
            state = ckpt.load(d)
        ckpt.unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        if rank == 0:
            logger.info("resuming from checkpoint after epoch %d (step %d)", state["epoch"], step)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    test_shard = ray.train.get_dataset_shard("test")
    batch_size = train_cfg["batch_size"]

    for epoch in range(start_epoch, train_cfg["epochs"]):
        model.train()
        t0, seen, loss_sum, batches = time.perf_counter(), 0, 0.0, 0
        for batch in train_shard.iter_torch_batches(
            batch_size=batch_size, device=device, local_shuffle_buffer_size=batch_size * 8,
            local_shuffle_seed=train_cfg["seed"] * 1000 + epoch,
        ):
            loss = task.loss(task.forward(model, batch), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            batches += 1
            seen += task.count(batch)
            loss_sum += float(loss)
        elapsed = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(batches, 1),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": seen * world / max(elapsed, 1e-9),
            **evaluate(model, task, val_shard, batch_size * 4, device, "val"),
        }
        if epoch == train_cfg["epochs"] - 1 and test_shard is not None:
            metrics.update(evaluate(model, task, test_shard, batch_size * 4, device, "test"))
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                ckpt.save(d, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, step=step,
                          history=history, config=job)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
