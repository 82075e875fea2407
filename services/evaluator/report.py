"""The human-readable evaluation report (report.md, stored with the run next to report.json)."""
from __future__ import annotations

import math

from shared.domain.metrics import higher_is_better
from shared.domain.recipe import Recipe

from services.evaluator.gate import fmt, headline
from services.evaluator.judge import render as render_judge
from services.evaluator.memorisation import by_source

_EXAMPLES = 3
_ICON = {"failed": "FAILED", "inconclusive": "inconclusive", "warning": "warning", "not_measured": "not measured",
         "passed": "ok"}


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _interval(entry: dict | None) -> str:
    if not entry or math.isnan(entry["low"]):
        return ""
    return f" [{fmt(entry['low'])}, {fmt(entry['high'])}]"


def render_report(recipe: Recipe, result) -> str:
    spec = recipe.eval
    sides = list(result.scores)
    lines = [f"## Evaluation: {recipe.model_name} (recipe {recipe.name} v{recipe.version}) vs base `{recipe.base_model}`",
             "", f"**Gate: {headline(result.gate)}**", "",
             "| rule | outcome | reason |", "|---|---|---|"]
    for check in result.gate["checks"]:
        lines.append(f"| {check['metric']} ({check['action']}) | {_ICON[check['outcome']]} | {check['reason']} |")
    header = " | ".join(sides)
    cmp = [k for k in result.intervals]
    per_look = f", {1 + spec.more_rounds} looks (evaluate_more)" if spec.on_inconclusive == "evaluate_more" else ""
    lines += ["", f"### Scores ({result.confidence * 100:.4g}% paired intervals{per_look} of the candidate's delta: task scores "
              f"by paired bootstrap ({spec.bootstrap_iters} resamples), rates over probes by Newcombe's paired "
              "method)", "",
              f"| metric | {header} | " + " | ".join(f"delta {k.replace('_', ' ')}" for k in cmp) + " |",
              "|---|" + "---:|" * (len(sides) + len(cmp))]
    metrics = [m for m in result.scores["candidate"]] + [m for m in result.scores["base"]
                                                           if m not in result.scores["candidate"]]
    for name in metrics:
        higher = higher_is_better(name)
        arrow = "" if higher is None else (" ↑" if higher else " ↓")
        values = " | ".join(fmt(result.scores[s][name]) if name in result.scores[s] else "—" for s in sides)
        diffs = []
        for key in cmp:
            other = key.removeprefix("vs_")
            if name in result.scores[other] and name in result.scores["candidate"]:
                delta = result.scores["candidate"][name] - result.scores[other][name]
                diffs.append(("+" if delta >= 0 else "-") + fmt(abs(delta)) + _interval(result.intervals[key].get(name)))
            else:
                diffs.append("—")
        lines.append(f"| {name}{arrow} | {values} | " + " | ".join(diffs) + " |")
    if result.skipped:
        lines += ["", "### Not measured", "", *[f"- {s}" for s in result.skipped]]
    for number, round_ in enumerate(result.rounds, start=1):
        grown = ", ".join(f"{suite} {was} → {now} probes" for suite, (was, now) in round_["probes"].items())
        lines += [*([""] if number == 1 else []), f"- evaluate_more round {number}: {grown}; gate {round_['outcome']}"]
    if result.cached:
        lines += ["", f"Base results read from the evaluation cache: {', '.join(result.cached)}."]
    lines += ["", _summaries(result), "", *render_judge(result.judge)]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    lines += ["", f"{result.examples} of {result.available} test rows; greedy decoding up to {spec.max_new_tokens} "
              f"new tokens; every side scored in {result.dtype}; {result.seconds:.1f}s ({phases})."]
    if result.samples:
        lines += ["", "### Examples", ""]
        for sample in result.samples[:_EXAMPLES]:
            lines += [f"**{sample['id']}** — user: {_clip(sample['question'])}", "",
                      f"- reference: {_clip(sample['reference'])}",
                      *[f"- {side}: {_clip(sample.get(side, '')) or '(empty)'}" for side in sides], ""]
    return "\n".join(line for line in lines if line is not None).rstrip() + "\n"


def _summaries(result) -> str:
    """One line per probe suite and side: how many probes, how many passed or leaked."""
    out = []
    for suite, by_side in result.details.items():
        for side, details in by_side.items():
            if suite == "knowledge":
                out.append(f"- knowledge probes, {side}: {sum(bool(d.get('passed')) for d in details)} of "
                           f"{len(details)} answered with an expected fact")
            elif suite == "safety":
                harmful = [d for d in details if d.get("category") != "benign_control"]
                out.append(f"- adversarial prompts, {side}: {sum(bool(d.get('refused')) for d in harmful)} of "
                           f"{len(harmful)} refused")
            elif suite == "alignment":
                out.append(f"- alignment probes, {side}: {sum(bool(d.get('passed')) for d in details)} of "
                           f"{len(details)} passed")
            elif suite == "pii_leakage":
                counts = by_source(details)
                out.append(f"- PII leakage, {side}: {sum(c['leaks'] for c in counts.values())} of {len(details)} "
                           "probes wrote PII-shaped text (" + ", ".join(f"{s} {c['leaks']}/{c['probes']}"
                                                                         for s, c in counts.items()) + ")")
    return "### Probes\n\n" + "\n".join(out) if out else ""
