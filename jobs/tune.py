"""Sweep hyperparameters with Ray Tune (each trial a Ray Train run) and register the best model.

    python -m jobs.tune --config jobs/configs/digits.yaml [--set tune.num_samples=4] [--resume] [--dry-run]
"""

import sys

from aidc.entry import run_job
from aidc.tune.space import validate_sweep


def _check(cfg):
    if cfg.train.privacy is not None:
        from aidc.errors import ConfigError

        raise ConfigError("train.privacy (DP-SGD) is not swept: every trial trains on the same private data and "
                          "picking the best leaks more than one trial's ε, which aidc does not account for. Train "
                          "once with python -m jobs.train, or drop train.privacy for the sweep")
    return validate_sweep(cfg)


def _run(cfg, args) -> None:
    from aidc.tune.results import leaderboard_lines
    from aidc.tune.sweep import tune_job

    spec = _check(cfg)
    out = tune_job(spec, resume=args.resume)
    print(f"sweep {out.name}: {len(out.records)} trials -> {out.directory}")
    print("\n".join(leaderboard_lines(out.table, spec.metric)))
    if out.version:
        print(f"registered {out.version.name} version {out.version.version} as {out.version.ref} "
              f"(best trial {out.best.trial_id})")


def _dry_run(cfg) -> None:
    from aidc.tune.sweep import dry_run_lines

    print("\n".join(dry_run_lines(_check(cfg))))


def main(argv=None) -> int:
    return run_job("python -m jobs.tune", __doc__.splitlines()[0], _run, dry_run=_dry_run, argv=argv,
                   check=_check, extra_args=lambda p: p.add_argument(
                       "--resume", action="store_true", help="continue the sweep named by run.name"))


if __name__ == "__main__":
    sys.exit(main())
