"""Heuristic quality filters for chat / instruction rows (Gopher, C4, FineWeb style, adapted).

Web-page heuristics assume long documents; chat rows are short, and a one-word answer ("Bonjour",
"Yes.") is often right. So the length and repetition rules look at the assistant turns (what the
model learns to write), the repetition rules only judge texts long enough to repeat themselves,
and language identification skips texts too short to identify.

Each rule has a name (recipe `quality.rules`) and thresholds (recipe `quality.*`):

    empty_answer      an assistant turn with no word character at all
    short_answer      final answer shorter than min_answer_words words
    long_answer       final answer longer than max_answer_words words
    truncated_answer  final answer of >= truncated_min_words words not ending in terminal punctuation
    symbol_ratio      ('#' runs + '...' + '…') per word of the conversation > max_symbol_ratio (Gopher;
                      Markdown headings and order numbers such as "#842654" are not counted)
    digit_ratio       digits / non-space characters of the conversation > max_digit_ratio
    duplicate_lines   share of repeated non-empty lines in the answers > max_duplicate_line_fraction
                      (answers of 4 lines or more; Gopher)
    repeated_ngrams   characters covered by the most frequent repeated n-gram / word characters of
                      the answers > max_top_ngram_fraction (answers of ngram_min_words or more; Gopher)
    boilerplate       lorem ipsum, "as an AI language model", "click here", cookie / JavaScript notices
                      ... in an answer (C4)
    non_printable     control / unassigned / private-use characters or U+FFFD share > max_non_printable_ratio
    language          py3langid (offline model shipped in the wheel) names a language outside
                      `languages` with probability >= min_language_confidence (the conversation
                      without code blocks / spans, when it has language_min_words words or more)
    toxicity          lexicon hits per word of the answers > max_toxicity (off by default; the small
                      lexicon below, no downloads)

`check(messages, rules)` returns the names of every rule a row trips (a row can trip several).
Standard library + py3langid only (imported lazily, once per worker).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.preprocess import formats

_WORD = re.compile(r"\w+", re.UNICODE)
_TERMINAL = tuple(".!?…。！？\"'”’»)]}`*:;>|")
# Phrases looked for in the case-folded answer (substring tests: 5x faster than one IGNORECASE regex)
BOILERPLATE = ("lorem ipsum", "dolor sit amet", "as an ai language model", "as a large language model",
               "i am an ai language model", "click here", "enable javascript", "javascript is disabled", "javascript is required",
               "this site uses cookies", "this website uses cookies", "we use cookies", "accept cookies",
               "accept all cookies", "cookie policy", "cookie settings", "terms of use apply",
               "terms of service apply", "all rights reserved", "subscribe to our newsletter")
# py3langid reads at most this many characters of a row, as equal heads of its turns (so that an
# answer in another language than its question still counts): its byte n-gram features settle well
# before that, and its cost is linear in the length (it was ~half of this stage's time)
LANGID_CHARS = 300
_ALLOWED_CONTROL = {"\n", "\t", "\r"}

# A deliberately small offline lexicon (profanity and insults aimed at people); hits are counted
# on whole lower-cased words. Extend through a custom build if a domain needs more.
TOXIC_LEXICON = frozenset("""
idiot idiots idiotic moron morons moronic stupid imbecile cretin dumbass jackass asshole assholes
bastard bastards bitch bitches bullshit crap damn dammit fuck fucked fucker fuckers fucking fuck-off
motherfucker shit shitty shithead piss pissed prick dick dickhead cunt twat wanker bollocks douche
douchebag scumbag loser losers retard retarded worthless pathetic disgusting hate hateful kill
screw screwed suck sucks stfu gtfo wtf jerk slut whore
""".split())


@dataclass(frozen=True)
class Rules:
    """The recipe's quality section as the workers need it (small and picklable)."""

    rules: tuple[str, ...] = ("empty_answer", "short_answer", "long_answer", "truncated_answer",
                              "symbol_ratio", "digit_ratio", "duplicate_lines", "repeated_ngrams",
                              "boilerplate", "non_printable", "language")
    min_answer_words: int = 1
    max_answer_words: int = 4000
    truncated_min_words: int = 30
    max_symbol_ratio: float = 0.1
    max_digit_ratio: float = 0.6
    max_duplicate_line_fraction: float = 0.3
    repeated_ngram_n: int = 2
    max_top_ngram_fraction: float = 0.2
    ngram_min_words: int = 20
    max_non_printable_ratio: float = 0.01
    languages: tuple[str, ...] = ("en",)
    min_language_confidence: float = 0.8
    language_min_words: int = 6
    max_toxicity: float = 0.05

    @classmethod
    def from_spec(cls, spec) -> "Rules":
        d = spec.model_dump()
        d.pop("enabled", None)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------ measures


def words(text: str) -> list[str]:
    return _WORD.findall(text)


_HASH_RUN = re.compile(r"(?<!^)(?<!#)#+(?![#\d])", re.MULTILINE)  # not headings, not "#842654"
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


def symbol_ratio(text: str, n_words: int) -> float:
    """Gopher's symbol-to-word ratio: runs of '#' (not a Markdown heading at the start of a line)
    and ellipses, per word."""
    symbols = len(_HASH_RUN.findall(text)) + text.count("...") + text.count("…")
    return symbols / max(n_words, 1)


_DIGIT = re.compile(r"\d")


def digit_ratio(text: str) -> float:
    """Digits over non-space characters (str.split and re's \\s agree on what is a space)."""
    return (len(text) - len(_DIGIT.sub("", text))) / max(len("".join(text.split())), 1)


def duplicate_line_fraction(text: str) -> tuple[float, int]:
    lines = [ln.strip().lower() for ln in text.splitlines() if ln.strip()]
    seen: set[str] = set()
    dup = 0
    for ln in lines:
        if ln in seen:
            dup += 1
        seen.add(ln)
    return dup / max(len(lines), 1), len(lines)


def top_ngram_fraction(ws: list[str], n: int) -> float:
    """Gopher: characters in the occurrences of the most frequent n-gram (seen twice or more) over
    the characters of all words."""
    if len(ws) < n:
        return 0.0
    ws = [w.lower() for w in ws]
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return sum(len(w) for w in gram) * count / max(sum(len(w) for w in ws), 1)


def non_printable_ratio(text: str) -> float:
    if text.replace("\n", " ").replace("\t", " ").replace("\r", " ").isprintable():
        return 0.0  # the common case, in C; isprintable() is stricter than the rule below
    bad = sum(
        1 for c in text
        if c == "\ufffd" or (c not in _ALLOWED_CONTROL and unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn"))
    )
    return bad / max(len(text), 1)


def toxicity(ws: list[str]) -> float:
    hits = sum(1 for w in ws if w.lower() in TOXIC_LEXICON)
    return hits / max(len(ws), 1)


_identifier = None


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid's bundled model (loaded once per process)."""
    global _identifier
    if _identifier is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _identifier.classify(text)
    return lang, float(prob)


# ------------------------------------------------------------------ the check


def check(segments: Iterable[tuple[str, str]], rules: Rules) -> tuple[str, ...]:
    """Names of the enabled rules a row trips, in `rules.rules` order (segments: see formats).

    Chat rows are judged on their answers (assistant turns) and the whole conversation. Preference
    rows on their prompt and chosen answer: the rejected answer may be poor by design. Classification
    rows have no answer: their text stands in for it and the answer-length rules do not apply.
    """
    kept = [(r, c) for r, c in formats.text_segments(segments) if r not in ("system", "rejected")]
    enabled = set(rules.rules)
    if formats.kind_of(segments) == "classification":
        enabled -= {"empty_answer", "short_answer", "long_answer", "truncated_answer"}
        is_answer = [True] * len(kept)
    else:
        is_answer = [r in ("assistant", "chosen") for r, _ in kept]
    kept_words = [words(c) for _, c in kept]  # once per turn: the joined texts' words are their concatenation
    answers = [c for (_, c), a in zip(kept, is_answer, strict=True) if a]
    answer_words = [w for ws, a in zip(kept_words, is_answer, strict=True) if a for w in ws]
    final = answers[-1] if answers else ""
    final_words = next((ws for ws, a in zip(reversed(kept_words), reversed(is_answer), strict=True) if a), [])
    answer_text = "\n".join(answers)
    convo = "\n".join(c for _, c in kept)
    convo_words = [w for ws in kept_words for w in ws]
    tripped: list[str] = []

    def trip(name: str, condition) -> None:
        if name in enabled and condition():
            tripped.append(name)

    trip("empty_answer", lambda: not answers or any(a and not ws for ws, a in zip(kept_words, is_answer, strict=True)))
    trip("short_answer", lambda: 0 < len(final_words) < rules.min_answer_words)
    trip("long_answer", lambda: len(final_words) > rules.max_answer_words)
    trip("truncated_answer", lambda: len(final_words) >= rules.truncated_min_words
         and not final.rstrip().endswith(_TERMINAL))
    trip("symbol_ratio", lambda: symbol_ratio(convo, len(convo_words)) > rules.max_symbol_ratio)
    trip("digit_ratio", lambda: digit_ratio(convo) > rules.max_digit_ratio)

    def dup_lines() -> bool:
        frac, n = duplicate_line_fraction(answer_text)
        return n >= 4 and frac > rules.max_duplicate_line_fraction

    trip("duplicate_lines", dup_lines)
    trip("repeated_ngrams", lambda: len(answer_words) >= rules.ngram_min_words
         and top_ngram_fraction(answer_words, rules.repeated_ngram_n) > rules.max_top_ngram_fraction)
    trip("boilerplate", lambda: any(p in a for a in (answer.casefold() for answer in answers) for p in BOILERPLATE))
    trip("non_printable", lambda: non_printable_ratio(convo) > rules.max_non_printable_ratio)

    def other_language() -> bool:
        turns = [_CODE.sub(" ", c) for _, c in kept]  # code blocks and spans say nothing of the language
        if sum(len(words(t)) for t in turns) < rules.language_min_words:
            return False
        head = LANGID_CHARS // max(len(turns), 1)
        lang, prob = identify_language("\n".join(t[:head] for t in turns))
        return lang not in rules.languages and prob >= rules.min_language_confidence

    trip("language", other_language)
    trip("toxicity", lambda: toxicity(answer_words) > rules.max_toxicity)
    return tuple(tripped)


# ------------------------------------------------------------------ Spark helpers (per partition)


def tag_partition(pairs: Iterable[tuple], rules: Rules) -> Iterator[tuple]:
    """(hash, (line, messages)) -> ((hash, (line, messages)), tripped rule names)."""
    for rec in pairs:
        yield rec, check(rec[1][1], rules)


def summarise(tagged: Iterable[tuple]) -> Iterator[dict]:
    counts: dict[str, int] = {}
    removed = checked = 0
    for _, tripped in tagged:
        checked += 1
        if tripped:
            removed += 1
            for name in tripped:
                counts[name] = counts.get(name, 0) + 1
    yield {"checked": checked, "removed": removed, "rules": counts}


def merge(parts: Iterable[dict]) -> dict:
    total: dict = {"checked": 0, "removed": 0, "rules": {}}
    for part in parts:
        total["checked"] += part["checked"]
        total["removed"] += part["removed"]
        for k, v in part["rules"].items():
            total["rules"][k] = total["rules"].get(k, 0) + v
    return total
