"""Data protection (#31): personal data scrubbing (aidc.data.privacy, Presidio) and the robustness settings."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from aidc.config import PII_TYPES, ConfigError, load_config
from aidc.data.privacy import ENTITIES, Scrubber
from aidc.testing import NOT_PERSONAL, planted_personal_data
from tests.conftest import CONFIGS

KINDS = ["email", "phone", "credit_card", "iban", "ip_address", "url"]


@pytest.fixture(scope="module")
def scrubber():
    return Scrubber(list(PII_TYPES))


def test_planted_personal_data_is_found_with_its_exact_span(scrubber):
    """Recall per type (the value replaced by its type's placeholder, nothing else changed) and precision (no
    hit of another type) over 100 planted values per type: cards Luhn-valid, IBANs checksummed, phone numbers
    valid for their region in international, national and E.164 forms."""
    found, other = Counter(), Counter()
    for kind, value, text in planted_personal_data(100, seed=1):
        hits = Counter()
        if scrubber.text(text, hits) == text.replace(value, ENTITIES[kind][2]) and hits == {kind: 1}:
            found[kind] += 1
        other[kind] += sum(n for k, n in hits.items() if k != kind)
    recall = {k: found[k] / 100 for k in KINDS}
    assert min(recall[k] for k in ("email", "phone", "credit_card")) >= 0.99, recall
    assert min(recall.values()) >= 0.95, recall
    assert sum(other.values()) <= 2, other  # hits of a type that was not planted


def test_ordinary_numbers_and_dotted_words_are_left_alone(scrubber):
    """'2nd', prices, times, an invalid card number (Luhn), "Mr.Smith" (Presidio's URL pattern alone takes
    "Mr.Sm"), "pain.it" (a chat text's missing space; .it is a real domain)."""
    for text in NOT_PERSONAL + ["that was a pain.it hurts", "holiday..so good", "her.love for him"]:
        hits = Counter()
        assert scrubber.text(text, hits) == text and not hits, (text, hits)


def test_a_trailing_full_stop_stays_outside_the_placeholder(scrubber):
    hits = Counter()
    assert scrubber.text("see https://example.org/a?b=1. then call", hits) == "see <URL>. then call"


def test_json_rows_keep_their_structure_and_a_broken_one_is_scrubbed_as_text():
    s = Scrubber(["email", "phone", "credit_card"], {"record": "json"})
    row = {"messages": [{"role": "user", "content": "mail me: ana.li@example.com"},
                        {"role": "assistant", "content": "ok, or call +44 20 7946 0958?"}], "email": "kept key"}
    out = s({"record": np.array([json.dumps(row), "{broken ana.li@example.com"], dtype=object)})
    doc = json.loads(out["record"][0])
    assert doc["messages"][0]["content"] == "mail me: <EMAIL>" and doc["email"] == "kept key"
    assert doc["messages"][1]["content"] == "ok, or call <PHONE>?"
    assert out["record"][1] == "{broken <EMAIL>"
    numbers = s({"record": np.array([json.dumps({"prompt": "x", "completion": 4111111111111111, "n": 3}),
                                     "4111111111111111"], dtype=object)})
    assert json.loads(numbers["record"][0]) == {"prompt": "x", "completion": "<CREDIT_CARD>", "n": 3}
    assert json.loads(numbers["record"][1]) == "<CREDIT_CARD>"
    assert [json.loads(f) for f in out[Scrubber.found_column]] == [{"email": 1, "phone": 1}, {"email": 1}]


def test_types_that_need_a_model_and_unknown_types_are_refused_clearly():
    with pytest.raises(ConfigError, match=r"data.privacy.scrub: .*named-entity model.*email"):
        load_config(CONFIGS / "sms-spam.yaml", ["data.privacy.scrub=[email, person]"])
    with pytest.raises(ConfigError, match=r"data.privacy.scrub: got 5: Input should be a valid list"):
        load_config(CONFIGS / "sms-spam.yaml", ["data.privacy.scrub=5"])
    with pytest.raises(ConfigError, match=r"data.privacy.scrub.1"):
        load_config(CONFIGS / "sms-spam.yaml", ["data.privacy.scrub=[email, passport]"])


def test_robustness_settings_are_checked_and_compare_lists_them_side_by_side():
    """eval.robustness's eps are fractions of the value range; `aidc model compare` puts each attack and eps of
    the two versions in a row, '-' where one version has no figure (an int8 version has no gradient)."""
    from aidc.compress.compare import format_comparison

    with pytest.raises(ConfigError, match=r"eval.robustness.eps: .*fractions of the value range"):
        load_config(CONFIGS / "digits.yaml", ["eval.robustness.eps=[0.1, 8]"])
    with pytest.raises(ConfigError, match=r"eval.robustness.attacks.0"):
        load_config(CONFIGS / "digits.yaml", ["eval.robustness.attacks=[deepfool]"])
    base = dict(version="d/1", compression="-", size_bytes=2048, parameters=10, nonzero_parameters=10,
                latency_p50_ms_b1=0.1, latency_p50_ms_b32=1.0, metric="test_accuracy", value=0.9,
                robustness={"robust_accuracy_pgd_eps0.1": 0.4, "robust_accuracy_fgsm_eps0.05": 0.8,
                            "robust_accuracy_fgsm_eps0.1": 0.5})
    rows = format_comparison(base, dict(base, version="d/2", compression="int8", robustness={}))
    assert [r.split("  ")[0] for r in rows[-3:]] == ["accuracy under fgsm eps 0.05", "accuracy under fgsm eps 0.1",
                                                     "accuracy under pgd eps 0.1"]
    assert rows[-1].split()[-2:] == ["0.4000", "-"]


# --- Differentially private training (train.privacy: DP-SGD with Opacus) ---

def _per_sample_grads_match(model, inputs, labels, call):
    """Opacus's per-sample gradients of the DP form of `model` equal each sample's own gradient of the plain
    model (the guarantee rests on them: a layer without a batch dim, like positions shared by the batch, breaks
    it)."""
    import copy

    import torch
    from opacus import GradSampleModule

    from aidc.train.privacy import private_model

    model.train()  # built without dropout: the two computations are the same function
    plain = copy.deepcopy(model)
    wanted = []
    for i in range(len(labels)):
        plain.zero_grad()
        torch.nn.functional.cross_entropy(call(plain, inputs, slice(i, i + 1)), labels[i:i + 1]).backward()
        wanted.append({n: p.grad.clone() for n, p in plain.named_parameters()})
    dp = GradSampleModule(private_model(copy.deepcopy(model)), loss_reduction="sum")
    torch.nn.functional.cross_entropy(call(dp, inputs, slice(None)), labels, reduction="sum").backward()
    layout = {n: p for n, p in dp._module.named_parameters()}
    for name in wanted[0]:
        if name.endswith("in_proj_weight") or name.endswith("in_proj_bias"):  # held as q, k, v in DP form
            kind = name.rsplit("_", 1)[1]
            got = [torch.cat([layout[name.replace(f"in_proj_{kind}", f"{q}.{kind}")].grad_sample[i]
                              for q in "qkv"]) for i in range(len(labels))]
        else:
            got = [layout[name].grad_sample[i] for i in range(len(labels))]
        for i in range(len(labels)):
            assert torch.allclose(got[i], wanted[i][name], atol=1e-5), name


def test_dp_forms_of_the_classifiers_give_exact_per_sample_gradients():
    import torch

    from aidc.models.cnn import SmallCNN
    from aidc.models.mlp import TabularMLP
    from aidc.models.transformer import TextTransformer

    torch.manual_seed(0)
    ids = torch.randint(1, 50, (4, 12))
    ids[:, 8:] = 0  # padding: masked keys
    labels = torch.tensor([0, 1, 1, 0])
    _per_sample_grads_match(TextTransformer(50, 12, 2, d_model=16, heads=2, dropout=0.0), ids, labels,
                            lambda m, x, s: m(x[s]))
    _per_sample_grads_match(SmallCNN(image_size=8, channels=(4, 8), hidden=8, norm="group", dropout=0.0),
                            torch.randn(4, 1, 8, 8), labels, lambda m, x, s: m(x[s]))
    x, cat = torch.randn(4, 3), torch.randint(0, 5, (4, 2))
    _per_sample_grads_match(TabularMLP(3, [5, 5], 2, dropout=0.0), (x, cat), labels,
                            lambda m, xc, s: m(xc[0][s], xc[1][s]))


def test_the_dp_text_model_keeps_the_plain_layout_and_outputs():
    import torch

    from aidc.models.transformer import TextTransformer
    from aidc.train.privacy import private_model

    torch.manual_seed(0)
    plain = TextTransformer(50, 12, 2, d_model=16, heads=2).eval()
    dp = private_model(TextTransformer(50, 12, 2, d_model=16, heads=2)).eval()
    dp.load_state_dict(plain.state_dict())  # a checkpoint of the plain model loads into the DP form ...
    again = TextTransformer(50, 12, 2, d_model=16, heads=2).eval()
    again.load_state_dict(dp.state_dict())  # ... and the DP form's state is the plain model's
    ids = torch.randint(1, 50, (3, 12))
    ids[0, 5:] = 0
    assert torch.allclose(plain(ids), dp(ids), atol=1e-6) and torch.equal(plain(ids), again(ids))


@pytest.mark.parametrize("override, words", [
    (["model.norm=batch"], "model.norm: group"),
    (["train.parallelism=fsdp"], "train.parallelism: ddp"),
    (["train.grad_accum_steps=2"], "grad_accum_steps: 1"),
    (["train.precision=bf16"], "fp32"),
    (["resources.num_workers=[1, 2]"], "fixed worker count"),
    (["data.augment.enabled=true"], "data.augment.enabled: false"),
])
def test_private_training_refuses_what_it_cannot_account_for(override, words):
    base = ["train.privacy.epsilon=3", "model.norm=group"]
    with pytest.raises(ConfigError, match="train.privacy") as err:
        load_config(CONFIGS / "digits.yaml", [*base, *override])
    assert words in str(err.value)
    with pytest.raises(ConfigError, match=r"supports? it \(image_classification, text_classification, "
                       r"tabular_classification\), not task 'language_model'"):
        load_config(CONFIGS / "shakespeare-gpt.yaml", ["train.privacy.epsilon=3"])


def test_a_private_config_is_not_swept():
    from jobs.tune import main

    assert main(["--config", str(CONFIGS / "digits.yaml"), "--set", "train.privacy.epsilon=3", "--set",
                 "model.norm=group", "--dry-run"]) == 2


def test_the_plan_spends_the_target_epsilon_and_refuses_one_it_cannot_reach():
    from opacus.accountants import RDPAccountant

    from aidc.train.privacy import ALPHAS, plan

    cfg = load_config(CONFIGS / "digits.yaml", ["train.privacy.epsilon=3", "model.norm=group", "train.epochs=4",
                                                "train.privacy.delta=1e-4", "resources.num_workers=2"])
    p = plan(cfg, 1437)
    assert p["sample_rate"] == pytest.approx(cfg.train.batch_size * 2 / 1437)
    assert p["steps"] == 4 * (1437 // (cfg.train.batch_size * 2))
    recount = RDPAccountant()
    recount.history = [(p["noise_multiplier"], p["sample_rate"], p["steps"])]
    assert 3 - 0.02 <= recount.get_epsilon(1e-4, alphas=ALPHAS) <= 3
    with pytest.raises(ConfigError, match="delta .* not below 1/rows"):
        plan(cfg, 5000 * 3)  # 1e-4 >= 1/15000
    tiny = load_config(CONFIGS / "digits.yaml", ["train.privacy.epsilon=1e-9", "model.norm=group"])
    with pytest.raises(ConfigError, match="cannot be reached"):
        plan(tiny, 1437)
    with pytest.raises(ConfigError, match="covers all"):
        plan(cfg, 40)


def test_an_empty_poisson_batch_still_takes_a_noised_step():
    """Poisson sampling can draw an empty batch; its step adds the noise (the accountant counts it) and the
    loop reads no loss from it."""
    import torch

    from aidc.models.mlp import TabularMLP
    from aidc.train.privacy import make_private, private_model

    torch.manual_seed(0)
    model = private_model(TabularMLP(3, [], 2))
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.01}
    wrapped, optimizer, accountant = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), dp, 8,
                                                  distributed=False, device=torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    out = wrapped(torch.zeros(0, 3), torch.zeros(0, 0, dtype=torch.long))
    torch.nn.functional.cross_entropy(out, torch.zeros(0, dtype=torch.long)).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # noise moved the weights
    assert accountant.history == [(1.0, 0.01, 1)]


# --- Encryption at rest (data.encryption: Parquet modular encryption, local KMS) ---

def test_local_keys_must_be_private_outside_the_storage_root_and_never_overwritten(tmp_path, monkeypatch):
    import base64
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from aidc.data import encryption
    from aidc.errors import DataError

    monkeypatch.setenv("AIDC_KEYS_DIR", str(tmp_path / "keys"))
    path = encryption.keygen("team-a")
    assert len(encryption.master_key("team-a", str(tmp_path / "store"))) == 32
    with pytest.raises(DataError, match="exists"):
        encryption.keygen("team-a")
    for bad in ("../elsewhere", "team a", ".hidden"):
        with pytest.raises(DataError, match="not a plain name"):
            encryption.keygen(bad)
    os.chmod(path, 0o644)
    with pytest.raises(DataError, match="readable by others .* chmod 600"):
        encryption.master_key("team-a")
    os.chmod(path, 0o600)
    with pytest.raises(DataError, match="inside the storage root"):
        encryption.master_key("team-a", str(tmp_path))
    with pytest.raises(DataError, match=r"key 'nobody' not found: set AIDC_KEY_NOBODY .* `aidc data keygen nobody`"):
        encryption.master_key("nobody")
    monkeypatch.setenv("AIDC_KEY_TEAM_B_1", base64.b64encode(b"x" * 16).decode())  # the environment, 128-bit
    assert encryption.master_key("team-b.1") == b"x" * 16
    monkeypatch.setenv("AIDC_KEY_SHORT", base64.b64encode(b"x" * 10).decode())
    with pytest.raises(DataError, match="10 bytes; AES needs 16, 24 or 32"):
        encryption.master_key("short")

    # A round trip through pyarrow: envelope-encrypted on disk, read back only through the KMS.
    table = pa.table({"text": ["alice@example.com lives here"] * 3})
    import pyarrow.dataset as pads

    options = pads.ParquetFileFormat().make_write_options(**encryption.write_args("team-a"))  # as Ray writes
    pads.write_dataset(table, tmp_path / "ds", format="parquet", file_options=options)
    written = next((tmp_path / "ds").glob("*.parquet"))
    assert b"alice" not in written.read_bytes()
    assert pq.read_table(written, decryption_properties=encryption.decryption_properties()) == table
    with pytest.raises(OSError):
        pq.read_table(written)  # no key, no rows


def test_encryption_of_streamed_own_files_is_refused_before_reading():
    from aidc.tasks import preprocess

    from aidc.config import validate

    cfg = validate({"name": "t", "task": "tabular_classification", "model": {"arch": "mlp"},
                    "registry": {"model_name": "t"},
                    "data": {"source": "files", "path": "/nonexistent/*.csv", "format": "csv", "label": "y",
                             "features": ["x"], "encryption": {"key": "k"}}})
    with pytest.raises(ConfigError, match="data.encryption covers datasets aidc loads"):
        preprocess(cfg)
