"""Preprocess a dataset into a versioned Parquet dataset + manifest (Ray Data).

    python -m jobs.preprocess --config jobs/configs/digits.yaml [--force]
"""

import sys

from aidc.data.pipeline import summary_lines
from aidc.tasks import preprocess
from aidc.entry import run_job


def _run(cfg, args) -> None:
    dv, reused = preprocess(cfg, force=args.force)
    print("\n".join(summary_lines(dv, reused)))


def main(argv=None) -> int:
    return run_job(
        "python -m jobs.preprocess", __doc__.splitlines()[0], _run, argv=argv,
        extra_args=lambda p: p.add_argument("--force", action="store_true", help="rebuild even if this version exists"),
    )


if __name__ == "__main__":
    sys.exit(main())
