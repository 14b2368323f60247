"""Language-model serving metrics through Ray's metrics API (exported to Prometheus as `ray_aidc_llm_*`).

The engine calls a small sink (`admitted`, `token`, `state`); this one records into
`ray.util.metrics`. (The operations work will move metric definitions into aidc.telemetry.)
"""

from __future__ import annotations

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class LMMetrics:
    """Time to first token, inter-token latency, queue time, token counts, running/waiting, KV-cache use."""

    def __init__(self, model: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("model",)
        self.tags = {"model": model}
        self.ttft = Histogram("aidc_llm_time_to_first_token_s", "Seconds from arrival to the first generated token.",
                              boundaries=LATENCY_BOUNDARIES_S, tag_keys=keys)
        self.itl = Histogram("aidc_llm_inter_token_latency_s", "Seconds between consecutive tokens of a sequence.",
                             boundaries=LATENCY_BOUNDARIES_S, tag_keys=keys)
        self.queue = Histogram("aidc_llm_queue_time_s", "Seconds a sequence waited before joining the batch.",
                               boundaries=LATENCY_BOUNDARIES_S, tag_keys=keys)
        self.prompt_tokens = Counter("aidc_llm_prompt_tokens", "Prompt tokens prefilled.", tag_keys=keys)
        self.generated_tokens = Counter("aidc_llm_generated_tokens", "Tokens generated.", tag_keys=keys)
        self.running = Gauge("aidc_llm_running_sequences", "Sequences in the running batch.", tag_keys=keys)
        self.waiting = Gauge("aidc_llm_waiting_sequences", "Sequences waiting for a batch slot.", tag_keys=keys)
        self.kv = Gauge("aidc_llm_kv_cache_usage", "Fraction of key/value cache positions in use.", tag_keys=keys)

    def admitted(self, seq, now: float) -> None:
        self.queue.observe(now - seq.arrived, tags=self.tags)
        self.prompt_tokens.inc(len(seq.prompt), tags=self.tags)

    def token(self, seq, now: float) -> None:
        if len(seq.out) <= 1:
            self.ttft.observe(now - seq.arrived, tags=self.tags)
        else:
            self.itl.observe(now - seq.last_token_at, tags=self.tags)
        self.generated_tokens.inc(1, tags=self.tags)

    def state(self, running: int, waiting: int, kv_used: float) -> None:
        self.running.set(running, tags=self.tags)
        self.waiting.set(waiting, tags=self.tags)
        self.kv.set(kv_used, tags=self.tags)
