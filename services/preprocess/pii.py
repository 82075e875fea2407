"""PII detection and masking with category tokens, behind one small detector interface.

Backends (chosen by `data.pii_backend` in the recipe):

- `rules` (default, offline; `RulesDetector`): regexes, checksums, the `phonenumbers` library and a
  small name gazetteer (`pii_names.txt`).
- `presidio` (`PresidioDetector`): presidio-analyzer's recognizers, where it and a spaCy model are
  installed (not a dependency of ftpipe).
- `dlp` (`DlpMasker`): Cloud DLP `deidentify_content` with replace-with-info-type; the request it
  builds and the mapping of its response are pure functions (`dlp_deidentify_request`,
  `dlp_map_response`).

`mask(text, categories, backend=...)` returns the masked text and a count per category; it never
returns or keeps the values it replaced. Overlapping spans are resolved deterministically: the
longest span wins, ties go to the more specific category (checksummed identifiers first, see
`PRIORITY`), then to the earlier start.

What the rules leave alone: years (2019), prices ($1,299.00), versions (1.2.3), dates outside a
date-of-birth context (01-02-2024), order/ticket numbers with clear boundaries (#12345,
ORD-2024-001234, order 100234), and numbers whose checksum fails (cards, IBAN, TFN, ABN, Medicare).
Phone numbers are found by `phonenumbers.PhoneNumberMatcher` (leniency VALID) over several regions,
and refused when glued to another digit group or a word (an order number such as ORD-2024-001234).
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Protocol

CATEGORIES = ("email", "phone", "card", "iban", "ip", "ssn", "tfn", "abn", "medicare", "dob", "address", "person")
TOKENS = {c: f"[{c.upper()}]" for c in CATEGORIES}
BACKENDS = ("rules", "dlp", "presidio")
# Ties between spans of the same length: the earlier category here wins (most specific first).
PRIORITY = {c: i for i, c in enumerate(
    ("card", "iban", "medicare", "abn", "tfn", "ssn", "email", "ip", "dob", "phone", "address", "person"))}
PHONE_REGIONS = ("US", "GB", "AU", "NZ", "DE", "FR", "IN")

Span = tuple[int, int, str]  # (start, end, category), end exclusive


class Detector(Protocol):
    """A PII detector: the spans of `text` to mask, each with its category."""

    name: str

    def detect(self, text: str) -> list[Span]: ...


class PiiBackendUnavailable(RuntimeError):
    """The recipe names a backend whose packages are not installed here."""


# ------------------------------------------------------------------------------ checksums


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


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if not (15 <= len(s) <= 34 and s[:2].isalpha() and s[2:4].isdigit() and s.isalnum()):
        return False
    return int("".join(str(int(ch, 36)) for ch in s[4:] + s[:4])) % 97 == 1


def tfn_ok(digits: str) -> bool:
    weights = {8: (10, 7, 8, 4, 6, 3, 5, 1), 9: (1, 4, 3, 7, 5, 8, 6, 9, 10)}.get(len(digits))
    return bool(weights) and sum(int(d) * w for d, w in zip(digits, weights, strict=True)) % 11 == 0


def abn_ok(digits: str) -> bool:
    if len(digits) != 11 or digits[0] == "0":
        return False
    nums = [int(d) for d in digits]
    nums[0] -= 1
    return sum(n * w for n, w in zip(nums, (10, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19), strict=True)) % 89 == 0


def medicare_ok(digits: str) -> bool:
    if len(digits) not in (10, 11) or digits[0] not in "23456":
        return False
    check = sum(int(d) * w for d, w in zip(digits[:8], (1, 3, 7, 9, 1, 3, 7, 9), strict=True)) % 10
    return check == int(digits[8])


def ssn_ok(area: str, group: str, serial: str) -> bool:
    a = int(area)
    return a != 0 and a != 666 and a < 900 and group != "00" and serial != "0000"


# ------------------------------------------------------------------------------ rules

_EMAIL = re.compile(
    r"(?<![\w.%+-])"  # not glued to a longer token
    r"[^\W_](?:[\w.%+'’-]{0,62}[\w%+-])?"  # local part, any script (chloé@, o'brien@)
    r"@"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}"  # domain
    r"(?![\w-])"
)
# 13-19 digits, optionally grouped by single spaces or dashes, not part of a longer number.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-]|[ -]\d)")
_IBAN = re.compile(r"(?i)(?<![\w-])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_IBAN_LEN = {"AD": 24, "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18, "FR": 27,
             "GB": 22, "GR": 27, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28, "PT": 25, "SE": 24}
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?(?![\w:])")
_SSN = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-]|[ -]\d)")
# Between a keyword and its number: punctuation and a few linking words ("my TFN is", "SSN: ",
# "social security number, it is", "ABN no. ").
_GAP = r"\W{0,4}(?:(?:is|was|it|it's|number|num|no|of|=)\W{1,4}){0,3}"
_SSN_BARE = re.compile(rf"(?i)\b(?:ssn|social security(?: number| no\.?)?){_GAP}(\d{{9}}|\d{{3}}[ -]\d{{2}}[ -]\d{{4}})(?![\w-])")
_TFN = re.compile(r"(?<![\w-])(\d{3} \d{3} \d{2,3})(?![\w-]|[ -]\d)")
_TFN_CTX = re.compile(rf"(?i)\b(?:tfn|tax file(?: number| no\.?)?){_GAP}(\d{{8,9}}|\d{{3}}[ -]\d{{3}}[ -]\d{{2,3}})(?![\w-])")
_ABN = re.compile(r"(?<![\w-])(\d{2} \d{3} \d{3} \d{3})(?![\w-]|[ -]\d)")
_ABN_CTX = re.compile(rf"(?i)\babn{_GAP}(\d{{11}}|\d{{2}}[ -]?\d{{3}}[ -]?\d{{3}}[ -]?\d{{3}})(?![\w-])")
_MEDICARE = re.compile(r"(?<![\w-])([2-6]\d{3}[ -]?\d{5}[ -]?\d(?:[ /-]?\d)?)(?![\w-]|[ -]\d)")

# Cheap pre-filter before phonenumbers (slow): some 7+ digits written as one number-like run.
_PHONE_SHAPED = re.compile(r"\(\d{3}\) ?\d{3}[-. ]\d{4}|(?<![\d-])\d{3}[-.]\d{3}[-.]\d{4}(?![\d-])")
_ANY_DIGIT = re.compile(r"\d")
_PHONE_HINT = re.compile(r"(?:\+|\(?\d)[\d ().\-/]{5,}\d")

_MONTHS = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
           r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
_DATE = (r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{1,2}-\d{1,2}"
         rf"|\d{{1,2}}(?:st|nd|rd|th)?(?: of)? {_MONTHS},? \d{{4}}|{_MONTHS} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}})")
_DOB = re.compile(rf"(?i)\b(?:born(?:\s+on|\s+in)?|d\.?o\.?b\.?|date\s+of\s+birth|birth\s?date|birthday)"
                  rf"(?:\s+is|\s+was)?\s*[:=-]?\s*(?P<date>{_DATE})(?!\d)")

_STREET_TYPES = (r"(?i:Street|St|Road|Rd|Avenue|Ave|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|"
                 r"Terrace|Tce|Crescent|Cres|Way|Highway|Hwy|Parade|Pde|Close|Cl|Parkway|Pkwy|Square|Sq|"
                 r"Circuit|Cct|Grove|Gr|Esplanade|Row|Mews|Gardens|Walk)\b")
# Street addresses, one pattern per convention. Each starts with a plain character class and puts
# its boundary check in a lookbehind after that first character: Python's re then skips ahead to
# candidate characters in C instead of trying every position (10x faster than one alternation).
_ADDRESSES = (
    # 12 Main Street, 5/27 George St, 14B Baker Street, 1600 Pennsylvania Avenue NW (a unit before
    # it, "Unit 3, ", is joined by _UNIT_BEFORE)
    re.compile(rf"\d(?<![\w/.-]\d)\d{{0,4}}[A-Za-z]?(?:[/-]\d{{1,5}}[A-Za-z]?)?,? (?:[A-Z][A-Za-z'’-]+ ){{1,4}}"
               rf"{_STREET_TYPES}(?: (?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\b)?"),
    # Hauptstraße 12, Musterstr. 5a, Lindenweg 7 (DE, AT, CH)
    re.compile(r"[A-ZÄÖÜ](?<!\w[A-ZÄÖÜ])[a-zäöüß-]*(?:straße|strasse|str\.|weg|allee|platz|gasse|ring|damm|ufer)"
               r"\s\d{1,4}[a-z]?(?!\w)"),
    # 12 rue de la Paix, 8 bis avenue Victor Hugo (FR)
    re.compile(r"\d(?<![\w/.-]\d)\d{0,3}(?: ?(?:bis|ter))?,? (?i:rue|avenue|av\.|boulevard|bd|place|chemin|allée|"
               r"impasse|quai|cours) (?:(?:de la|de|du|des|la|le|l'|d') ?)?[A-ZÉÈ][\w'’-]+(?: [A-ZÉÈ][\w'’-]+){0,3}"),
)
_UNIT_BEFORE = re.compile(r"(?i:unit|apt\.?|apartment|suite|flat|level) \d{1,4}[A-Za-z]?,? \Z")

_NAME = r"[A-Z][a-zà-öø-ÿ]+(?:[-'’][A-Z][a-zà-öø-ÿ]+)?"
_NAMES = rf"{_NAME}(?:[ \t]+{_NAME}){{0,2}}"


def _phrases(*phrases: str) -> str:
    """Keyword phrases as one alternation that accepts any run of spaces between their words
    ("my  name is": a copy with doubled spaces names a person just the same)."""
    return "|".join(p.replace(" ", r"\s+") for p in phrases)


_STRONG_PHRASES = ("my name is", "my name's", "name:", "under the name of", "under the name", "in the name of",
                   "named", "spoke to", "spoke with", "speak to", "speak with", "talked to", "talking to", "ask for",
                   "asked for")
_STRONG_CONTEXTS = _phrases(*_STRONG_PHRASES)
# Contexts that introduce a person whatever the name: "my name is", "under the name", "I spoke to".
_NAME_STRONG = re.compile(rf"(?i:\b(?:{_STRONG_CONTEXTS})\s+)(?P<n>{_NAMES})")
# The same contexts in a copy written in one case ("my name is peter ramos", "MY NAME IS ..."):
# only gazetteer names, since capitals no longer tell a name from a word.
_NAME_STRONG_ANY_CASE = re.compile(rf"(?i)\b(?:{_STRONG_CONTEXTS})\s+(?P<n>[a-zà-öø-ÿ]+(?:[ \t]+[a-zà-öø-ÿ]+)?)")
# Self-introductions: a gazetteer name, or any capitalised name closed by punctuation or a link word
# ("This is Aroha again.", "I'm Tam from accounts") — "I'm Happy to help" stays text.
_INTRO_PHRASES = ("i am", "i'm", "this is", "it's", "call me")
_INTRO_CONTEXTS = _phrases(*_INTRO_PHRASES)
_GREETING_PHRASES = ("hi", "hello", "hey", "dear", "thanks", "thank you", "cheers", "good morning", "good afternoon",
                     "good evening")
_GREETINGS = _phrases(*_GREETING_PHRASES)
_SIGN_OFF_PHRASES = ("regards", "best", "thanks", "thank you", "cheers", "sincerely", "yours truly", "yours")
_SIGN_OFFS = _phrases(*_SIGN_OFF_PHRASES)
_NAME_INTRO = re.compile(rf"(?i:\b(?:{_INTRO_CONTEXTS})\s+)(?P<n>{_NAMES})"
                         rf"(?P<closed>(?=\s*(?:[,.!?;:\n]|$))|\s+(?i:from|here|again|speaking|calling|and|at|with|of)\b)?")
# A greeting names its reader: "Hi Aroha,", "Thanks Tom!", "Dear Aroha Ngata".
_NAME_GREETING = re.compile(rf"(?i:\b(?:{_GREETINGS})),?"
                            rf"\s+(?P<n>{_NAMES})(?=\s*(?:[,!.:;\n]|$))")
# Capitalised words these contexts meet that are not names ("Hi Team,", "Thanks Again!", "I'm Australian.").
NOT_NAMES = frozenset("""There Team All Everyone Everybody Folks Guys Ladies Gentlemen Support Again Sir Madam Mate
    Friend Friends Customer Customers Service Sales Someone Anyone You So Very Much For In Advance Ok Okay Yes No Both
    The A An Your Our My This That It Heaps Lots Manager Staff Agent Admin Billing Accounts Reception Guest Sorry
    Monday Tuesday Wednesday Thursday Friday Saturday Sunday Australian English American British French German Indian
    Canadian Irish Scottish Welsh New Here Back Done Good Great Fine""".split())
_TITLES = ("Mr", "Ms", "Miss", "Mx", "Dr", "Prof", "Sir", "Dame")  # "Mrs" contains "Mr"
_NAME_TITLE = re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame)\.?[ \t]+(?P<n>{_NAMES})")
# The keyword phrases as the folded, space-collapsed text of _persons has them (a necessary
# condition for the context regexes, checked before running them)
_STRONG_NEEDLES = tuple(p.casefold() for p in _STRONG_PHRASES)
_GREETING_NEEDLES = tuple(p.casefold() for p in _GREETING_PHRASES)
_INTRO_NEEDLES = tuple(p.casefold() for p in _INTRO_PHRASES)
_SIGN_OFF_NEEDLES = tuple(p.casefold() for p in _SIGN_OFF_PHRASES)
_NAME_SIGN = re.compile(rf"(?i:\b(?:{_SIGN_OFFS})),?[ \t]*\n+[ \t]*"
                        rf"(?P<n>{_NAMES})[ \t]*(?=\n|$)")
_NAME_PAIR = re.compile(rf"(?=\b(?P<a>{_NAME})[ \t]+(?P<b>{_NAME})\b)")  # lookahead: overlapping pairs
_WORD_SPAN = re.compile(r"\S+")


@lru_cache(maxsize=1)
def gazetteer() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, surnames) from pii_names.txt; read with importlib.resources so that it also
    works from the zip Spark ships to its workers."""
    from importlib.resources import files

    first, last = set(), set()
    for line in files("services.preprocess").joinpath("pii_names.txt").read_text(encoding="utf-8").splitlines():
        kind, _, name = line.partition(":")
        if kind == "first":
            first.add(name.strip())
        elif kind == "last":
            last.add(name.strip())
    return frozenset(first), frozenset(last)


def _boundary_ok(text: str, start: int, end: int) -> bool:
    """A phone match must not be glued to a word, '#', '/', '-', '.', or another digit group."""
    if start > 0:
        before = text[start - 1]
        if before.isalnum() or before in "#/.+-_":
            return False
        if start > 1 and before in " .-" and text[start - 2].isdigit():
            return False
    if end < len(text):
        after = text[end]
        if after.isalnum() or after in "-_":
            return False
        if end + 1 < len(text) and after in " .-" and text[end + 1].isdigit():
            return False
    return True


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


# Australian identifiers: (category, its usual written shape, the number after its keyword, checksum).
# A number its keyword names goes to `keyed` in detect(), where its category wins.
_AU_NUMBERS = (("tfn", _TFN, _TFN_CTX, tfn_ok), ("abn", _ABN, _ABN_CTX, abn_ok),
               ("medicare", _MEDICARE, None, medicare_ok))


class RulesDetector:
    """The default offline backend: regexes, checksums, phonenumbers, a name gazetteer."""

    name = "rules"

    def __init__(self, categories: Iterable[str] = CATEGORIES):
        self.categories = frozenset(categories)
        unknown = self.categories - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown PII categories: {sorted(unknown)}")

    def detect(self, text: str) -> list[Span]:
        cats = self.categories
        spans: list[Span] = []
        keyed: list[Span] = []  # numbers named by their keyword ("ABN", "TFN", "SSN"): their category wins
        add = spans.append
        has_digit = _ANY_DIGIT.search(text) is not None
        if "email" in cats and "@" in text:
            for m in _EMAIL.finditer(text):
                add((m.start(), m.end(), "email"))
        if has_digit:
            if "card" in cats:
                for m in _CARD.finditer(text):
                    if luhn_ok(_digits(m.group(0))):
                        add((m.start(), m.end(), "card"))
            if "iban" in cats:
                self._iban(text, add)
            if "ip" in cats:
                for m in _IPV4.finditer(text):
                    add((m.start(), m.end(), "ip"))
                if ":" in text:
                    for m in _IPV6.finditer(text):
                        if self._ipv6_ok(m.group(0)):
                            add((m.start(), m.end(), "ip"))
            if "ssn" in cats:
                for m in _SSN.finditer(text):
                    if ssn_ok(m.group(1), m.group(3), m.group(4)):
                        add((m.start(), m.end(), "ssn"))
                for m in _SSN_BARE.finditer(text):
                    d = _digits(m.group(1))
                    if ssn_ok(d[:3], d[3:5], d[5:]):
                        keyed.append((m.start(1), m.end(1), "ssn"))
            for cat, shaped, after_keyword, checksum_ok in _AU_NUMBERS:
                if cat not in cats:
                    continue
                for pattern, found in ((shaped, spans), (after_keyword, keyed)):
                    for m in pattern.finditer(text) if pattern is not None else ():
                        if checksum_ok(_digits(m.group(1))):
                            found.append((m.start(1), m.end(1), cat))
            if "dob" in cats:
                for m in _DOB.finditer(text):
                    add((m.start("date"), m.end("date"), "dob"))
            if "phone" in cats:
                self._phones(text, add, spans)
            if "address" in cats:
                for pattern in _ADDRESSES:
                    for m in pattern.finditer(text):
                        unit = _UNIT_BEFORE.search(text, max(0, m.start() - 24), m.start())
                        add((unit.start() if unit else m.start(), m.end(), "address"))
        if "person" in cats:
            self._persons(text, add)
        if keyed:  # a number its keyword names is that, even where another checksum also passes
            spans = [s for s in spans if not any(k[0] - 2 <= s[0] and s[1] <= k[1] + 2 for k in keyed)]
            spans += keyed
        return spans

    @staticmethod
    def _iban(text: str, add) -> None:
        for m in _IBAN.finditer(text):
            raw = m.group(0)
            pos = [i for i, ch in enumerate(raw) if ch != " "]
            compact = raw.replace(" ", "").upper()
            want = _IBAN_LEN.get(compact[:2])
            lengths = [want] if want else range(len(compact), 14, -1)
            for n in lengths:
                if n <= len(compact) and iban_ok(compact[:n]):
                    add((m.start(), m.start() + pos[n - 1] + 1, "iban"))
                    break

    @staticmethod
    def _ipv6_ok(s: str) -> bool:
        if sum(ch.isalnum() for ch in s) < 3 or s.count(":") < 2:
            return False
        try:
            ipaddress.IPv6Address(s.split("%")[0])
        except ValueError:
            return False
        return True

    @staticmethod
    def _phones(text: str, add, found: list[Span]) -> None:
        import phonenumbers

        seen: set[tuple[int, int]] = set()
        # phonenumbers is slow: run it only on windows around number-like runs of 7+ digits (one
        # character of context each side), with offsets mapped back; skip runs a checksummed
        # category already covers (cards, IBANs, ABNs... win over a phone of the same length), and
        # stop trying regions once one match covers the whole run
        for hint in _PHONE_HINT.finditer(text):
            if len(_ANY_DIGIT.findall(hint.group(0))) < 7:
                continue
            if any(s[0] <= hint.start() and hint.end() <= s[1] for s in found):
                continue
            ws, we = max(0, hint.start() - 1), min(len(text), hint.end() + 1)
            window = text[ws:we]
            for region in PHONE_REGIONS:
                whole = False
                for m in phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID):
                    key = (ws + m.start, ws + m.end)
                    if key not in seen and _boundary_ok(text, *key):
                        seen.add(key)
                        add((*key, "phone"))
                        whole = whole or (key[0] <= hint.start() and hint.end() <= key[1])
                if whole:
                    break
        # North-American formatting is a phone whatever the area code: VALID leniency refuses
        # unassigned codes (and 555 numbers), which people still type and which still identify.
        for m in _PHONE_SHAPED.finditer(text):
            if (m.start(), m.end()) not in seen and _boundary_ok(text, m.start(), m.end()):
                add((m.start(), m.end(), "phone"))

    @staticmethod
    def _persons(text: str, add) -> None:
        first, last = gazetteer()

        def known(name: str) -> bool:
            parts = name.split()
            return parts[0] in first or parts[0] in last or parts[-1] in last

        def add_name(m: re.Match, words: list[re.Match] | None = None) -> None:
            # cut the name at the first word that is not one ("Hi Tom Again" -> Tom)
            words = words or list(_WORD_SPAN.finditer(m.group("n")))
            n = next((i for i, w in enumerate(words) if w.group(0) in NOT_NAMES), len(words))
            if n:
                add((m.start("n"), m.start("n") + words[n - 1].end(), "person"))

        # Each context regex runs only where its keyword occurs: a substring test on the folded,
        # space-collapsed text is a necessary condition for a match and far cheaper than the scan
        folded = " ".join(text.casefold().split())

        def mentions(needles: tuple[str, ...]) -> bool:
            return any(n in folded for n in needles)

        if mentions(_STRONG_NEEDLES):
            for m in _NAME_STRONG.finditer(text):
                add_name(m)
            for m in _NAME_STRONG_ANY_CASE.finditer(text):
                words = list(_WORD_SPAN.finditer(m.group("n")))
                while words and not all(w.group(0).title() in first or w.group(0).title() in last for w in words):
                    words.pop()  # "peter ramos" -> both if both are known names; "liam in" -> liam
                if words:
                    add_name(m, words)
        if mentions(_GREETING_NEEDLES):
            for m in _NAME_GREETING.finditer(text):
                add_name(m)
        if mentions(_INTRO_NEEDLES):
            for m in _NAME_INTRO.finditer(text):
                if known(m.group("n")) or m.group("closed") is not None:
                    add_name(m)
        if any(t in text for t in _TITLES):
            for m in _NAME_TITLE.finditer(text):
                add((m.start("n"), m.end("n"), "person"))
        if "\n" in text and mentions(_SIGN_OFF_NEEDLES):
            for m in _NAME_SIGN.finditer(text):
                if known(m.group("n")) or len(m.group("n").split()) >= 2:
                    add((m.start("n"), m.end("n"), "person"))
        for m in _NAME_PAIR.finditer(text):
            if m.group("a") in first and m.group("b") in last:
                add((m.start("a"), m.end("b"), "person"))


def resolve(spans: Iterable[Span]) -> list[Span]:
    """Non-overlapping spans, sorted by start: longest first, then the more specific category
    (PRIORITY), then the earlier start; a span overlapping one already kept is dropped."""
    kept: list[Span] = []
    for s in sorted(set(spans), key=lambda s: (-(s[1] - s[0]), PRIORITY.get(s[2], 99), s[0])):
        if all(s[1] <= k[0] or s[0] >= k[1] for k in kept):
            kept.append(s)
    return sorted(kept)


def apply_spans(text: str, spans: list[Span]) -> tuple[str, dict[str, int]]:
    """Replace resolved spans with their tokens; return (masked text, count per category)."""
    counts: dict[str, int] = {}
    out, pos = [], 0
    for start, end, cat in spans:
        out.append(text[pos:start])
        out.append(TOKENS[cat])
        counts[cat] = counts.get(cat, 0) + 1
        pos = end
    out.append(text[pos:])
    return "".join(out), counts


# ------------------------------------------------------------------------------ presidio

PRESIDIO_ENTITIES = {
    "EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "card", "IBAN_CODE": "iban",
    "IP_ADDRESS": "ip", "US_SSN": "ssn", "AU_TFN": "tfn", "AU_ABN": "abn", "AU_MEDICARE": "medicare",
    "DATE_TIME": "dob", "LOCATION": "address", "PERSON": "person",
}


PRESIDIO_MODEL_ENV = "FTPIPE_PRESIDIO_SPACY_MODEL"
# Country recognizers that presidio ships disabled and that match our categories (AU_ACN is not one).
PRESIDIO_EXTRA_RECOGNIZERS = ("AuTfnRecognizer", "AuAbnRecognizer", "AuMedicareRecognizer")


def presidio_engine(spacy_model: str | None = None, language: str = "en"):
    """presidio-analyzer's AnalyzerEngine at its best offline: its default recognizers plus the
    Australian ones (TFN, ABN, Medicare), over a spaCy pipeline given as an installed package name
    or a folder (`spacy_model`, else $FTPIPE_PRESIDIO_SPACY_MODEL, else en_core_web_lg). A blank
    pipeline saved with `spacy.blank("en").to_disk(dir)` works too: no NER then (no PERSON,
    LOCATION or NER dates), the pattern recognizers all run.

    Never downloads: presidio itself would fetch a model it cannot find, so a model that is
    neither installed nor a folder raises PiiBackendUnavailable first."""
    import os
    from pathlib import Path

    try:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry, predefined_recognizers
        from presidio_analyzer.nlp_engine import NlpEngineProvider
    except ImportError as exc:
        raise PiiBackendUnavailable(
            "pii_backend 'presidio' needs presidio-analyzer and a spaCy model: "
            "pip install presidio-analyzer && python -m spacy download en_core_web_lg "
            f"(or a model folder in ${PRESIDIO_MODEL_ENV})") from exc
    model = spacy_model or os.environ.get(PRESIDIO_MODEL_ENV) or "en_core_web_lg"
    if not (Path(model).is_dir() or spacy.util.is_package(model)):
        raise PiiBackendUnavailable(
            f"pii_backend 'presidio' needs a spaCy model: {model!r} is neither an installed package nor a "
            f"folder; python -m spacy download en_core_web_lg, or set ${PRESIDIO_MODEL_ENV} to a model folder")
    try:
        nlp_engine = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": model}]}).create_engine()
    except (OSError, ValueError) as exc:  # a folder that is not a spaCy pipeline
        raise PiiBackendUnavailable(f"pii_backend 'presidio': cannot load spaCy model {model!r}: {exc}") from exc
    registry = RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
    for name in PRESIDIO_EXTRA_RECOGNIZERS:
        registry.add_recognizer(getattr(predefined_recognizers, name)(supported_language=language))
    return AnalyzerEngine(nlp_engine=nlp_engine, registry=registry, supported_languages=[language])


class PresidioDetector:
    """presidio-analyzer's recognizers (`presidio_engine`: defaults + AU TFN / ABN / Medicare, spaCy
    model from $FTPIPE_PRESIDIO_SPACY_MODEL); DATE_TIME only counts as a date of birth, LOCATION
    as an address."""

    name = "presidio"

    def __init__(self, categories: Iterable[str] = CATEGORIES, language: str = "en", spacy_model: str | None = None):
        self.categories = frozenset(categories)
        self.entities = [e for e, c in PRESIDIO_ENTITIES.items() if c in self.categories]
        self.language = language
        self._engine = presidio_engine(spacy_model, language)

    def detect(self, text: str) -> list[Span]:
        results = self._engine.analyze(text=text, entities=self.entities, language=self.language)
        return presidio_spans(results, self.categories)


def presidio_spans(results, categories: Iterable[str]) -> list[Span]:
    """presidio RecognizerResult-like objects (entity_type, start, end) -> our spans."""
    cats = set(categories)
    spans = []
    for r in results:
        cat = PRESIDIO_ENTITIES.get(r.entity_type)
        if cat in cats:
            spans.append((r.start, r.end, cat))
    return spans


# ------------------------------------------------------------------------------ Cloud DLP

DLP_INFO_TYPES = {
    "email": ("EMAIL_ADDRESS",), "phone": ("PHONE_NUMBER",), "card": ("CREDIT_CARD_NUMBER",),
    "iban": ("IBAN_CODE",), "ip": ("IP_ADDRESS",), "ssn": ("US_SOCIAL_SECURITY_NUMBER",),
    "tfn": ("AUSTRALIA_TAX_FILE_NUMBER",), "abn": ("AUSTRALIA_BUSINESS_NUMBER",),
    "medicare": ("AUSTRALIA_MEDICARE_NUMBER",), "dob": ("DATE_OF_BIRTH",), "address": ("STREET_ADDRESS",),
    "person": ("PERSON_NAME",),
}
_DLP_TO_CAT = {it: cat for cat, its in DLP_INFO_TYPES.items() for it in its}


def dlp_deidentify_request(project: str, text: str, categories: Iterable[str], location: str = "global") -> dict:
    """The DeidentifyContentRequest (as a dict) that replaces every finding with its info type."""
    info_types = [{"name": it} for c in CATEGORIES if c in set(categories) for it in DLP_INFO_TYPES[c]]
    return {
        "parent": f"projects/{project}/locations/{location}",
        "inspect_config": {"info_types": info_types, "min_likelihood": "POSSIBLE"},
        "deidentify_config": {"info_type_transformations": {"transformations": [
            {"info_types": info_types, "primitive_transformation": {"replace_with_info_type_config": {}}}]}},
        "item": {"value": text},
    }


_DLP_TOKEN = re.compile(r"\[?\b(" + "|".join(sorted(_DLP_TO_CAT, key=len, reverse=True)) + r")\b\]?")


def dlp_map_response(response: dict) -> tuple[str, dict[str, int]]:
    """A DeidentifyContentResponse (as a dict, e.g. `type(r).to_dict(r)`) -> (text with our tokens,
    count per category). Counts come from the transformation overview; the text's DLP info-type
    names ([EMAIL_ADDRESS] or EMAIL_ADDRESS) become our tokens ([EMAIL])."""
    text = response.get("item", {}).get("value", "")
    text = _DLP_TOKEN.sub(lambda m: TOKENS[_DLP_TO_CAT[m.group(1)]], text)
    counts: dict[str, int] = {}
    for summary in response.get("overview", {}).get("transformation_summaries", []):
        cat = _DLP_TO_CAT.get(summary.get("info_type", {}).get("name", ""))
        if cat is None:
            continue
        n = sum(int(r.get("count", 0)) for r in summary.get("results", [])
                if r.get("code", "SUCCESS") in ("SUCCESS", 1))
        if n:
            counts[cat] = counts.get(cat, 0) + n
    return text, counts


class DlpMasker:
    """Cloud DLP de-identification: DLP replaces the values itself (so no spans come back);
    `mask` calls `deidentify_content` once per text."""

    name = "dlp"

    def __init__(self, categories: Iterable[str] = CATEGORIES, project: str | None = None):
        try:
            from google.cloud import dlp_v2
        except ImportError as exc:
            raise PiiBackendUnavailable(
                "pii_backend 'dlp' needs google-cloud-dlp: pip install google-cloud-dlp") from exc
        import os

        self.categories = tuple(categories)
        self.project = project or os.environ.get("GOOGLE_CLOUD_PROJECT") or os.environ.get("FTPIPE_PROJECT")
        if not self.project:
            raise PiiBackendUnavailable("pii_backend 'dlp' needs a project: set GOOGLE_CLOUD_PROJECT")
        self._client = dlp_v2.DlpServiceClient()

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        response = self._client.deidentify_content(
            request=dlp_deidentify_request(self.project, text, self.categories))
        return dlp_map_response(type(response).to_dict(response))


# ------------------------------------------------------------------------------ the API


@lru_cache(maxsize=16)
def backend(name: str = "rules", categories: tuple[str, ...] = CATEGORIES):
    """The (cached, per process) detector or masker for a recipe's backend and categories; raises
    PiiBackendUnavailable when its packages are missing."""
    if name == "rules":
        return RulesDetector(categories)
    if name == "presidio":
        return PresidioDetector(categories)
    if name == "dlp":
        return DlpMasker(categories)
    raise ValueError(f"unknown pii_backend {name!r}; expected one of {BACKENDS}")


def mask(text: str, categories: Iterable[str] = CATEGORIES, backend_name: str = "rules") -> tuple[str, dict[str, int]]:
    """Replace PII of the given categories with tokens; return (masked text, count per category)."""
    cats = tuple(c for c in CATEGORIES if c in set(categories))
    if not cats or not text:
        return text, {}
    b = backend(backend_name, cats)
    if hasattr(b, "mask"):
        return b.mask(text)
    return apply_spans(text, resolve(b.detect(text)))


def mask_excerpt(raw: str, limit: int = 200) -> str:
    """The first `limit` characters of a raw row with every PII category masked (for rejected.jsonl).

    Masks a generous prefix before cutting, so that a value straddling the cut is not left half
    visible.
    """
    masked, _ = mask(raw[: limit * 10])
    return masked[:limit]


# ------------------------------------------------------------------------------ canary

# One seeded value per category, each in its usual context. Test data only (documentation ranges,
# published checksum examples).
CANARY_VALUES = {
    "email": ("Write to ", "canary.user@example.org"),
    "phone": (" or call ", "+61 412 345 678"),
    "card": (". Card ", "4111 1111 1111 1111"),
    "iban": (", IBAN ", "GB82 WEST 1234 5698 7654 32"),
    "ip": (", from ", "192.0.2.44"),
    "ssn": (". SSN ", "536-22-8726"),
    "tfn": (", TFN ", "123 456 782"),
    "abn": (", ABN ", "51 824 753 556"),
    "medicare": (", Medicare ", "2123 45670 1"),
    "dob": (". I was born on ", "14 March 1987"),
    "address": (" and live at ", "42 Wallaby Way"),
    "person": (". My name is ", "Olivia Bennett"),
}


def canary_document(categories: Iterable[str] = CATEGORIES) -> str:
    cats = set(categories)
    return "".join(pre + value for c, (pre, value) in CANARY_VALUES.items() if c in cats) + "."


def canary_missed(categories: Iterable[str] = CATEGORIES, backend_name: str = "rules") -> list[str]:
    """The enabled categories whose seeded canary value the backend does not fully mask with its own
    token (empty: the backend passes). Names categories only, never values."""
    cats = tuple(c for c in CATEGORIES if c in set(categories))
    if not cats:
        return []
    masked, counts = mask(canary_document(cats), cats, backend_name)
    return [c for c in cats
            if CANARY_VALUES[c][1] in masked or TOKENS[c] not in masked or not counts.get(c)]
