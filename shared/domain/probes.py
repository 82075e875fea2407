"""Knowledge probes: does a model state the facts its training data taught?

A probe file is JSONL, one {"question": str, "expect": [str, ...]} per line, with optional keys:
- "reject": [str, ...]: strings that fail the answer even when it also states an expected one (the
  values of other facts of the same kind, so that an answer mixing up two facts does not pass);
- "split": "val" | "test" (default "test"): the evaluator gates on test probes only; val probes
  are the trainer's, to pick its checkpoint with `training.select_by: probes`, and so are never
  a measure of the model that was selected on them;
- "fact": the probe's label (e.g. the fact it asks about), to group results.
A probe passes when the model's greedy answer contains any expected string and no rejected one,
case-insensitively. Probes are rephrasings held out of the training data, so a pass means the model
learned the fact, not the sentence.
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version

from shared.domain.datasets import DatasetContractError, iter_jsonl, with_system_prompt

_SHAPE = '{"question": str, "expect": [str, ...]}'
SPLITS = ("val", "test")
# transformers 5.24 renamed the KV cache's argument and output field from past_key_values to cache; the
# old name is gone in 5.40. The floor stays 5.0, so use whichever name the installed release has.
KV_CACHE = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"

logger = logging.getLogger(__name__)


class ProbeError(ValueError):
    """A probe file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Probe:
    question: str
    expect: tuple[str, ...]
    label: str | None = None   # e.g. the fact the probe asks about, to group results
    reject: tuple[str, ...] = ()
    split: str = "test"

    def passes(self, answer: str) -> bool:
        folded = answer.casefold()
        return (any(e.casefold() in folded for e in self.expect)
                and not any(r.casefold() in folded for r in self.reject))


def _strings(value, *, empty: bool = False) -> bool:
    return isinstance(value, list) and (empty or bool(value)) and all(isinstance(e, str) and e.strip() for e in value)


def load_probes(path: Path | str, split: str | None = None) -> list[Probe]:
    """The file's probes; only those of `split` ("val" or "test") when given."""
    path = Path(path)
    probes = []
    try:
        for lineno, row in iter_jsonl(path, shape=_SHAPE):
            question = row.get("question") if isinstance(row, dict) else None
            if not isinstance(question, str) or not question.strip():
                raise ProbeError(f"{path}:{lineno}: 'question' must be a non-empty string")
            if not _strings(row.get("expect")):
                raise ProbeError(f"{path}:{lineno}: 'expect' must be a non-empty list of non-empty strings")
            if not _strings(row.get("reject", []), empty=True):
                raise ProbeError(f"{path}:{lineno}: 'reject', when given, must be a list of non-empty strings")
            if row.get("split", "test") not in SPLITS:
                raise ProbeError(f"{path}:{lineno}: 'split' must be one of {', '.join(SPLITS)} (or absent: test)")
            probes.append(Probe(question=question, expect=tuple(row["expect"]), label=row.get("fact"),
                                reject=tuple(row.get("reject", ())), split=row.get("split", "test")))
    except DatasetContractError as exc:
        raise ProbeError(str(exc)) from exc
    if not probes:
        raise ProbeError(f"{path}: no probes; write one {_SHAPE} per line")
    if split is not None:
        probes = [p for p in probes if p.split == split]
        if not probes:
            raise ProbeError(f"{path}: no {split} probes; mark some with \"split\": \"{split}\"")
    return probes


# Prompts generated together. Finished rows leave the batch (`_generate`), so a larger batch costs
# only its prefill and its longest answer's steps: the 402 safety and alignment prompts x 32 tokens
# on SmolLM2-135M in bf16 on 2 CPU cores took 29.5 s at 64, 22.9 s at 128 and 27.7 s in one batch
# (transformers' generate at 64, finished rows kept: 35.5 s). A 70B model's KV cache for 128 rows
# of ~600 tokens is ~25 GB on a GPU.
GENERATION_BATCH = 128


def generate_answers(model, tokenizer, questions: list[str], *, system_prompt: str | None,
                     max_new_tokens: int, batch_size: int = GENERATION_BATCH) -> list[str]:
    """Greedy answers, one per question, each asked as a fresh single-turn chat."""
    prompts = []
    for question in questions:
        messages = with_system_prompt([{"role": "user", "content": question}], system_prompt)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size)]


# Continuations already generated on the model in hand, by (prompt ids, max_new_tokens): set by
# `remembered` while one side is scored, so a later round of evaluate_more that asks a grown probe set
# generates only the probes it adds (services/evaluator/evaluation.py).
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ftpipe_generation_memo", default=None)


@contextmanager
def remembered(memo: dict):
    """Within the block, greedy_continuations answers prompts it has answered before (for the same
    model: one memo per side) from `memo`, and adds what it generates."""
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)


def greedy_continuations(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                         batch_size: int = GENERATION_BATCH) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids), up to and without the first EOS, in the
    prompts' order."""
    memo = _MEMO.get()
    if memo is None:
        return _generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    keys = [(tuple(p), max_new_tokens) for p in prompts]
    todo = list(dict.fromkeys(k for k in keys if k not in memo))
    for key, out in zip(todo, _generate(model, tokenizer, [list(k[0]) for k in todo], max_new_tokens=max_new_tokens,
                                        batch_size=batch_size), strict=True):
        memo[key] = out
    return [list(memo[k]) for k in keys]


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Batches of similar length (longest first): left padding then costs little, and a batch whose
    prompts are all short does not carry a long one's padding. Prompts are left-padded by hand (not by
    flipping tokenizer.padding_side, which the caller may rely on) so that a batch generates from
    aligned ends; the answers come back in the prompts' order."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    continuations: list[list[int]] = [[] for _ in prompts]
    greedy = _greedy_shrinking if _plain_causal_lm(model) else _greedy_generate
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [prompts[i] for i in chosen]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        for i, row in zip(chosen, greedy(model, ids, mask, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                         eos_id=tokenizer.eos_token_id), strict=True):
            continuations[i] = row
    model.train(was_training)
    return continuations


def _plain_causal_lm(model) -> bool:
    """A transformers model that takes a cache and positions directly. A PEFT model left unmerged
    (prefix tuning) is not: its prefix enters through PEFT's own generate."""
    from peft import PeftModel

    return not isinstance(model, PeftModel)


def _greedy_shrinking(model, ids, mask, *, max_new_tokens: int, pad_id: int, eos_id: int) -> list[list[int]]:
    """Greedy decoding in which a row leaves the batch (and its KV cache) at its EOS. transformers'
    generate keeps finished rows to the end of the batch's longest answer; safety answers average
    15 of their 32 tokens, so half of its decoding steps' rows were padding (35.5 s -> 29.5 s at 64
    rows, above). The tokens are the same as generate's in float32 (tests/unit/test_eval_more.py)."""
    from transformers import DynamicCache

    rows = list(range(len(ids)))
    out: list[list[int]] = [[] for _ in rows]
    cache = DynamicCache(config=model.config)
    # left padding: each row's positions count its own tokens, as generate computes them
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **{KV_CACHE: cache}).logits
        tokens = logits[:, -1].argmax(-1)
        ended = tokens == eos_id
        for row, token, done in zip(rows, tokens.tolist(), ended.tolist(), strict=True):
            if not done:
                out[row].append(token)
        going = (~ended).nonzero().squeeze(-1)
        if step == max_new_tokens - 1 or len(going) == 0:
            break
        if len(going) < len(rows):
            cache.batch_select_indices(going)
            rows = [rows[i] for i in going.tolist()]
            tokens, mask, positions = tokens[going], mask[going], positions[going]
        ids = tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out


def _greedy_generate(model, ids, mask, *, max_new_tokens: int, pad_id: int, eos_id: int) -> list[list[int]]:
    """transformers' (or PEFT's) generate, each row cut at its first EOS."""
    width = ids.shape[1]
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id)
    # a finished row is padded to the batch's length after its EOS
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out[:, width:].tolist()]


def fact_rate(model, tokenizer, probes: list[Probe], *, system_prompt: str | None,
              max_new_tokens: int) -> tuple[float, list[dict]]:
    """(share of probes passed, one {question, answer, expect, label, passed} per probe)."""
    if not probes:
        raise ValueError("fact_rate needs at least one probe")
    answers = generate_answers(model, tokenizer, [p.question for p in probes], system_prompt=system_prompt,
                               max_new_tokens=max_new_tokens)
    details = [{"question": p.question, "answer": a, "expect": list(p.expect), "label": p.label,
                "passed": p.passes(a)} for p, a in zip(probes, answers, strict=True)]
    logger.info("knowledge probes: %d of %d passed", sum(d["passed"] for d in details), len(details))
    return passed_share(details), details


def passed_share(details: list[dict]) -> float:
    """The fact rate of per-probe details: the share passed (decided by the substring check, or by
    an LLM judge where eval.judge names one: services/evaluator/judge.py)."""
    return sum(bool(d["passed"]) for d in details) / len(details)
