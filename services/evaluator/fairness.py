"""Counterfactual fairness probes: does the model treat a customer differently when only a
demographic term changes?

A template file is JSONL with three kinds of line (data/fairness_templates.jsonl is the default):
  {"axis": "religion", "terms": ["Christian", "Muslim", ...]}            a demographic axis
  {"control": ["returning", "new", ...]}        the control terms (at least as many as any axis has)
  {"template": "The {group} customer asked ... was", "continuation": " helpful."}
Every template is filled with every term of every axis (terms are adjectives, so one template
serves all axes).

- Language models (`likelihood_disparity`): the log-likelihood of the continuation for each term;
  a template's spread on an axis is max - min across the terms, in nats per continuation token, so
  long continuations do not outweigh short ones. The disparity is that spread relative to the
  spread of control terms, customer attributes that are not protected ("returning", "business",
  ...; as many as the axis has terms), in the same template: sum of the axis spreads over sum of
  the control spreads. Fine-tuning makes a model's likelihoods move more with any word it is given:
  the support_b model's raw demographic spread rose 38% over the base's while its control spread
  rose 46% (bench/README.md, Eval), so a raw spread gates the tuning, not unfairness. A ratio of 1
  means demographic terms move the model as much as irrelevant attributes do.
- Classifiers (`flip_rate`): the predicted label of the filled template and its continuation; a
  template flips on an axis when the terms do not all get the same label.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.domain.datasets import DatasetContractError, iter_jsonl

from services.evaluator.likelihood import continuation_logprobs

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = Path(__file__).parent / "data" / "fairness_templates.jsonl"
SLOT = "{group}"
_SHAPE = ('{"axis": str, "terms": [str, str, ...]}, {"control": [str, str, ...]} or '
          '{"template": "... {group} ...", "continuation": str}')
_AXIS_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")   # it becomes part of a metric name


class FairnessTemplateError(ValueError):
    """A template file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Template:
    text: str            # with one {group} slot
    continuation: str
    line: int            # where it is in its file, to name it in details

    def filled(self, term: str) -> str:
        return self.text.replace(SLOT, term)


@dataclass(frozen=True)
class FairnessProbes:
    axes: dict[str, tuple[str, ...]]
    templates: tuple[Template, ...]
    controls: tuple[str, ...] = ()   # an axis of k terms is compared with the first k


def _axis(path: Path, lineno: int, row: dict, axes: dict) -> None:
    name, terms = row.get("axis"), row.get("terms")
    if not isinstance(name, str) or not _AXIS_NAME.match(name):
        raise FairnessTemplateError(f"{path}:{lineno}: 'axis' must be a lower-case name such as \"age\" "
                                    f"(letters, digits, _), got {name!r}")
    if name in axes:
        raise FairnessTemplateError(f"{path}:{lineno}: axis {name!r} is declared twice; keep one line per axis")
    if (not isinstance(terms, list) or len(terms) < 2 or not all(isinstance(t, str) and t.strip() for t in terms)
            or len(set(terms)) != len(terms)):
        raise FairnessTemplateError(f"{path}:{lineno}: 'terms' of axis {name!r} must be two or more distinct "
                                    "non-empty strings")
    axes[name] = tuple(terms)


def _template(path: Path, lineno: int, row: dict) -> Template:
    text, continuation = row.get("template"), row.get("continuation")
    if not isinstance(text, str) or text.count(SLOT) != 1:
        raise FairnessTemplateError(f"{path}:{lineno}: 'template' must be a string with {SLOT} exactly once")
    if not isinstance(continuation, str) or not continuation.strip():
        raise FairnessTemplateError(f"{path}:{lineno}: 'continuation' must be a non-empty string "
                                    "(with its leading space, e.g. \" helpful.\")")
    return Template(text, continuation, lineno)


def load_templates(path: Path | str = DEFAULT_TEMPLATES) -> FairnessProbes:
    path = Path(path)
    axes: dict[str, tuple[str, ...]] = {}
    templates, controls = [], {}
    try:
        for lineno, row in iter_jsonl(path, shape=_SHAPE):
            keys = set(row) if isinstance(row, dict) else set()
            if keys == {"axis", "terms"}:
                _axis(path, lineno, row, axes)
            elif keys == {"control"}:
                _axis(path, lineno, {"axis": "control", "terms": row["control"]}, controls)
            elif keys == {"template", "continuation"}:
                templates.append(_template(path, lineno, row))
            else:
                raise FairnessTemplateError(f"{path}:{lineno}: expected {_SHAPE}, got keys {sorted(keys)}")
    except DatasetContractError as exc:
        raise FairnessTemplateError(str(exc)) from exc
    if not axes or not templates:
        raise FairnessTemplateError(f"{path}: needs at least one axis and one template line; write {_SHAPE}")
    control = controls.get("control", ())
    if control and len(control) < max(map(len, axes.values())):
        raise FairnessTemplateError(f"{path}: the control line has {len(control)} terms and an axis has "
                                    f"{max(map(len, axes.values()))}; give at least as many control terms")
    if set(control) & {t for terms in axes.values() for t in terms}:
        raise FairnessTemplateError(f"{path}: a control term is also an axis's term; controls are attributes "
                                    "that are not protected")
    return FairnessProbes(axes, tuple(templates), control)


def _summary(name: str, per_pair: list[dict], key: str, axes) -> dict[str, float]:
    metrics = {f"fairness_{name}": sum(d[key] for d in per_pair) / len(per_pair)}
    for axis in axes:
        values = [d[key] for d in per_pair if d["axis"] == axis]
        metrics[f"fairness_{name}_{axis}"] = sum(values) / len(values)
    return metrics


# The templates are one sentence each (~20 tokens), so wide batches cost little memory: the 1,632
# sequences of the shipped set on SmolLM2-135M in bf16, 2 CPU cores, took 12.2 s at 32 and 9.5 s at 128.
FAIRNESS_BATCH = 128


def likelihood_disparity(model, tokenizer, probes: FairnessProbes, *,
                         batch_size: int = FAIRNESS_BATCH) -> tuple[dict[str, float], list[dict]]:
    """({fairness_disparity, fairness_disparity_<axis>..., fairness_max_disparity}, one {template (line),
    axis, disparity (the axis's spread), control (the control terms' spread), lowest, highest} per
    template and axis) for a causal LM. fairness_disparity(_<axis>) is the sum of the spreads over
    the sum of the control spreads; fairness_max_disparity the largest spread, in nats per token."""
    if len(probes.controls) < max(map(len, probes.axes.values())):
        raise FairnessTemplateError("likelihood_disparity needs a control line with at least as many terms as the "
                                    f"largest axis ({max(map(len, probes.axes.values()))}); add "
                                    '{"control": [...]} to the template file')
    groups = [*probes.axes.values(), probes.controls]   # the control terms last
    scored = [(t.filled(term), t.continuation) for t in probes.templates for terms in groups for term in terms]
    # templates are plain text, not chat: the tokenizer's BOS where it adds one, as for any document
    logprobs, counts = continuation_logprobs(model, tokenizer, scored, batch_size=batch_size, add_special_tokens=True)
    per_token = iter(lp / n for lp, n in zip(logprobs, counts, strict=True))
    details = []
    for t in probes.templates:
        *axes, controls = [[next(per_token) for _ in terms] for terms in groups]
        for (axis, terms), got in zip(probes.axes.items(), axes, strict=True):
            control = controls[:len(terms)]
            details.append({"template": t.line, "axis": axis, "disparity": max(got) - min(got),
                            "control": max(control) - min(control),
                            "lowest": terms[got.index(min(got))], "highest": terms[got.index(max(got))]})

    def relative(rows: list[dict]) -> float:
        return relative_disparity(sum(d["disparity"] for d in rows), sum(d["control"] for d in rows))

    metrics = {"fairness_disparity": relative(details)}
    for axis in probes.axes:
        metrics[f"fairness_disparity_{axis}"] = relative([d for d in details if d["axis"] == axis])
    metrics["fairness_max_disparity"] = max(d["disparity"] for d in details)
    logger.info("fairness: disparity %.3f of the control terms' spread, max spread %.4f nats/token over %d "
                "template-axis pairs", metrics["fairness_disparity"], metrics["fairness_max_disparity"], len(details))
    return metrics, details


def relative_disparity(spreads: float, controls: float) -> float:
    """The sum of the demographic spreads over the sum of their control spreads (a ratio of sums: a
    template whose controls barely move does not blow it up; controls that never move make it huge,
    not infinite). The metric, and the statistic its paired bootstrap recomputes (evidence.py)."""
    return float(spreads) / max(float(controls), 1e-9)


@torch.no_grad()
def _labels(model, tokenizer, texts: list[str], batch_size: int) -> list[int]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
        labels += model(**batch.to(device)).logits.argmax(-1).tolist()
    model.train(was_training)
    return labels


def flip_rate(model, tokenizer, probes: FairnessProbes, *,
              batch_size: int = 32) -> tuple[dict[str, float], list[dict]]:
    """({fairness_flip_rate, fairness_flip_rate_<axis>...}, one {template (line), axis, flipped,
    labels: {term: label id}} per template and axis) for a sequence classifier."""
    pairs = [(t, axis) for t in probes.templates for axis in probes.axes]
    labels = _labels(model, tokenizer, [t.filled(term) + t.continuation for t, axis in pairs
                                        for term in probes.axes[axis]], batch_size)
    details, at = [], 0
    for t, axis in pairs:
        terms = probes.axes[axis]
        got = dict(zip(terms, labels[at:at + len(terms)], strict=True))
        at += len(terms)
        details.append({"template": t.line, "axis": axis, "flipped": len(set(got.values())) > 1, "labels": got})
    metrics = _summary("flip_rate", details, "flipped", probes.axes)
    logger.info("fairness: %d of %d template-axis pairs flip their label", sum(d["flipped"] for d in details),
                len(details))
    return metrics, details
