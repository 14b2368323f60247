"""Language-model serving metrics: the engine's sink, recorded through aidc.ops.metrics (Prometheus `ray_aidc_llm_*`).

The engine calls a small sink (`admitted`, `token`, `state`); this one records time to first token,
inter-token latency, queue time, token counts, running/waiting sequences and KV-cache use per model.
"""

from __future__ import annotations

from aidc.ops import metrics


class LMMetrics:
    """Time to first token, inter-token latency, queue time, token counts, running/waiting, KV-cache use."""

    def __init__(self, model: str):
        self.model = model

    def admitted(self, seq, now: float) -> None:
        metrics.observe("aidc_llm_queue_time_seconds", now - seq.arrived, model=self.model)
        metrics.inc("aidc_llm_prompt_tokens_total", len(seq.prompt), model=self.model)

    def token(self, seq, now: float, first: bool) -> None:
        if first:
            metrics.observe("aidc_llm_time_to_first_token_seconds", now - seq.arrived, model=self.model)
        else:
            metrics.observe("aidc_llm_inter_token_latency_seconds", now - seq.last_token_at, model=self.model)
        metrics.inc("aidc_llm_generated_tokens_total", 1, model=self.model)

    def state(self, running: int, waiting: int, kv_used: float) -> None:
        metrics.set_gauge("aidc_llm_running_sequences", running, model=self.model)
        metrics.set_gauge("aidc_llm_waiting_sequences", waiting, model=self.model)
        metrics.set_gauge("aidc_llm_kv_cache_usage_ratio", kv_used, model=self.model)
