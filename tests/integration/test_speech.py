"""Speech (spoken digits) on the integration tier's Ray: real FSDD recordings preprocessed on Ray Data (broken
files counted and kept with their reasons), a recurrent model trained with the platform's loop well above chance,
registered, and answering wav files through the same features preprocessing computed."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from aidc.data.audio import decode_wav
from aidc.registry import tracking_uri
from aidc.tasks import preprocess
from aidc.tasks.loaded import load_model
from aidc.train.register import register
from aidc.train.trainer import run_training
from tests.conftest import SHARED_DATA
from tests.integration.conftest import edge_venv, workload_config
from tests.unit.test_speech import broken_wavs

RECORDINGS = SHARED_DATA / "fsdd" / "recordings"


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("speech"))


def test_own_recordings_broken_files_are_counted_and_kept_with_their_reasons(root, tmp_path):
    """source: files, format: wav — 100 real recordings plus each kind of broken file and a name off the
    scheme: every file is a row; the broken ones are rejected rows with their reasons, never a failed job."""
    folder = tmp_path / "recordings"
    folder.mkdir()
    real = sorted(RECORDINGS.glob("*_jackson_1?.wav"))  # 10 digits x 10 takes
    for p in real:
        shutil.copy(p, folder / p.name)
    good = real[0].read_bytes()
    broken = broken_wavs(good)
    for i, (kind, (data, _)) in enumerate(broken.items()):
        (folder / f"{i}_broken_{i}.wav").write_bytes(data)
    (folder / "hello.wav").write_bytes(good)  # decodes, but the name carries no label
    cfg = workload_config("fsdd", root, "data.source=files", f"data.path={folder}", "data.format=wav",
                          "data.split={strategy: hash, train: 0.8, val: 0.1, test: 0.1}", "name=own-recordings")
    dv, _ = preprocess(cfg)
    c = dv.manifest()["counts"]
    assert c["read"] == len(real) + len(broken) + 1 and c["kept"] == len(real), c
    rejected = dv.read_numpy("rejected")
    reasons = dict(zip(rejected["file"], rejected["reject_reason"]))
    for i, (kind, (_, words)) in enumerate(broken.items()):
        assert words in reasons[str(folder / f"{i}_broken_{i}.wav")], (kind, reasons)
    assert "no label" in reasons[str(folder / "hello.wav")]
    assert sum(c["rejected_by_reason"].values()) == c["rejected"] == len(broken) + 1


def test_held_out_speaker_split_is_deterministic_and_recorded(root):
    """data.split.strategy: group — every recording of the held-out speaker is the test set, none of them in
    train/val; the manifest records the split; built again from scratch, every row lands in the same split."""
    over = ["data.split={strategy: group, group_column: speaker, test_groups: [theo], train: 0.9, val: 0.1, test: 0}",
            "name=fsdd-speaker"]
    dv, _ = preprocess(workload_config("fsdd", root, *over))
    c = dv.manifest()["counts"]
    assert c["splits"]["test"] == 500, c  # 10 digits x 50 takes
    assert set(dv.read_numpy("test")["speaker"]) == {"theo"}
    assert "theo" not in set(dv.read_numpy("train")["speaker"]) | set(dv.read_numpy("val")["speaker"])
    assert dv.manifest()["config"]["data"]["split"]["test_groups"] == ["theo"]
    splits = {s: sorted(dv.read_numpy(s)["id"].tolist()) for s in ("train", "val", "test")}
    again, reused = preprocess(workload_config("fsdd", root, *over), force=True)
    assert not reused and again.version == dv.version
    assert {s: sorted(again.read_numpy(s)["id"].tolist()) for s in splits} == splits


def test_fsdd_trains_registers_answers_wav_files_scores_a_folder_and_exports_to_the_edge(root, tmp_path):
    cfg = workload_config("fsdd", root, "model.hidden=64", "model.layers=1", "train.epochs=5",
                          "data.audio.augment=false", "resources.num_workers=1", "resources.cpus_per_worker=1",
                          "run.name=fsdd-tiny")
    dv, _ = preprocess(cfg)
    m = dv.manifest()
    assert m["counts"]["splits"]["test"] == 300 and m["counts"]["rejected"] == 0  # the official split
    outcome = run_training(cfg)
    assert outcome.metrics["test_accuracy"] > 0.5, outcome.metrics  # chance is 0.1
    version = register(cfg, outcome)
    loaded = load_model(version.ref, tracking_uri(None, root))

    # wav files as a client sends them: the same frames as the stored waveforms of those recordings (1e-5), and
    # the registered model scores all 300 test recordings from their files as training scored the test split
    test = dv.read_numpy("test")
    wavs = np.array([(RECORDINGS / f).read_bytes() for f in test["file"]], dtype=object)
    state, task = loaded.spec["transform"], loaded.task
    served = task.transform_batch({"audio": wavs[::30]}, state)  # every 30th test recording
    stored = task.transform_batch({"waveform": test["waveform"][::30]}, state)
    np.testing.assert_allclose(served["x"], stored["x"], atol=1e-5)
    assert (served["lengths"] == stored["lengths"]).all()
    out = loaded.infer_tensors({"audio": wavs})
    assert out["probabilities"].shape == (300, 10) and (out["label"] == [str(c) for c in out["class"]]).all()
    from_files = float((out["class"] == test["label"]).mean())
    assert from_files == pytest.approx(outcome.metrics["test_accuracy"], abs=0.01), from_files

    # batch inference over a folder of wav files (format: wav): one row per file keyed by its path, broken
    # files rejected with their reasons, the rest scored as the registered model scores them
    from aidc.batch import run_batch_inference

    folder = tmp_path / "to-score"
    folder.mkdir()
    for f in test["file"][:40]:
        shutil.copy(RECORDINGS / f, folder / f)
    broken = broken_wavs(wavs[0])
    for kind, (data, _) in broken.items():
        (folder / f"{kind.replace(' ', '-')}.wav").write_bytes(data)
    own = cfg.model_copy(update={"batch_infer": cfg.batch_infer.model_copy(update={
        "model": version.ref, "path": str(folder), "format": "wav", "key": "file", "batch_size": 16,
        "output": str(tmp_path / "out"), "actors": 1})})
    m = run_batch_inference(own)
    c = m["counts"]
    assert c["rows_in"] == 40 + len(broken) and c["predicted"] == 40 and c["rejected"] == len(broken), c
    assert m["input"]["format"] == "wav" and m["input"]["files"] == 40 + len(broken)
    rejected = pd.read_parquet(tmp_path / "out" / "rejected")
    reasons = dict(zip(rejected["key"], rejected["reject_reason"]))
    for kind, (_, words) in broken.items():
        assert words in reasons[str(folder / f"{kind.replace(' ', '-')}.wav")], (kind, reasons)
    preds = pd.read_parquet(tmp_path / "out" / "predictions").sort_values("key")
    expected = loaded.infer_tensors({"audio": np.array([(folder / f).read_bytes() for f in sorted(test["file"][:40])],
                                                       dtype=object)})
    assert preds["key"].tolist() == [str(folder / f) for f in sorted(test["file"][:40])]
    np.testing.assert_allclose(np.stack(preds["probabilities"]), expected["probabilities"], atol=1e-5)

    # ONNX export (parity 1e-4) and the edge bundle: wav files and a waveform scored with numpy + onnxruntime
    # only (its own venv: no torch, no librosa, no soundfile), as the served model scores them
    from aidc.cli import main as aidc

    bundle = tmp_path / "edge"
    assert aidc(["model", "export", version.ref, "--format", "edge", "--out", str(bundle), "--storage", root]) == 0
    assert json.loads((bundle / "SOURCE.json").read_text())["onnx_parity"]["max_abs_diff"] < 1e-4
    files = sorted(test["file"][:12])
    rows = [{"wav": str(folder / f)} for f in files]
    rows.append({"waveform": decode_wav((folder / files[0]).read_bytes(), 8000)[0].tolist(), "sample_rate": 8000})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([str(edge_venv()), str(bundle / "run.py"), str(tmp_path / "rows.jsonl"), "--out",
                    str(tmp_path / "preds.jsonl")], check=True, cwd=tmp_path)
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    served = loaded.infer_tensors({"audio": np.array([(folder / f).read_bytes() for f in files + files[:1]],
                                                     dtype=object)})
    assert [p["class"] for p in preds] == served["class"].tolist()
    np.testing.assert_allclose([p["probabilities"] for p in preds], served["probabilities"], atol=1e-4)
