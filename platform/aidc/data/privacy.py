"""Personal data in text, scrubbed before anything is written (data.privacy.scrub).

Detection is Microsoft Presidio's (presidio-analyzer's pattern recognizers: regular expressions with checksum
validation where the type has one — Luhn for cards, ISO 7064 for IBANs — and Google's libphonenumber for
phone numbers); the replacement is presidio-anonymizer's (overlapping hits resolved, each span replaced by a
typed placeholder such as `<EMAIL>`). Only the counts per type are kept, never the values.

Recognizers that need a named-entity model (person, location, organisation) are not offered: Presidio gets
them from a spaCy or transformers model, and nothing here downloads a model at run time.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np

from aidc.config import PII_TYPES

# tldextract (Presidio's e-mail check) fetches the public suffix list from GitHub on first use, and on a machine
# without internet logs a traceback and waits on DNS before it falls back to its bundled copy: use the bundled
# copy from the start (an empty URL list; tldextract's documented variable).
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

# What data.privacy.scrub names -> (Presidio recognizer class, Presidio entity, placeholder)
ENTITIES = {
    "email": ("EmailRecognizer", "EMAIL_ADDRESS", "<EMAIL>"),
    "phone": ("PhoneRecognizer", "PHONE_NUMBER", "<PHONE>"),
    "credit_card": ("CreditCardRecognizer", "CREDIT_CARD", "<CREDIT_CARD>"),
    "iban": ("IbanRecognizer", "IBAN_CODE", "<IBAN>"),
    "ip_address": ("IpRecognizer", "IP_ADDRESS", "<IP_ADDRESS>"),
    "url": ("UrlRecognizer", "URL", "<URL>"),
    "us_ssn": ("UsSsnRecognizer", "US_SSN", "<US_SSN>"),
    "crypto": ("CryptoRecognizer", "CRYPTO", "<CRYPTO>"),
    "uk_nhs": ("NhsRecognizer", "UK_NHS", "<UK_NHS>"),
}
assert tuple(ENTITIES) == PII_TYPES, "aidc.config.PII_TYPES and ENTITIES name the same types"


# A web address without a scheme, "www." or a path is taken only under one of these endings (or a two-part
# one such as co.uk): elsewhere "word.word" is mostly a missing space in chat text ("pain.it", "her.love",
# "days.so": all real top-level domains). Measured on the SMS corpus in the #31 note.
BARE_DOMAIN_ENDINGS = ("com", "net", "org", "edu", "gov", "mil", "int", "info", "biz")


def _keep(text: str, hit) -> bool:
    """Whether a Presidio hit is kept, after trimming sentence punctuation off its end (Presidio's URL pattern
    takes the full stop after a URL). It must start and end at a token boundary (the URL pattern has none at
    its end and matched "Mr.Sm" in "Mr.Smith"); a URL must have no empty label ("holiday..so") and, when bare
    (no scheme, "www." or path), end in BARE_DOMAIN_ENDINGS or a two-part ending."""
    while hit.end > hit.start and text[hit.end - 1] in ".,;:!?":
        hit.end -= 1
    value = text[hit.start:hit.end]
    if not value or (hit.start and text[hit.start - 1].isalnum()) or \
            (hit.end < len(text) and text[hit.end].isalnum()):
        return False
    if hit.entity_type != "URL":
        return True
    host = value.split("://", 1)[-1].split("/", 1)[0]
    if ".." in host or host.startswith("."):
        return False
    if "://" in value or "/" in value or host.lower().startswith("www."):
        return True
    labels = host.lower().split(".")
    return labels[-1] in BARE_DOMAIN_ENDINGS or (len(labels) > 2 and len(labels[-2]) <= 3 and len(labels[-1]) == 2)


class Scrubber:
    """Replaces the named types of personal data in text with placeholders and counts what it found.

    Callable on a Ray Data batch (`columns`: {column: "text" | "json"}; a json column holds one JSON document
    per row, whose strings are scrubbed and which stays the same JSON; a row that is not JSON is scrubbed as
    text). Adds one column, `found_column`, a JSON object of counts per type for each row.
    """

    found_column = "_pii_found"

    def __init__(self, types: list[str], columns: dict[str, str] | None = None, min_score: float = 0.0):
        from presidio_analyzer import predefined_recognizers
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        unknown = [t for t in types if t not in ENTITIES]
        if unknown:
            raise ValueError(f"unknown personal data type(s) {unknown}; known: {sorted(ENTITIES)}")
        self.types, self.columns, self.min_score = list(types), dict(columns or {}), min_score
        self._recognizers = [getattr(predefined_recognizers, ENTITIES[t][0])() for t in self.types]
        self._entities = [ENTITIES[t][1] for t in self.types]
        self._name = {ENTITIES[t][1]: t for t in self.types}
        self._anonymizer = AnonymizerEngine()
        self._operators = {ENTITIES[t][1]: OperatorConfig("replace", {"new_value": ENTITIES[t][2]})
                           for t in self.types}

    def text(self, text: str, found: Counter) -> str:
        """`text` with every hit replaced; adds what it replaced, per type, to `found`."""
        if not isinstance(text, str) or not text:
            return text
        hits = [h for r, e in zip(self._recognizers, self._entities)
                for h in r.analyze(text, [e], None) if h.score >= self.min_score and _keep(text, h)]
        if not hits:
            return text
        out = self._anonymizer.anonymize(text, hits, self._operators)
        found.update(self._name[item.entity_type] for item in out.items)
        return out.text

    def texts(self, texts, found: Counter | None = None) -> np.ndarray:
        """Each of `texts` scrubbed (a served text model's instances)."""
        found = Counter() if found is None else found
        return np.array([self.text(t, found) for t in texts], dtype=object)

    def json_text(self, line: str, found: Counter) -> str:
        """One JSON document with its strings (and numbers that are personal data, as strings) scrubbed, keys
        kept; a line that is not JSON, as text."""
        try:
            doc = json.loads(line)
        except (TypeError, ValueError):
            return self.text(line, found)

        def walk(value):
            if isinstance(value, str):
                return self.text(value, found)
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # a card number as a JSON number
                text = json.dumps(value)
                scrubbed = self.text(text, found)
                return value if scrubbed == text else scrubbed
            if isinstance(value, list):
                return [walk(v) for v in value]
            if isinstance(value, dict):
                return {k: walk(v) for k, v in value.items()}
            return value

        return json.dumps(walk(doc), ensure_ascii=False)

    def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        found = [Counter() for _ in range(n)]
        out = dict(batch)
        for column, kind in self.columns.items():
            scrub = self.json_text if kind == "json" else self.text
            out[column] = np.array([scrub(v, found[i]) for i, v in enumerate(batch[column])], dtype=object)
        out[self.found_column] = np.array([json.dumps(dict(f)) for f in found], dtype=object)
        return out


def total(found_rows, types: list[str]) -> dict[str, int]:
    """The counts per type over rows of Scrubber's found column (every type named, zeros included)."""
    totals = Counter({t: 0 for t in types})
    for row in found_rows:
        totals.update(json.loads(row))
    return dict(totals)
