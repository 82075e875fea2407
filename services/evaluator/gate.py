"""The promotion gate: the recipe's rules (over ftpipe's defaults for its task and probes) applied
to the scores of the base, the candidate and, when there is one, the production version. Pure
functions, no model in sight.

A rule compares the candidate with each side it names on the evidence: where the comparison has a
paired interval of the candidate's difference (services/evaluator/evidence.py, stats.py), the rule
fails only when the whole interval is worse than the tolerance allows (a significant regression at
`eval.confidence`), passes when the whole interval is within it, and is `inconclusive` when the
interval straddles the tolerance: the sample cannot tell, and the report says how many more probes
would decide. A tolerance of 0 means "no significant increase". Without an interval (bounds, a
metric measured on one side only, `eval.bootstrap_iters: 0`) the point values decide, as before.
A failed `block` rule blocks promotion; an inconclusive one is treated per `eval.on_inconclusive`
(`warn`: reported, the gate passes; `hold`: the version is held, neither promoted nor quarantined;
`evaluate_more`: services/evaluator/evaluation.py scores more probes first, then holds);
a `warn` rule is only reported. A metric a rule names that was not measured fails that rule when the
recipe named it, and is reported as not measured when the rule is one of the defaults (its probe
did not apply).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from shared.domain.gate_rules import effective_rules
from shared.domain.metrics import higher_is_better
from shared.domain.recipe import GateRule, Recipe

from services.evaluator.stats import Interval, needed_more


@dataclass(frozen=True)
class Check:
    metric: str
    outcome: str          # passed | failed | inconclusive | warning | not_measured
    reason: str
    action: str           # block | warn
    evidence: str = "point"   # interval: decided on the paired interval of every side it compared


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)   # failures first, then the inconclusive, warnings, the rest
    checks: list[Check] = field(default_factory=list)
    outcome: str = "passed"   # passed | failed | inconclusive (a block rule the evidence could not decide)
    held: bool = False        # inconclusive under eval.on_inconclusive: hold (the registry holds the version)
    # failed on evidence: every failed block rule was a significant regression on its intervals. A
    # failure on point values (no interval) is not, and its quarantine stays re-evaluable.
    conclusive: bool = False

    def to_json(self) -> dict:
        return {"passed": self.passed, "outcome": self.outcome, "held": self.held, "conclusive": self.conclusive,
                "reasons": self.reasons, "checks": [asdict(c) for c in self.checks]}


def headline(decision: dict) -> str:
    """PASSED, FAILED, HELD (inconclusive) or PASSED (inconclusive), from GateDecision.to_json()."""
    if decision.get("held"):
        return "HELD (inconclusive: not promoted, not quarantined)"
    if decision.get("passed"):
        return "PASSED" + (" (inconclusive rules reported)" if decision.get("outcome") == "inconclusive" else "")
    return "FAILED"


def deltas(reference: dict[str, float], candidate: dict[str, float]) -> dict[str, float]:
    """candidate - reference for every metric both have."""
    return {k: candidate[k] - reference[k] for k in reference if k in candidate}


def fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100_000 else f"{value:.3g}"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "-") + fmt(abs(value))


def _compare(name: str, higher: bool, rule: GateRule, side: str, ref: float, cand: float,
             evidence: dict | None) -> tuple[str, str, bool] | None:
    """(outcome failed | inconclusive, the reason, decided on an interval) when the candidate is, or
    may be, too far behind `side`; None when it is within the tolerance. `evidence`: the paired interval of the candidate's
    delta against `side` ({delta, low, high, n, method}), or None to decide on the point values."""
    worse_by = (ref - cand) if higher else (cand - ref)
    allowed = rule.tolerance * abs(ref) if rule.relative and ref != 0 and not math.isinf(ref) else rule.tolerance
    how = f"{rule.tolerance:.0%} of {side} = {fmt(allowed)}" if rule.relative else fmt(allowed)
    versus = (f"{name} {fmt(cand)} vs {side} {fmt(ref)} ({_signed(cand - ref)}; {'higher' if higher else 'lower'} "
              f"is better)")
    usable = evidence is not None and not (math.isnan(evidence["low"]) or math.isnan(evidence["high"]))
    if not usable:
        if worse_by <= allowed + 1e-12:
            return None
        return "failed", f"{versus}: worse by {fmt(worse_by)} > tolerance {how}", False
    assert evidence is not None
    # the interval of how much worse the candidate is (the delta's, turned where higher is better)
    low, high = (-evidence["high"], -evidence["low"]) if higher else (evidence["low"], evidence["high"])
    interval = f"worse by {fmt(worse_by)}, {evidence.get('method', 'paired')} interval [{fmt(low)}, {fmt(high)}]"
    if low > allowed + 1e-12:
        return "failed", f"{versus}: {interval} wholly beyond tolerance {how}", True
    if high <= allowed + 1e-12 or allowed <= 0:   # tolerance 0: only a significant increase fails
        return None
    n = int(evidence.get("n") or 0)
    more = needed_more(Interval(worse_by, low, high), allowed, n)
    decide = ("no number of probes would decide it (the estimate sits on the tolerance)" if more is None
              else f"about {more} more probes would decide it")
    return "inconclusive", f"{versus}: {interval} straddles tolerance {how} on {n} probes; {decide}", True


def check(name: str, rule: GateRule, scores: dict[str, dict[str, float]], *, named: bool,
          higher: bool | None = None, evidence: dict[str, dict] | None = None) -> Check:
    """One rule on the scores of every side ({"base": {...}, "candidate": {...}, "production": {...}}),
    on the evidence where there is some (`evidence`: side -> the paired interval of the candidate's delta)."""
    higher = higher_is_better(name) if higher is None else higher
    cand = scores.get("candidate", {}).get(name)
    if higher is None:
        return Check(name, "failed", f"{name}: unknown metric, its direction is not known", rule.action)
    if cand is None:
        outcome = "failed" if named else "not_measured"
        hint = " (set eval.probes to a probes file)" if name == "fact_rate" else ""
        return Check(name, outcome if rule.action == "block" or outcome == "not_measured" else "warning",
                     f"{name}: not measured for the candidate{hint}", rule.action)
    problems, doubts, notes = [], [], []
    on_points = False   # a failure the intervals did not establish (bounds, no interval, not a number)
    if math.isnan(cand):
        problems.append(f"{name} is not a number")
    if rule.min is not None and not cand >= rule.min:
        problems.append(f"{name} {fmt(cand)} is below the minimum {fmt(rule.min)}")
    if rule.max is not None and not cand <= rule.max:
        problems.append(f"{name} {fmt(cand)} is above the maximum {fmt(rule.max)}")
    on_points = bool(problems)
    if rule.tolerance is not None:
        for side in rule.against:
            ref = scores.get(side, {}).get(name)
            if ref is None:
                notes.append(f"no {side} score to compare" if side != "production" or "production" in scores
                             else "no production version yet")
                continue
            if math.isnan(ref):
                problems.append(f"{name} of the {side} is not a number")
                on_points = True
            elif (found := _compare(name, higher, rule, side, ref, cand, (evidence or {}).get(side))) is not None:
                (problems if found[0] == "failed" else doubts).append(found[1])
                on_points = on_points or (found[0] == "failed" and not found[2])
            else:
                notes.append(f"vs {side} {fmt(ref)} ({_signed(cand - ref)})")
    if problems or doubts:
        outcome = ("failed" if problems else "inconclusive") if rule.action == "block" else "warning"
        suffix = {"failed": ": FAILED", "inconclusive": ": INCONCLUSIVE", "warning": ": warning"}[outcome]
        return Check(name, outcome, "; ".join(problems + doubts) + suffix, rule.action,
                     "point" if on_points else "interval")
    return Check(name, "passed", f"{name} {fmt(cand)} ok" + (f" ({'; '.join(notes)})" if notes else ""), rule.action)


def gate(recipe: Recipe, scores: dict[str, dict[str, float]], *, directions: dict[str, bool] | None = None,
         intervals: dict[str, dict[str, dict]] | None = None) -> GateDecision:
    """Apply the recipe's effective rules. `directions` gives higher-is-better for metrics the
    catalogue does not know (standard lm-eval tasks report their own); `intervals` ("vs_base" /
    "vs_production" -> metric -> interval, services/evaluator/evaluation.py) the evidence."""
    directions, intervals = directions or {}, intervals or {}
    checks = [check(name, rule, scores, named=named, higher=directions.get(name),
                    evidence={key.removeprefix("vs_"): by_metric[name] for key, by_metric in intervals.items()
                              if name in by_metric})
              for name, (rule, named) in effective_rules(recipe).items()]
    order = {"failed": 0, "inconclusive": 1, "warning": 2, "not_measured": 3, "passed": 4}
    checks.sort(key=lambda c: order[c.outcome])
    if not checks:   # refused at submission too (shared/domain/jobs.py): an empty gate proves nothing
        return GateDecision(passed=False, outcome="failed", reasons=[
            "no gate rules: a gate that checks nothing is refused, not passed; set eval.gate or leave the defaults on"])
    outcomes = {c.outcome for c in checks}
    outcome = "failed" if "failed" in outcomes else "inconclusive" if "inconclusive" in outcomes else "passed"
    # evaluate_more has run its rounds by the time its last gate is applied: what is left is held
    held = outcome == "inconclusive" and recipe.eval.on_inconclusive in ("hold", "evaluate_more")
    conclusive = outcome == "failed" and all(c.evidence == "interval" for c in checks if c.outcome == "failed")
    return GateDecision(passed=outcome == "passed" or (outcome == "inconclusive" and not held), outcome=outcome,
                        held=held, conclusive=conclusive, reasons=[c.reason for c in checks], checks=checks)
