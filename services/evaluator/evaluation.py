"""The evaluator's domain logic: score the base model and the candidate (base + LoRA adapter) on
the prepared dataset's test split through lm-eval, then apply the gate.

    result = evaluate(recipe, data_dir, adapter_dir, probes_path=None, log=print)

The base model is loaded once. The adapter is attached to it straight away (so a broken adapter
fails before any scoring); the base is scored with the adapter disabled, then the adapter is
merged into the weights and the candidate is scored at the base model's speed.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from shared.recipe import Recipe

from .gate import HIGHER_IS_BETTER, deltas as compute_deltas, gate
from .tasks import (
    EvaluationError,
    end_of_turn_markers,
    generation_task_config,
    load_test_examples,
    loglikelihood_task_config,
    run_task,
    write_documents,
)

__all__ = ["EvaluationError", "EvalResult", "evaluate", "render_report"]

_logger = logging.getLogger("ftpipe.evaluator")

# On a shared CPU box, OpenMP threads that spin while they wait make torch up to ~6x slower as
# soon as another process competes for the cores (measured on 2 busy cores: 422 s with the default
# policy, 71 s with PASSIVE, for 35 conversations on SmolLM2-135M). Sleeping instead of spinning
# should cost little when the cores are free. libgomp reads the variable when torch is first
# imported, so this only helps if it runs before that; entrypoints should export it themselves.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_BATCH_SIZE = 8  # generation batches; 8 is ~3x faster than 1 for a 135M model on 2 CPU cores
_REPORT_EXAMPLES = 3


@dataclass
class EvalResult:
    scores: dict[str, dict[str, float]]  # {"base": {...}, "candidate": {...}}
    deltas: dict[str, float]  # candidate - base
    passed: bool
    reasons: list[str]
    report_markdown: str
    examples: int  # test conversations scored
    seconds: float  # wall time of the whole evaluation
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    samples: list[dict] = field(default_factory=list)  # per example: id, question, reference, base, candidate
    # knowledge probes, when given: {"base": [{question, answer, expect, label, passed}, ...], "candidate": [...]}
    probe_details: dict[str, list[dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> dict:
        """A JSON-ready dict (report.json)."""
        return self.to_dict()


def evaluate(recipe: Recipe, data_dir: Path, adapter_dir: Path, *, probes_path: Path | None = None,
             log: Callable[[str], None] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             device: str | None = None) -> EvalResult:
    """Score base and candidate on ``data_dir/test.jsonl`` and decide the gate.

    Knowledge probes are scored (``fact_rate``) when ``probes_path`` is given; when the recipe
    names probes but the caller passes none, they are skipped (and a gate on fact_rate fails
    with "not measured").

    Raises EvaluationError (what, where, how to fix) for a missing/empty/malformed test split,
    a base model that cannot be loaded, an adapter folder that does not load, or a probes file
    that cannot be read.
    """
    say = log or _logger.info
    started = time.perf_counter()
    timings: dict[str, float] = {}
    spec = recipe.eval
    data_dir, adapter_dir = Path(data_dir), Path(adapter_dir)

    if recipe.data_kind != "chat" or recipe.adapter.kind == "full":
        # The trainer trains these; their scores (accuracy and macro-F1, preference win rate, whole-model
        # candidates) are the evaluator's next step, so the gate fails with the reason rather than guessing.
        raise EvaluationError(f"evaluating {recipe.data_kind} runs with adapter.kind {recipe.adapter.kind!r} is not "
                              "supported yet (chat SFT with an adapter is); the trained result is kept with the run "
                              "and can be evaluated by hand")
    examples, available = load_test_examples(data_dir, max_examples=spec.max_examples)
    say(f"evaluating on {len(examples)} of {available} test conversations from {data_dir / 'test.jsonl'}")
    probes = _load_probes(probes_path)
    if probes is None and spec.probes:
        say(f"recipe eval.probes is {spec.probes!r} but no probes file was given: fact_rate not measured")
    _check_adapter_folder(adapter_dir)

    import torch
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _phase(timings, "load"):
        tokenizer, base = _load_base(recipe.base_model, device)
        peft_model = _attach_adapter(base, adapter_dir)
    say(f"loaded {recipe.base_model} + adapter {adapter_dir} in {timings['load']:.1f}s")

    scores: dict[str, dict[str, float]] = {}
    predictions: dict[str, dict[str, str]] = {}
    probe_details: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="ftpipe-eval-") as tmp, _quiet_lm_eval():
        work = Path(tmp)
        lm = HFLM(pretrained=peft_model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        docs_path = work / "docs.jsonl"
        write_documents(examples, tokenizer, lm, docs_path, system_prompt=recipe.data.system_prompt)
        gen_config = generation_task_config(docs_path, work / "datasets", until=end_of_turn_markers(tokenizer),
                                            max_new_tokens=spec.max_new_tokens)
        ll_config = loglikelihood_task_config(docs_path, work / "datasets")

        with peft_model.disable_adapter():
            scores["base"], predictions["base"], probe_details["base"] = _score(
                "base", lm, tokenizer, gen_config, ll_config, probes, recipe, timings, say)

        with _phase(timings, "merge"):
            candidate = _merge(peft_model, say)
        lm = HFLM(pretrained=candidate, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        scores["candidate"], predictions["candidate"], probe_details["candidate"] = _score(
            "candidate", lm, tokenizer, gen_config, ll_config, probes, recipe, timings, say)

    decision = gate(scores["base"], scores["candidate"], gate_metrics=spec.gate_metrics,
                    tolerance=spec.tolerance)
    samples = [{"id": ex.id, "question": _last_user_turn(ex.messages), "reference": ex.reference,
                "base": predictions["base"].get(ex.id, ""),
                "candidate": predictions["candidate"].get(ex.id, "")} for ex in examples]
    seconds = time.perf_counter() - started
    result = EvalResult(
        scores=scores, deltas=compute_deltas(scores["base"], scores["candidate"]),
        passed=decision.passed, reasons=decision.reasons, report_markdown="",
        examples=len(examples), seconds=round(seconds, 2),
        timings={k: round(v, 2) for k, v in timings.items()}, samples=samples,
        probe_details=probe_details if probes is not None else {})
    result.report_markdown = render_report(recipe, result, available=available)
    say(f"gate {'PASSED' if result.passed else 'FAILED'} in {seconds:.1f}s: " + "; ".join(result.reasons))
    return result


# --------------------------------------------------------------------------- loading


def _check_adapter_folder(adapter_dir: Path) -> None:
    fix = ("point adapter_dir at the folder the trainer wrote with PeftModel.save_pretrained "
           "(adapter_config.json + adapter_model.safetensors)")
    if not adapter_dir.is_dir():
        raise EvaluationError(f"adapter folder not found: {adapter_dir} does not exist; {fix}")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise EvaluationError(f"adapter folder {adapter_dir} has no adapter_config.json; {fix}")


def _load_base(ref: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.models import ModelNotAvailable, resolve_model

    try:
        path = resolve_model(ref)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (ModelNotAvailable, OSError, ValueError) as exc:
        raise EvaluationError(
            f"base model {ref!r} could not be loaded: {exc}. Check recipe base_model (a built-in alias, "
            f"a local Hugging Face model folder, or a hub id with the hub reachable).") from exc
    if tokenizer.chat_template is None:
        raise EvaluationError(
            f"base model {ref!r} has no chat template; the evaluator renders test conversations with it. "
            f"Use an instruct/chat model or add chat_template.jinja to the model folder.")
    return tokenizer, model.to(device).eval()


def _attach_adapter(base, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft raises ValueError/KeyError/RuntimeError/OSError depending on the fault
        raise EvaluationError(
            f"adapter folder {adapter_dir} does not load onto the base model: {type(exc).__name__}: "
            f"{str(exc)[:400]}. It must be a PEFT adapter trained on this recipe's base_model "
            f"(same architecture and sizes); re-run training or point at the right checkpoint.") from exc


def _merge(peft_model, say):
    """Fold the adapter into the base weights (the base is not needed any more): the candidate then
    runs as fast as the base. Adapters that cannot merge are evaluated unmerged."""
    try:
        return peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - fall back to the (slower, equivalent) unmerged model
        say(f"adapter could not be merged ({type(exc).__name__}: {exc}); evaluating it unmerged")
        return peft_model


def _load_probes(probes_path: Path | None):
    if probes_path is None:
        return None
    probes_path = Path(probes_path)
    if not probes_path.is_file():
        raise EvaluationError(f"probes file not found: {probes_path}; check eval.probes in the recipe")
    from . import probes as probes_module

    try:
        return probes_module.load_probes(probes_path)
    except EvaluationError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface any parse error with the file named
        raise EvaluationError(f"probes file {probes_path} could not be read: {exc}; fix the file named "
                              f"by eval.probes (one {{\"question\": ..., \"expect\": [...]}} per line)") from exc


# --------------------------------------------------------------------------- scoring


def _score(which, lm, tokenizer, gen_config, ll_config, probes, recipe, timings, say):
    with _phase(timings, f"{which}_generate"):
        gen_metrics, gen_samples = run_task(lm, gen_config)
    with _phase(timings, f"{which}_loglikelihood"):
        ll_metrics, _ = run_task(lm, ll_config)
    scores = {
        "chrf": gen_metrics["chrf"],
        "exact_match": gen_metrics["exact_match"],
        "perplexity": ll_metrics["perplexity"],
    }
    details: list[dict] = []
    if probes is not None:
        from . import probes as probes_module

        with _phase(timings, f"{which}_probes"):
            outcome = probes_module.fact_rate(lm.model, tokenizer, probes, system_prompt=recipe.data.system_prompt,
                                              max_new_tokens=recipe.eval.max_new_tokens)
        if isinstance(outcome, tuple):  # (rate, per-probe details)
            outcome, details = outcome[0], list(outcome[1])
        scores["fact_rate"] = float(outcome)
    say(f"{which}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
        + f" (generation {timings[f'{which}_generate']:.1f}s, loglikelihood {timings[f'{which}_loglikelihood']:.1f}s)")
    predictions = {s["doc"]["id"]: _first(s.get("filtered_resps")) for s in gen_samples}
    return scores, predictions, details


def _last_user_turn(messages) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def _first(resps) -> str:
    while isinstance(resps, (list, tuple)) and resps:
        resps = resps[0]
    return resps.strip() if isinstance(resps, str) else ""


@contextmanager
def _phase(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs a page of warnings per call (pre-initialised model, seeds, ...): keep errors only."""
    lm_logger = logging.getLogger("lm_eval")
    previous = lm_logger.level
    lm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(previous)


# --------------------------------------------------------------------------- report


def _fmt(value: float) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100_000 else f"{value:.3g}"


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_report(recipe: Recipe, result: EvalResult, *, available: int | None = None) -> str:
    spec = recipe.eval
    gated = set(spec.gate_metrics)
    base, cand = result.scores["base"], result.scores["candidate"]
    lines = [
        f"## Evaluation: {recipe.model_name} v{recipe.version} vs base `{recipe.base_model}`",
        "",
        f"**Gate: {'PASSED' if result.passed else 'FAILED'}** — gated on {', '.join(spec.gate_metrics) or 'nothing'} "
        f"(tolerance: {spec.tolerance:.0%} of the base score)",
        "",
        "| metric | base | candidate | delta | gate |",
        "|---|---:|---:|---:|---|",
    ]
    for name in HIGHER_IS_BETTER:
        if name in base and name in cand:
            arrow = "↑" if HIGHER_IS_BETTER[name] else "↓"
            delta = cand[name] - base[name]
            lines.append(f"| {name} {arrow} | {_fmt(base[name])} | {_fmt(cand[name])} | "
                         f"{'+' if delta >= 0 else '-'}{_fmt(abs(delta))} | {'gated' if name in gated else 'info'} |")
    lines += ["", *[f"- {r}" for r in result.reasons], ""]
    of = f" of {available}" if available is not None else ""
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    lines.append(f"{result.examples}{of} test conversations; greedy decoding up to {spec.max_new_tokens} new tokens; "
                 f"{result.seconds:.1f}s ({phases}).")
    for side in ("base", "candidate"):
        details = result.probe_details.get(side)
        if details:
            lines.append(f"Knowledge probes, {side}: {sum(bool(d.get('passed')) for d in details)} of "
                         f"{len(details)} answered with an expected fact.")
    if result.samples:
        lines += ["", "### Examples", ""]
        for sample in result.samples[:_REPORT_EXAMPLES]:
            lines += [f"**{sample['id']}** — user: {_clip(sample['question'])}", "",
                      f"- reference: {_clip(sample['reference'])}",
                      f"- base: {_clip(sample['base']) or '(empty)'}",
                      f"- candidate: {_clip(sample['candidate']) or '(empty)'}", ""]
    return "\n".join(lines).rstrip() + "\n"
