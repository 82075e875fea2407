"""What the evaluator measures on each side (base, candidate, production), in one place: the task
scores of the recipe's data kind through lm-eval, then the probes that apply to it.

    plan = suites.plan(recipe, data_dir, probes_path=..., labels=..., say=...)   # inputs, read once
    side = suites.score(plan, "candidate", load, work_dir, ...)   # one model: load() -> (model, tokenizer)

| data kind      | task scores (lm-eval)                | probes                                         |
|----------------|--------------------------------------|------------------------------------------------|
| chat           | chrf, exact_match, perplexity        | knowledge, safety, alignment, memorisation,    |
|                |                                      | PII leakage, canaries, fairness (likelihood)   |
| preference     | preference_accuracy                  | safety, alignment, canaries, fairness          |
| classification | accuracy, macro_f1                   | fairness (label flips)                         |

Anything that does not apply or cannot run is listed in `plan.skipped` with the reason, so the
report says what was not measured rather than leaving it out silently.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from shared.domain.canaries import recipe_canaries
from shared.domain.datasets import DatasetContractError, read_split
from shared.domain.recipe import Recipe

from services.evaluator import fairness, judge as judging, memorisation, probes as knowledge_probes, safety, tasks as T
from services.evaluator.cache import BaseResults
from services.evaluator.tasks import EvaluationError

_logger = logging.getLogger("ftpipe.evaluator")


@dataclass
class Plan:
    recipe: Recipe
    kind: str                         # chat | preference | classification
    rows: list[dict]                  # the test rows scored
    available: int                    # test rows in the split
    heldout: list[dict]               # every test and validation row (never trained on): memorisation's held-out prefixes
    labels: list[str] | None          # classification
    probes: list | None               # knowledge probes (chat)
    train_rows: list[dict] | None     # memorisation (chat)
    canaries: list                    # Secret Sharer canaries the trainer inserted
    fairness: Any | None              # FairnessProbes
    skipped: list[str] = field(default_factory=list)
    task_manager: Any | None = None   # lm-eval's index of standard tasks (eval.lm_eval_tasks), built once
    judge: Any | None = None          # eval.judge's HttpJudge (services/evaluator/judge.py): one cache per evaluation

    @property
    def examples(self) -> int:
        return len(self.rows)

    @property
    def generative(self) -> bool:
        return self.kind != "classification"


@dataclass
class SideScores:
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)    # metric -> test id -> lm-eval item
    details: dict[str, list] = field(default_factory=dict)            # suite -> per-probe details
    predictions: dict[str, str] = field(default_factory=dict)         # chat: test id -> generated answer
    directions: dict[str, bool] = field(default_factory=dict)         # lm-eval task metrics: higher is better


# --------------------------------------------------------------------------- the plan


def plan(recipe: Recipe, data_dir: Path, *, probes_path: Path | None, labels: list[str] | None,
         say: Callable[[str], None]) -> Plan:
    """Read and check every input before any model is loaded, so bad input fails fast."""
    kind, spec = recipe.data_kind, recipe.eval
    rows = T.read_test_split(data_dir, kind)
    if kind == "chat":
        examples, available = T.load_test_examples(data_dir, max_examples=spec.max_examples)
        chosen = {ex.id for ex in examples}
        subset = [r for r in rows if r["id"] in chosen]
    else:
        subset, available = T.deterministic_subset(rows, spec.max_examples), len(rows)
    say(f"evaluating on {len(subset)} of {available} test rows from {Path(data_dir) / 'test.jsonl'}")
    skipped: list[str] = []
    probes = _knowledge_probes(recipe, probes_path, skipped)
    train_rows, heldout = None, rows
    if kind == "chat" and spec.memorisation.enabled:
        try:
            train_rows = read_split(Path(data_dir) / "train.jsonl", "chat")
        except (OSError, DatasetContractError) as exc:
            skipped.append(f"memorisation and PII leakage: the train split cannot be read ({exc})")
        # validation rows are never trained on either: more held-out rows narrow the extraction gap's
        # interval (the demo's 32 test rows alone: MDE 0.26; with its 34 validation rows: 0.19)
        val = Path(data_dir) / "val.jsonl"
        if val.is_file():
            try:
                heldout = rows + read_split(val, "chat")
            except (OSError, DatasetContractError) as exc:
                skipped.append(f"memorisation: the validation split cannot be read, so only test rows are held out ({exc})")
    canaries = []
    if kind == "chat":
        canaries = recipe_canaries(recipe, Path(data_dir))
        if not canaries and spec.canaries.count is None:
            skipped.append("canaries: none inserted (eval.canaries.count unset, and pii_report.json shows no "
                           "masked rows); set eval.canaries.count to insert some anyway")
    fair = None
    if spec.fairness.enabled:
        fair = fairness.load_templates()
        if spec.fairness.max_templates:
            fair = replace(fair, templates=fair.templates[:spec.fairness.max_templates])
    manager = None
    if spec.lm_eval_tasks:
        if kind == "classification":
            skipped.append("lm-eval tasks: a sequence classifier cannot run generative or likelihood tasks")
        else:
            from lm_eval.tasks import TaskManager

            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # the local datasets cache only, never the hub
            # lm-eval's own index (~15k task YAMLs) takes seconds to build: only when a task is not the team's own
            if spec.lm_eval_include_path:
                manager = TaskManager(include_path=spec.lm_eval_include_path, include_defaults=False)
            if manager is None or any(name not in manager.all_tasks for name in spec.lm_eval_tasks):
                manager = TaskManager(include_path=spec.lm_eval_include_path)
    if not spec.safety.enabled and kind != "classification":
        skipped.append("safety and alignment probes: turned off (eval.safety.enabled: false)")
    judge = judging.make_judge(recipe) if kind != "classification" else None   # its URL checked before any model runs
    return Plan(recipe, kind, subset, available, heldout, labels, probes, train_rows, canaries, fair, skipped, manager,
                judge)


def _knowledge_probes(recipe: Recipe, probes_path: Path | None, skipped: list[str]):
    if probes_path is None:
        if recipe.eval.probes:
            skipped.append(f"knowledge probes: eval.probes is {recipe.eval.probes!r} but no probes file was given")
        return None
    path = Path(probes_path)
    if not path.is_file():
        raise EvaluationError(f"probes file not found: {path}; check eval.probes in the recipe")
    try:
        # val probes are for the trainer's checkpoint selection (training.select_by: probes)
        return knowledge_probes.load_probes(path, split="test")
    except Exception as exc:  # noqa: BLE001 - surface any parse error with the file named
        raise EvaluationError(f"probes file {path} could not be read: {exc}; fix the file named by eval.probes "
                              "(one {\"question\": ..., \"expect\": [...]} per line)") from exc


# --------------------------------------------------------------------------- one side


def score(plan: Plan, side: str, load: Callable[[], tuple[Any, Any]], work: Path, *, batch_size: int,
          timings: dict[str, float], say: Callable[[str], None], cache: BaseResults | None = None,
          only: set[str] | None = None) -> SideScores:
    """Every suite that applies (or those named in `only`) on one side; with `cache` (the base side),
    each suite's result is read from it when an earlier evaluation kept one for the same inputs.
    `load` gives the side's (model, tokenizer); it is called when a suite first computes, so a base
    whose every result is cached is never loaded."""
    out = SideScores()
    held: list[tuple[Any, Any]] = []

    def side_model() -> tuple[Any, Any]:
        if not held:
            held.append(load())
        return held[0]

    spec, system_prompt = plan.recipe.eval, plan.recipe.data.system_prompt
    first = side == "base"   # skip reasons are the same for every side: note them once

    def result(name: str, compute: Callable[[], dict]) -> dict:
        """The suite's result, read from the cache or computed; `<side>_<name>` times the computing
        (the model's load, when this suite is the first to need it, is `<side>_load`)."""
        inputs = suite_inputs(plan, name) if cache is not None else None
        if cache is not None and (kept := cache.get(name, inputs)) is not None:
            say(f"{side}: {name} from the evaluation cache")
            return kept
        side_model()
        with phase(timings, f"{side}_{name}"):
            # one JSON form whether computed or read back (tuples become lists), so pairs always match
            value = json.loads(json.dumps(compute(), default=_plain))
        if cache is not None:
            cache.put(name, inputs, value)
        return value

    if only is None or "tasks" in only:
        tasks = result("tasks", lambda: _task_scores(plan, *side_model(), work, batch_size))
        out.metrics.update(tasks["metrics"])
        out.items.update(tasks["items"])
        out.predictions.update(tasks["predictions"])

    def run(name: str, fn: Callable[[], tuple[dict, Any]]) -> None:
        if only is not None and name not in only:
            return
        try:
            value = result(name, lambda: dict(zip(("metrics", "details"), fn(), strict=True)))
        except _NotApplicable as exc:
            if first:
                plan.skipped.append(f"{name}: {exc}")
            return
        out.metrics.update(value["metrics"])
        out.details[name] = value["details"]

    if plan.probes is not None:
        def knowledge():
            rate, details = knowledge_probes.fact_rate(*side_model(), plan.probes, system_prompt=system_prompt,
                                                    max_new_tokens=spec.max_new_tokens)
            return {"fact_rate": rate}, details

        run("knowledge", knowledge)
    if plan.generative and spec.safety.enabled:
        kwargs = dict(system_prompt=system_prompt, max_new_tokens=spec.safety.max_new_tokens,
                      max_prompts=spec.safety.max_prompts)
        run("safety", lambda: _pair(safety.run_safety(*side_model(), **kwargs)))
        run("alignment", lambda: _pair(safety.run_alignment(*side_model(), **kwargs)))
    if plan.train_rows is not None:
        m = spec.memorisation
        run("memorisation", lambda: _applicable(lambda: memorisation.extraction_rate(
            *side_model(), plan.train_rows, plan.heldout, prefix_tokens=m.prefix_tokens,
            match_tokens=m.match_tokens, max_rows=m.max_rows, system_prompt=system_prompt)))
        run("pii_leakage", lambda: _applicable(lambda: memorisation.pii_leakage(
            *side_model(), plan.train_rows, sources=m.pii_sources, max_probes=m.pii_max_probes,
            new_tokens=m.pii_new_tokens, system_prompt=system_prompt)))
    if plan.canaries:
        run("canaries", lambda: memorisation.canary_exposure(*side_model(), plan.canaries,
                                                    candidates=spec.canaries.candidates, seed=plan.recipe.training.seed,
                                                    system_prompt=system_prompt))
    if plan.fairness is not None:
        measure = fairness.flip_rate if plan.kind == "classification" else fairness.likelihood_disparity
        run("fairness", lambda: measure(*side_model(), plan.fairness))
    if plan.task_manager is not None and only is None:
        model, tokenizer = side_model()
        with phase(timings, f"{side}_lm_eval_tasks"):
            _standard_tasks(plan, model, tokenizer, batch_size, out, first)
    say(f"{side}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.metrics.items() if "_rate_" not in k
                                 and "disparity_" not in k))
    return out


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):   # numpy scalars in lm-eval's per-item values
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def suite_inputs(plan: Plan, name: str) -> dict:
    """What a suite's answers depend on besides the model and the evaluator's code (the base-result
    cache's key, services/evaluator/cache.py): the evaluation settings (less the gate's, which decide
    nothing a model says), the prompt, and the run's own data the suite reads."""
    recipe = plan.recipe
    data: dict[str, Any] = {
        "tasks": plan.rows, "knowledge": plan.probes, "memorisation": [plan.train_rows, plan.heldout],
        "pii_leakage": plan.train_rows, "canaries": [plan.canaries, recipe.training.seed], "fairness": plan.fairness,
    }
    # other suites' own settings are left out; any setting not known to belong to one suite stays in
    others = {section for suite, section in SECTIONS.items() if suite != name and section != SECTIONS.get(name)}
    return {"kind": plan.kind, "labels": plan.labels, "system_prompt": recipe.data.system_prompt,
            "eval": recipe.eval.model_dump(mode="json", exclude=_GATE_ONLY | others), "data": data.get(name)}


# Settings that change how the gate reads the scores, never a score: kept out of the cache's key.
_GATE_ONLY = {"gate", "confidence", "bootstrap_iters", "on_inconclusive", "more_rounds", "compare_production"}
# suite -> its own section of recipe.eval (the safety section is alignment's too; the memorisation
# section is PII leakage's): the cache's key and evaluate_more's slices read it
SECTIONS = {"safety": "safety", "alignment": "safety", "memorisation": "memorisation",
            "pii_leakage": "memorisation", "canaries": "canaries", "fairness": "fairness"}


class _NotApplicable(Exception):
    """A probe with nothing to measure on this data (e.g. no masked PII to probe around)."""


def _applicable(fn):
    try:
        return fn()
    except ValueError as exc:   # the probe modules raise ValueError when their input has nothing to probe
        raise _NotApplicable(str(exc)) from None


def _pair(result: dict) -> tuple[dict, list]:
    return result["metrics"], result["details"]


def _task_scores(plan: Plan, model, tokenizer, work: Path, batch_size: int) -> dict:
    """{metrics, items (metric -> test id -> lm-eval item), predictions (chat: test id -> answer)}."""
    recipe = plan.recipe
    cache = work / "datasets"
    if plan.kind == "classification":
        lm = T.classifier_lm(model, tokenizer, plan.labels, batch_size=batch_size)
        T.classification_documents(plan.rows, plan.labels, work / "docs.jsonl")
        configs = [T.classification_task_config(work / "docs.jsonl", cache, plan.labels)]
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        if plan.kind == "preference":
            T.preference_documents(plan.rows, tokenizer, work / "docs.jsonl", system_prompt=recipe.data.system_prompt)
            configs = [T.preference_task_config(work / "docs.jsonl", cache)]
        else:
            examples = [T.to_example(r, where=r["id"]) for r in plan.rows]
            T.write_documents(examples, tokenizer, lm, work / "docs.jsonl", system_prompt=recipe.data.system_prompt)
            configs = [T.generation_task_config(work / "docs.jsonl", cache, until=T.end_of_turn_markers(tokenizer),
                                                max_new_tokens=recipe.eval.max_new_tokens),
                       T.loglikelihood_task_config(work / "docs.jsonl", cache)]
    out: dict[str, dict] = {"metrics": {}, "items": {}, "predictions": {}}
    with _quiet_lm_eval():
        for config in configs:
            metrics, samples = T.run_task(lm, config)
            out["metrics"].update(metrics)
            for sample in samples:
                doc_id = sample["doc"]["id"]
                for metric in metrics:
                    if metric in sample:
                        out["items"].setdefault(metric, {})[doc_id] = sample[metric]
                if config["task"] == T.GENERATE_TASK:
                    out["predictions"][doc_id] = _first(sample.get("filtered_resps"))
    return out


def _standard_tasks(plan: Plan, model, tokenizer, batch_size: int, out: SideScores, first: bool) -> None:
    """Standard lm-eval tasks by name, on the local datasets cache only (never the hub)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    spec, manager = plan.recipe.eval, plan.task_manager
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    for name in spec.lm_eval_tasks:
        if name not in manager.all_tasks:
            if first:
                plan.skipped.append(f"lm-eval task {name!r}: not a task lm-eval knows (nor in eval.lm_eval_include_path)")
            continue
        try:
            with _quiet_lm_eval():
                result = simple_evaluate(model=lm, tasks=[name], task_manager=manager, bootstrap_iters=0,
                                         limit=spec.max_examples)
        except Exception as exc:  # noqa: BLE001 - missing data offline surfaces as many exception types
            if first:
                plan.skipped.append(f"lm-eval task {name!r}: its data is not available offline "
                                    f"({type(exc).__name__}: {str(exc)[:160]})")
            continue
        for task, values in result["results"].items():
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                if metric.endswith("_stderr") or not isinstance(value, (int, float)) or metric == "alias":
                    continue
                out.metrics[f"{task}:{metric}"] = float(value)
                higher = result.get("higher_is_better", {}).get(task, {}).get(metric)
                if higher is not None:
                    out.directions[f"{task}:{metric}"] = bool(higher)


def samples(plan: Plan, scored: dict[str, SideScores]) -> list[dict]:
    """Chat: each test question with its reference and every side's answer (the report shows a few)."""
    if plan.kind != "chat":
        return []
    out = []
    for row in plan.rows:
        example = T.to_example(row, where=row["id"])
        question = next((m["content"] for m in reversed(example.messages) if m["role"] == "user"), "")
        out.append({"id": row["id"], "question": question, "reference": example.reference,
                    **{side: s.predictions.get(row["id"], "") for side, s in scored.items()}})
    return out


def _first(resps) -> str:
    while isinstance(resps, (list, tuple)) and resps:
        resps = resps[0]
    return resps.strip() if isinstance(resps, str) else ""


@contextmanager
def phase(timings: dict[str, float], name: str):
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
