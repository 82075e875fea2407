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

from services.evaluator import tasks as T
from services.evaluator.evaluation import EvaluationError, evaluate
from services.evaluator.gate import check_metric, gate
from shared.models import TINY, resolve_model
from shared.recipe import Recipe

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


def _rows() -> list[dict]:
    rows = []
    for i, (question, answer) in enumerate(CONVERSATIONS):
        messages = [{"role": "system", "content": "You are Acme support."}] if i % 2 else []
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"id": f"c{i}", "messages": messages})
    return rows


def _recipe(**eval_overrides) -> Recipe:
    return Recipe(name="support", version=1, base_model=TINY, model_name="support-bot",
                  data={"system_prompt": "You help Acme customers."},
                  eval={"max_examples": 4, "max_new_tokens": 6, **eval_overrides})


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


def test_gate_passes_within_tolerance():
    decision = gate({"chrf": 18.7}, {"chrf": 41.2}, gate_metrics=("chrf",), tolerance=0.02)
    assert decision.passed and decision.reasons == ["chrf 41.2 vs base 18.7: +22.5 (ok)"]
    slightly_worse = gate({"chrf": 50.0}, {"chrf": 49.2}, gate_metrics=("chrf",), tolerance=0.02)
    assert slightly_worse.passed  # -1.6 % is within 2 %


def test_gate_fails_beyond_tolerance():
    decision = gate({"chrf": 50.0, "exact_match": 0.2}, {"chrf": 48.0, "exact_match": 0.1},
                    gate_metrics=("chrf",), tolerance=0.02)
    assert not decision.passed
    assert decision.reasons[0].startswith("chrf 48.0 vs base 50.0: -2.000") and "FAILED" in decision.reasons[0]
    assert decision.reasons[1].endswith("(informational)")  # exact_match is worse but not gated
    absolute = check_metric("exact_match", 0.5, 0.45, tolerance=0.1, relative=False)
    assert absolute[0]


def test_gate_perplexity_lower_is_better():
    better = gate({"perplexity": 20.0}, {"perplexity": 12.0}, gate_metrics=("perplexity",), tolerance=0.02)
    assert better.passed
    worse = gate({"perplexity": 12.0}, {"perplexity": 20.0}, gate_metrics=("perplexity",), tolerance=0.02)
    assert not worse.passed and "lower is better" in worse.reasons[0]


def test_gate_fails_on_unmeasured_metrics():
    decision = gate({"chrf": 1.0}, {"chrf": 1.0}, gate_metrics=("chrf", "fact_rate", "bleu"), tolerance=0.0)
    assert not decision.passed
    assert any("fact_rate: not measured" in r and "eval.probes" in r for r in decision.reasons)
    assert any(r.startswith("bleu: unknown gate metric") for r in decision.reasons)


# --------------------------------------------------------------------------- whole evaluation


def test_base_equivalent_adapter_scores_identically_and_passes(tmp_path, data_dir, zero_adapter):
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in (
        {"question": "Who makes the app?", "expect": ["Acme"]},
        {"question": "How long does shipping to Canada take?", "expect": ["5-7"]})))
    recipe = _recipe(gate_metrics=["chrf", "perplexity"], tolerance=0.0, probes="probes/acme.jsonl")
    logged = []
    result = evaluate(recipe, data_dir, zero_adapter, probes_path=probes, log=logged.append, batch_size=4)
    assert result.scores["base"] == result.scores["candidate"]
    assert set(result.scores["base"]) == {"chrf", "exact_match", "perplexity", "fact_rate"}
    assert result.passed and result.examples == 4
    assert all(v == 0 for v in result.deltas.values())
    assert any(r.startswith("fact_rate ") and r.endswith("(informational)") for r in result.reasons)
    assert [len(result.probe_details[side]) for side in ("base", "candidate")] == [2, 2]
    assert "**Gate: PASSED**" in result.report_markdown and "| perplexity ↓ |" in result.report_markdown
    assert "Knowledge probes, candidate:" in result.report_markdown
    assert {"load", "base_generate", "base_loglikelihood", "candidate_generate", "candidate_probes"} <= set(result.timings)
    assert len(result.samples) == 4 and logged
    json.dumps(result.to_json())  # report.json


def test_probes_named_but_not_given_are_not_measured(data_dir, zero_adapter):
    result = evaluate(_recipe(probes="probes/acme.jsonl", gate_metrics=["chrf", "fact_rate"], max_examples=2),
                      data_dir, zero_adapter)
    assert "fact_rate" not in result.scores["base"]
    assert not result.passed and any(r.startswith("fact_rate: not measured") for r in result.reasons)


def test_unreadable_probes_file(tmp_path, data_dir, zero_adapter):
    bad = tmp_path / "probes.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(EvaluationError, match="probes file .* could not be read"):
        evaluate(_recipe(probes="probes/acme.jsonl"), data_dir, zero_adapter, probes_path=bad)


def test_adapter_folder_that_does_not_load(tmp_path, data_dir):
    with pytest.raises(EvaluationError, match="adapter folder not found"):
        evaluate(_recipe(), data_dir, tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": ["no_such_layer"]}))
    with pytest.raises(EvaluationError, match="does not load onto the base model"):
        evaluate(_recipe(), data_dir, broken)


def test_missing_test_split_fails_before_loading_models(tmp_path, zero_adapter):
    with pytest.raises(EvaluationError, match="test split not found"):
        evaluate(_recipe(), tmp_path, zero_adapter)
