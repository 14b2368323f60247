"""The torchrun baseline: plain PyTorch DDP (gloo on CPU, NCCL on GPU) over the same preprocessed split,
model and batch size as aidc's Ray Train loop. Launched by benchmarks.train_vs_torchrun."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402


def main() -> None:
    cfg = json.loads(sys.argv[1])
    from aidc.data.dataset import open_dataset
    from aidc.tasks import get_task

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    dv = open_dataset(cfg["root"], cfg["name"])
    task = get_task(cfg["task"])
    manifest = dv.manifest()
    batch = task.transform_batch(dv.read_numpy("train"), manifest["transform"])
    data = TensorDataset(torch.from_numpy(batch["x"]), torch.from_numpy(batch["y"]))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=cfg["batch_size"], sampler=sampler, drop_last=True)
    torch.manual_seed(0)
    model = DDP(task.build_model(cfg["model"], manifest["features"]).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates = []
    for epoch in range(cfg["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        t0, seen = time.perf_counter(), 0
        for step, (x, y) in enumerate(loader):
            if step >= cfg["steps"]:
                break
            x, y = x.to(device), y.to(device)
            loss = task.loss(model(x), {"y": y})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if cuda:
            torch.cuda.synchronize()
        rates.append(seen * world / (time.perf_counter() - t0))
    if rank == 0:
        print("RESULT " + json.dumps({"samples_per_s": rates}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
