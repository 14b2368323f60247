"""What every job entrypoint shares: arguments, config loading, exit codes, Ray start-up.

`python -m jobs.<job> --config FILE [--set a.b=v ...] [--dry-run]`: a bad config exits 2 before
anything starts; other aidc errors exit 1 with their message, never a bare traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from aidc.config import JobConfig, load_config, to_yaml
from aidc.errors import AidcError
from aidc.telemetry import setup_logging

logger = logging.getLogger(__name__)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="job config YAML, e.g. jobs/configs/digits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=VALUE",
                   help="override a config field (repeatable), e.g. --set train.epochs=3")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, start nothing")
    return p


def run_job(
    prog: str,
    description: str,
    run: Callable[[JobConfig, argparse.Namespace], None],
    dry_run: Callable[[JobConfig], None] | None = None,
    argv: list[str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    check: Callable[[JobConfig], None] | None = None,
    plan: Callable[[JobConfig], int] | None = None,
) -> int:
    """check: more validation of the loaded config (raise ConfigError), before the dry run or Ray start."""
    parser = job_parser(prog, description)
    if plan:
        parser.add_argument("--plan", action="store_true", help="print the capacity plan (as `aidc plan`) for "
                            "cluster.yaml, start nothing")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args(argv)
    setup_logging()
    import aidc.tasks  # noqa: F401 - registers the workloads whose schemas the config is checked against

    try:
        cfg = load_config(args.config, args.overrides)
        if check:
            check(cfg)
        if plan and args.plan:
            return plan(cfg)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            if dry_run:
                dry_run(cfg)
            return 0
        from aidc.runtime import init_ray
        from aidc.security.audit import record_quietly

        record_quietly("job.start", target=prog, details={"config": args.config, "overrides": args.overrides})
        init_ray()
        run(cfg, args)
        return 0
    except AidcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
