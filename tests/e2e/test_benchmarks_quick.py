"""Each benchmark's --quick mode runs, so benchmarks cannot rot (figures are for issue notes, not asserts)."""

import pytest

pytestmark = pytest.mark.e2e  # each starts and stops its own local Ray, so it runs outside the integration tier


def test_data_throughput_quick():
    from benchmarks.data_throughput import main

    r = main(["--quick"])
    assert r["text_pandas_rows_per_s"] > 0 and r["text_ray_2cpu_rows_per_s"] > 0


def test_data_streaming_quick():
    from benchmarks.data_streaming import main

    r = main(["--quick"])
    assert r["input_rows"] == sum(r["splits"].values())


def test_train_vs_torchrun_quick():
    from benchmarks.train_vs_torchrun import main

    r = main(["--quick"])
    assert r["ray_train_samples_per_s"] > 0 and r["torchrun_samples_per_s"] > 0


def test_llm_kv_cache_quick():
    from benchmarks.llm_kv_cache import main

    r = main(["--quick"])
    assert r["same_tokens"] and r["kv_cache_tokens_per_s"] > 0 and r["recompute_tokens_per_s"] > 0


def test_llm_engines_quick():
    from benchmarks.llm_engines import main

    r = main(["--quick"])
    assert r["aidc_engine_tokens_per_s"] > 0 and r.get("same_greedy_tokens", True)


def test_llm_serving_quick():
    from benchmarks.llm_serving import main

    r = main(["--quick"])
    assert all(r[f"{v}_c4"]["tokens_per_s"] > 0 for v in ("continuous", "sequential", "static"))
