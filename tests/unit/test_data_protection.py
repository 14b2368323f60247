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
