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


def test_oip_serving_quick():
    from benchmarks.oip_serving import main

    r = main(["--quick"])
    assert r["batched_1r"]["c8"]["req_per_s"] > 0 and r["plain_fastapi"]["c1"]["req_per_s"] > 0
    assert r["batched_1r"]["c8"]["errors"] == 0


def test_tune_search_quick():
    from benchmarks.tune_search import main

    r = main(["--quick"])
    assert r["asha_vs_grid"]["grid_trial_epochs"] > 0 and r["asha_vs_grid"]["asha_trial_epochs"] > 0
    assert {"random_best", "optuna_best"} <= set(r["tpe_vs_random"]["runs"][0])
