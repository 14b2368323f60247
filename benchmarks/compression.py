"""Compression trade-offs, measured the way `aidc model compare` reports them: int8 dynamic quantization of
the text classifier, the tabular MLP and the GPT, and a distilled student of the MLP and the text
classifier, each registered as a new version and compared with its source (size, parameters, CPU latency
p50 at batch 1 and 32 measured interleaved, the task metric on the test split).

    python -m benchmarks.compression [--quick]

Targets (issue #12): int8 within 1 point of the source's metric at >= 1.5x CPU speed; a student with <= 1/4
of the parameters within 2 points. Models are trained briefly in the driver (resources.num_workers=0) on
the shared data mirror; the tabular MLP reads the digits images as 64 numeric columns of a CSV. Latency is
interleaved (one call of each model per round), so load from other work hits both alike.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


from benchmarks.common import ROOT, SHARED_DATA, local_ray

QUALITY_POINTS = {"test_accuracy": 100, "test_macro_f1": 100}  # metric -> points per unit (perplexity: as is)
LOWER_IS_BETTER = {"test_perplexity", "test_rmse"}


def _digits_csv(path: Path) -> Path:
    """The digits images (sklearn's bundled copy, as the digits loader reads it) as a 64-column CSV."""
    from sklearn.datasets import load_digits

    d = load_digits()
    path.mkdir(parents=True)
    cols = [f"p{i}" for i in range(64)]
    lines = [",".join([*cols, "digit"])] + [",".join([*map(lambda v: f"{v:g}", x), str(y)])
                                             for x, y in zip(d.data, d.target)]
    (path / "digits.csv").write_text("\n".join(lines) + "\n")
    return path


def configs(root: str, tmp: Path, quick: bool) -> dict:
    """workload -> (config overrides of the source model, student model overrides or None)."""
    steps = ["train.max_steps_per_epoch=5", "train.epochs=1"] if quick else []
    tab = _digits_csv(tmp / "tabular")
    return {
        "text_classifier": ("sms-spam", [f"data.mirror={SHARED_DATA}", *steps],
                            ["model.d_model=24", "model.heads=2", "model.layers=1"]),
        "tabular_mlp": ("digits", ["name=digits-tab", "task=tabular_classification", "data.source=files",
                                   f"data.path={tab}", "data.format=csv",
                                   f"data.features=[{', '.join(f'p{i}' for i in range(64))}]", "data.categorical=[]",
                                   "data.label=digit", "model={arch: mlp, hidden: [512, 512], dropout: 0.1}",
                                   "registry.model_name=digits-mlp", "train.epochs=20", "train.lr=0.001", *steps],
                        ["model={arch: mlp, hidden: [96], dropout: 0.0}"]),
        "gpt": ("shakespeare-gpt", [f"data.mirror={SHARED_DATA}", "train.epochs=2", "train.max_steps_per_epoch=150",
                                    *steps], None),
    }


def run(root: str, tmp: Path, quick: bool, only: list[str] | None = None) -> dict:
    from aidc.compress.compare import compare
    from aidc.compress.job import compress
    from aidc.config import JobConfig, apply_overrides, load_config, validate
    from aidc.tasks import preprocess
    from aidc.registry import tracking_uri
    from aidc.train.register import register
    from aidc.train.trainer import run_training

    uri = tracking_uri(None, root)
    out = {}
    for label, (name, overrides, student) in configs(root, tmp, quick).items():
        if only and label not in only:
            continue
        cfg = load_config(ROOT / "jobs" / "configs" / f"{name}.yaml",
                          [f"run.storage={root}", "resources.num_workers=0", f"run.name=bench-{label}", *overrides])
        preprocess(cfg)
        source = register(cfg, run_training(cfg)).ref
        methods = [("int8", [])] + ([("distill", [*student, "compress.temperature=2", "compress.alpha=0.7"])]
                                    if student else [])
        for method, extra in methods:
            raw = cfg.model_dump(mode="json")
            raw["compress"] = {"method": method}
            job = validate(apply_overrides(raw, [f"run.name=bench-{label}-{method}", *extra]), JobConfig)
            made = compress(job).ref
            a, b = compare([source, made], uri, root)
            out[f"{label}/{method}"] = summary(a, b)
            print(json.dumps({f"{label}/{method}": out[f"{label}/{method}"]}), flush=True)
    return out


def summary(a: dict, b: dict) -> dict:
    metric = a["metric"]
    scale = QUALITY_POINTS.get(metric, 1)
    delta = (b["value"] - a["value"]) * scale  # + is better for accuracy/F1, worse for perplexity/RMSE
    loss = delta if metric in LOWER_IS_BETTER else -delta
    return {"metric": metric, "source": round(a["value"], 4), "compressed": round(b["value"], 4),
            "points_lost": round(loss, 2), "params_ratio": round(b["parameters"] / a["parameters"], 3),
            "size_ratio": round(b["size_bytes"] / a["size_bytes"], 3),
            "speed_b1": round(a["latency_p50_ms_b1"] / b["latency_p50_ms_b1"], 2),
            "speed_b32": round(a["latency_p50_ms_b32"] / b["latency_p50_ms_b32"], 2),
            "latency_ms_b1": [round(a["latency_p50_ms_b1"], 3), round(b["latency_p50_ms_b1"], 3)],
            "latency_ms_b32": [round(a["latency_p50_ms_b32"], 3), round(b["latency_p50_ms_b32"], 3)]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few training steps (smoke test)")
    p.add_argument("--only", nargs="*", choices=["text_classifier", "tabular_mlp", "gpt"], help="these workloads")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, local_ray(2):
        result = run(str(Path(tmp, "storage")), Path(tmp), a.quick, a.only)
    print(json.dumps(result, indent=2))
    for k, r in result.items():
        print(f"{k:26s} {r['metric']} {r['source']} -> {r['compressed']} ({r['points_lost']:+.2f} pt lost), "
              f"params x{r['params_ratio']}, size x{r['size_ratio']}, speed b1 {r['speed_b1']}x b32 {r['speed_b32']}x")
    return result


if __name__ == "__main__":
    main()
