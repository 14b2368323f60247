"""Batch inference: rows/s of the Ray Data actor-pool job vs a single-process loop over the same model,
rows and code (the same BatchPredictor class, called batch by batch in this process), and a streaming run whose
input is larger than the object store.

    python -m benchmarks.batch_infer [--quick]

Three models, each briefly trained in the driver: the digits CNN (raw 8x8 images: little compute per row),
the MNIST CNN (28x28 images) and the character GPT (a 32-token completion per prompt); image rows are
validated as the API validates requests. Each runs at two input sizes, so the marginal rate (extra rows
over extra time) cancels the job's fixed start-up (actors importing torch, fetching and verifying the
model). The loop runs with torch's default threads (both cores for the model's ops); each actor has one.
Measured on this machine's 2 cores; with other work running on it, compare the side-by-side ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, SHARED_DATA, local_ray, timed

import numpy as np

LM_TOKENS = 32  # tokens per completion in the language-model run


def _ray(num_cpus: float, **kwargs):
    from aidc.runtime import aidc_package_dir

    return local_ray(num_cpus, runtime_env={"py_modules": [aidc_package_dir()]}, **kwargs)


def _train(root: str, name: str = "digits"):
    from aidc.config import load_config
    from aidc.tasks import preprocess
    from aidc.train.register import register
    from aidc.train.trainer import run_training

    cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml", [
        f"run.storage={root}", "resources.num_workers=0", "train.epochs=1", "train.max_steps_per_epoch=20",
        f"run.name=bench-{name}", *([f"data.mirror={SHARED_DATA}"] if name != "digits" else [])])
    preprocess(cfg)
    register(cfg, run_training(cfg))
    return cfg


def _write_prompts(path: Path, rows: int, files: int) -> int:
    """`rows` prompts (the first words of Shakespeare's lines) as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [ln for ln in (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text().splitlines() if len(ln) > 20]
    path.mkdir(parents=True)
    per = rows // files
    for f in range(files):
        ids = np.arange(f * per, (f + 1) * per)
        pq.write_table(pa.table({"id": ids, "prompt": [lines[i % len(lines)][:24] for i in ids]}),
                       path / f"part-{f:03d}.parquet")
    return per * files


def _write_rows(cfg, path: Path, rows: int, payload_bytes: int, files: int) -> int:
    """`rows` raw digit rows (tiled from the dataset) as Parquet; payload inflates each row's size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aidc.data.dataset import open_dataset

    images = open_dataset(cfg.run.storage, cfg.name).read_numpy("train")["image"]
    path.mkdir(parents=True)
    per = rows // files
    pad = "x" * payload_bytes
    for f in range(files):
        ids = np.arange(f * per, (f + 1) * per)
        cols = {"id": pa.array(ids), "image": pa.array(images[ids % len(images)].tolist())}
        if payload_bytes:
            cols["payload"] = pa.array([pad] * per)
        pq.write_table(pa.table(cols), path / f"part-{f:03d}.parquet", row_group_size=2048)
    return per * files


def _loop(cfg, path: Path, batch_size: int) -> int:
    """The single-process baseline: one model, the same Predictor, Parquet batches read in order."""
    import pyarrow.parquet as pq

    from aidc.batch.predictor import BatchPredictor
    from aidc.registry import tracking_uri

    b = cfg.batch_infer
    predictor = BatchPredictor(f"{cfg.registry.model_name}@champion", tracking_uri(None, cfg.run.storage), "id", False,
                          {"batch_size": batch_size, "max_tokens": LM_TOKENS, "temperature": b.temperature,
                           "top_p": b.top_p, "seed": b.seed, "stop": []}, cfg.task)
    n = 0
    with tempfile.TemporaryDirectory() as out:
        for i, f in enumerate(sorted(path.glob("*.parquet"))):
            for j, batch in enumerate(pq.ParquetFile(f).iter_batches(batch_size=batch_size)):
                table = predictor(batch.to_pandas())
                pq.write_table(table, Path(out, f"{i}-{j}.parquet"))
                n += table.num_rows
    return n


def _job(cfg, path: Path, out: Path, actors: int, batch_size: int) -> dict:
    from aidc.batch import run_batch_inference

    job = cfg.model_copy(update={"batch_infer": cfg.batch_infer.model_copy(update={
        "path": str(path), "format": "parquet", "output": str(out), "actors": actors, "batch_size": batch_size,
        "cpus_per_actor": 0.5, "max_tokens": LM_TOKENS})})
    return run_batch_inference(job)


def _cpu_seconds() -> float:
    """CPU time of this process, all its threads (the loop runs here)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _side_by_side(cfg, tmp: str, label: str, sizes: list[int], batch: int, write, actors: int = 2) -> dict:
    """Loop and Ray job over the same rows at each size; rates end to end and, with two sizes, marginal."""
    times, busy = {}, {}
    for n in sizes:
        data = Path(tmp, f"{label}-{n}")
        write(data, n)
        cpu = _cpu_seconds()
        done, times[("loop", n)] = timed(_loop, cfg, data, batch)
        busy[n] = (_cpu_seconds() - cpu) / times[("loop", n)]
        m, times[("ray", n)] = timed(_job, cfg, data, Path(tmp, f"{label}-out-{n}"), actors, batch)
        assert done == m["counts"]["predicted"] == n
    big = sizes[-1]
    # The loop's own cores (torch's intra-op threads): N cores of M cap any parallel speed-up over it at M / N.
    out: dict = {"rows": sizes, "batch_size": batch, "loop_cores_busy": round(busy[big], 2)}
    for kind in ("loop", "ray"):
        out[f"{kind}_seconds"] = [round(times[(kind, n)], 2) for n in sizes]
        out[f"{kind}_rows_per_s"] = big / times[(kind, big)]  # end to end: start-up (model loads, actors) included
        extra = times[(kind, big)] - times[(kind, sizes[0])]
        if len(sizes) == 2 and extra > 0:  # the extra rows over the extra time: start-up cancels, the rate remains
            out[f"{kind}_marginal_rows_per_s"] = (big - sizes[0]) / extra  # (absent when load noise swamps it)
    out["ray_vs_loop"] = out["ray_rows_per_s"] / out["loop_rows_per_s"]
    if "ray_marginal_rows_per_s" in out and "loop_marginal_rows_per_s" in out:
        out["ray_vs_loop_marginal"] = out["ray_marginal_rows_per_s"] / out["loop_marginal_rows_per_s"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the test suite")
    p.add_argument("--rows", type=int, nargs=2, default=[100000, 400000],
                   help="digits rows of the two runs (the marginal rate is their difference over the time's)")
    p.add_argument("--mnist-rows", type=int, nargs=2, default=[10000, 60000], help="MNIST rows of the two runs")
    p.add_argument("--prompts", type=int, nargs=2, default=[1024, 8192], help="GPT prompts of the two runs")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (this machine: 2)")
    p.add_argument("--actors", type=int, default=2, help="actors in the pool (on a GPU machine they share its GPUs)")
    p.add_argument("--skip", nargs="*", default=[], choices=["mnist", "gpt"], help="models to leave out")
    args = p.parse_args(argv)
    stream_rows, payload, store_mb = (6000 if args.quick else 30000), 16384, 80
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp, "storage"))
        with _ray(args.num_cpus):
            digits = _train(root)
            sizes = [3000] if args.quick else args.rows
            results["digits_cnn"] = _side_by_side(digits, tmp, "digits", sizes, 512,
                                                  lambda path, n: _write_rows(digits, path, n, 0, files=8),
                                                  args.actors)
            print(json.dumps({"digits_cnn": results["digits_cnn"]}), flush=True)  # figures as they come
            if not (args.quick or "mnist" in args.skip):  # a 28x28 image per row: the MNIST CNN (the issue's)
                mnist = _train(root, "mnist")
                results["mnist_cnn"] = _side_by_side(mnist, tmp, "mnist", args.mnist_rows, 512,
                                                     lambda path, n: _write_rows(mnist, path, n, 0, files=8),
                                                     args.actors)
                print(json.dumps({"mnist_cnn": results["mnist_cnn"]}), flush=True)
            if not (args.quick or "gpt" in args.skip):  # a heavier row: a 32-token completion per prompt (char GPT)
                gpt = _train(root, "shakespeare-gpt")
                results["char_gpt"] = _side_by_side(gpt, tmp, "gpt", args.prompts, 32,
                                                    lambda path, n: _write_prompts(path, n, files=8), args.actors)
                print(json.dumps({"char_gpt": results["char_gpt"]}), flush=True)
        # Streaming: input several times the object store; the job must finish with every row accounted for.
        big = Path(tmp, "big")
        written = _write_rows(digits, big, stream_rows, payload, files=8)
        with _ray(args.num_cpus, object_store_memory=store_mb * 2**20):
            m, s = timed(_job, digits, big, Path(tmp, "big-out"), args.actors, 512)
        results["streaming"] = {"input_rows": written,
                                "input_mb_parquet": round(sum(f.stat().st_size for f in big.iterdir()) / 2**20, 1),
                                "input_mb_in_memory": round(written * (payload + 64 * 8) / 2**20, 1),
                                "object_store_mb": store_mb, "predicted": m["counts"]["predicted"],
                                "rejected": m["counts"]["rejected"], "seconds": round(s, 1)}
    print(json.dumps(results, indent=2))
    for name, r in results.items():
        if "ray_vs_loop" in r:
            print(f"{name}: single-process loop {r['loop_rows_per_s']:.0f} rows/s ({r['loop_cores_busy']} cores busy), "
                  f"Ray Data {args.actors} actors "
                  f"{r['ray_rows_per_s']:.0f} rows/s end to end ({r['ray_vs_loop']:.2f}x)"
                  + (f", marginal {r['ray_vs_loop_marginal']:.2f}x" if "ray_vs_loop_marginal" in r else ""))
    print("(a machine shared with other work: compare the side-by-side ratios, not absolute rates)")
    return results


if __name__ == "__main__":
    main()
