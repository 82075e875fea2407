"""The promotion gate: the recipe's rules (over ftpipe's defaults for its task and probes) applied
to the scores of the base, the candidate and, when there is one, the production version. Pure
functions, no model in sight.

A rule fails when the candidate is worse than a compared model by more than its tolerance, or lies
outside its [min, max]. A failed `block` rule blocks promotion; a failed `warn` rule is reported.
A metric a rule names that was not measured fails that rule when the recipe named it, and is
reported as not measured when the rule is one of the defaults (its probe did not apply).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.domain.gate_rules import effective_rules
from shared.domain.metrics import higher_is_better
from shared.domain.recipe import GateRule, Recipe


@dataclass(frozen=True)
class Check:
    metric: str
    outcome: str          # passed | failed | warning | not_measured
    reason: str
    action: str           # block | warn


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)   # failures first, then warnings, then the rest
    checks: list[Check] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"passed": self.passed, "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def deltas(reference: dict[str, float], candidate: dict[str, float]) -> dict[str, float]:
    """candidate - reference for every metric both have."""
    return {k: candidate[k] - reference[k] for k in reference if k in candidate}


def fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100_000 else f"{value:.3g}"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + fmt(abs(value))


def _compare(name: str, higher: bool, rule: GateRule, side: str, ref: float, cand: float) -> str | None:
    """The reason the candidate is too far behind `side`, or None."""
    worse_by = (ref - cand) if higher else (cand - ref)
    allowed = rule.tolerance * abs(ref) if rule.relative and ref != 0 and not math.isinf(ref) else rule.tolerance
    if worse_by <= allowed + 1e-12:
        return None
    how = f"{rule.tolerance:.0%} of {side} = {fmt(allowed)}" if rule.relative else fmt(allowed)
    return (f"{name} {fmt(cand)} vs {side} {fmt(ref)} ({_signed(cand - ref)}; {'higher' if higher else 'lower'} is "
            f"better): worse by {fmt(worse_by)} > tolerance {how}")


def check(name: str, rule: GateRule, scores: dict[str, dict[str, float]], *, named: bool,
          higher: bool | None = None) -> Check:
    """One rule on the scores of every side ({"base": {...}, "candidate": {...}, "production": {...}})."""
    higher = higher_is_better(name) if higher is None else higher
    cand = scores.get("candidate", {}).get(name)
    if higher is None:
        return Check(name, "failed", f"{name}: unknown metric, its direction is not known", rule.action)
    if cand is None:
        outcome = "failed" if named else "not_measured"
        hint = " (set eval.probes to a probes file)" if name == "fact_rate" else ""
        return Check(name, outcome if rule.action == "block" or outcome == "not_measured" else "warning",
                     f"{name}: not measured for the candidate{hint}", rule.action)
    problems, notes = [], []
    if math.isnan(cand):
        problems.append(f"{name} is not a number")
    if rule.min is not None and not cand >= rule.min:
        problems.append(f"{name} {fmt(cand)} is below the minimum {fmt(rule.min)}")
    if rule.max is not None and not cand <= rule.max:
        problems.append(f"{name} {fmt(cand)} is above the maximum {fmt(rule.max)}")
    if rule.tolerance is not None:
        for side in rule.against:
            ref = scores.get(side, {}).get(name)
            if ref is None:
                notes.append(f"no {side} score to compare" if side != "production" or "production" in scores
                             else "no production version yet")
                continue
            if math.isnan(ref):
                problems.append(f"{name} of the {side} is not a number")
            elif (problem := _compare(name, higher, rule, side, ref, cand)) is not None:
                problems.append(problem)
            else:
                notes.append(f"vs {side} {fmt(ref)} ({_signed(cand - ref)})")
    if problems:
        outcome = "failed" if rule.action == "block" else "warning"
        return Check(name, outcome, "; ".join(problems) + (": FAILED" if outcome == "failed" else ": warning"),
                     rule.action)
    return Check(name, "passed", f"{name} {fmt(cand)} ok" + (f" ({'; '.join(notes)})" if notes else ""), rule.action)


def gate(recipe: Recipe, scores: dict[str, dict[str, float]], *,
         directions: dict[str, bool] | None = None) -> GateDecision:
    """Apply the recipe's effective rules. `directions` gives higher-is-better for metrics the
    catalogue does not know (standard lm-eval tasks report their own)."""
    directions = directions or {}
    checks = [check(name, rule, scores, named=named, higher=directions.get(name))
              for name, (rule, named) in effective_rules(recipe).items()]
    order = {"failed": 0, "warning": 1, "not_measured": 2, "passed": 3}
    checks.sort(key=lambda c: order[c.outcome])
    if not checks:   # refused at submission too (shared/domain/jobs.py): an empty gate proves nothing
        return GateDecision(passed=False, reasons=["no gate rules: a gate that checks nothing is refused, not "
                                                   "passed; set eval.gate or leave the defaults on"])
    passed = not any(c.outcome == "failed" for c in checks)
    reasons = [c.reason for c in checks]
    return GateDecision(passed=passed, reasons=reasons, checks=checks)
