"""Each benchmark's --quick mode runs, so benchmarks cannot rot (figures are for issue notes, not asserts)."""

import os

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


def test_finetune_quick():
    from benchmarks.finetune import main

    r = main(["--quick"])
    assert r["full"]["tokens_per_s"] > 0 and r["lora"]["tokens_per_s"] > 0
    assert r["lora"]["trained_params"] < r["full"]["trained_params"] / 10  # the adapters only
    assert r["lora"]["checkpoint_mb"] < r["full"]["checkpoint_mb"] / 5
    ckpt = r["fsdp_checkpoint_2_ranks"]
    assert ckpt["gathered"]["rank1"]["mb"] == 0 and ckpt["sharded"]["rank1"]["mb"] > 0  # every rank writes its part


def test_llm_serving_quick():
    from benchmarks.llm_serving import main

    r = main(["--quick"])
    assert r["c1"]["tokens_per_s"] > 0 and r["c4"]["tokens_per_s"] > 0 and r["c4"]["ttft_p50_ms"] > 0


def test_oip_serving_quick():
    from benchmarks.oip_serving import main

    r = main(["--quick"])
    assert r["batched_1r"]["c8"]["req_per_s"] > 0 and r["plain_fastapi"]["c1"]["req_per_s"] > 0
    assert r["batched_1r"]["c8"]["errors"] == 0


def test_pii_scrub_quick():
    from benchmarks.pii_scrub import main

    r = main(["--quick"])
    assert min(r["planted"]["recall"].values()) >= 0.95 and not r["planted"]["hits_in_ordinary_text"]
    assert r["sms"]["hits"].get("phone", 0) > 10 and r["sms"]["presidio_url_hits_alone"] > r["sms"]["hits"]["url"]


def test_robustness_quick():
    from benchmarks.robustness import main

    d = main(["--quick"])["digits"]
    assert d["samples"] == 100 and all(d[f"pgd@{e}"] <= d[f"fgsm@{e}"] for e in ("0.1", "0.2", "0.3"))


def test_auth_overhead_quick():
    from benchmarks.auth_overhead import main

    r = main(["--quick"])
    assert r["on_c1"]["req_per_s"] > 0 and r["off_c1"]["req_per_s"] > 0 and r["on_c1"]["errors"] == 0
    assert r["in_process"]["scrypt_us"] > r["in_process"]["sha256_us"]


def test_tune_search_quick():
    from benchmarks.tune_search import main

    r = main(["--quick"])
    assert r["asha_vs_grid"]["grid_trial_epochs"] > 0 and r["asha_vs_grid"]["asha_trial_epochs"] > 0
    assert {"random_best", "optuna_best"} <= set(r["tpe_vs_random"]["runs"][0])


def test_batch_infer_quick():
    from benchmarks.batch_infer import main

    r = main(["--quick"])
    assert r["digits_cnn"]["loop_rows_per_s"] > 0 and r["digits_cnn"]["ray_rows_per_s"] > 0
    assert 0.3 < r["digits_cnn"]["loop_cores_busy"] <= os.cpu_count() + 0.2  # the loop's CPU use (rusage)
    s = r["streaming"]  # an input larger than the object store streams through, every row accounted for
    assert s["input_mb_in_memory"] > s["object_store_mb"] and s["predicted"] + s["rejected"] == s["input_rows"]


def test_metrics_overhead_quick():
    from benchmarks.metrics_overhead import main

    r = main(["--quick"])
    assert r["record"]["aidc_inc_us"] > 0 and r["record"]["ray_inc_us"] > 0
    assert r["middleware"]["instrumented_request_us"] > 0 and r["middleware"]["bare_request_us"] > 0


def test_chaos_quick():
    from benchmarks.chaos import main

    r = main(["--quick"])  # a loaded endpoint on a 3-worker-node local cluster; one node lost and replaced
    assert r["node_events"] == ["remove", "add"] and r["requests"] > 50
    assert r["requests_failed"] == 0 and r["checkpoints_lost"] == 0, r


def test_allocator_quick():
    from benchmarks.allocator import main

    r = main(["--quick"])  # two fresh processes: glibc's defaults vs aidc's tuning (no Ray)
    assert r["applied"] == {"tuned": True, "default": False}
    assert all(v["tuned"] > 0 and v["glibc_default"] > 0 for k, v in r.items() if k.endswith(("_ms", "_per_s")))
    assert "gpt_forward_b16_t190_ms" in r
