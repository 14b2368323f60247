"""Make a smaller/faster version of a registered model (int8, pruned, distilled) and register it.

    python -m jobs.compress --config jobs/configs/digits.yaml --set compress.method=int8
"""

import sys

from aidc.entry import run_job


def _run(cfg, args) -> None:
    from aidc.compress.job import compress, source_ref

    version = compress(cfg)
    print(f"{cfg.compress.method}: {source_ref(cfg)} -> registered {version.name} version {version.version} as "
          f"{version.ref}; compare them: aidc model compare {source_ref(cfg)} {version.ref}")


def _check(cfg) -> None:
    from aidc.errors import ConfigError

    if cfg.compress is None:
        raise ConfigError("python -m jobs.compress needs a compress section, e.g. --set compress.method=int8")


def main(argv=None) -> int:
    return run_job("python -m jobs.compress", __doc__.splitlines()[0], _run, argv=argv, check=_check)


if __name__ == "__main__":
    sys.exit(main())
