"""The evaluator's intervals (docs/evaluation-statistics.md).

Task scores: corpus metrics that can be recomputed on resampled examples, and the paired bootstrap
of their deltas (candidate - base on the same resampled test examples: Koehn 2004). Each metric
turns lm-eval's per-example items into a row of additive statistics once; a resample sums its rows
and recomputes the metric, so 1,000 resamples of corpus chrF cost milliseconds rather than 1,000
sacrebleu passes over the text.

Rates over probes (the same probes asked of both models): the Wilson score interval of a rate
(Wilson 1927), Newcombe's square-and-add interval of a paired difference (Newcombe 1998, "Improved
confidence intervals for the difference between binomial proportions based on paired data",
Statistics in Medicine 17:2635-2650, method 10), and the MOVER difference of two such differences
(Zou & Donner 2008, Statistics in Medicine 27:1693-1702) for a gap such as train minus held-out
extraction. Closed forms, exact to the published examples (tests), and no resampling noise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import norm


@dataclass(frozen=True)
class Statistic:
    rows: Callable[[list], np.ndarray]        # lm-eval items of the examples -> (examples, k) array
    value: Callable[[np.ndarray], float]      # rows of a (re)sample -> the metric


def _mean_rows(items: list) -> np.ndarray:
    return np.asarray(items, dtype=np.float64).reshape(-1, 1)


def _mean(rows: np.ndarray) -> float:
    return float(rows.mean())


def _chrf_rows(items: list) -> np.ndarray:
    from sacrebleu.metrics import CHRF

    # the segment statistics sacrebleu sums for corpus chrF (lm-eval's chrf aggregation: defaults)
    refs, preds = zip(*items, strict=True)
    return np.asarray(CHRF()._extract_corpus_statistics(list(preds), [list(refs)]), dtype=np.float64)


def _chrf(rows: np.ndarray) -> float:
    from sacrebleu.metrics import CHRF

    return float(CHRF()._compute_score_from_stats(rows.sum(axis=0).tolist()).score)


def _perplexity(rows: np.ndarray) -> float:
    # lm-eval's weighted_perplexity: exp(-sum log p / sum tokens)
    return math.exp(-rows[:, 0].sum() / rows[:, 1].sum())


def _macro_f1(rows: np.ndarray) -> float:
    """Mean F1 over the classes that occur among the golds or the predictions."""
    gold, pred = rows[:, 0].astype(int), rows[:, 1].astype(int)
    scores = []
    for label in np.union1d(gold, pred):
        tp = np.sum((gold == label) & (pred == label))
        denominator = np.sum(gold == label) + np.sum(pred == label)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


STATISTICS: dict[str, Statistic] = {
    "chrf": Statistic(_chrf_rows, _chrf),
    "exact_match": Statistic(_mean_rows, _mean),
    "perplexity": Statistic(lambda items: np.asarray(items, dtype=np.float64).reshape(-1, 2), _perplexity),
    "accuracy": Statistic(_mean_rows, _mean),
    "macro_f1": Statistic(lambda items: np.asarray(items, dtype=np.float64).reshape(-1, 2), _macro_f1),
    "preference_accuracy": Statistic(_mean_rows, _mean),
}


def macro_f1(items: list) -> float:
    """lm-eval aggregation: items are (gold, predicted) class indices."""
    return _macro_f1(STATISTICS["macro_f1"].rows(items))


@dataclass(frozen=True)
class Interval:
    delta: float
    low: float
    high: float

    def to_json(self) -> dict:
        return {"delta": self.delta, "low": self.low, "high": self.high}


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of `confidence` (1.96 at 0.95)."""
    return float(norm.ppf(1 - (1 - confidence) / 2))


def wilson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a rate: never outside [0, 1], and informative at 0 of n."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"a rate needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    z, p = z_score(confidence), successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired(reference: list[bool], candidate: list[bool], confidence: float) -> Interval:
    """The candidate's rate minus the reference's, on the same probes in the same order (Newcombe
    1998, method 10: Wilson intervals of both rates, combined with the phi correlation of the pairs)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"a paired difference needs the same probes on both sides ({len(reference)} vs "
                         f"{len(candidate)})")
    pairs = [(bool(r), bool(c)) for r, c in zip(reference, candidate, strict=True)]
    both = pairs.count((True, True))
    only_candidate = pairs.count((False, True))
    only_reference = pairs.count((True, False))
    n = len(pairs)
    neither = n - both - only_candidate - only_reference
    p1, p2 = (both + only_candidate) / n, (both + only_reference) / n
    l1, u1 = wilson(both + only_candidate, n, confidence)
    l2, u2 = wilson(both + only_reference, n, confidence)
    marginals = (both + only_candidate) * (only_reference + neither) * (both + only_reference) * (only_candidate + neither)
    cross = both * neither - only_candidate * only_reference
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(marginals) if marginals > 0 else 0.0
    delta = p1 - p2
    low = delta - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = delta + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Interval(delta, low, high)


def mover_difference(first: Interval, second: Interval) -> Interval:
    """An interval of first.delta - second.delta from the intervals of two independent estimates
    (MOVER, square-and-add: Zou & Donner 2008)."""
    delta = first.delta - second.delta
    low = delta - math.sqrt((first.delta - first.low) ** 2 + (second.high - second.delta) ** 2)
    high = delta + math.sqrt((first.high - first.delta) ** 2 + (second.delta - second.low) ** 2)
    return Interval(delta, low, high)


def needed_more(worse: Interval, allowed: float, n: int) -> int | None:
    """How many more probes (beyond `n`) would likely make a straddling comparison decide: the
    interval's half-width on the side that must clear `allowed` shrinks as 1/sqrt(n), assuming the
    point estimate and the per-probe variance hold (an approximation, said so in the report). `worse`
    is oriented so that larger is worse. None: the estimate sits on the tolerance, no n decides it."""
    gap = abs(worse.delta - allowed)
    if gap < 1e-12 or n <= 0:
        return None
    half = worse.delta - worse.low if worse.delta > allowed else worse.high - worse.delta
    return max(0, math.ceil(n * (half / gap) ** 2) - n)


def minimum_detectable_effect(sd_difference: float, n: int, confidence: float, power: float = 0.8) -> float:
    """The smallest true difference a paired comparison of `n` probes detects with `power`, at the
    two-sided `confidence`: (z + z_power) * sd / sqrt(n) (about 2.80 sd / sqrt(n) at 0.95 and 0.8)."""
    if n <= 0:
        return math.inf
    return (z_score(confidence) + float(norm.ppf(power))) * sd_difference / math.sqrt(n)


def paired_bootstrap(stat: Statistic, reference: list, candidate: list, *, iters: int, confidence: float,
                     seed: int = 0) -> Interval:
    """Percentile interval of value(candidate) - value(reference), both recomputed on the same
    examples drawn with replacement. `reference` and `candidate` are the items of the same
    examples in the same order."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"paired bootstrap needs the same examples on both sides ({len(reference)} vs {len(candidate)})")
    ref, cand = stat.rows(reference), stat.rows(candidate)
    delta = stat.value(cand) - stat.value(ref)
    if iters == 0:
        return Interval(delta, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    n = len(ref)
    draws = np.empty(iters)
    for i in range(iters):
        idx = rng.integers(0, n, n)
        draws[i] = stat.value(cand[idx]) - stat.value(ref[idx])
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return Interval(float(delta), float(low), float(high))
