"""Corpus metrics that can be recomputed on resampled examples, and the paired bootstrap of their
deltas (candidate - base on the same resampled test examples: Koehn 2004).

Each metric turns lm-eval's per-example items into a row of additive statistics once; a resample
sums its rows and recomputes the metric, so 1,000 resamples of corpus chrF cost milliseconds
rather than 1,000 sacrebleu passes over the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


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
