"""The residual PII scan: an independent, deliberately loose second look at the *masked* outputs.

It shares no code with the detectors in `pii` (no checksums, no phonenumbers, no gazetteer): its
rules are high-recall shapes (any run of 9+ digits, anything@anything.tld, IBAN-like, IP-like, a
capitalised word after "my name is", a greeting or a title, ...). A hit is not necessarily PII (an order number
with a bad checksum also is a 9+ digit run): the residual rate is an upper bound on what masking
missed, and the recipe's `data.pii_residual_threshold` bounds it. Reports counts only, never values.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator

from services.preprocess import formats

# Countries that issue IBANs (ISO 13616 registry): "AP12 3456 7890 12AU" is a tracking code, not an IBAN.
_IBAN_COUNTRIES = ("AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL "
                   "GR GT HR HU IE IL IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM "
                   "PK PL PS PT QA RO RS RU SA SC SD SE SI SK SM SO ST SV TL TN TR UA VA VG XK YE").split()
# Capitalised words after a greeting that are not names.
_GREETING_WORDS = "There|Team|All|Everyone|Everybody|Folks|Guys|Again|Support|So|Very|Much|For|You"

RULES: dict[str, re.Pattern[str]] = {
    "email_like": re.compile(r"[^\s@\[\]]+@[^\s@\[\]]+\.[A-Za-z]{2,}"),
    # a run of 9+ digits standing alone (codes such as ORD-2024-001234 or AP123456789012AU are glued
    # to letters or dashes: product and order codes, not identifiers of people)
    "digit_run_9plus": re.compile(r"(?<![\w-])\d(?:[ .()/-]{0,2}\d){8,}(?!\w)"),
    "iban_like": re.compile(rf"\b(?:{'|'.join(_IBAN_COUNTRIES)})\d{{2}}(?:[ -]?[A-Za-z0-9]{{4}}){{2,}}"),
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


def scan(text: str) -> dict[str, int]:
    """Hits per rule in one text (only rules with hits)."""
    hits: dict[str, int] = {}
    for name, pattern in RULES.items():
        n = sum(1 for _ in pattern.finditer(text))
        if n:
            hits[name] = n
    return hits


def summarise(records: Iterable[tuple]) -> Iterator[dict]:
    """Prepared records (split, id, line_no, json_line, ...) -> one summary per partition:
    documents scanned, documents with any hit, hits per rule."""
    docs = flagged = 0
    hits: dict[str, int] = {}
    for rec in records:
        docs += 1
        row = json.loads(rec[3])
        found: dict[str, int] = {}
        for text in formats.record_texts(row):
            for k, v in scan(text).items():
                found[k] = found.get(k, 0) + v
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
