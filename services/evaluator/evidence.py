"""Intervals for the rates the probes measure, paired probe by probe between the candidate and each
other side (base, production), as the task scores' paired bootstrap is (services/evaluator/stats.py,
docs/evaluation-statistics.md).

A rate over probes (refusals, harmful answers, instruction following, honesty, knowledge facts,
extraction, PII leaks, label flips) gets Newcombe's paired interval of its difference; extraction_gap the
MOVER difference of the train and held-out ones; the fairness disparities (per template and axis, a spread and its
control spread) the paired bootstrap of their ratio of sums. Pairs are matched by each probe's key, never by position: where the two
sides did not answer the same probes (a production version evaluated on another probe set), the
metric gets no interval rather than a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from shared.domain.recipe import Recipe

from services.evaluator.fairness import relative_disparity
from services.evaluator.safety import BENIGN
from services.evaluator.stats import Interval, Statistic, mover_difference, newcombe_paired, paired_bootstrap


@dataclass(frozen=True)
class Rate:
    """A metric that is the share of a suite's probes with `outcome` true, over the probes `keep` selects."""
    suite: str
    outcome: str
    keep: Callable[[dict], bool] = lambda d: True


def probe_key(suite: str, detail: dict) -> str:
    """What names a probe within its suite's details: the same probe on every side has the same key."""
    if suite == "knowledge":
        return detail["question"]
    if suite == "memorisation":
        return f"{detail['split']}:{detail['id']}"
    if suite == "pii_leakage":
        return detail["key"]
    if suite == "fairness":
        return f"{detail['axis']}:{detail['template']}"
    return str(detail["id"])


RATES: dict[str, Rate] = {
    "refusal_rate": Rate("safety", "refused", lambda d: d["category"] != BENIGN),
    "over_refusal_rate": Rate("safety", "refused", lambda d: d["category"] == BENIGN),
    "harmful_rate": Rate("safety", "harmful", lambda d: d["category"] != BENIGN),
    "instruction_following_rate": Rate("alignment", "passed", lambda d: d["kind"] == "instruction"),
    "honesty_rate": Rate("alignment", "passed", lambda d: d["kind"] == "honesty"),
    "fact_rate": Rate("knowledge", "passed"),
    "extraction_rate_train": Rate("memorisation", "extracted", lambda d: d["split"] == "train"),
    "extraction_rate_heldout": Rate("memorisation", "extracted", lambda d: d["split"] == "heldout"),
    "pii_leak_rate": Rate("pii_leakage", "leaked"),
    "fairness_flip_rate": Rate("fairness", "flipped"),
}
# fairness.relative_disparity over (spread, control spread) rows, recomputed on each resample
_RELATIVE_DISPARITY = Statistic(lambda items: np.asarray(items, dtype=np.float64).reshape(-1, 2),
                                lambda rows: relative_disparity(rows[:, 0].sum(), rows[:, 1].sum()))


def _rate(metric: str) -> Rate | None:
    if metric in RATES:
        return RATES[metric]
    if metric.startswith("refusal_rate_"):   # per harm category
        category = metric.removeprefix("refusal_rate_")
        return Rate("safety", "refused", lambda d: d["category"] == category)
    if metric.startswith("fairness_flip_rate_"):
        axis = metric.removeprefix("fairness_flip_rate_")
        return Rate("fairness", "flipped", lambda d: d["axis"] == axis)
    return None


def _paired(suite: str, reference: list[dict], candidate: list[dict], keep: Callable[[dict], bool],
            value: Callable[[dict], object]) -> tuple[list, list] | None:
    """The values of the probes both sides answered, in one order; None when the probe sets differ."""
    ref = {probe_key(suite, d): value(d) for d in reference if keep(d)}
    cand = {probe_key(suite, d): value(d) for d in candidate if keep(d)}
    if not cand or set(ref) != set(cand):
        return None
    keys = sorted(cand)
    return [ref[k] for k in keys], [cand[k] for k in keys]


def _as_json(interval: Interval, method: str, n: int) -> dict:
    return {**interval.to_json(), "method": method, "n": n}


def probe_intervals(recipe: Recipe, reference: dict[str, list[dict]], candidate: dict[str, list[dict]],
                    metrics: list[str]) -> dict[str, dict]:
    """metric -> {delta, low, high, method, n}: the candidate's difference from the reference (per-suite
    probe details of each side, as services/evaluator/suites.py keeps them) for every metric in
    `metrics` that the probes measure on both sides."""
    confidence, out = recipe.eval.confidence, {}
    for metric in metrics:
        rate = _rate(metric)
        if rate is None or rate.suite not in reference or rate.suite not in candidate:
            continue
        pairs = _paired(rate.suite, reference[rate.suite], candidate[rate.suite], rate.keep,
                        lambda d, field=rate.outcome: bool(d[field]))
        if pairs is not None:
            out[metric] = _as_json(newcombe_paired(*pairs, confidence), "newcombe-paired", len(pairs[0]))
    if "extraction_rate_train" in out and "extraction_rate_heldout" in out and "extraction_gap" in metrics:
        train, heldout = (out[m] for m in ("extraction_rate_train", "extraction_rate_heldout"))
        gap = mover_difference(Interval(train["delta"], train["low"], train["high"]),
                               Interval(heldout["delta"], heldout["low"], heldout["high"]))
        out["extraction_gap"] = _as_json(gap, "mover", min(train["n"], heldout["n"]))
    for metric in metrics:
        if not metric.startswith("fairness_disparity") or "fairness" not in candidate or "fairness" not in reference:
            continue
        axis = metric.removeprefix("fairness_disparity").removeprefix("_")
        pairs = _paired("fairness", reference["fairness"], candidate["fairness"],
                        lambda d, axis=axis: not axis or d["axis"] == axis,
                        lambda d: (float(d["disparity"]), float(d["control"])))
        if pairs is not None:
            interval = paired_bootstrap(_RELATIVE_DISPARITY, *pairs, iters=recipe.eval.bootstrap_iters,
                                        confidence=confidence)
            out[metric] = _as_json(interval, "paired-bootstrap", len(pairs[0]))
    return out


def suite_of(metric: str) -> str | None:
    """The probe suite that measures `metric` (services/evaluator/suites.py), or None for the task
    scores and standard lm-eval tasks."""
    if (rate := _rate(metric)) is not None:
        return rate.suite
    if metric == "extraction_gap":
        return "memorisation"
    if metric == "pii_leak_rate":
        return "pii_leakage"
    if metric.startswith("fairness_"):
        return "fairness"
    return "canaries" if metric.startswith("canary_") else None
