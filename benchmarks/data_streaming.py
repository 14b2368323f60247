"""Streaming preprocessing of a synthetic tabular dataset several times larger than Ray's object store.

Writes Parquet shards whose in-memory size is `--ratio` x the object store, runs aidc's streaming
files pipeline over them (clean -> split -> partitioned write -> fitted statistics), checks every row
is accounted for, and reports peak RSS of the driver and of the largest Ray worker.

    python -m benchmarks.data_streaming [--quick] [--store-mb 200] [--ratio 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import PeakRSS, local_ray, timed

COLUMNS = 8


def write_shards(directory: Path, total_bytes: int, rows_per_shard: int = 250_000) -> tuple[int, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = written = shard = 0
    while written < total_bytes:
        cols = {f"x{i}": rng.normal(size=rows_per_shard) for i in range(COLUMNS)}
        cols["colour"] = rng.choice(np.array(["red", "green", "blue"], dtype=object), rows_per_shard)
        cols["y"] = rng.integers(0, 2, rows_per_shard)
        table = pa.table(cols)
        pq.write_table(table, directory / f"part-{shard:04d}.parquet")
        rows += table.num_rows
        written += table.nbytes
        shard += 1
    return rows, written


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store-mb", type=int, default=200)
    p.add_argument("--ratio", type=float, default=4.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    store_mb = 80 if args.quick else args.store_mb
    ratio = 0.2 if args.quick else args.ratio

    from aidc.config import load_config
    from aidc.tasks import preprocess

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "input")
        data.mkdir()
        rows, nbytes = write_shards(data, int(store_mb * 2**20 * ratio), 25_000 if args.quick else 250_000)
        cfg = load_config(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "digits.yaml", [
            f"run.storage={tmp}/storage", "name=synthetic", "task=tabular_classification", "data.source=files",
            f"data.path={data}", "data.format=parquet", f"data.features=[{', '.join(f'x{i}' for i in range(COLUMNS))}]",
            "data.categorical=[colour]", "data.label=y", "data.clean.dedup=false", "model={arch: mlp}"])
        with local_ray(2, object_store_memory=store_mb * 2**20), PeakRSS() as rss:
            (dv, _), secs = timed(preprocess, cfg)
        counts = dv.manifest()["counts"]
    assert counts["read"] == rows == counts["kept"] + counts["rejected"], counts
    result = {
        "object_store_mb": store_mb, "input_rows": rows, "input_in_memory_mb": round(nbytes / 2**20),
        "input_vs_object_store": round(nbytes / (store_mb * 2**20), 2), "seconds": round(secs, 1),
        "rows_per_s": round(rows / secs), "splits": counts["splits"],
        "peak_rss_driver_mb": round(rss.driver / 2**20), "peak_rss_largest_worker_mb": round(rss.workers / 2**20),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
