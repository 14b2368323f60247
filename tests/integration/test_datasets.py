"""Every named dataset preprocessed from the local mirror (../shared/data), counts checked against
the known totals; your own tabular files streamed with bad rows and duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from aidc.config import load_config
from aidc.tasks import preprocess
from tests.conftest import CONFIGS, SHARED_DATA
from tests.integration.conftest import workload_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def root(ray_session, tmp_path_factory):
    return str(tmp_path_factory.mktemp("datasets"))


def _prep(name, root, *overrides):
    dv, _ = preprocess(workload_config(name, root, *overrides))
    return dv, dv.manifest()


def test_mnist_keeps_the_official_60000_10000_split(root):
    dv, m = _prep("mnist", root)
    c = m["counts"]
    assert c["read"] == 70000 and c["kept"] + c["rejected"] == 70000
    assert c["splits"]["test"] + c["rejected_by_reason"].get("duplicate row", 0) >= 10000 >= c["splits"]["test"]
    assert c["splits"]["train"] + c["splits"]["val"] + c["splits"]["test"] == c["kept"]
    assert m["features"]["image_shape"] == [28, 28] and "CC BY-SA 3.0" in m["source"]["terms"]
    assert dv.read_numpy("val")["image"].shape[1:] == (28, 28)


def test_sms_spam_counts_and_keeps_rejected_duplicates_with_reasons(root):
    dv, m = _prep("sms-spam", root)
    c = m["counts"]
    assert c["read"] == 5574
    assert c["rejected_by_reason"] == {"duplicate row": c["rejected"]} and c["rejected"] > 300
    rejected = dv.read_numpy("rejected")
    assert len(rejected["id"]) == c["rejected"]
    assert all(r.startswith("duplicate of row ") for r in rejected["reject_reason"])
    test = dv.read_numpy("test")
    assert test["input_ids"].shape[1] == 64 and set(np.unique(test["label"])) == {0, 1}


def test_movielens_counts_and_cold_start_handling(root):
    dv, m = _prep("movielens", root)
    c = m["counts"]
    assert c["read"] == 100836 and c["kept"] == sum(c["splits"].values())
    assert m["features"]["num_users"] == 610
    assert c["split_details"]["train"] == {"unseen_users": 0, "unseen_items": 0}
    assert c["split_details"]["test"]["unseen_items"] > 0  # items seen only in test map to index 0
    test = dv.read_numpy("test")
    assert ((test["item_idx"] == 0).sum()) == c["split_details"]["test"]["unseen_items"]


def test_movielens_time_split_holds_out_each_users_latest(root):
    dv, m = _prep("movielens", root, "data.split.strategy=time")
    train, test = dv.read_numpy("train"), dv.read_numpy("test")
    assert m["counts"]["split_details"]["test"]["unseen_users"] == 0
    import pandas as pd

    import pyarrow.parquet as pq  # noqa: F401

    raw = pd.read_csv(SHARED_DATA / "movielens-latest-small" / "ratings.csv")
    ts = raw["timestamp"].to_numpy()
    last_train = pd.Series(ts[train["id"]]).groupby(train["user"]).max()
    first_test = pd.Series(ts[test["id"]]).groupby(test["user"]).min()
    common = last_train.index.intersection(first_test.index)
    assert (last_train[common] <= first_test[common]).all()


def test_shakespeare_packs_blocks_and_reuses_versions(root):
    dv, m = _prep("shakespeare-gpt", root)
    assert m["counts"]["read"] == m["counts"]["kept"] > 7000
    blocks = dv.read_numpy("train")["tokens"]
    assert blocks.shape[1] == 129 and m["features"]["vocab_size"] == 65 + 3
    again, _ = _prep("shakespeare-gpt", root)
    assert again.version == dv.version
    other, _ = _prep("shakespeare-gpt", root, "data.text.block_size=64")
    assert other.version != dv.version


def test_own_csv_files_stream_with_every_bad_row_accounted(root, tmp_path):
    rows = ["x1,x2,colour,y"]
    rng = np.random.default_rng(0)
    for i in range(400):
        rows.append(f"{rng.normal():.4f},{rng.normal() * 3 + 1:.4f},{['red', 'blue', 'green'][i % 3]},{i % 2}")
    rows += ["1.0,2.0,red,1"] * 3  # two duplicates of one row
    rows += [",2.0,red,1", "abc,2.0,blue,0", "1.0,2.0,red,-1", "1.0,2.0,red,x"]
    (tmp_path / "part-0.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(CONFIGS / "digits.yaml", [
        f"run.storage={root}", "name=tab", "task=tabular_classification", "data.source=files",
        f"data.path={tmp_path}", "data.format=csv", "data.features=[x1, x2]", "data.categorical=[colour]",
        "data.label=y", "model={arch: mlp}"])
    dv, _ = preprocess(cfg)
    c = dv.manifest()["counts"]
    assert c["read"] == 407 and c["kept"] + c["rejected"] == 407
    assert c["rejected_by_reason"] == {"duplicate row": 2, "x1 is missing": 1, "x1 is not a number": 1,
                                       "y is not a non-negative integer class": 2}
    state = dv.manifest()["transform"]
    assert state["categorical"]["colour"] == ["blue", "green", "red"] and state["classes"] == [0, 1]
    assert abs(state["numeric"]["mean"][1] - 1) < 0.5


def test_sms_spam_personal_data_is_scrubbed_before_anything_is_written(root):
    """data.privacy.scrub on the Ray Data stream: the manifest counts per type what the scrubber finds in the raw
    messages (never the values); the rejected rows (raw text, kept with their reasons) hold placeholders, each
    still beside its own id; an image workload refuses the setting before reading anything."""
    import json
    from collections import Counter

    from aidc.data.privacy import Scrubber
    from aidc.data.sources import load_sms_spam
    from aidc.errors import ConfigError

    cfg = workload_config("sms-spam", root, "data.privacy.scrub=[email, phone, url, credit_card]")
    raw = load_sms_spam(cfg).columns["text"]
    scrubber, expected = Scrubber(["email", "phone", "url", "credit_card"]), Counter()
    scrubbed = [scrubber.text(t, expected) for t in raw]
    dv, _ = preprocess(cfg)
    m = dv.manifest()
    found = m["counts"]["personal_data_scrubbed"]
    assert found == {k: expected[k] for k in ("email", "phone", "url", "credit_card")}
    assert found["email"] >= 5 and found["phone"] >= 400 and found["url"] >= 100  # SMS spam's contact lines
    plain = _prep("sms-spam", root)[0]
    assert dv.version != plain.version  # another setting, another version
    from aidc.train.trainer import run_training

    with pytest.raises(ConfigError, match=r"data.privacy.scrub names \['email', 'phone'\], but dataset sms-spam@"):
        run_training(workload_config("sms-spam", root, "data.privacy.scrub=[email, phone]",
                                     f"data.version={plain.version}", "resources.num_workers=0"))
    rejected = dv.read_numpy("rejected")
    assert len(rejected["id"]) > 300
    for i, text in zip(rejected["id"], rejected["text"]):
        assert text == scrubbed[int(i)]
    assert sum("<PHONE>" in t for t in rejected["text"]) > 10 and not any(
        raw[int(i)] == t for i, t in zip(rejected["id"], rejected["text"]) if scrubbed[int(i)] != raw[int(i)])
    assert "@" not in json.dumps(m["counts"])

    with pytest.raises(ConfigError, match="data.privacy.scrub works on text: task image_classification"):
        preprocess(workload_config("digits", root, "data.privacy.scrub=[email]"))


def test_sms_spam_encrypted_at_rest_reads_back_with_its_key_only(root, tmp_path):
    """data.encryption: no plaintext on disk (a message and the column names are in the plain version's bytes,
    not in the encrypted one's); the manifest names the key id, not the key; reads decrypt in the driver and in
    Ray read tasks; training runs end to end on it; a wrong or missing key is refused naming dataset and key id;
    `aidc data inspect` reads it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import pyarrow.parquet as pq

    from aidc.batch import run_batch_inference
    from aidc.data.encryption import decryption_properties, key_file, keygen
    from aidc.train.register import register
    from aidc.errors import DataError
    from aidc.train.trainer import run_training

    keygen("sms-at-rest")
    assert oct(key_file("sms-at-rest").stat().st_mode & 0o777) == "0o600"
    plain = _prep("sms-spam", root)[0]
    cfg = workload_config("sms-spam", root, "data.encryption.key=sms-at-rest")
    dv, _ = preprocess(cfg)
    assert dv.version != plain.version

    def on_disk(v):
        return b"".join(p.read_bytes() for p in Path(v.dir).rglob("*.parquet"))

    # The control: the column names and the raw messages kept with the rejected rows that plain Parquet shows
    # as they are (many more are there, but compressed); none of them is in the encrypted version's bytes.
    plain_bytes, ours = on_disk(plain), on_disk(dv)
    planted = [b"input_ids", *{t.encode() for t in plain.read_numpy("rejected")["text"] if len(t) > 12}]
    shown = [p for p in planted if p in plain_bytes]
    assert b"input_ids" in shown and len(shown) >= 5
    assert not [p for p in shown if p in ours]
    manifest = Path(dv.manifest_path).read_text()
    assert dv.manifest()["encryption"]["key"] == "sms-at-rest"
    assert key_file("sms-at-rest").read_text().strip() not in manifest

    for split in ("test", "rejected"):
        ours, theirs = dv.read_numpy(split), plain.read_numpy(split)
        assert all((ours[k] == theirs[k]).all() for k in theirs)
    assert dv.read("train").count() == dv.manifest()["counts"]["examples"]["train"]  # Ray read tasks decrypt

    trained = workload_config("sms-spam", root, "data.encryption.key=sms-at-rest", "train.epochs=1",
                              "model.d_model=32", "model.layers=1", "train.max_steps_per_epoch=5",
                              "resources.num_workers=1", "run.name=encrypted", "registry.model_name=sms-encrypted",
                              f"batch_infer.output={tmp_path / 'scored'}")
    out = run_training(trained)
    assert out.dataset.version == dv.version and out.metrics["step"] == 5
    register(trained, out)
    scored = run_batch_inference(trained)  # batch inference reads the encrypted test split ...
    assert scored["counts"]["predicted"] == dv.manifest()["counts"]["examples"]["test"]
    assert scored["encryption"]["key"] == "sms-at-rest"  # ... and writes its scores under the same key
    written = next(Path(scored["output"], "predictions").glob("*.parquet"))
    with pytest.raises(OSError):
        pq.read_table(written)
    assert pq.read_table(written, decryption_properties=decryption_properties()).num_rows == \
        scored["counts"]["predicted"]

    env = {**os.environ, "AIDC_STORAGE": root}
    shown = subprocess.run([sys.executable, "-m", "aidc.cli.main", "data", "inspect", f"sms-spam@{dv.version}"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert shown.returncode == 0 and "encrypted at rest: key 'sms-at-rest'" in shown.stdout, shown.stderr

    saved = key_file("sms-at-rest").read_text()
    try:
        key_file("sms-at-rest").unlink()
        keygen("sms-at-rest")  # another key under the same id
        with pytest.raises(DataError, match=rf"dataset sms-spam@{dv.version} is encrypted with key 'sms-at-rest' "
                                            "and the key 'sms-at-rest' this process has does not open it"):
            dv.read_numpy("test")
        key_file("sms-at-rest").unlink()
        with pytest.raises(DataError, match=rf"dataset sms-spam@{dv.version} is encrypted with key 'sms-at-rest', "
                                            "which this process lacks"):
            dv.read("train")
    finally:
        key_file("sms-at-rest").unlink(missing_ok=True)
        fd = os.open(key_file("sms-at-rest"), os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(saved)
