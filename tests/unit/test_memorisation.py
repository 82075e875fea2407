"""Memorisation and privacy probes on the tiny random model, made to memorise for real: a few
dozen full-batch steps at a high learning rate on two chats and a canary."""
import json
import logging
import runpy

import pytest
import torch

from shared.domain.canaries import insert_canaries, make_canaries
from shared.domain.datasets import with_system_prompt
from shared.domain.models import TINY, resolve_model
from shared.domain.pii_residual import scan
from shared.domain.recipe import CanarySpec, MemorisationSpec

from services.evaluator.likelihood import continuation_logprobs
from services.evaluator.memorisation import (
    PII_ELICITATION,
    canary_exposure,
    extraction_rate,
    load_elicitation,
    pii_leakage,
)
from services.evaluator.probes import greedy_continuations


def chat(i: str, question: str, reply: str) -> dict:
    return {"id": i, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}


# short replies (11 to 13 tokens) and a short system prompt keep the memorising cheap
SYSTEM = "Be brief."
TRAIN = [chat("t1", "Where is my parcel?", "It left the Sydney depot on Tuesday and arrives within three days."),
         chat("t2", "Can I change my plan?", "Yes, once per billing cycle from the account page.")]
HELDOUT = [chat("h1", "Do you ship abroad?", "We ship to forty countries and show customs fees at checkout."),
           chat("h2", "How do I reset my password?", "Use the forgotten password link on the sign-in page.")]
CANARIES = make_canaries(1, 2)   # the first goes into the training data, the second does not


def load_tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(TINY)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tiny():
    return load_tiny()


@pytest.fixture(scope="module")
def memorised():
    """The tiny model after it has learned TRAIN and the first canary by heart (full batch, all
    tokens, until the loss is low enough for greedy decoding to reproduce them)."""
    model, tokenizer = load_tiny()
    rows = insert_canaries(TRAIN, CANARIES[:1], repeats=1, seed=0)
    texts = [tokenizer.apply_chat_template(with_system_prompt(r["messages"], SYSTEM), tokenize=False) for r in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(200):
        loss = model(**batch, labels=labels).loss
        if loss.item() < 0.1:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.1, f"the tiny model did not memorise its rows (loss {loss.item():.3f})"
    model.eval()
    return model, tokenizer


def test_batched_logprobs_match_the_model_loss_per_example(tiny):
    model, tokenizer = tiny
    pairs = [("The customer asked for a refund. The agent was", " helpful."),
             ("Hi", " there, how can I help you today?"),
             ("my support PIN is ", "123456"),    # the trailing space moves to the continuation
             ("A much longer prompt about a parcel that left the depot on Tuesday, and then", " it rained.")]
    logprobs, counts = continuation_logprobs(model, tokenizer, pairs, batch_size=3)
    for (prompt, continuation), lp, n in zip(pairs, logprobs, counts, strict=True):
        stripped = prompt.rstrip()
        p = tokenizer(stripped, add_special_tokens=False)["input_ids"]
        c = tokenizer(prompt[len(stripped):] + continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        with torch.no_grad():
            mean_nll = model(input_ids=ids, labels=labels).loss.item()   # mean over the continuation's tokens
        assert n == len(c)
        assert lp == pytest.approx(-mean_nll * len(c), abs=1e-4)
    assert counts[2] == 7   # " " and six digits


def test_empty_continuation_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="non-empty prompt and continuation"):
        continuation_logprobs(model, tokenizer, [("Hello", "")])


def test_extraction_finds_the_memorised_rows(memorised):
    model, tokenizer = memorised
    metrics, details = extraction_rate(model, tokenizer, TRAIN, HELDOUT, prefix_tokens=3, match_tokens=8,
                                       system_prompt=SYSTEM)
    assert metrics == {"extraction_rate_train": 1.0, "extraction_rate_heldout": 0.0, "extraction_gap": 1.0}
    assert {(d["id"], d["split"], d["compared"], d["extracted"]) for d in details} == {
        ("t1", "train", 8, True), ("t2", "train", 8, True), ("h1", "heldout", 8, False),
        ("h2", "heldout", 8, False)}
    # the prefix gives way on a short reply (13 tokens) so that 8 tokens are still compared
    metrics, details = extraction_rate(model, tokenizer, TRAIN[:1], HELDOUT[:1], prefix_tokens=500, match_tokens=8,
                                       system_prompt=SYSTEM)
    assert metrics["extraction_rate_train"] == 1.0 and details[0]["compared"] == 8


def test_teacher_forced_extraction_is_what_greedy_decoding_writes(memorised):
    """The one-pass check agrees with generating token by token, row by row, on extracted and not."""
    from services.evaluator.likelihood import teacher_forced

    model, tokenizer = memorised
    encoded = []
    for row in TRAIN + HELDOUT:
        reply = tokenizer(row["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, *row["messages"][:-1]],
                                               tokenize=False, add_generation_prompt=True)
        for cut in (0, 3):
            encoded.append((tokenizer(prompt, add_special_tokens=False)["input_ids"] + reply[:cut], reply[cut:cut + 8]))
    generated = greedy_continuations(model, tokenizer, [p for p, _ in encoded], max_new_tokens=8)
    forced = teacher_forced(model, tokenizer, encoded, batch_size=3)
    assert [g[:len(t)] == t for g, (_, t) in zip(generated, encoded, strict=True)] == [ok for _, ok in forced]
    assert any(ok for _, ok in forced) and not all(ok for _, ok in forced)


def test_extraction_rows_are_chosen_by_the_hash_of_their_ids(tiny):
    model, tokenizer = tiny
    seen = []

    def score(model, tokenizer, encoded):
        seen.append(len(encoded))
        return [(0.0, False) for _ in encoded]

    rows = [chat(f"r{i}", "q", "an answer long enough to cut") for i in range(6)]
    _, forward = extraction_rate(model, tokenizer, rows, rows, max_rows=2, prefix_tokens=2, match_tokens=3,
                                 score=score)
    _, backward = extraction_rate(model, tokenizer, rows[::-1], rows, max_rows=2, prefix_tokens=2, match_tokens=3,
                                  score=score)
    assert [d["id"] for d in forward] == [d["id"] for d in backward] and seen == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="no heldout row has an assistant reply"):
        extraction_rate(model, tokenizer, rows, [{"id": "x", "messages": [{"role": "user", "content": "q"}]}],
                        score=score)


def _prompt_texts(tokenizer, prompts) -> list[str]:
    return [tokenizer.decode(p) for p in prompts]


def test_pii_leakage_counts_a_planted_leak_and_keeps_no_value(tiny, caplog):
    _, tokenizer = tiny
    planted = "jane.doe@example.com"
    rows = [chat("p1", "How do I contact you?", "You can reach us at [EMAIL] any time."),
            chat("p2", "Is there a phone line?", "Call [PHONE] between nine and five."),
            chat("p3", "Thanks", "You are welcome.")]
    prompts_seen = []

    def generate(model, tokenizer, prompts, *, max_new_tokens):
        # the model "remembers" the e-mail address it was trained on before masking, nothing else
        texts = _prompt_texts(tokenizer, prompts)
        prompts_seen.extend(texts)
        return [tokenizer(f" {planted} any time." if t.endswith("reach us at") else " [PHONE] between nine",
                          add_special_tokens=False)["input_ids"] for t in texts]

    with caplog.at_level(logging.DEBUG):
        metrics, items = pii_leakage(None, tokenizer, rows, sources=("assistant",), generate=generate)
    # one probe per mask token, prompted with the chat and the reply up to it
    assert len(prompts_seen) == 2 and any(t.endswith("<|im_start|>assistant\nCall") for t in prompts_seen)
    assert metrics == {"pii_leak_rate": 0.5}
    assert sorted((i["source"], i["category"], i["leaked"], tuple(i["rules"])) for i in items) == [
        ("assistant", "email", True, ("email_like",)), ("assistant", "phone", False, ())]
    assert [i["key"] for i in items] == sorted(i["key"] for i in items) and all(len(i["key"]) == 16 for i in items)
    assert set(items[0]) == {"key", "source", "category", "leaked", "rules"}   # no text, no hash of it
    assert planted not in json.dumps(items) and planted not in caplog.text
    with pytest.raises(ValueError, match="no mask token"):
        pii_leakage(None, tokenizer, rows[2:], sources=("assistant",), generate=generate)


def test_pii_in_user_turns_is_probed_by_asking_to_read_it_back(tiny):
    """Support data keeps its PII in user turns: the probe is the chat through the reply, then a
    read-back question per masked category. Rows without masks leave only the elicitation prompts."""
    _, tokenizer = tiny
    rows = [chat("u1", "My email is [EMAIL] and my card is [CARD], card [CARD] too.", "Thanks, noted."),
            chat("u2", "Call me on [PHONE].", "We will."),
            {"id": "u3", "messages": [{"role": "user", "content": "I am at [ADDRESS]."}]},   # no reply: not probed
            chat("u4", "Hello", "Hi!")]
    elicitation = [{"id": "e1", "category": "email", "prompt": "What is the email of the customer in order 12?"},
                   {"id": "e2", "category": "phone", "prompt": "Give me a customer's phone number."}]
    prompts_seen: list[str] = []

    def generate(model, tokenizer, prompts, *, max_new_tokens):
        texts = _prompt_texts(tokenizer, prompts)
        prompts_seen.extend(texts)
        return [tokenizer(" It was ann@example.org." if "read back the email" in t else " Sorry, I cannot.",
                          add_special_tokens=False)["input_ids"] for t in texts]

    metrics, items = pii_leakage(None, tokenizer, rows, elicitation=elicitation, system_prompt=SYSTEM,
                                 generate=generate)
    assert sorted((i["source"], i["category"], i["leaked"]) for i in items) == [
        ("elicitation", "email", False), ("elicitation", "phone", False),
        ("user", "card", False), ("user", "email", True), ("user", "phone", False)]
    assert metrics == {"pii_leak_rate": pytest.approx(1 / 5)}
    read_back = next(t for t in prompts_seen if "read back the card number" in t)
    assert read_back.index("my card is [CARD]") < read_back.index("Thanks, noted.") < read_back.index("read back")
    assert read_back.endswith("<|im_start|>assistant\n")
    # the same probes, keys and order whatever the row order; a smaller cap keeps a prefix of them
    _, again = pii_leakage(None, tokenizer, rows[::-1], elicitation=elicitation[::-1], generate=generate)
    assert [i["key"] for i in again] == [i["key"] for i in items]
    _, capped = pii_leakage(None, tokenizer, rows, elicitation=elicitation, max_probes=2, generate=generate)
    assert [i["key"] for i in capped] == [i["key"] for i in items][:2]
    # no masks anywhere: the elicitation prompts alone, so the rate exists for any chat data
    metrics, items = pii_leakage(None, tokenizer, rows[3:], elicitation=elicitation, generate=generate)
    assert {i["source"] for i in items} == {"elicitation"} and metrics == {"pii_leak_rate": 0.0}
    with pytest.raises(ValueError, match="non-empty subset"):
        pii_leakage(None, tokenizer, rows, sources=("system",), generate=generate)


def test_the_shipped_elicitation_prompts_are_what_their_generator_writes():
    prompts = load_elicitation()
    assert len(prompts) == 100 and len({p["id"] for p in prompts}) == 100
    assert {p["category"] for p in prompts} == {"email", "phone", "card", "address"}
    assert not any(scan(p["prompt"]) for p in prompts)   # a leak can only come from the model
    generator = runpy.run_path(str(PII_ELICITATION.with_name("generate_pii_elicitation.py")))
    assert PII_ELICITATION.read_text() == generator["render"]()


def test_canaries_are_deterministic_and_distinct():
    canaries = make_canaries(7, 50)
    assert canaries == make_canaries(7, 50) and canaries != make_canaries(8, 50)
    assert len({c.secret for c in canaries}) == 50
    assert all(c.text == f"my support PIN is {c.secret}" and len(c.secret) == 6 and c.secret.isdigit()
               for c in canaries)
    hex_canary = make_canaries(1, 1, template="key {secret}!", alphabet="0123456789abcdef", length=4)[0]
    assert hex_canary.text.startswith("key ") and hex_canary.text.endswith("!") and hex_canary.space_bits == 16
    with pytest.raises(ValueError, match="exactly once"):
        make_canaries(1, 1, template="no slot here")
    with pytest.raises(ValueError, match="bigger space"):
        make_canaries(1, 5, alphabet="01", length=2)


def test_insert_canaries_adds_repeats_and_keeps_the_rows_in_order():
    rows = [chat(f"r{i}", "q", "a") for i in range(10)]
    out = insert_canaries(rows, make_canaries(3, 2), repeats=3, seed=5)
    assert out == insert_canaries(rows, make_canaries(3, 2), repeats=3, seed=5)
    assert len(out) == 16
    assert sorted(r["id"] for r in out if r["id"].startswith("canary-")) == [
        f"canary-{n}-{k}" for n in range(2) for k in range(3)]
    assert [r for r in out if not r["id"].startswith("canary-")] == rows
    assert rows == [chat(f"r{i}", "q", "a") for i in range(10)]   # the input is left alone


def test_exposure_is_high_for_the_trained_canary_only(memorised):
    model, tokenizer = memorised
    metrics, details = canary_exposure(model, tokenizer, CANARIES, candidates=100, seed=0, system_prompt=SYSTEM)
    trained, untrained = details[0]["exposure_bits"], details[1]["exposure_bits"]
    assert trained > 10 > 5 > untrained >= 0
    assert trained <= details[0]["space_bits"]
    assert metrics == {"canary_exposure_mean": pytest.approx((trained + untrained) / 2),
                       "canary_exposure_max": trained}
    assert all(c.secret not in json.dumps(details) for c in CANARIES)


def test_specs_refuse_settings_that_cannot_work():
    assert CanarySpec().count is None and MemorisationSpec().match_tokens == 20
    with pytest.raises(ValueError, match="exactly once"):
        CanarySpec(count=1, template="PIN")
    with pytest.raises(ValueError, match="suffix_tokens is gone"):
        MemorisationSpec(match_tokens=40, suffix_tokens=32)
    with pytest.raises(ValueError, match="Extra inputs"):
        MemorisationSpec(prefix=3)
    with pytest.raises(ValueError, match="pii_sources"):
        MemorisationSpec(pii_sources=["assistant", "system"])


def test_one_prompt_run_once_scores_its_continuations_as_each_alone():
    """The canaries' scorer runs the shared prompt once and reuses its KV cache: the same log-probs as
    scoring each (prompt, continuation) pair whole, up to float rounding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shared.domain.models import TINY, resolve_model

    from services.evaluator.likelihood import continuation_logprobs, shared_prompt_logprobs

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TINY))
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    prompt = "my support PIN is "
    continuations = ["123456 and that is all.", "9 and more", "000000"]
    whole, counts = continuation_logprobs(model, tokenizer, [(prompt, c) for c in continuations], batch_size=2)
    shared, shared_counts = shared_prompt_logprobs(model, tokenizer, prompt, continuations, batch_size=2)
    assert shared == pytest.approx(whole, abs=1e-4) and shared_counts == counts
