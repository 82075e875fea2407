"""The evaluator's economy (issue 22): the base's results kept across evaluations, length-sorted
generation batches, and `eval.on_inconclusive: evaluate_more`, which scores the next slice of an
undecided probe set before deciding. On the tiny random model, offline."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
from pathlib import Path

import pytest

from shared.domain import probes
from shared.domain.access import Caller
from shared.domain.models import TINY, resolve_model
from shared.domain.overrides import OverrideRefused, check_overrides
from shared.domain.recipe import Recipe
from shared.platform.adapters.local_store import LocalObjectStore

from services.evaluator.cache import PREFIX, BaseResults, StoreEntries
from services.evaluator.evaluation import evaluate
from services.evaluator.gate import gate

QA = [("How do I reset my password?", "Open Settings, then Account, then Reset password."),
      ("Do you ship to Canada?", "Yes, we ship to Canada in 5-7 business days."),
      ("Where is my invoice?", "Invoices are under Billing > History."),
      ("Can I cancel my subscription?", "Yes, under Billing > Subscription > Cancel.")]

QUICK = {"max_examples": 2, "max_new_tokens": 4, "bootstrap_iters": 50,
         "safety": {"max_prompts": 9, "max_new_tokens": 3},
         "memorisation": {"enabled": False}, "fairness": {"enabled": False}}


def _recipe(**eval_overrides) -> Recipe:
    return Recipe(name="support", version=1, base_model=TINY, model_name="support-bot",
                  data={"system_prompt": "You help Acme customers."}, eval={**QUICK, **eval_overrides})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "test.jsonl").write_text("".join(json.dumps(
        {"id": f"c{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
        for i, (q, a) in enumerate(QA)))
    return folder


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory) -> Path:
    """A LoRA adapter in its initial state (B = 0): it answers as the base does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    out = tmp_path_factory.mktemp("adapter")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")).save_pretrained(out)
    return out


@pytest.fixture
def generated(monkeypatch) -> list[int]:
    """How many prompts each call of the model's generation loop was given."""
    calls: list[int] = []
    real = probes._generate

    def counting(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(probes, "_generate", counting)
    return calls


# --------------------------------------------------------------------------- the base's results, cached


def test_a_second_evaluation_reads_the_base_from_the_cache_and_decides_the_same(tmp_path, data_dir, zero_adapter,
                                                                            generated):
    store = LocalObjectStore(tmp_path / "store")
    entries = StoreEntries(store, "bucket")
    first = evaluate(_recipe(), data_dir, zero_adapter, cache=entries, batch_size=4)
    asked_first = sum(generated)
    assert first.cached == []
    kept = [o.name for o in store.list("bucket", PREFIX)]
    assert len(kept) == 3   # the base's tasks, safety and alignment

    generated.clear()
    second = evaluate(_recipe(), data_dir, zero_adapter, cache=entries, batch_size=4)
    assert set(second.cached) == {"tasks", "safety", "alignment"}
    assert sum(generated) == asked_first // 2   # only the candidate's probes were generated
    assert "base_load" in first.timings and "base_load" not in second.timings   # nothing left to load it for
    assert second.scores == first.scores and second.details == first.details
    assert second.intervals == first.intervals and second.gate == first.gate
    assert "read from the evaluation cache: tasks, safety, alignment" in second.report_markdown

    # a changed input of a suite misses for that suite only; the gate's settings change no key
    third = evaluate(_recipe(safety={"max_prompts": 10, "max_new_tokens": 3}, confidence=0.9,
                             gate={"chrf": {"tolerance": 0.5}}), data_dir, zero_adapter, cache=entries, batch_size=4)
    assert third.cached == ["tasks"] and "base_load" in third.timings


def test_every_side_is_scored_in_the_dtype_the_device_multiplies_natively(monkeypatch, tmp_path, data_dir,
                                                                          zero_adapter):
    import torch

    from services.evaluator.evaluation import scoring_dtype

    assert scoring_dtype("float32", "cuda") == "float32" and scoring_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # a V100, a T4
    assert scoring_dtype("auto", "cuda") == "float32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert scoring_dtype("auto", "cuda:1") == "bfloat16"
    for amx, avx512_bf16, expected in ((False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        assert scoring_dtype("auto", "cpu") == expected
    assert scoring_dtype("auto", "mps") == "float32"

    # an evaluation says what it scored in, and another dtype does not read the first one's base results
    entries = StoreEntries(LocalObjectStore(tmp_path / "store"), "bucket")
    first = evaluate(_recipe(dtype="bfloat16"), data_dir, zero_adapter, cache=entries, batch_size=4)
    second = evaluate(_recipe(dtype="float32"), data_dir, zero_adapter, cache=entries, batch_size=4)
    assert (first.dtype, second.dtype, second.cached) == ("bfloat16", "float32", [])
    assert "scored in bfloat16" in first.report_markdown


def test_the_cache_key_names_everything_that_changes_an_answer(tmp_path):
    entries = StoreEntries(LocalObjectStore(tmp_path / "store"), "bucket")
    results = BaseResults(entries, base_sha256="a" * 64, device="cpu", dtype="float32", batch_size=8)
    key = results.key("safety", {"system_prompt": "x", "eval": {"max_new_tokens": 4}})
    assert key == results.key("safety", {"eval": {"max_new_tokens": 4}, "system_prompt": "x"})
    assert key != results.key("safety", {"system_prompt": "y", "eval": {"max_new_tokens": 4}})
    assert key != results.key("alignment", {"system_prompt": "x", "eval": {"max_new_tokens": 4}})
    for changed in ({"base_sha256": "b" * 64}, {"device": "cuda"}, {"dtype": "bfloat16"}, {"batch_size": 32}):
        other = BaseResults(entries, **{"base_sha256": "a" * 64, "device": "cpu", "dtype": "float32",
                                        "batch_size": 8, **changed})
        assert other.key("safety", {"system_prompt": "x", "eval": {"max_new_tokens": 4}}) != key, changed


def test_an_entry_that_does_not_parse_is_a_miss(tmp_path):
    store = LocalObjectStore(tmp_path / "store")
    entries = StoreEntries(store, "bucket")
    results = BaseResults(entries, base_sha256="a" * 64, device="cpu", dtype="float32", batch_size=8)
    store.write("bucket", f"{PREFIX}{results.key('safety', {})}.json", b"{not json")
    assert results.get("safety", {}) is None
    results.put("safety", {}, {"metrics": {"refusal_rate": 0.5}, "details": []})
    assert results.get("safety", {}) == {"metrics": {"refusal_rate": 0.5}, "details": []}


# --------------------------------------------------------------------------- batches by length


def test_length_sorted_batches_answer_as_one_prompt_at_a_time(data_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(TINY)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [tokenizer(text)["input_ids"] for text in
               ("hi", "a much longer prompt with many more tokens in it than the others", "mid length prompt here",
                "x y", "another fairly long prompt that pads the short ones")]
    batched = probes.greedy_continuations(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    alone = [probes.greedy_continuations(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone

    memo: dict = {}
    with probes.remembered(memo):
        first = probes.greedy_continuations(model, tokenizer, prompts[:3], max_new_tokens=5)
        again = probes.greedy_continuations(model, tokenizer, prompts, max_new_tokens=5)
    assert first == batched[:3] and again == batched and len(memo) == 5


def test_rows_leave_the_batch_at_their_eos_and_answer_as_transformers_generate():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # large random weights, so each row's tokens depend on its own context (TINY repeats one token)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, initializer_range=0.5)).eval()
    draw = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 64, (n,), generator=draw).tolist() for n in (9, 3, 6, 2)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = probes._greedy_generate(model, ids, mask, max_new_tokens=8, pad_id=0, eos_id=63)[0][2]
    # the first row says `eos` at its third step and leaves the batch there; rows at other steps or never
    shrinking = probes._greedy_shrinking(model, ids, mask, max_new_tokens=8, pad_id=0, eos_id=eos)
    assert shrinking == probes._greedy_generate(model, ids, mask, max_new_tokens=8, pad_id=0, eos_id=eos)
    assert len(shrinking[0]) == 2 and len({len(row) for row in shrinking}) > 1 and max(map(len, shrinking)) == 8


# --------------------------------------------------------------------------- evaluate_more


def test_evaluate_more_scores_the_next_slice_only_and_holds_what_it_cannot_decide(data_dir, zero_adapter, generated):
    """Identical answers on 9 then 18 prompts cannot show refusal is within 0.05 of the base: each
    round generates only the new slice, and what is still undecided is held."""
    recipe = _recipe(on_inconclusive="evaluate_more", more_rounds=1,
                     gate={"refusal_rate": {"tolerance": 0.05}, "chrf": {"tolerance": 1.0, "action": "off"}})
    result = evaluate(recipe, data_dir, zero_adapter, batch_size=4)
    assert result.confidence == pytest.approx(1 - 0.05 / 2)   # two looks share the error rate
    assert [r["suites"] for r in result.rounds] == [["alignment", "safety"]]
    assert result.rounds[0]["probes"] == {"alignment": [9, 18], "safety": [9, 18]}
    assert len(result.details["safety"]["base"]) == len(result.details["safety"]["candidate"]) == 18
    assert result.intervals["vs_base"]["refusal_rate"]["n"] == len(
        [d for d in result.details["safety"]["candidate"] if d["category"] != "benign_control"])
    # per side: safety and alignment's first 9 each, then only their 9 new ones each
    prompts_per_side = sum(generated) // 2
    assert prompts_per_side == 36, generated
    assert result.gate["outcome"] == "inconclusive" and result.gate["held"] and not result.passed
    assert "evaluate_more round 1: alignment 9 → 18 probes, safety 9 → 18 probes; gate inconclusive" \
        in result.report_markdown
    assert "97.5% paired intervals, 2 looks (evaluate_more)" in result.report_markdown


def test_evaluate_more_stops_when_the_undecided_set_is_whole(data_dir, zero_adapter):
    """No first slice (max_prompts: None asks the whole set): nothing more to score, so it holds at once."""
    recipe = _recipe(on_inconclusive="evaluate_more", safety={"max_prompts": None, "max_new_tokens": 1},
                     max_examples=1, gate={"refusal_rate": {"tolerance": 0.0001}})
    result = evaluate(recipe, data_dir, zero_adapter, batch_size=32)
    assert result.rounds == [] and result.gate["held"]


def test_gate_holds_an_inconclusive_rule_after_evaluate_more():
    recipe = _recipe(on_inconclusive="evaluate_more", gate={"refusal_rate": {"tolerance": 0.05}})
    scores = {"base": {"refusal_rate": 0.5}, "candidate": {"refusal_rate": 0.5}}
    decision = gate(recipe, scores, intervals={"vs_base": {"refusal_rate": {
        "delta": 0.0, "low": -0.2, "high": 0.2, "n": 9, "method": "newcombe-paired"}}})
    assert decision.outcome == "inconclusive" and decision.held and not decision.passed


def test_a_submitter_may_ask_for_more_evidence_but_not_to_let_undecided_rules_pass():
    submitter = Caller(subject="ann@example.com", grants={"acme": frozenset({"submitter"})})
    check_overrides(submitter, _recipe(), {"eval.on_inconclusive": "evaluate_more", "eval.more_rounds": 3})
    check_overrides(submitter, _recipe(on_inconclusive="hold"), {"eval.on_inconclusive": "evaluate_more"})
    with pytest.raises(OverrideRefused, match="only tighten"):
        check_overrides(submitter, _recipe(on_inconclusive="hold"), {"eval.on_inconclusive": "warn"})
