"""Sweep results: one row per trial (CSV + Parquet), the metric per trial over epochs and against each
parameter (PNGs), and the leaderboard `aidc sweeps show` prints."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from aidc import storage
from aidc.errors import AidcError

logger = logging.getLogger(__name__)

SUMMARY = "sweep.json"


@dataclass
class TrialRecord:
    trial_id: str
    status: str  # completed | stopped early | errored
    params: dict
    history: list[tuple[int, float]]  # (epochs_done, metric) per epoch
    final: dict = field(default_factory=dict)  # the completed run's final report (test metrics)
    checkpoint_path: str | None = None
    error: str | None = None
    epoch_rows: list[dict] = field(default_factory=list)


def _best(values: list[float], mode: str) -> float | None:
    return (min(values) if mode == "min" else max(values)) if values else None


def _reported_rows(result) -> pd.DataFrame:
    """Every result a trial reported. result.json (not progress.csv, whose columns are fixed by the first
    row) keeps keys that appear later, such as a PBT-exploited trial's init_trial."""
    path = Path(result.path or "", "result.json")
    if path.is_file() and path.stat().st_size:
        return pd.read_json(path, lines=True, convert_dates=False, dtype=False)
    return result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()


def error_reason(err: BaseException) -> str:
    """Why a trial errored, in one line: the trial's own exception (Ray wraps it in RayTaskError/TuneError, whose
    first line is only the actor's name), e.g. aidc's ResourcesUnavailable message."""
    while getattr(err, "cause", None) is not None:
        err = err.cause
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:500]


def collect(grid, metric: str) -> list[TrialRecord]:
    """Trial records from Tune's ResultGrid."""
    from aidc.tune.trainable import usable_checkpoint

    records = []
    for r in grid:
        df = _reported_rows(r)
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        reported = "completed" in df and "epochs_done" in df and metric in df
        epochs = df[df["completed"] == 0] if reported else pd.DataFrame(columns=["epochs_done", metric])
        finals = df[df["completed"] == 1] if reported else df.iloc[0:0]
        # a restored trial can report an epoch again (its work after the last checkpoint): keep the latest
        epochs = epochs.drop_duplicates("epochs_done", keep="last").sort_values("epochs_done")
        history = [(int(e), float(v)) for e, v in zip(epochs["epochs_done"], epochs[metric])] if len(epochs) else []
        status = "errored" if r.error else "completed" if len(finals) else "stopped early"
        checkpoint = usable_checkpoint(r.checkpoint)
        records.append(TrialRecord(
            trial_id=str(trial_id), status=status, params=dict(r.config or {}), history=history,
            final=finals.iloc[-1].to_dict() if len(finals) else {},
            checkpoint_path=checkpoint.path if checkpoint else None,
            error=error_reason(r.error) if r.error else None,
            epoch_rows=epochs.to_dict("records"),
        ))
    return records


def table(records: list[TrialRecord], metric: str, mode: str) -> pd.DataFrame:
    rows = []
    for t in records:
        values = [v for _, v in t.history]
        row = {"trial_id": t.trial_id, "status": t.status, **{f"param:{k}": v for k, v in t.params.items()},
               "epochs": t.history[-1][0] if t.history else 0,
               f"last_{metric}": values[-1] if values else None, f"best_{metric}": _best(values, mode)}
        row.update({k: v for k, v in t.final.items() if k.startswith("test_")})
        row["error"] = t.error or ""
        rows.append(row)
    df = pd.DataFrame(rows)
    key = f"best_{metric}"
    if len(df):
        df = df.sort_values(key, ascending=(mode == "min"), na_position="last").reset_index(drop=True)
    return df


def best_record(records: list[TrialRecord], metric: str, mode: str) -> TrialRecord | None:
    """The best completed trial (it has test metrics and a final checkpoint); else the best of any."""
    def score(t):
        v = _best([v for _, v in t.history], mode)
        return float("inf") if v is None else (v if mode == "min" else -v)

    done = [t for t in records if t.status == "completed" and t.checkpoint_path]
    pool = done or [t for t in records if t.checkpoint_path]
    return min(pool, key=score) if pool else None


def plot_curves(records: list[TrialRecord], metric: str, path: Path) -> Path:
    """The metric of every trial over epochs; stopped trials end with an x, errored with a square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in records:
        if not t.history:
            continue
        xs, ys = zip(*t.history)
        (line,) = ax.plot(xs, ys, marker=".", alpha=0.8, label=f"{t.trial_id} ({t.status})")
        if t.status != "completed":
            ax.plot(xs[-1], ys[-1], marker="x" if t.status == "stopped early" else "s", markersize=10,
                    color=line.get_color())
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per trial (x = stopped early)")
    if len(records) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_params(df: pd.DataFrame, metric: str, path: Path) -> Path:
    """Each trial's best metric against each sampled parameter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [c for c in df.columns if c.startswith("param:")]
    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4.5 * max(1, len(params)), 4), squeeze=False)
    for ax, col in zip(axes[0], params):
        xs = df[col]
        numeric = pd.api.types.is_numeric_dtype(xs)
        x = xs if numeric else xs.astype(str)
        colors = df["status"].map({"completed": "tab:blue", "stopped early": "tab:orange", "errored": "tab:red"})
        ax.scatter(x, df[f"best_{metric}"], c=colors)
        if numeric and (xs > 0).all() and xs.max() / max(xs.min(), 1e-12) > 20:
            ax.set_xscale("log")
        ax.set(xlabel=col.removeprefix("param:"), ylabel=f"best {metric}")
    fig.suptitle(f"{metric} against each parameter (blue completed, orange stopped early)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(records: list[TrialRecord], directory: str, metric: str, mode: str, summary: dict) -> pd.DataFrame:
    """results.csv, results.parquet, curves.png, params.png and sweep.json in the sweep folder."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    df = table(records, metric, mode)
    df.to_csv(out / "results.csv", index=False)
    df.astype({c: str for c in df.columns if df[c].dtype == object}).to_parquet(out / "results.parquet", index=False)
    plot_curves(records, metric, out / "curves.png")
    plot_params(df, metric, out / "params.png")
    (out / SUMMARY).write_text(json.dumps({**summary, "metric": metric, "mode": mode}, indent=2, default=str))
    return df


def leaderboard_lines(df: pd.DataFrame, metric: str, top: int = 10) -> list[str]:
    """Fixed-width leaderboard: rank, trial, status, epochs, best/last metric, test metrics, parameters."""
    if not len(df):
        return ["(no trials)"]
    params = [c for c in df.columns if c.startswith("param:")]
    tests = [c for c in df.columns if c.startswith("test_") and not c.startswith("test_f1_")][:2]
    head = ["#", "trial", "status", "epochs", f"best_{metric}", f"last_{metric}", *tests,
            *(p.removeprefix("param:") for p in params)]
    rows = []
    for i, r in df.head(top).iterrows():
        cells = [str(i + 1), r["trial_id"], r["status"], str(r["epochs"])]
        for c in (f"best_{metric}", f"last_{metric}", *tests, *params):
            v = r.get(c)
            cells.append("-" if v is None or (isinstance(v, float) and pd.isna(v))
                         else f"{v:.4g}" if isinstance(v, float) else str(v))
        rows.append(cells)
    widths = [max(len(h), *(len(row[j]) for row in rows)) for j, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), *(fmt.format(*row) for row in rows)]


def list_sweeps(root: str) -> list[dict]:
    base = Path(storage.storage_root(root), "sweeps")
    found = []
    for d in sorted(base.glob("*/" + SUMMARY)):
        info = json.loads(d.read_text())
        found.append({"name": d.parent.name, **info})
    return found


def load_sweep(root: str, name: str) -> tuple[dict, pd.DataFrame]:
    d = Path(storage.storage_root(root), "sweeps", name)
    if not (d / SUMMARY).is_file():
        known = [s["name"] for s in list_sweeps(root)]
        raise AidcError(f"no finished sweep {name!r} under {d.parent} (known: {known or 'none'}); run "
                        "python -m jobs.tune --config FILE --set run.name=" + name)
    return json.loads((d / SUMMARY).read_text()), pd.read_csv(d / "results.csv")
