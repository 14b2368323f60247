"""Offline and edge deployment on real parts: batch inference on a Ray Data actor pool (files with bad rows,
LM prompts), compressed versions (int8, pruned, distilled) registered, signed and loadable, ONNX parity
with onnxruntime per model, the numpy+onnxruntime edge bundle in its own minimal venv, and the Hugging Face
GPT-2 round trip through `transformers`. Tiny models, trained once in the driver for the whole module."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aidc.cli import main as aidc
from aidc.config import JobConfig, apply_overrides, load_config, validate
from aidc.tasks import preprocess
from aidc.errors import ConfigError
from aidc.registry import tracking_uri
from aidc.train.register import register
from aidc.runtime import cluster_has_gpus
from aidc.tasks.loaded import load_model
from aidc.train.trainer import run_training
from tests.conftest import CONFIGS
from tests.integration.conftest import edge_venv, workload_config

pytestmark = pytest.mark.integration

DRIVER = ["resources.num_workers=0", "train.epochs=1"]
TINY = {
    "digits": ["model.channels=[8]", "model.hidden=32", "train.max_steps_per_epoch=30",
               "eval.robustness.eps=[0.05, 0.1, 0.2]", "eval.robustness.pgd_steps=10"],
    "shakespeare-gpt": ["model.d_model=64", "model.layers=1", "model.heads=2", "model.dropout=0.0",
                        "train.max_steps_per_epoch=15"],
    "sms-spam": ["model.d_model=32", "model.layers=1", "train.max_steps_per_epoch=10", "data.text.tokenizer=char"],
    "movielens": ["model.dim=8", "train.max_steps_per_epoch=10"],
}


def _tabular_cfg(root: str, data: Path, *overrides: str):
    rows = ["x1,x2,colour,y"]
    rng = np.random.default_rng(0)
    for i in range(300):
        x1 = rng.normal()
        rows.append(f"{x1:.4f},{rng.normal() * 3 + 1:.4f},{['red', 'blue', 'green'][i % 3]},{int(x1 > 0)}")
    (data / "part-0.csv").write_text("\n".join(rows) + "\n")
    return load_config(CONFIGS / "digits.yaml", [
        f"run.storage={root}", "name=tab", "task=tabular_classification", "data.source=files",
        f"data.path={data}", "data.format=csv", "data.features=[x1, x2]", "data.categorical=[colour]",
        "data.label=y", "model={arch: mlp, hidden: [32, 16]}", "registry.model_name=tab-mlp",
        "train.max_steps_per_epoch=20", *DRIVER, *overrides])


class Trained(dict):
    """Tiny registered models of every workload on this module's storage root, each trained in the driver the
    first time a test asks for it (so each test's time limit covers only what it needs)."""

    def __init__(self, root: str, tabular_data: Path):
        super().__init__(root=root, uri=tracking_uri(None, root), cfgs={}, refs=_Refs(self))
        self.tabular_data = tabular_data

    def train(self, name: str) -> str:
        root = self["root"]
        cfg = (_tabular_cfg(root, self.tabular_data, "run.name=off-tab") if name == "tabular" else
               workload_config(name, root, *DRIVER, *TINY[name], f"run.name=off-{name}"))
        preprocess(cfg)
        self["cfgs"][name] = cfg
        return register(cfg, run_training(cfg)).ref


class _Refs(dict):
    def __init__(self, trained: Trained):
        super().__init__()
        self.trained = trained

    def __missing__(self, name: str) -> str:
        self[name] = self.trained.train(name)
        return self[name]


@pytest.fixture(scope="module")
def models(ray_session, tmp_path_factory):
    return Trained(str(tmp_path_factory.mktemp("offline")), tmp_path_factory.mktemp("tabular"))


def _rows(models, name: str, split: str = "test") -> dict:
    from aidc.data.dataset import open_dataset

    return open_dataset(models["root"], models["cfgs"][name].name).read_numpy(split)


def test_batch_inference_scores_a_split_and_accounts_for_every_bad_row(models, tmp_path):
    from aidc.batch import run_batch_inference

    ref = models["refs"]["digits"]  # trained on first use
    cfg = models["cfgs"]["digits"]
    loaded = load_model(ref, models["uri"])
    test = _rows(models, "digits")
    split = run_batch_inference(cfg, "split")  # the dataset's test split, already validated
    assert split["counts"] == {"rows_in": len(test["id"]), "predicted": len(test["id"]), "rejected": 0,
                               "rejected_by_reason": {}}
    preds = pd.read_parquet(Path(split["output"], "predictions")).sort_values("key")
    served = loaded.predict(test["image"])
    assert preds["key"].tolist() == test["id"].tolist()
    assert preds["class"].tolist() == [p["class"] for p in served]  # the same answers as the served model
    assert np.allclose(np.stack(preds["probabilities"]), [p["probabilities"] for p in served], atol=1e-5)
    assert split["model"]["version"] == loaded.version and split["input"]["fingerprint"]

    # Your own JSONL with bad rows: each rejected with the API's own message, none lost. One actor holds 3.5
    # of the session's 4 CPUs, as Serve replicas may on a real head: the reads and writes (io_cpus 0.25)
    # must still be scheduled (at Ray Data's default of 1 CPU each they would wait forever).
    images = [img.tolist() for img in test["image"][:40]]
    images[3] = None
    images[5] = images[5][:7]
    images[8] = [[99.0] * 8] * 8
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": 1000 + i, "image": img}) + "\n" for i, img in enumerate(images)))
    own = cfg.model_copy(update={"batch_infer": cfg.batch_infer.model_copy(update={
        "path": str(path), "format": "jsonl", "batch_size": 16, "output": str(tmp_path / "out"), "actors": 1,
        "cpus_per_actor": 3.5})})
    m = run_batch_inference(own)
    c = m["counts"]
    assert c["rows_in"] == 40 and c["predicted"] == 37 and c["rejected"] == 3
    assert set(c["rejected_by_reason"]) == {
        "row must be a list (8 rows of 8 numbers or a flat list of 64), got NoneType",
        "row has shape 7x8; expected 8 rows of 8 numbers or a flat list of 64",
        "row pixel (0,0) = 99 is outside the trained range 0..16"}
    rejected = pd.read_parquet(tmp_path / "out" / "rejected").sort_values("key")
    assert rejected["key"].tolist() == [1003, 1005, 1008]
    assert json.loads(rejected["input"].iloc[0]) == {"id": 1003, "image": None}  # the row as it came
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"]["format"] == "jsonl" and len(manifest["input"]["fingerprint"]) == 64
    good = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("key")
    assert len(good) == 37 and set(good.columns) == {"key", "class", "probabilities"}
    with pytest.raises(Exception, match="already holds"):
        run_batch_inference(own)  # never overwrites a result
    gpu = own.batch_infer.model_copy(update={"use_gpu": True, "output": str(tmp_path / "gpu")})
    if cluster_has_gpus():  # on a GPU machine the actors take them
        assert run_batch_inference(own.model_copy(update={"batch_infer": gpu}))["counts"]["predicted"] == 37
    else:  # use_gpu: true without GPUs: a clear error, not actors waiting for ever for a GPU no node has
        with pytest.raises(ConfigError, match="use_gpu is true but the cluster has no GPUs"):
            run_batch_inference(own.model_copy(update={"batch_infer": gpu}))


def test_lm_batch_completions_on_vllm_reject_bad_prompts_and_repeat_with_a_seed(models, tmp_path):
    """Prompts through vLLM (the llm app's engine) on a Ray Data actor: bad prompts rejected with the API's
    reasons, the rest completed; the same seed and options give the same completions again."""
    from aidc.batch import run_batch_inference

    models["refs"]["shakespeare-gpt"]  # trained on first use
    cfg = models["cfgs"]["shakespeare-gpt"]
    prompts = ["ROMEO:", "To be, or not", "", "x" * 200, "KING HENRY:\nWhat news?"]
    path = tmp_path / "prompts.csv"
    pd.DataFrame({"id": range(len(prompts)), "prompt": prompts}).to_csv(path, index=False)
    runs = []
    for out in ("out", "again"):
        opts = {"path": str(path), "format": "csv", "max_tokens": 12, "temperature": 0.8, "seed": 7,
                "batch_size": 8, "output": str(tmp_path / out)}
        m = run_batch_inference(cfg.model_copy(update={"batch_infer": cfg.batch_infer.model_copy(update=opts)}))
        assert m["counts"]["rows_in"] == 5 and m["counts"]["predicted"] == 3 and m["counts"]["rejected"] == 2
        reasons = " | ".join(m["counts"]["rejected_by_reason"])
        assert "non-empty" in reasons and "context is 128 tokens" in reasons
        runs.append(pd.read_parquet(tmp_path / out / "predictions").sort_values("key"))
    assert runs[0]["key"].tolist() == [0, 1, 4] and set(runs[0]["finish_reason"]) <= {"length", "stop"}
    assert all(runs[0]["completion"].str.len() > 0)
    assert runs[0]["completion"].tolist() == runs[1]["completion"].tolist()


def test_robustness_is_recorded_with_each_version_and_set_side_by_side(models, capsys):
    """eval.robustness (ART's FGSM and PGD): accuracy per attack and eps in the version's metrics, PGD never
    above FGSM at the same eps and falling as eps grows; a pruned version (the same config) gets its own;
    `aidc model compare` sets them side by side. A text workload refuses the section before it trains."""
    from aidc.compress.job import compress
    from aidc.errors import ConfigError

    uri, root = models["uri"], models["root"]
    source = load_model(models["refs"]["digits"], uri)
    m = source.spec["metrics"]
    eps = [0.05, 0.1, 0.2]
    assert m["robust_samples"] > 100 and m["robust_clean_accuracy"] == pytest.approx(m["test_accuracy"], abs=0.02)
    for e in eps:
        assert m[f"robust_accuracy_pgd_eps{e:g}"] <= m[f"robust_accuracy_fgsm_eps{e:g}"], (e, m)
    pgd = [m[f"robust_accuracy_pgd_eps{e:g}"] for e in eps]
    assert pgd == sorted(pgd, reverse=True) and pgd[-1] < m["robust_clean_accuracy"] - 0.2, pgd

    raw = models["cfgs"]["digits"].model_dump(mode="json")
    raw["compress"] = {"method": "prune", "sparsity": 0.5}
    pruned = compress(validate(apply_overrides(raw, ["run.name=c-digits-robust"]), JobConfig))
    assert "robust_accuracy_pgd_eps0.1" in load_model(pruned.ref, uri).spec["metrics"]
    assert aidc(["model", "compare", models["refs"]["digits"], pruned.ref, "--storage", root,
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    for row in ("accuracy under fgsm eps 0.05", "accuracy under pgd eps 0.2"):
        assert row in out, out

    with pytest.raises(ConfigError, match="eval.robustness: gradient attacks need continuous inputs; task "
                                          "text_classification"):
        run_training(workload_config("sms-spam", root, *DRIVER, "eval.robustness.eps=[0.1]"))


def test_compressed_versions_are_registered_signed_loadable_and_smaller(models, capsys):
    import torch

    from aidc.compress.job import compress
    from aidc.registry import fetched

    uri, root = models["uri"], models["root"]
    made = {}
    for name, method, extra in [("sms-spam", "int8", []), ("tabular", "int8", []), ("shakespeare-gpt", "int8", []),
                                ("digits", "prune", ["compress.sparsity=0.7"]),
                                ("digits", "distill", ["model.channels=[4]", "model.hidden=8",
                                                       "compress.temperature=3", "compress.alpha=0.7"])]:
        models["refs"][name]  # trained on first use
        raw = models["cfgs"][name].model_dump(mode="json")
        raw["compress"] = {"method": method}
        cfg = validate(apply_overrides(raw, [f"run.name=c-{name}-{method}", *extra]), JobConfig)
        made[(name, method)] = compress(cfg)

    for (name, method), version in made.items():
        loaded = load_model(version.ref, uri)  # signature + manifest verified, like any version
        source = load_model(models["refs"][name], uri)
        assert loaded.name == source.name and int(loaded.version) > int(source.version)
        assert loaded.spec["compression"]["method"] == method
        assert loaded.spec["compression"]["source"] == f"{source.name}/{source.version}"
        with fetched(version.ref, uri) as (_, directory):
            assert (directory / "model.sig").is_file()
            if method == "int8":
                from torch.ao.nn.quantized.dynamic import Linear as QLinear

                assert any(isinstance(mod, QLinear) for mod in loaded.model.modules())
                with fetched(models["refs"][name], uri) as (_, src_dir):
                    int8_bytes = (directory / "model.safetensors").stat().st_size
                    assert int8_bytes < (src_dir / "model.safetensors").stat().st_size
    # Each one answers requests through the serving path.
    text = load_model(made[("sms-spam", "int8")].ref, uri).predict(np.array(["win a free prize now", "hi mum"]))
    assert len(text) == 2 and abs(sum(text[0]["probabilities"]) - 1) < 1e-4
    gpt = load_model(made[("shakespeare-gpt", "int8")].ref, uri).predict(["ROMEO:"])
    assert isinstance(gpt[0]["text"], str)
    digits = _rows(models, "digits")["image"][:4]
    for method in ("prune", "distill"):
        assert len(load_model(made[("digits", method)].ref, uri).predict(digits)) == 4
    pruned = load_model(made[("digits", "prune")].ref, uri).model
    weights = [m.weight for m in pruned.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.7 - 1e-3  # the fine-tune kept the sparsity
    teacher = sum(p.numel() for p in load_model(models["refs"]["digits"], uri).model.parameters())
    student = sum(p.numel() for p in load_model(made[("digits", "distill")].ref, uri).model.parameters())
    assert student <= teacher / 4

    assert aidc(["model", "compare", models["refs"]["tabular"], made[("tabular", "int8")].ref,
                 "--storage", root, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    for row in ("size on disk", "parameters", "latency p50 batch 1", "latency p50 batch 32", "test_accuracy"):
        assert row in out


@pytest.mark.parametrize("name", ["digits", "tabular", "sms-spam", "movielens"])
def test_onnx_export_matches_torch_under_onnxruntime(models, name, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert aidc(["model", "export", models["refs"][name], "--format", "onnx", "--out", str(out),
                 "--storage", models["root"], "--tracking-uri", models["uri"]]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.rsplit("max abs difference ", 1)[1].split()[0])
    assert (out / "model.onnx").is_file() and diff < 1e-4, printed


def test_edge_bundle_reproduces_served_predictions_with_only_numpy_and_onnxruntime(models, tmp_path):
    py = edge_venv()
    frozen = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    names = {line.split("==")[0].lower() for line in frozen.split()}
    assert "torch" not in names and "ray" not in names and {"numpy", "onnxruntime"} <= names

    for name in ("digits", "tabular"):
        bundle = tmp_path / f"edge-{name}"
        assert aidc(["model", "export", models["refs"][name], "--format", "edge", "--out", str(bundle),
                     "--storage", models["root"], "--tracking-uri", models["uri"]]) == 0
        loaded = load_model(models["refs"][name], models["uri"])
        if name == "digits":
            raw = _rows(models, name)["image"]
            rows = [{"image": img.tolist()} for img in raw]
            served = loaded.predict(raw)
        else:
            rows = [{"x1": 0.5 * i - 3, "x2": 1.0, "colour": ["red", "blue", "violet"][i % 3]} for i in range(12)]
            served = loaded.infer_tensors({"x1": np.array([r["x1"] for r in rows]), "x2": np.ones(12),
                                           "colour": np.array([r["colour"] for r in rows], dtype=object)})
            served = [{"class": int(c), "probabilities": p.tolist()} for c, p in zip(served["class"],
                                                                                      served["probabilities"])]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        subprocess.run([str(py), str(bundle / "run.py"), str(tmp_path / "rows.jsonl"), "--out",
                        str(tmp_path / "preds.jsonl")], check=True, cwd=tmp_path)
        preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
        assert [p["class"] for p in preds] == [s["class"] for s in served]
        assert np.allclose([p["probabilities"] for p in preds], [s["probabilities"] for s in served], atol=1e-5)


def test_hf_export_loads_in_transformers_with_matching_logits_and_imports_back(models, tmp_path):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ref, uri, root = models["refs"]["shakespeare-gpt"], models["uri"], models["root"]
    out = tmp_path / "hf"
    assert aidc(["model", "export", ref, "--format", "hf", "--out", str(out), "--storage", root,
                 "--tracking-uri", uri]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ours = load_model(ref, uri)
    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "ROMEO:\nWhat light through yonder window breaks?"
    from aidc.data.tokenizer import encode

    ids = encode([text], ours.spec["transform"]["tokenizer"])[0]
    assert tok(text)["input_ids"] == ids  # the exported tokenizer encodes as ours does
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits - ours.model(x)).abs().max().item()
    assert diff < 1e-4, diff  # float32 on CPU: same math, reordered at most

    # and back: `aidc model import` of the export gives the same weights
    assert aidc(["model", "import", str(out), "--name", "gpt-roundtrip", "--storage", root,
                 "--tracking-uri", uri]) == 0
    back = load_model("gpt-roundtrip@champion", uri)
    for k, v in ours.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
