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

from shared.domain.datasets import DatasetContractError, iter_jsonl, with_system_prompt

_SHAPE = '{"question": str, "expect": [str, ...]}'
SPLITS = ("val", "test")

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


# Prompts generated together. A decoding step costs little more for 64 rows than for 32, so larger
# batches amortise it: 200 safety prompts x 32 tokens on SmolLM2-135M in bf16 on 2 CPU cores took
# 20.0 s at 32, 15.2 s at 64, 12.4 s at 100 and 13.4 s at 200 (a batch runs until its longest answer
# ends). 64 keeps a 70B model's KV cache for 64 rows of ~600 tokens near 13 GB on a GPU.
GENERATION_BATCH = 64


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
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = [prompts[i] for i in chosen]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
        for i, row in zip(chosen, out[:, width:].tolist(), strict=True):
            # a finished row is padded to the batch's length after its EOS
            continuations[i] = row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
    model.train(was_training)
    return continuations


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
