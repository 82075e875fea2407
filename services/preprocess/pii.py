"""PII masking with category tokens: rules (regexes + checksums), no external service.

`mask(text, categories)` returns the masked text and a count per category; it never returns or
keeps the values it replaced. The order matters: emails first (their local part may hold digits),
then card numbers (only when the Luhn checksum holds), then phone numbers. A number that is not
masked as a card (bad checksum) is not masked as a phone either: phone patterns refuse to start or
end next to another digit group.

What is deliberately left alone: years (2019), prices ($1,299.00), versions (1.2.3), dates
(01-02-2024: too few digits), order/ticket numbers with clear boundaries (#12345, ORD-2024-001234,
order 100234), and long digit runs with a bad Luhn checksum. Known limit of this first version:
a bare US-shaped number such as 415-555-0100 is masked as a phone even where it is an order
number; a production backend (Cloud DLP) would use context.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

CATEGORIES = ("email", "phone", "card")
TOKENS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}

_EMAIL = re.compile(
    r"(?<![\w.%+-])"  # not glued to a longer token
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"  # local part
    r"@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"  # domain
    r"(?![\w-])"
)

# 13-19 digits, optionally grouped by single spaces or dashes, not part of a longer number.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-]|[ -]\d)")

# Boundaries shared by the phone patterns: not preceded by a word character, '#', '/', '-', '.'
# or by a digit group ("12 " / "12-"); not followed by a word character or another digit group.
_PB = r"(?<![\w#/.+-])(?<!\d[ .-])"
_PE = r"(?![\w-])(?![ .-]\d)"
_PHONE = re.compile(
    _PB
    + r"(?:"
    # international: +CC then 2-5 groups, optional (area) group: +1 415 555 0100, +44 20 7946 0958,
    # +1 (415) 555-0100, +61 412 345 678, +14155550100
    r"\+\d{1,3}(?:[ .-]?\(\d{1,4}\))?(?:[ .-]?\d{1,5}){1,5}"
    # North American with the area code in parentheses: (415) 555-0100, (415)555-0100
    r"|\(\d{3}\)[ ]?\d{3}[ .-]\d{4}"
    # North American, consistent separator: 415-555-0100, 415.555.0100, 415 555 0100
    r"|\d{3}([ .-])\d{3}\1\d{4}"
    # national trunk prefix 0 (AU, UK, EU): 0412 345 678, 020 7946 0958, 02 9876 5432, 07700 900123
    r"|\(0\d{1,4}\)[ ]?\d{2,4}(?:[ -]?\d{2,4}){1,2}"
    r"|0\d{1,4}(?:[ -]\d{2,6}){1,3}"
    # national, unseparated: 0412345678, 07700900123 (not 00..., which reads as a padded number)
    r"|0[1-9]\d{8,9}"
    r")"
    + _PE
)

_DIGIT_RANGE = {"+": (8, 15), "(": (10, 11), "0": (9, 11)}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _plausible_phone(match: str) -> bool:
    digits = sum(ch.isdigit() for ch in match)
    lo, hi = _DIGIT_RANGE.get(match[0], (10, 10))
    if match.startswith("(0"):
        lo, hi = 9, 11
    return lo <= digits <= hi


def mask(text: str, categories: Iterable[str] = CATEGORIES) -> tuple[str, dict[str, int]]:
    """Replace PII of the given categories with tokens; return (masked text, count per category)."""
    cats = set(categories)
    counts: dict[str, int] = {}

    def sub(pattern: re.Pattern[str], category: str, accept) -> None:
        nonlocal text
        n = 0

        def repl(m: re.Match[str]) -> str:
            nonlocal n
            if accept(m.group(0)):
                n += 1
                return TOKENS[category]
            return m.group(0)

        text = pattern.sub(repl, text)
        if n:
            counts[category] = counts.get(category, 0) + n

    if "email" in cats and "@" in text:
        sub(_EMAIL, "email", lambda s: True)
    if ("card" in cats or "phone" in cats) and any(ch.isdigit() for ch in text):
        if "card" in cats:
            sub(_CARD, "card", lambda s: luhn_ok(s.replace(" ", "").replace("-", "")))
        if "phone" in cats:
            sub(_PHONE, "phone", _plausible_phone)
    return text, counts


def mask_excerpt(raw: str, limit: int = 200) -> str:
    """The first `limit` characters of a raw row with every PII category masked (for rejected.jsonl).

    Masks a generous prefix before cutting, so that a value straddling the cut is not left half
    visible.
    """
    masked, _ = mask(raw[: limit * 10])
    return masked[:limit]
