"""Run every side-by-side benchmark in turn (each prints its JSON figures).

    python -m benchmarks.run [--quick]
"""

import sys

from benchmarks import chaos  # noqa: I001 - node loss on a multi-node local cluster (issue 13)
from benchmarks import (allocator, auth_overhead, batch_infer, data_streaming, data_throughput, dp_accuracy, encryption,
                        finetune, llm_serving, metrics_overhead, oip_serving, pii_scrub, plan_calibrate, robustness,
                        sweep_resume, train_vs_torchrun, tune_search)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for bench in (data_throughput, data_streaming, pii_scrub, encryption, train_vs_torchrun, finetune, tune_search,
                  dp_accuracy, llm_serving, oip_serving, batch_infer, robustness, auth_overhead, metrics_overhead,
                  allocator, plan_calibrate, sweep_resume, chaos):
        print(f"== {bench.__name__}", flush=True)
        bench.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
