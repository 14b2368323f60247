"""Score a dataset split or your own Parquet/CSV/JSONL with a registered model on a Ray Data actor pool.

    python -m jobs.batch_infer --config jobs/configs/digits.yaml [--set batch_infer.path=rows.csv ...]
"""

import sys

from aidc.batch import model_ref, run_batch_inference, summary_lines
from aidc.entry import run_job


def _run(cfg, args) -> None:
    print("\n".join(summary_lines(run_batch_inference(cfg, args.run_id))))


def _dry_run(cfg) -> None:
    print(f"# would score with {model_ref(cfg)} on {cfg.batch_infer.actors} actor(s)")


def main(argv=None) -> int:
    return run_job("python -m jobs.batch_infer", __doc__.splitlines()[0], _run, dry_run=_dry_run, argv=argv,
                   extra_args=lambda p: p.add_argument("--run-id", help="names the output folder (default: dated)"))


if __name__ == "__main__":
    sys.exit(main())
