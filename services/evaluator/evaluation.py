"""The evaluator's domain logic: score the base model, the candidate and (when there is one) the
production version of the same model name, on the held-out test split through lm-eval and on the
shipped safety, alignment, memorisation and fairness probes; then apply the recipe's gate.

    result = evaluate(recipe, data_dir, candidate_dir, production_dir=None, probes_path=None)

Each side is loaded, scored and freed in turn (an adapter is merged into its base first, so every
side runs at the base model's speed); only one model is in memory at a time. Every metric the test
split or the probes measure on both sides gets a paired interval of the candidate's delta against
each other side: the paired bootstrap for task scores, Newcombe's paired interval for rates over
probes (services/evaluator/evidence.py).
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from shared.domain.recipe import Recipe

from services.evaluator import suites
from services.evaluator.cache import BaseResults, Entries
from services.evaluator.evidence import probe_intervals
from services.evaluator.gate import GateDecision, deltas as compute_deltas, gate, headline
from services.evaluator.judge import settle
from services.evaluator.probes import remembered
from services.evaluator.report import render_report
from services.evaluator.stats import STATISTICS, paired_bootstrap
from services.evaluator.tasks import EvaluationError, ModelLoadError

__all__ = ["EvaluationError", "EvalResult", "ModelLoadError", "evaluate"]

_logger = logging.getLogger("ftpipe.evaluator")

# On a shared CPU box, OpenMP threads that spin while they wait make torch up to ~6x slower as
# soon as another process competes for the cores (measured on 2 busy cores: 422 s with the default
# policy, 71 s with PASSIVE, for 35 conversations on SmolLM2-135M). Sleeping instead of spinning
# should cost little when the cores are free. libgomp reads the variable when torch is first
# imported, so this only helps if it runs before that; entrypoints should export it themselves.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# lm-eval's batches (the probes batch 32 too: probes.greedy_continuations). On SmolLM2-135M, 2 CPU
# cores: 0.72 s per test prompt at 8, 0.25 s at 32; 64 gains under a fifth more.
DEFAULT_BATCH_SIZE = 32
LABELS_FILE = "labels.json"   # written by the trainer next to a classifier's weights


@dataclass
class EvalResult:
    scores: dict[str, dict[str, float]]          # side (base, candidate, production) -> metric -> value
    deltas: dict[str, float]                     # candidate - base
    intervals: dict[str, dict[str, dict]]        # "vs_base" / "vs_production" -> metric -> {delta, low, high}
    passed: bool
    reasons: list[str]
    gate: dict                                   # GateDecision.to_json(): every rule's outcome
    report_markdown: str
    examples: int                                # test rows scored
    available: int                               # test rows in the split
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)     # chat: id, question, reference, one answer per side
    details: dict[str, dict[str, list]] = field(default_factory=dict)   # suite -> side -> per-item details
    skipped: list[str] = field(default_factory=list)      # what was not measured, and why
    judge: dict = field(default_factory=dict)             # eval.judge: who decided each suite, agreement with the rules
    rounds: list[dict] = field(default_factory=list)      # evaluate_more: each round's suites, probes, outcome
    confidence: float = 0.95                               # the intervals' (per look, under evaluate_more)
    cached: list[str] = field(default_factory=list)       # the base's suites read from the evaluation cache
    dtype: str = "float32"                                 # what every side was scored in (eval.dtype)

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(recipe: Recipe, data_dir: Path, candidate_dir: Path, *, production_dir: Path | None = None,
             probes_path: Path | None = None, log: Callable[[str], None] | None = None,
             batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None,
             cache: Entries | None = None) -> EvalResult:
    """Score every side and decide the gate.

    `candidate_dir` is what the trainer wrote: a PEFT adapter, or a whole model (adapter.kind full).
    `production_dir` is the production version's folder from the registry, when there is one.
    `cache` keeps the base side's results across evaluations (services/evaluator/cache.py).

    Raises EvaluationError (what, where, how to fix) for a missing/empty/malformed test split, a
    candidate folder that is missing or not a model, or a probes file that cannot be read; its
    subclass ModelLoadError for a model (base, adapter, whole model) that does not load or merge.
    Errors while a model runs (CUDA, out of memory) propagate as they are.
    """
    say = log or _logger.info
    started = time.perf_counter()
    timings: dict[str, float] = {}
    data_dir, candidate_dir = Path(data_dir), Path(candidate_dir)
    _check_model_folder(candidate_dir, "candidate")
    plan = suites.plan(recipe, data_dir, probes_path=probes_path, labels=_labels(recipe, candidate_dir), say=say)
    sides = [("base", None), ("candidate", candidate_dir)]
    if production_dir is not None:
        reason = _production_unusable(recipe, Path(production_dir), candidate_dir)
        if reason:
            plan.skipped.append(f"production version: {reason}")
        else:
            sides.append(("production", Path(production_dir)))

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = scoring_dtype(recipe.eval.dtype, device)
    say(f"scoring every side in {dtype} on {device}")
    stats_recipe = _per_look(recipe)
    base_cache = _base_cache(recipe, cache, device, dtype, batch_size)
    memos: dict[str, dict] = {side: {} for side, _ in sides}   # generations per side, for evaluate_more
    scored: dict[str, suites.SideScores] = {}

    def score_sides(current: suites.Plan, only: set[str] | None) -> None:
        for side, folder in sides:
            def load(side=side, folder=folder):
                with suites.phase(timings, f"{side}_load"):
                    tokenizer, model = load_model(recipe, folder, plan.labels, device, dtype)
                say(f"{side}: loaded {folder or recipe.base_model} in {timings[f'{side}_load']:.1f}s")
                return model, tokenizer

            with remembered(memos[side]):
                found = suites.score(current, side, load, Path(tmp) / side, batch_size=batch_size,
                                     timings=timings, say=say, cache=base_cache if side == "base" else None,
                                     only=only)
            if only is None:
                scored[side] = found
            else:   # the grown suites' results replace the first slice's
                scored[side].metrics.update(found.metrics)
                scored[side].details.update(found.details)
            gc.collect()   # the side's model, held by score() alone, goes before the next one loads
        if plan.judge is not None:   # eval.judge decides its suites on every side at once (services/evaluator/judge.py)
            with suites.phase(timings, "judge"):
                judged.update(settle(plan.judge, scored, say=say))

    judged: dict = {}
    with tempfile.TemporaryDirectory(prefix="ftpipe-eval-") as tmp:
        score_sides(plan, None)
        decision, intervals = _decide(stats_recipe, scored)
        rounds: list[dict] = []
        exhausted: set[str] = set()   # suites whose last round added no probe
        while (recipe.eval.on_inconclusive == "evaluate_more" and decision.outcome == "inconclusive"
               and len(rounds) < recipe.eval.more_rounds):
            grown = _next_slice(stats_recipe, decision, len(rounds) + 1, exhausted)
            if grown is None:
                say("evaluate_more: no undecided rule's probe set has more probes")
                break
            grown_recipe, named = grown
            say(f"evaluate_more round {len(rounds) + 1}: the next slice of {', '.join(sorted(named))}")
            before = {s: len(scored["candidate"].details.get(s, [])) for s in named}
            with suites.phase(timings, f"more_{len(rounds) + 1}"):
                score_sides(suites.plan(grown_recipe, data_dir, probes_path=probes_path, labels=plan.labels,
                                        say=lambda _: None), named)
            decision, intervals = _decide(stats_recipe, scored)
            probes = {s: [before[s], len(scored["candidate"].details.get(s, []))] for s in sorted(named)}
            exhausted |= {s for s, (was, now) in probes.items() if now == was}
            rounds.append({"suites": sorted(named), "probes": probes, "outcome": decision.outcome})

    scores = {side: s.metrics for side, s in scored.items()}
    result = EvalResult(
        scores=scores, deltas=compute_deltas(scores["base"], scores["candidate"]), intervals=intervals,
        passed=decision.passed, reasons=decision.reasons, gate=decision.to_json(), report_markdown="",
        examples=plan.examples, available=plan.available, seconds=round(time.perf_counter() - started, 2),
        timings={k: round(v, 2) for k, v in timings.items()}, samples=suites.samples(plan, scored),
        details={suite: {side: s.details[suite] for side, s in scored.items() if suite in s.details}
                 for suite in sorted({k for s in scored.values() for k in s.details})},
        skipped=plan.skipped, judge=judged, rounds=rounds, confidence=stats_recipe.eval.confidence,
        cached=base_cache.hits if base_cache is not None else [], dtype=dtype)
    result.report_markdown = render_report(recipe, result)
    say(f"gate {headline(result.gate)} in {result.seconds:.1f}s: " + "; ".join(result.reasons[:3]))
    return result


def _decide(recipe: Recipe, scored: dict[str, "suites.SideScores"]) -> tuple[GateDecision, dict]:
    intervals = {f"vs_{side}": _intervals(recipe, scored[side], scored["candidate"])
                 for side in scored if side != "candidate"}
    directions = {k: v for s in scored.values() for k, v in s.directions.items()}
    scores = {side: s.metrics for side, s in scored.items()}
    return gate(recipe, scores, directions=directions, intervals=intervals), intervals


def _per_look(recipe: Recipe) -> Recipe:
    """The recipe the intervals are computed with: under evaluate_more, each of the 1 + more_rounds
    looks at the evidence gets an equal share of the error rate (Bonferroni), so that stopping at
    whichever look decides first still errs at most 1 - confidence overall."""
    spec = recipe.eval
    if spec.on_inconclusive != "evaluate_more":
        return recipe
    confidence = 1 - (1 - spec.confidence) / (1 + spec.more_rounds)
    return recipe.model_copy(update={"eval": spec.model_copy(update={"confidence": confidence})})


# suite -> the limit in its recipe.eval section (suites.SECTIONS) that is its first slice; safety's
# limit is alignment's too
_LIMITS = {"safety": "max_prompts", "alignment": "max_prompts", "memorisation": "max_rows",
           "pii_leakage": "pii_max_probes", "fairness": "max_templates"}


def _next_slice(recipe: Recipe, decision: GateDecision, look: int,
                exhausted: set[str]) -> tuple[Recipe, set[str]] | None:
    """(the recipe with each undecided suite's limit at `look` + 1 first slices, the suites to score
    again), or None when no inconclusive rule's suite can grow. Every limit is a prefix of a fixed
    order (strata taking turns, or the ids' sha256), so the grown set holds the first one, and the
    memo of each side's generations answers the probes already asked: a round generates only its
    new slice."""
    from services.evaluator.evidence import suite_of

    undecided = {suite_of(c.metric) for c in decision.checks if c.outcome == "inconclusive"}
    updates: dict[str, dict] = {}
    named: set[str] = set()
    for suite in sorted(s for s in undecided if s in _LIMITS and s not in exhausted):
        section, limit = suites.SECTIONS[suite], _LIMITS[suite]
        first = getattr(getattr(recipe.eval, section), limit)
        if first is None:
            continue   # the whole set was scored: there is no next slice
        updates.setdefault(section, {})[limit] = first * (look + 1)
        named |= {s for s in _LIMITS if (suites.SECTIONS[s], _LIMITS[s]) == (section, limit)}
    if not named:
        return None
    spec = recipe.eval.model_copy(update={section: getattr(recipe.eval, section).model_copy(update=values)
                                          for section, values in updates.items()})
    return recipe.model_copy(update={"eval": spec}), named


def _intervals(recipe: Recipe, reference: "suites.SideScores", candidate: "suites.SideScores") -> dict[str, dict]:
    """metric -> {delta, low, high, method, n}: the task scores' paired bootstrap over the test rows,
    and the probes' paired rate intervals (services/evaluator/evidence.py)."""
    out = {}
    for metric, items in candidate.items.items():
        ref_items = reference.items.get(metric)
        if metric not in STATISTICS or ref_items is None or set(ref_items) != set(items):
            continue
        ids = sorted(items)
        interval = paired_bootstrap(STATISTICS[metric], [ref_items[i] for i in ids], [items[i] for i in ids],
                                    iters=recipe.eval.bootstrap_iters, confidence=recipe.eval.confidence)
        out[metric] = {**interval.to_json(), "method": "paired-bootstrap", "n": len(ids)}
    probes = probe_intervals(recipe, reference.details, candidate.details, list(candidate.metrics))
    return {**probes, **out}


# --------------------------------------------------------------------------- loading


def _base_cache(recipe: Recipe, entries: Entries | None, device: str, dtype: str,
                batch_size: int) -> BaseResults | None:
    if entries is None:
        return None
    from shared.domain.models import ModelNotAvailable, base_model_identity

    try:
        identity = base_model_identity(recipe.base_model)["sha256"]
    except (ModelNotAvailable, OSError):
        identity = None
    if identity is None:   # a hub id not on this machine: no files to name it by
        return None
    return BaseResults(entries, base_sha256=identity, device=device, dtype=dtype, batch_size=batch_size)


def _check_model_folder(folder: Path, side: str) -> None:
    fix = ("point it at the folder the trainer wrote: a PEFT adapter (adapter_config.json + "
           "adapter_model.safetensors) or, for adapter.kind full, a model folder (config.json + *.safetensors)")
    if not folder.is_dir():
        raise EvaluationError(f"{side} folder not found: {folder} does not exist; {fix}")
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise EvaluationError(f"{side} folder {folder} has neither adapter_config.json nor config.json; {fix}")


def _labels(recipe: Recipe, folder: Path) -> list[str] | None:
    if recipe.task != "classification":
        return None
    path = folder / LABELS_FILE
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"classifier folder {folder} has no readable {LABELS_FILE} ({exc}); the trainer "
                              "writes it next to the weights: re-run training or copy it from the run") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise EvaluationError(f"{path} must be a non-empty JSON list of label names")
    return labels


def _production_unusable(recipe: Recipe, production: Path, candidate: Path) -> str | None:
    """Why the production version cannot be scored against this candidate, or None. (That it adapts
    the same base model is the caller's check: the registry records each version's base.)"""
    try:
        _check_model_folder(production, "production")
    except EvaluationError as exc:
        return str(exc)
    if recipe.task == "classification":
        try:
            same = _labels(recipe, production) == _labels(recipe, candidate)
        except EvaluationError as exc:
            return str(exc)
        if not same:
            return "its labels differ from the candidate's, so their scores do not compare"
    return None


def scoring_dtype(setting: str, device: str) -> str:
    """eval.dtype on this device: `auto` is bfloat16 where the device multiplies it natively, else float32."""
    if setting != "auto":
        return setting
    import torch

    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported()
    elif device == "cpu":   # AMX or AVX512-BF16 (oneDNN's bf16 kernels); torch exposes the probes privately
        native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    else:
        native = False
    return "bfloat16" if native else "float32"


def load_model(recipe: Recipe, folder: Path | None, labels: list[str] | None, device: str, dtype: str = "float32"):
    """(tokenizer, model in eval mode, in `dtype`): the base when folder is None, else the base with the
    folder's adapter merged in, or the folder's whole model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from shared.domain.models import ModelNotAvailable, resolve_model

    auto = AutoModelForSequenceClassification if recipe.task == "classification" else AutoModelForCausalLM
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if labels:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    whole = folder is not None and not (folder / "adapter_config.json").is_file()
    try:
        base_path = resolve_model(recipe.base_model)
        tokenizer = AutoTokenizer.from_pretrained(folder if whole and (folder / "tokenizer_config.json").is_file()
                                                  else base_path)
        torch.manual_seed(recipe.training.seed)   # a base classifier's fresh head: the same on every side
        model = auto.from_pretrained(folder if whole else base_path, **kwargs)
    except (ModelNotAvailable, OSError, ValueError) as exc:
        where = f"candidate model folder {folder}" if whole else f"base model {recipe.base_model!r}"
        raise ModelLoadError(
            f"{where} could not be loaded: {exc}. Check recipe base_model (a built-in alias, a local Hugging "
            f"Face model folder, or a hub id with the hub reachable) and the trainer's output folder.") from exc
    if recipe.task != "classification" and tokenizer.chat_template is None:
        raise ModelLoadError(
            f"base model {recipe.base_model!r} has no chat template; the evaluator renders test conversations with "
            f"it. Use an instruct/chat model or add chat_template.jinja to the model folder.")
    if recipe.task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if folder is not None and not whole:
        model = _merged(model, folder)
    head = model.get_output_embeddings() if recipe.task != "classification" else None
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return tokenizer, model.to(device).eval()


def _contiguous_input(_module, args: tuple) -> tuple:
    """The output layer's input made contiguous. transformers hands it a slice of the hidden states
    (the last position in generation, the scored ones with logits_to_keep), and PyTorch's matmul folds
    such a view into one matrix product only when an operand requires grad: for frozen weights (a
    merged PEFT adapter) it takes bmm with the vocabulary matrix copied once per row. On SmolLM2-135M
    in bfloat16 that made the candidate's fairness suite 10x slower than the base's (pytorch/pytorch
    PR 166891 discusses the rule). Copying the slice costs a few kilobytes."""
    return (args[0].contiguous(), *args[1:])


def _merged(base, adapter_dir: Path):
    """The base with the adapter folded into its weights: it then runs as fast as the base.
    Adapters that cannot merge (prefix tuning) are evaluated unmerged."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft raises ValueError/KeyError/RuntimeError/OSError depending on the fault
        raise ModelLoadError(
            f"adapter folder {adapter_dir} does not load onto the base model: {type(exc).__name__}: "
            f"{str(exc)[:400]}. It must be a PEFT adapter trained on this recipe's base_model "
            f"(same architecture and sizes); re-run training or point at the right checkpoint.") from exc
    try:
        return model.merge_and_unload()
    except Exception:  # noqa: BLE001 - prefix tuning has nothing to merge: the (equivalent) unmerged model
        return model
