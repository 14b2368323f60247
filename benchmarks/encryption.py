"""Cost of data.encryption: writing and reading a dataset's Parquet with Parquet modular encryption (pyarrow,
envelope keys from aidc's local KMS) against plain Parquet, side by side on the same table, as ratios.

    python -m benchmarks.encryption [--rows N] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as pads

    from aidc.data import encryption

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="20,000 rows, once")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.repeats = 20_000, 1
    rng = np.random.default_rng(0)
    # An encoded text dataset's shape: 64 token ids, a label and an id per row
    table = pa.table({"id": np.arange(a.rows), "label": rng.integers(0, 2, a.rows),
                      "input_ids": pa.FixedSizeListArray.from_arrays(
                          pa.array(rng.integers(0, 2000, a.rows * 64, dtype=np.int32)), 64)})
    with tempfile.TemporaryDirectory(prefix="aidc-enc-") as d:
        os.environ["AIDC_KEYS_DIR"] = os.path.join(d, "keys")
        encryption.keygen("bench")
        ways = {"plain": ("parquet", None),
                "encrypted": (encryption.parquet_format(),
                              pads.ParquetFileFormat().make_write_options(**encryption.write_args("bench")))}
        best: dict[str, dict] = {w: {"write_s": float("inf"), "read_s": float("inf")} for w in ways}
        for r in range(a.repeats):
            for way, (fmt, options) in ways.items():  # interleaved: both see the same machine state
                out = os.path.join(d, f"{way}-{r}")
                t0 = time.perf_counter()
                pads.write_dataset(table, out, format="parquet", file_options=options)
                t1 = time.perf_counter()
                back = pads.dataset(out, format=fmt).to_table()
                t2 = time.perf_counter()
                assert back.num_rows == a.rows
                best[way] = {"write_s": min(best[way]["write_s"], t1 - t0), "read_s": min(best[way]["read_s"], t2 - t1)}
    result = {"rows": a.rows, "bytes": table.nbytes, **best,
              "write_ratio": round(best["encrypted"]["write_s"] / best["plain"]["write_s"], 3),
              "read_ratio": round(best["encrypted"]["read_s"] / best["plain"]["read_s"], 3)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
