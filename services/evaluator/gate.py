"""The promotion gate: a candidate may not be worse than its base model by more than a tolerance
on any gated metric. Pure functions, no model in sight."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# metric -> True when higher is better
HIGHER_IS_BETTER: dict[str, bool] = {
    "chrf": True,
    "exact_match": True,
    "fact_rate": True,
    "perplexity": False,
}


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per metric, gated ones first


def deltas(base: dict[str, float], candidate: dict[str, float]) -> dict[str, float]:
    """candidate - base for every metric both have."""
    return {k: candidate[k] - base[k] for k in base if k in candidate}


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100_000 else f"{value:.3g}"


def _fmt_delta(value: float) -> str:
    return ("+" if value >= 0 else "-") + _fmt(abs(value))


def _describe(name: str, base: float, candidate: float) -> str:
    return f"{name} {_fmt(candidate)} vs base {_fmt(base)}: {_fmt_delta(candidate - base)}"


def check_metric(name: str, base: float, candidate: float, *, tolerance: float,
                 relative: bool = True) -> tuple[bool, str]:
    """(ok, reason) for one metric. The candidate is "worse" by (base - candidate) when higher is
    better and by (candidate - base) when lower is better; it fails when that exceeds the
    tolerance: a fraction of |base| when ``relative`` (0.02 = 2 %), else absolute units."""
    higher = HIGHER_IS_BETTER[name]
    if math.isnan(base) or math.isnan(candidate):
        return False, f"{name} {_fmt(candidate)} vs base {_fmt(base)}: not a number (FAILED)"
    worse_by = (base - candidate) if higher else (candidate - base)
    if relative and base != 0 and not math.isinf(base):
        allowed = tolerance * abs(base)
        allowed_txt = f"{tolerance:.0%} of base = {_fmt(allowed)}"
    else:
        allowed = tolerance
        allowed_txt = _fmt(tolerance)
    if worse_by <= allowed + 1e-12:
        return True, f"{_describe(name, base, candidate)} (ok)"
    direction = "higher" if higher else "lower"
    return False, (f"{_describe(name, base, candidate)} ({direction} is better; worse by "
                   f"{_fmt(worse_by)} > tolerance {allowed_txt}: FAILED)")


def gate(base: dict[str, float], candidate: dict[str, float], *, gate_metrics, tolerance: float,
         relative: bool = True) -> GateDecision:
    """Decide pass/fail from the gated metrics; every other metric both sides have is reported
    as information. A gated metric that was not measured (unknown name, or fact_rate without
    probes) fails the gate with a reason saying so."""
    reasons: list[str] = []
    passed = True
    gated = list(dict.fromkeys(gate_metrics))
    if not gated:
        reasons.append("no gate metrics configured (eval.gate_metrics is empty): passed by default")
    for name in gated:
        if name not in HIGHER_IS_BETTER:
            passed = False
            reasons.append(f"{name}: unknown gate metric (known: {', '.join(sorted(HIGHER_IS_BETTER))}): FAILED")
            continue
        if name not in base or name not in candidate:
            passed = False
            hint = " (set eval.probes to a probes file)" if name == "fact_rate" else ""
            reasons.append(f"{name}: not measured for {'base' if name not in base else 'candidate'}{hint}: FAILED")
            continue
        ok, reason = check_metric(name, base[name], candidate[name], tolerance=tolerance, relative=relative)
        passed = passed and ok
        reasons.append(reason)
    for name in HIGHER_IS_BETTER:
        if name not in gated and name in base and name in candidate:
            reasons.append(f"{_describe(name, base[name], candidate[name])} (informational)")
    return GateDecision(passed=passed, reasons=reasons)
