"""Personal data scrubbing (data.privacy.scrub), measured: recall and precision per type on planted values,
what it finds in the SMS Spam Collection (and what aidc's boundary rules drop from Presidio's own hits), and
rows/s of one scrubber, side by side with Presidio's recognizers alone.

    python -m benchmarks.pii_scrub [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from benchmarks.common import SHARED_DATA

KINDS = ["email", "phone", "credit_card", "iban", "ip_address", "url"]


def planted(n: int) -> dict:
    """Per type: recall (the value replaced by its placeholder, exactly its span) and hits of other types."""
    from aidc.data.privacy import ENTITIES, Scrubber
    from aidc.testing import NOT_PERSONAL, planted_personal_data

    scrubber = Scrubber(KINDS)
    found, other = Counter(), Counter()
    for kind, value, text in planted_personal_data(n, seed=7):
        hits = Counter()
        if scrubber.text(text, hits) == text.replace(value, ENTITIES[kind][2]) and hits == {kind: 1}:
            found[kind] += 1
        other.update({k: v for k, v in hits.items() if k != kind})
    ordinary = Counter()
    for text in NOT_PERSONAL:
        scrubber.text(text, ordinary)
    return {"per_type": n, "recall": {k: found[k] / n for k in KINDS},
            "hits_of_a_type_not_planted": dict(other), "hits_in_ordinary_text": dict(ordinary)}


def sms(limit: int | None) -> dict:
    """Hits per type in the SMS corpus with aidc's rules, and Presidio's own URL hits beside them."""
    from presidio_analyzer.predefined_recognizers import UrlRecognizer

    from aidc.data.privacy import Scrubber

    path = SHARED_DATA / "sms-spam-collection" / "SMSSpamCollection"
    texts = [line.split("\t", 1)[1] for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
             if "\t" in line][:limit]
    scrubber, hits = Scrubber(KINDS), Counter()
    t0 = time.perf_counter()
    for text in texts:
        scrubber.text(text, hits)
    scrub_s = time.perf_counter() - t0
    url, raw = UrlRecognizer(), Counter()
    t0 = time.perf_counter()
    for text in texts:
        raw.update(text[h.start:h.end] for h in url.analyze(text, ["URL"], None))
    return {"messages": len(texts), "hits": dict(hits), "rows_per_s": round(len(texts) / scrub_s),
            "presidio_url_hits_alone": sum(raw.values()), "presidio_url_rows_per_s": round(
                len(texts) / (time.perf_counter() - t0)),
            "presidio_url_hits_dropped_examples": [u for u, _ in raw.most_common() if ".." in u][:5]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="20 planted values per type, 500 messages")
    a = p.parse_args(argv)
    out = {"planted": planted(20 if a.quick else 200), "sms": sms(500 if a.quick else None)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
