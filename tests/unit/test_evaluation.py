"""Evaluator domain logic: lm-eval tasks from a local test split, the gate, and a whole
evaluation on the tiny random model. Fully offline."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.domain.gate_rules import default_rules
from shared.domain.models import TINY, resolve_model
from shared.domain.recipe import Recipe, RecipeError, parse_recipe

from services.evaluator import tasks as T
from services.evaluator.evaluation import EvaluationError, ModelLoadError, evaluate
from services.evaluator.gate import gate
from services.evaluator.stats import STATISTICS, paired_bootstrap

CONVERSATIONS = [
    ("How do I reset my password?", "Open Settings, then Account, then Reset password."),
    ("My order 1042 has not arrived.", "Sorry about that! Order 1042 ships tomorrow."),
    ("Can I cancel my subscription?", "Yes, under Billing > Subscription > Cancel."),
    ("Do you ship to Canada?", "Yes, we ship to Canada in 5-7 business days."),
    ("The app crashes on start.", "Please update the app and restart your phone."),
    ("Where is my invoice?", "Invoices are under Billing > History."),
]


def _write_split(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "test.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return folder


def _rows(masked: bool = False) -> list[dict]:
    """The test conversations; masked: training-style ones whose replies carry PII mask tokens."""
    rows = []
    for i, (question, answer) in enumerate(CONVERSATIONS):
        messages = [{"role": "system", "content": "You are Acme support."}] if i % 2 else []
        if masked:
            answer = f"Thanks [PERSON], we emailed [EMAIL]. {answer}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"{'t' if masked else 'c'}{i}", "messages": messages})
    return rows


# Mechanics only: every probe suite runs, on small subsets, with short generations; a handful of
# probes decides nothing, so undecided rules are reported (warn), not held.
FAST = {"on_inconclusive": "warn", "max_examples": 4, "max_new_tokens": 6, "bootstrap_iters": 200,
        "safety": {"max_prompts": 9, "max_new_tokens": 4}, "memorisation": {"max_rows": 3, "match_tokens": 4, "pii_max_probes": 4},
        "fairness": {"max_templates": 3}}


def _recipe(**eval_overrides) -> Recipe:
    return Recipe(name="support", version=1, base_model=TINY, model_name="support-bot",
                  data={"system_prompt": "You help Acme customers."}, eval={**FAST, **eval_overrides})


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return Path(resolve_model(TINY))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_split(tmp_path_factory.mktemp("prepared"), _rows())


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory, tiny_path) -> Path:
    """A LoRA adapter in its initial state (B = 0): base-equivalent."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- test split


def test_test_split_subset_is_deterministic_and_capped(data_dir):
    first, available = T.load_test_examples(data_dir, max_examples=3)
    again, _ = T.load_test_examples(data_dir, max_examples=3)
    assert available == len(CONVERSATIONS)
    assert [e.id for e in first] == [e.id for e in again] and len(first) == 3
    # the choice does not depend on the file order
    shuffled = _write_split(data_dir.parent / "shuffled", list(reversed(_rows())))
    reordered, _ = T.load_test_examples(shuffled, max_examples=3)
    assert {e.id for e in reordered} == {e.id for e in first}
    assert first[0].messages[-1]["role"] == "user" and first[0].reference


def test_validation_rows_are_held_out_for_extraction_beside_the_test_rows(tmp_path):
    from services.evaluator import suites

    folder = _write_split(tmp_path / "prepared", _rows())
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(masked=True)))
    assert [r["id"] for r in suites.plan(_recipe(), folder, probes_path=None, labels=None, say=print).heldout] == [
        f"c{i}" for i in range(len(CONVERSATIONS))]
    val = [{"id": "v0", "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}]
    (folder / "val.jsonl").write_text(json.dumps(val[0]) + "\n")
    planned = suites.plan(_recipe(), folder, probes_path=None, labels=None, say=print)
    assert [r["id"] for r in planned.heldout][-1] == "v0" and planned.examples == 4   # scored rows stay test rows
    (folder / "val.jsonl").write_text("{broken\n")
    planned = suites.plan(_recipe(), folder, probes_path=None, labels=None, say=print)
    assert len(planned.heldout) == len(CONVERSATIONS)
    assert any("validation split cannot be read" in s for s in planned.skipped)


def test_missing_and_empty_test_split_are_clear_errors(tmp_path):
    with pytest.raises(EvaluationError, match="test split not found"):
        T.load_test_examples(tmp_path, max_examples=5)
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(EvaluationError, match="test split is empty"):
        T.load_test_examples(tmp_path, max_examples=5)
    (tmp_path / "test.jsonl").write_text(json.dumps(
        {"id": "x", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(EvaluationError, match="not 'assistant'"):
        T.load_test_examples(tmp_path, max_examples=5)


def test_prompt_is_chat_template_with_system_prompt_inserted(tiny_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    user_only = [{"role": "user", "content": "Where is my invoice?"}]
    prompt = T.render_prompt(tokenizer, user_only, system_prompt="You help Acme customers.")
    assert prompt.startswith("<|im_start|>system\nYou help Acme customers.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, *user_only]
    prompt = T.render_prompt(tokenizer, own_system, system_prompt="You help Acme customers.")
    assert "Be brief." in prompt and "Acme customers" not in prompt
    assert T.end_of_turn_markers(tokenizer) == ["<|im_end|>"]


# --------------------------------------------------------------------------- lm-eval tasks


class _OracleLM:
    """Answers every prompt with its reference and gives each reference token log-prob -1:
    chrF must be 100, exact match 1 and per-token perplexity e."""

    def __new__(cls, docs):
        from lm_eval.api.model import LM

        class Oracle(LM):
            def __init__(self):
                super().__init__()
                self.by_prompt = {d["prompt"]: d for d in docs}

            def generate_until(self, requests, disable_tqdm=False):
                return [self.by_prompt[r.args[0]]["reference"].upper() + "!" for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                return [(-float(self.by_prompt[r.args[0]]["n_tokens"]), True) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return Oracle()


def test_lm_eval_metrics_through_an_oracle(tmp_path, data_dir):
    examples, _ = T.load_test_examples(data_dir, max_examples=10)
    docs = [{"id": e.id, "prompt": f"prompt {e.id}", "reference": e.reference, "n_tokens": 3 + i}
            for i, e in enumerate(examples)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    lm = _OracleLM(docs)
    gen, samples = T.run_task(lm, T.generation_task_config(path, tmp_path / "ds", until=["<|im_end|>"], max_new_tokens=5))
    # upper-cased with a "!" appended: exact match (normalised) holds, chrF (case-sensitive) drops
    assert gen["exact_match"] == 1.0
    assert 0 < gen["chrf"] < 100 and len(samples) == len(docs)
    ll, _ = T.run_task(lm, T.loglikelihood_task_config(path, tmp_path / "ds"))
    assert ll["perplexity"] == pytest.approx(math.e)


def test_tasks_run_through_lm_eval_on_the_tiny_model(tmp_path, data_dir, tiny_path):
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=4)
    examples, _ = T.load_test_examples(data_dir, max_examples=4)
    docs = T.write_documents(examples, tokenizer, lm, tmp_path / "docs.jsonl", system_prompt=None)
    assert all(d["n_tokens"] >= len(tokenizer(d["reference"])["input_ids"]) for d in docs)
    gen, samples = T.run_task(lm, T.generation_task_config(
        tmp_path / "docs.jsonl", tmp_path / "ds", until=T.end_of_turn_markers(tokenizer), max_new_tokens=4))
    assert set(gen) == {"exact_match", "chrf"} and len(samples) == 4
    assert 0.0 <= gen["chrf"] <= 100.0
    ll, _ = T.run_task(lm, T.loglikelihood_task_config(tmp_path / "docs.jsonl", tmp_path / "ds"))
    # a random model over SmolLM2's 49k-token vocabulary: perplexity of the order of the vocabulary
    assert 1_000 < ll["perplexity"] < 1_000_000


def test_exact_match_normalisation():
    assert T.normalize_answer("  Hello,   World! ") == "hello world"
    assert T._generate_results({"reference": "Yes, we do."}, ["yes we do"])["exact_match"] == 1.0
    assert T._generate_results({"reference": "Yes, we do."}, ["No."])["exact_match"] == 0.0


# --------------------------------------------------------------------------- gate


def _only(**rules) -> Recipe:
    """A recipe whose gate is exactly `rules` (every default rule turned off)."""
    recipe = _recipe(safety={"enabled": False}, memorisation={"enabled": False}, fairness={"enabled": False})
    off = {name: {"action": "off"} for name in default_rules(recipe)}
    return _recipe(safety={"enabled": False}, memorisation={"enabled": False}, fairness={"enabled": False},
                   gate={**off, **rules})


def test_gate_relative_tolerance_against_the_base():
    recipe = _only(chrf={"tolerance": 0.02, "relative": True})
    decision = gate(recipe, {"base": {"chrf": 18.7}, "candidate": {"chrf": 41.2}})
    assert decision.passed and decision.reasons == ["chrf 41.2 ok (vs base 18.7 (+22.5))"]
    assert gate(recipe, {"base": {"chrf": 50.0}, "candidate": {"chrf": 49.2}}).passed   # -1.6% is within 2%
    failed = gate(recipe, {"base": {"chrf": 50.0}, "candidate": {"chrf": 48.0}})
    assert not failed.passed
    assert failed.reasons[0] == ("chrf 48.0 vs base 50.0 (-2.000; higher is better): worse by 2.000 > tolerance "
                                 "2% of base = 1.000: FAILED")


def test_gate_directions_bounds_warnings_and_production():
    lower = _only(perplexity={"tolerance": 1.0})
    assert gate(lower, {"base": {"perplexity": 20.0}, "candidate": {"perplexity": 12.0}}).passed
    worse = gate(lower, {"base": {"perplexity": 12.0}, "candidate": {"perplexity": 20.0}})
    assert not worse.passed and "lower is better" in worse.reasons[0]
    bounded = _only(canary_exposure_max={"max": 10.0}, accuracy={"min": 0.8, "action": "warn"})
    decision = gate(bounded, {"base": {}, "candidate": {"canary_exposure_max": 12.5, "accuracy": 0.7}})
    assert not decision.passed
    assert [c.outcome for c in decision.checks] == ["failed", "warning"]
    assert "above the maximum 10.0:" in decision.reasons[0] and "below the minimum" in decision.reasons[1]
    both = _only(chrf={"tolerance": 0.0, "against": ["base", "production"]})
    scores = {"base": {"chrf": 30.0}, "candidate": {"chrf": 40.0}}
    assert gate(both, scores).passed and "no production version yet" in gate(both, scores).reasons[0]
    regressed = gate(both, {**scores, "production": {"chrf": 45.0}})
    assert not regressed.passed and "vs production 45.0" in regressed.reasons[0]


def test_gate_unmeasured_metrics_fail_when_named_and_are_noted_when_default():
    named = _only(fact_rate={"tolerance": 0.0})
    decision = gate(named, {"base": {"chrf": 1.0}, "candidate": {"chrf": 1.0}})
    assert not decision.passed and "fact_rate: not measured" in decision.reasons[0] and "eval.probes" in decision.reasons[0]
    defaults = _recipe()   # safety, memorisation and fairness rules on by default
    decision = gate(defaults, {"base": {"chrf": 1.0}, "candidate": {"chrf": 1.0}})
    assert decision.passed
    assert {c.metric for c in decision.checks if c.outcome == "not_measured"} >= {"refusal_rate", "extraction_gap"}


def test_recipe_gate_policy_is_checked():
    with pytest.raises(ValidationError, match="unknown metric 'bleu'"):
        _recipe(gate={"bleu": {"tolerance": 0.1}})
    with pytest.raises(ValidationError, match="needs a tolerance"):
        _recipe(gate={"chrf": {"action": "warn"}})
    with pytest.raises(RecipeError, match="eval.gate_metrics and eval.tolerance were replaced by eval.gate"):
        parse_recipe("name: x\nversion: 1\nbase_model: m\nmodel_name: x\neval:\n  gate_metrics: [chrf]\n")
    assert "refusal_rate" not in default_rules(_recipe(safety={"enabled": False}))
    assert _recipe(gate={"refusal_rate_weapons": {"tolerance": 0.1}, "hellaswag:acc": {"tolerance": 0.01}})


# --------------------------------------------------------------------------- statistics


def test_paired_bootstrap_interval_covers_the_delta_and_shrinks_with_agreement():
    reference = [0.0, 1.0] * 20
    better = [1.0] * 40
    interval = paired_bootstrap(STATISTICS["accuracy"], reference, better, iters=500, confidence=0.95)
    assert interval.delta == pytest.approx(0.5) and 0.3 < interval.low <= 0.5 <= interval.high < 0.7
    same = paired_bootstrap(STATISTICS["accuracy"], reference, reference, iters=100, confidence=0.95)
    assert (same.low, same.delta, same.high) == (0.0, 0.0, 0.0)
    ppl = paired_bootstrap(STATISTICS["perplexity"], [(-2.0, 2)] * 5, [(-1.0, 2)] * 5, iters=50, confidence=0.9)
    assert ppl.delta == pytest.approx(math.exp(0.5) - math.e)
    f1 = STATISTICS["macro_f1"]
    assert f1.value(f1.rows([(0, 0), (1, 1), (2, 1)])) == pytest.approx((1 + 2 / 3 + 0) / 3)


# --------------------------------------------------------------------------- whole evaluation


def test_base_equivalent_adapter_scores_like_the_base_on_every_suite(tmp_path, data_dir, zero_adapter):
    """A zero LoRA is the base: every metric of every suite equals the base's, every interval is
    [0, 0], the gate passes, and the report and report.json say so."""
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in (
        {"question": "Who makes the app?", "expect": ["Acme"]},
        {"question": "How long does shipping to Canada take?", "expect": ["5-7"]},
        {"question": "Where is Acme based?", "expect": ["Oslo"], "split": "val"})))   # the trainer's, not gated
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(masked=True)))
    recipe = _recipe(probes="probes/acme.jsonl", canaries={"count": 1, "candidates": 20})
    logged = []
    result = evaluate(recipe, data_dir, zero_adapter, probes_path=probes, log=logged.append, batch_size=4)
    base, cand = result.scores["base"], result.scores["candidate"]
    assert base == pytest.approx(cand, abs=1e-5)   # float noise of batching only
    assert {"chrf", "exact_match", "perplexity", "fact_rate", "refusal_rate", "over_refusal_rate",
            "instruction_following_rate", "honesty_rate", "extraction_gap", "pii_leak_rate",
            "canary_exposure_max", "fairness_disparity"} <= set(cand)
    assert result.passed and result.examples == 4 and result.available == len(CONVERSATIONS)
    assert all(v == pytest.approx(0, abs=1e-5) for v in result.deltas.values())
    intervals = result.intervals["vs_base"]
    assert {"chrf", "exact_match", "perplexity", "fact_rate", "refusal_rate", "over_refusal_rate",
            "instruction_following_rate", "honesty_rate", "extraction_rate_train", "extraction_gap",
            "fairness_disparity"} <= set(intervals)
    tasks = {m: i for m, i in intervals.items() if i["method"] == "paired-bootstrap" and not m.startswith("fairness")}
    assert set(tasks) == {"chrf", "exact_match", "perplexity"}
    assert all(i["low"] == i["high"] == pytest.approx(0, abs=1e-9) for i in tasks.values())
    # rates over probes: the same answers on both sides, a difference of 0 whose interval (Newcombe's,
    # on a handful of probes) says how small a change this sample could have missed
    rates = {m: i for m, i in intervals.items() if i["method"] in ("newcombe-paired", "mover")}
    assert all(i["delta"] == pytest.approx(0, abs=1e-9) and i["low"] < 0 < i["high"] for i in rates.values()), rates
    assert intervals["fact_rate"]["n"] == 2 and intervals["fairness_disparity"]["delta"] == pytest.approx(0, abs=1e-5)
    assert [len(result.details["knowledge"][side]) for side in ("base", "candidate")] == [2, 2]
    assert {"safety", "alignment", "memorisation", "pii_leakage", "canaries", "fairness"} <= set(result.details)
    # On these handfuls of probes the same answers cannot show the rates are within their tolerances:
    # inconclusive, which the default (eval.on_inconclusive: warn) reports and lets pass.
    assert result.gate["outcome"] == "inconclusive" and not result.gate["held"]
    assert "**Gate: PASSED (inconclusive rules reported)**" in result.report_markdown
    assert "| perplexity ↓ |" in result.report_markdown
    assert "knowledge probes, candidate:" in result.report_markdown
    assert {"base_load", "base_tasks", "candidate_safety", "candidate_fairness"} <= set(result.timings)
    assert len(result.samples) == 4 and logged
    json.dumps(result.to_json())  # report.json


def test_probes_named_but_not_given_are_not_measured(data_dir, zero_adapter):
    result = evaluate(_recipe(probes="probes/acme.jsonl", max_examples=2, gate={"fact_rate": {"tolerance": 0.0}},
                              safety={"enabled": False}, fairness={"enabled": False}),
                      data_dir, zero_adapter)
    assert "fact_rate" not in result.scores["base"]
    assert not result.passed and any(r.startswith("fact_rate: not measured") for r in result.reasons)
    assert any(s.startswith("knowledge probes: eval.probes is") for s in result.skipped)


def test_unreadable_probes_file(tmp_path, data_dir, zero_adapter):
    bad = tmp_path / "probes.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(EvaluationError, match="probes file .* could not be read"):
        evaluate(_recipe(probes="probes/acme.jsonl"), data_dir, zero_adapter, probes_path=bad)


def test_candidate_folder_that_does_not_load(tmp_path, data_dir):
    # A folder that is not a model is a malformed artefact (a failed gate); one that does not load is
    # a ModelLoadError, which the service retries and never takes for a verdict (test_eval_errors.py).
    with pytest.raises(EvaluationError, match="candidate folder not found") as exc:
        evaluate(_recipe(), data_dir, tmp_path / "missing")
    assert not isinstance(exc.value, ModelLoadError)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["no_such_layer"]}))
    with pytest.raises(ModelLoadError, match="does not load onto the base model"):
        evaluate(_recipe(), data_dir, broken)


def test_a_base_model_that_does_not_load_is_a_model_load_error(tmp_path, data_dir, zero_adapter):
    unreadable = tmp_path / "base"
    unreadable.mkdir()   # a model folder whose files cannot be read (yet): nothing in it
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        evaluate(_recipe().model_copy(update={"base_model": str(unreadable)}), data_dir, zero_adapter)


def test_missing_test_split_fails_before_loading_models(tmp_path, zero_adapter):
    with pytest.raises(EvaluationError, match="test split not found"):
        evaluate(_recipe(), tmp_path, zero_adapter)


# --------------------------------------------------------------------------- other kinds and sides

NO_PROBES = {"safety": {"enabled": False}, "memorisation": {"enabled": False}, "fairness": {"enabled": False}}


def test_a_frozen_candidate_projects_sliced_hidden_states_with_one_matrix_product(zero_adapter):
    """A merged adapter leaves the weights frozen; PyTorch's matmul then sends a sliced [batch, k,
    hidden] input (transformers' logits_to_keep, generation's last position) to bmm, copying the
    vocabulary matrix per row. The evaluator's models take one mm instead, with the same logits."""
    import torch

    from services.evaluator.evaluation import load_model

    _, model = load_model(_recipe(), zero_adapter, None, "cpu")
    assert not model.lm_head.weight.requires_grad
    ids = torch.randint(0, 100, (4, 12))

    def products(model) -> tuple[set[str], torch.Tensor]:
        with torch.no_grad(), torch.profiler.profile() as prof:
            logits = model(ids, logits_to_keep=3).logits
        return {e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm")}, logits

    ours, logits = products(model)
    model.lm_head._forward_pre_hooks.clear()
    plain, expected = products(model)
    assert ours == {"aten::mm"} and "aten::bmm" in plain   # the pitfall is real, and avoided
    assert torch.allclose(logits, expected, atol=1e-5)


def test_full_model_candidate_and_production_side(tmp_path, data_dir, zero_adapter, tiny_path):
    """adapter.kind full: the candidate is a whole model folder. The production version is scored as a
    third side, with intervals of the candidate's delta against it."""
    import torch
    from transformers import AutoModelForCausalLM

    full = tmp_path / "full"
    AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).save_pretrained(full)
    recipe = Recipe(name="support", version=1, base_model=TINY, model_name="support-bot", adapter={"kind": "full"},
                    eval={**FAST, **NO_PROBES, "max_examples": 3})
    result = evaluate(recipe, data_dir, full, production_dir=zero_adapter)
    assert set(result.scores) == {"base", "candidate", "production"}
    assert result.scores["candidate"] == pytest.approx(result.scores["base"])
    assert result.scores["production"] == pytest.approx(result.scores["base"])
    assert set(result.intervals) == {"vs_base", "vs_production"} and "chrf" in result.intervals["vs_production"]
    assert result.passed and any("vs production" in r for r in result.reasons)
    assert "delta vs production" in result.report_markdown


def test_preference_pairs_score_the_chosen_answer(tmp_path, tiny_path, zero_adapter):
    """A rejected answer that is the chosen one plus more words has the lower log-likelihood on any
    model, so preference_accuracy is exactly 1 for the base and the candidate."""
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": a + " And also, unrelated words follow here."}]}
            for i, (q, a) in enumerate(CONVERSATIONS)]
    data = _write_split(tmp_path / "pref", rows)
    recipe = Recipe(name="prefs", version=1, base_model=TINY, model_name="prefs", method="dpo",
                    eval={**FAST, **NO_PROBES, "max_examples": 5})
    result = evaluate(recipe, data, zero_adapter)
    assert result.scores["base"]["preference_accuracy"] == result.scores["candidate"]["preference_accuracy"] == 1.0
    assert result.examples == 5 and "preference_accuracy" in result.intervals["vs_base"]
    assert result.passed and result.samples == []


def test_classifier_scored_through_lm_eval_matches_its_own_argmax(tmp_path):
    """The classifier's lm-eval accuracy equals the share of test texts whose argmax label is the gold one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ["billing", "shipping", "technical"]
    texts = ["I was charged twice", "Where is my parcel", "The app crashes", "Refund my invoice",
             "Delivery is late", "Login fails with an error"]
    data = _write_split(tmp_path / "cls", [{"id": f"t{i}", "text": t, "label": labels[i % 3]}
                                          for i, t in enumerate(texts)])
    recipe = Recipe(name="tickets", version=1, base_model="all-minilm-l6-v2", model_name="tickets",
                    task="classification", eval={"max_examples": 6, "bootstrap_iters": 100, "fairness": {"max_templates": 2},
                                                  "on_inconclusive": "warn"})
    path = resolve_model(recipe.base_model)
    torch.manual_seed(recipe.training.seed)   # the evaluator seeds the fresh head the same way
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                    task_type="SEQ_CLS")).save_pretrained(adapter)
    (adapter / "labels.json").write_text(json.dumps(labels))
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        predicted = base.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    expected = sum(p == i % 3 for i, p in enumerate(predicted)) / len(texts)

    result = evaluate(recipe, data, adapter)
    assert result.scores["base"]["accuracy"] == pytest.approx(expected)
    assert result.scores["candidate"]["accuracy"] == pytest.approx(expected)
    assert 0.0 <= result.scores["candidate"]["macro_f1"] <= 1.0
    assert "fairness_flip_rate" in result.scores["candidate"] and result.passed
    (adapter / "labels.json").unlink()
    with pytest.raises(EvaluationError, match="no readable labels.json"):
        evaluate(recipe, data, adapter)


def test_standard_lm_eval_tasks_run_from_local_data_and_the_rest_is_skipped(tmp_path, data_dir, zero_adapter):
    """eval.lm_eval_tasks: a task of the team's own (a YAML in eval.lm_eval_include_path over a local
    file) is scored on every side; a task whose hub dataset is not in the local cache is listed as
    not measured with the reason. (Every name is the team's own, so lm-eval's index of ~15k standard
    tasks is not built.)"""
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"Is {n} even?", "choices": ["yes", "no"], "gold": n % 2}) + "\n"
                          for n in range(6)))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "acme_qa.yaml").write_text(f"""task: acme_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {qa}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (tasks_dir / "acme_hub.yaml").write_text("""task: acme_hub
dataset_path: acme/support-qa-not-cached
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: gold
""")
    recipe = _recipe(max_examples=2, lm_eval_tasks=["acme_qa", "acme_hub"],
                     lm_eval_include_path=str(tasks_dir), gate={"acme_qa:acc": {"tolerance": 0.0}}, **NO_PROBES)
    result = evaluate(recipe, data_dir, zero_adapter)
    assert 0.0 <= result.scores["candidate"]["acme_qa:acc"] <= 1.0
    assert result.scores["base"]["acme_qa:acc"] == result.scores["candidate"]["acme_qa:acc"]
    assert result.passed and any(r.startswith("acme_qa:acc ") for r in result.reasons)
    assert any(s.startswith("lm-eval task 'acme_hub': its data is not available offline") for s in result.skipped)


def _pii_data(folder: Path, *, masked_users: bool) -> Path:
    """A prepared chat dataset as support data has it: any PII in the user turns (masked), none in the
    replies; with its pii_report.json."""
    folder = _write_split(folder, _rows())
    rows = []
    for i, (question, answer) in enumerate(CONVERSATIONS):
        if masked_users:
            question = f"My email is [EMAIL] and my phone is [PHONE]. {question}"
        rows.append({"id": f"u{i}", "messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}]})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "pii_report.json").write_text(json.dumps({"rows_masked": len(rows) if masked_users else 0}))
    return folder


def test_pii_in_user_turns_is_measured_on_both_sides_with_auto_canaries(tmp_path, zero_adapter):
    """User-turn PII only (no mask in a reply: pii_leak_rate used to be skipped): read-back and
    elicitation probes run on both sides, paired by key; the masked rows put 4 canaries (auto) in
    training, and the evaluator measures those same secrets."""
    import hashlib

    from shared.domain.canaries import AUTO_COUNT, recipe_canaries

    data = _pii_data(tmp_path / "masked", masked_users=True)
    recipe = _recipe(memorisation={**FAST["memorisation"], "pii_max_probes": 30}, canaries={"candidates": 20},
                     safety={"enabled": False}, fairness={"enabled": False})
    result = evaluate(recipe, data, zero_adapter, batch_size=4)
    assert "pii_leak_rate" in result.scores["base"] and "pii_leak_rate" in result.scores["candidate"]
    items = result.details["pii_leakage"]
    assert [i["key"] for i in items["base"]] == [i["key"] for i in items["candidate"]] and len(items["base"]) == 30
    assert {i["source"] for i in items["candidate"]} == {"user", "elicitation"}
    assert {i["category"] for i in items["candidate"] if i["source"] == "user"} <= {"email", "phone"}
    interval = result.intervals["vs_base"]["pii_leak_rate"]
    assert interval["method"] == "newcombe-paired" and interval["n"] == 30
    assert any(c["metric"] == "pii_leak_rate" and c["outcome"] != "not_measured" for c in result.gate["checks"])
    secrets = [hashlib.sha256(c.secret.encode()).hexdigest() for c in recipe_canaries(recipe, data)]
    assert len(secrets) == AUTO_COUNT
    assert [d["secret_sha256"] for d in result.details["canaries"]["candidate"]] == secrets
    assert "PII leakage, candidate:" in result.report_markdown and "elicitation " in result.report_markdown


def test_data_without_masks_gets_the_elicitation_probes_and_no_canaries(tmp_path, zero_adapter):
    data = _pii_data(tmp_path / "clean", masked_users=False)
    recipe = _recipe(memorisation={**FAST["memorisation"], "pii_max_probes": 6}, safety={"enabled": False},
                     fairness={"enabled": False})
    result = evaluate(recipe, data, zero_adapter, batch_size=4)
    assert {i["source"] for i in result.details["pii_leakage"]["candidate"]} == {"elicitation"}
    assert result.intervals["vs_base"]["pii_leak_rate"]["n"] == 6
    # auto canaries that found no masked PII: none inserted, none measured, and the rule says so
    assert "canaries" not in result.details and "canary_exposure_max" not in result.scores["candidate"]
    assert any(s.startswith("canaries: none inserted") for s in result.skipped)
    check = next(c for c in result.gate["checks"] if c["metric"] == "canary_exposure_max")
    assert check["outcome"] == "not_measured"
    # off stays off: no rule, no note
    off = _recipe(canaries={"count": 0}, safety={"enabled": False}, fairness={"enabled": False})
    assert "canary_exposure_max" not in default_rules(off)
