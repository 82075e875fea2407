"""The residual PII scan: an independent, deliberately loose second look at the *masked* outputs.

It shares no code with the detectors in `pii` (no checksums, no phonenumbers, no gazetteer): its
rules are high-recall shapes (any run of 9+ digits, anything@anything.tld, IBAN-like, IP-like, a
capitalised word after "my name is", a greeting or a title, ...). A hit is not necessarily PII (an order number
with a bad checksum also is a 9+ digit run): the residual rate is an upper bound on what masking
missed, and the recipe's `data.pii_residual_threshold` bounds it. Reports counts only, never values.

It lives in `shared` because two services use it: preprocess (on its masked outputs) and the
evaluator (on what a fine-tuned model generates where the training data had a mask token).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

# IBAN lengths by country (ISO 13616 registry): "ST45 8885 0713 13AU" (16 characters) is a tracking
# code, not a São Tomé IBAN (25).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30}
# Capitalised words after a greeting that are not names.
_GREETING_WORDS = "There|Team|All|Everyone|Everybody|Folks|Guys|Again|Support|So|Very|Much|For|You"

RULES: dict[str, re.Pattern[str]] = {
    "email_like": re.compile(r"[^\s@\[\]]+@[^\s@\[\]]+\.[A-Za-z]{2,}"),
    # a run of 9+ digits standing alone (codes such as ORD-2024-001234 or AP123456789012AU are glued
    # to letters or dashes: product and order codes, not identifiers of people)
    "digit_run_9plus": re.compile(r"(?<![\w-])\d(?:[ .()/-]{0,2}\d){8,}(?!\w)"),
    "iban_like": re.compile(r"\b[A-Za-z]{2}\d{2}(?:[ -]?[A-Za-z0-9]){11,30}\b"),  # + country and length
    "ipv4_like": re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"),
    "ipv6_like": re.compile(r"\b[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{0,4}){3,}"),
    "phone_like": re.compile(r"\+\d[\d ().-]{6,}\d|\(\d{2,5}\) ?\d{3,4}[ .-]?\d{3,4}"),
    "ssn_like": re.compile(r"\b\d{3}[- ]\d{2}[- ]\d{4}\b"),
    "dob_like": re.compile(r"(?i)\b(?:born|d\.?o\.?b|date of birth|birthday)\b\W{0,12}(?:on |in |is |was )?\d"),
    "name_after_intro": re.compile(r"(?i:\bmy name is|\bmy name's|\bunder the name|\bspoke (?:to|with))\s+[A-Z][a-z]"),
    "name_after_greeting": re.compile(rf"(?i:\b(?:hi|hello|hey|dear|thanks)),?\s+(?!(?:{_GREETING_WORDS})\b)[A-Z][a-z]+\s*[,!]"),
    "name_after_title": re.compile(r"\b(?:Mr|Mrs|Ms|Dr)\.? [A-Z][a-z]+"),
    "street_like": re.compile(r"\b\d{1,5} (?:[A-Z][a-z]+ ){1,3}(?i:street|st|road|rd|avenue|ave|lane|drive|way|court|place)\b"),
}


def _iban_sized(match: re.Match) -> bool:
    compact = re.sub(r"[ -]", "", match.group(0)).upper()
    # a country that issues IBANs, and at least its length (a longer run may hold the IBAN and more)
    return len(compact) >= IBAN_LENGTHS.get(compact[:2], 99)


# What a rule cannot match without (a character every match contains): checked with `in` first,
# which is ~100x cheaper than letting the regex walk the text. Rules not listed always run.
_NEEDS_DIGIT = frozenset({"digit_run_9plus", "iban_like", "ipv4_like", "phone_like", "ssn_like", "dob_like",
                          "street_like"})
_NEEDS_CHAR = {"email_like": "@", "ipv6_like": ":"}
_DIGIT = re.compile(r"\d")


def scan(text: str) -> dict[str, int]:
    """Hits per rule in one text (only rules with hits)."""
    hits: dict[str, int] = {}
    has_digit = _DIGIT.search(text) is not None
    for name, pattern in RULES.items():
        if (name in _NEEDS_DIGIT and not has_digit) or _NEEDS_CHAR.get(name, "") not in text:
            continue
        n = sum(1 for m in pattern.finditer(text) if name != "iban_like" or _iban_sized(m))
        if n:
            hits[name] = n
    return hits


def scan_texts(texts: Iterable[str]) -> dict[str, int]:
    """Hits per rule over the texts of one document."""
    found: dict[str, int] = {}
    for text in texts:
        for k, v in scan(text).items():
            found[k] = found.get(k, 0) + v
    return found


def summarise(records: Iterable[tuple]) -> Iterator[dict]:
    """Prepared records (split, id, line_no, json_line, pii_counts, placed_by, residual hits: see
    stages.mask_and_place, which scans each masked row) -> one summary per partition: documents
    scanned, documents with any hit, hits per rule."""
    docs = flagged = 0
    hits: dict[str, int] = {}
    for rec in records:
        docs += 1
        found = rec[6]
        if found:
            flagged += 1
            for k, v in found.items():
                hits[k] = hits.get(k, 0) + v
    yield {"documents": docs, "documents_with_hits": flagged, "hits": hits}


def merge(parts: Iterable[dict]) -> dict:
    total = {"documents": 0, "documents_with_hits": 0, "hits": {}}
    for part in parts:
        total["documents"] += part["documents"]
        total["documents_with_hits"] += part["documents_with_hits"]
        for k, v in part["hits"].items():
            total["hits"][k] = total["hits"].get(k, 0) + v
    total["hits"] = dict(sorted(total["hits"].items()))
    total["rate"] = total["documents_with_hits"] / total["documents"] if total["documents"] else 0.0
    return total
