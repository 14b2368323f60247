"""The platform's Prometheus metrics: every definition in one catalogue, recorded through `ray.util.metrics`.

Ray's metrics agent on each node serves them (with a `ray_` prefix) on `--metrics-export-port`, so the
Prometheus that scrapes Ray's service-discovery file sees them with no other exporter. Instrumenting a
component is one line:

    from aidc.ops import metrics
    metrics.inc("aidc_auth_failures_total", app="llm", reason="missing_key")
    metrics.observe("aidc_train_checkpoint_save_seconds", 0.8, job="digits")
    metrics.set_gauge("aidc_train_step", 120, job="digits", run="digits-20260101-120000")

Recording never raises: outside Ray (unit tests, the CLI) values go only to a small in-process table
(`value()` reads it), and a failing exporter is logged at debug level. Label values must be bounded
(model names, app names, reasons from a fixed set) — never request ids or raw user input.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
DURATION_S = [0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0]
BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]


@dataclass(frozen=True)
class Metric:
    """One metric: its Prometheus kind, name (units in the name), help text, label names and buckets."""

    kind: str  # counter | gauge | histogram
    name: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = field(default=())


def _c(name, help, *labels):
    return Metric("counter", name, help, labels)


def _g(name, help, *labels):
    return Metric("gauge", name, help, labels)


def _h(name, help, buckets, *labels):
    return Metric("histogram", name, help, labels, tuple(buckets))


CATALOGUE: dict[str, Metric] = {m.name: m for m in [
    # -- data ---------------------------------------------------------------------------------
    _c("aidc_data_rows_read_total", "Raw rows read by preprocessing.", "dataset"),
    _c("aidc_data_rows_kept_total", "Rows kept after cleaning.", "dataset"),
    _c("aidc_data_rows_rejected_total", "Rows rejected by cleaning, by reason.", "dataset", "reason"),
    _g("aidc_data_rows_per_second", "Preprocessing throughput of the last run (rows read per second).", "dataset"),
    # -- training -----------------------------------------------------------------------------
    _g("aidc_train_running", "1 while a training run is in progress on its rank-0 worker, 0 when it ended.",
       "job", "run"),
    _g("aidc_train_step", "Optimizer steps done by the run.", "job", "run"),
    _g("aidc_train_epoch", "Epochs completed by the run.", "job", "run"),
    _g("aidc_train_last_step_timestamp_seconds", "Unix time of the run's last optimizer step.", "job", "run"),
    _g("aidc_train_loss", "Loss of the last epoch (split: train or val).", "job", "run", "split"),
    _g("aidc_train_samples_per_second", "Training throughput of the last epoch, all workers.", "job", "run"),
    _g("aidc_train_model_flops_utilization_ratio", "Model FLOPs utilisation of the last epoch (language models on "
       "GPUs; 6N FLOPs per token over the GPUs' peak).", "job", "run"),
    _h("aidc_train_checkpoint_save_seconds", "Seconds to write one checkpoint (rank 0).", DURATION_S, "job"),
    _c("aidc_train_restarts_total", "Times a run resumed from a checkpoint (worker restarts).", "job", "run"),
    _c("aidc_train_runs_total", "Training runs ended, by outcome (completed, errored).", "job", "outcome"),
    _g("aidc_train_gpu_energy_kwh", "GPU energy used by the run so far (NVML energy counter).", "job", "run"),
    # -- tuning -------------------------------------------------------------------------------
    _g("aidc_tune_trials", "Trials of a sweep by state (running, completed, stopped, errored).", "sweep", "state"),
    # -- serving (every protocol) -------------------------------------------------------------
    _c("aidc_serve_requests_total", "Requests answered, by app, model, version, protocol (http, grpc), route "
       "and status code (HTTP codes; gRPC errors as their HTTP equivalent).",
       "app", "model", "version", "protocol", "route", "code"),
    _h("aidc_serve_request_duration_seconds", "Request latency as the app saw it.", LATENCY_S,
       "app", "model", "protocol", "route"),
    _h("aidc_serve_batch_size", "Requests run together in one model call.", BATCH, "app", "model", "version"),
    # language models: vLLM's own engine metrics (ray_vllm_*: TTFT, inter-token latency, KV cache, prefix cache)
    # come through Ray Serve LLM (aidc.serving.llm.app, `metrics: true`); aidc adds the request metrics above
    # -- registry -----------------------------------------------------------------------------
    _c("aidc_model_loads_total", "Model versions loaded from the registry, by outcome (ok, integrity, error).",
       "model", "outcome"),
    _c("aidc_model_integrity_failures_total", "Model loads refused because files failed their integrity check.",
       "model", "reason"),
    # -- security -----------------------------------------------------------------------------
    _c("aidc_auth_failures_total", "Requests refused by authentication or authorisation, by reason.",
       "app", "reason"),
]}

_lock = threading.Lock()
_exporters: dict[str, object] = {}
_local: dict[tuple, float] = {}


def ray_on() -> bool:
    try:
        return sys.modules["ray"].is_initialized() if "ray" in sys.modules else False
    except Exception:  # noqa: BLE001 - metrics never break the caller
        return False


def _exporter(m: Metric):
    with _lock:
        if m.name not in _exporters:
            from ray.util import metrics as rm

            if m.kind == "counter":
                _exporters[m.name] = rm.Counter(m.name, m.help, tag_keys=m.labels)
            elif m.kind == "gauge":
                _exporters[m.name] = rm.Gauge(m.name, m.help, tag_keys=m.labels)
            else:
                _exporters[m.name] = rm.Histogram(m.name, m.help, boundaries=list(m.buckets), tag_keys=m.labels)
        return _exporters[m.name]


def _tags(m: Metric, labels: dict) -> dict[str, str]:
    unknown = set(labels) - set(m.labels)
    if unknown:
        raise ValueError(f"{m.name} has labels {list(m.labels)}; got unknown {sorted(unknown)}")
    return {k: str(labels.get(k, "")) for k in m.labels}


def record(kind: str, name: str, value: float, labels: dict, export: bool = True) -> None:
    m = CATALOGUE.get(name)
    if m is None:
        raise KeyError(f"unknown metric {name!r}: define it in aidc.ops.metrics.CATALOGUE")
    if m.kind != kind:
        raise TypeError(f"{name} is a {m.kind}, not a {kind}")
    tags = _tags(m, labels)
    key = (name, tuple(sorted(tags.items())))
    with _lock:
        if kind == "counter":
            _local[key] = _local.get(key, 0.0) + value
        elif kind == "gauge":
            _local[key] = float(value)
        else:
            _local[key + ("count",)] = _local.get(key + ("count",), 0.0) + 1
            _local[key + ("sum",)] = _local.get(key + ("sum",), 0.0) + value
    if not export or not ray_on():
        return
    try:
        exporter = _exporter(m)
        if kind == "counter":
            exporter.inc(value, tags=tags)
        elif kind == "gauge":
            exporter.set(value, tags=tags)
        else:
            exporter.observe(value, tags=tags)
    except Exception as exc:  # noqa: BLE001 - an exporter problem must not fail a request or a training step
        logger.debug("metric %s not recorded: %s", name, exc)


def inc(name: str, value: float = 1.0, **labels) -> None:
    """Add `value` to a counter."""
    record("counter", name, value, labels)


def set_gauge(name: str, value: float, **labels) -> None:
    """Set a gauge."""
    record("gauge", name, value, labels)


def observe(name: str, value: float, **labels) -> None:
    """Record one observation in a histogram."""
    record("histogram", name, value, labels)


def value(name: str, stat: str | None = None, **labels) -> float:
    """This process's recorded value (counter total, gauge value; histogram `stat` 'count' or 'sum'); 0 if none."""
    m = CATALOGUE[name]
    key = (name, tuple(sorted(_tags(m, labels).items()))) + ((stat,) if stat else ())
    with _lock:
        return _local.get(key, 0.0)


def exported_name(name: str) -> str:
    """The name Prometheus sees: Ray prefixes `ray_`."""
    return f"ray_{name}"


# -- one-line hooks for what several components count --------------------------------------------

def count_model_load(model: str, outcome: str) -> None:
    """A registry load ended: outcome 'ok', 'integrity' (refused: files fail verification) or 'error'."""
    inc("aidc_model_loads_total", model=model, outcome=outcome)


def count_integrity_failure(model: str, reason: str) -> None:
    """A model's files failed verification (reason: 'manifest', 'signature', ...): never served; alerts at once."""
    inc("aidc_model_integrity_failures_total", model=model, reason=reason)


def count_auth_failure(app: str, reason: str) -> None:
    """A request was refused by auth (reason from a fixed set: 'missing_key', 'bad_key', 'scope', ...)."""
    inc("aidc_auth_failures_total", app=app, reason=reason)


def model_name(ref: str) -> str:
    """The registered name in a reference ('digits-cnn@champion', 'digits-cnn/3' -> 'digits-cnn'): a bounded label."""
    return str(ref).split("@")[0].split("/")[0] or "unknown"


def integrity_reason(exc: BaseException) -> str:
    """A bounded reason for an IntegrityError: its `reason` attribute if set, else 'signature' or 'manifest'."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    return "signature" if "signature" in str(exc).lower() else "manifest"


@contextmanager
def model_load(ref: str):
    """Count one registry load around the fetch/verify/load call: `with metrics.model_load(ref): fetch(...)`."""
    from aidc.errors import IntegrityError

    model = model_name(ref)
    try:
        yield
    except IntegrityError as exc:
        count_integrity_failure(model, integrity_reason(exc))
        count_model_load(model, "integrity")
        raise
    except Exception:
        count_model_load(model, "error")
        raise
    count_model_load(model, "ok")
