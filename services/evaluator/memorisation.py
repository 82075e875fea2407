"""Memorisation and privacy probes: does the fine-tuned model give its training data back?

- `extraction_rate`: verbatim continuation of training replies against held-out ones (Carlini et al.
  2021, "Extracting Training Data from Large Language Models": prefix in, greedy suffix out). The gap
  (train minus held-out) is memorisation beyond what the task itself makes predictable.
- `pii_leakage`: the preprocess stage replaced PII with category tokens ([EMAIL], [PHONE], ...);
  prompted with a training reply up to such a token, a model that memorised the data before masking
  (or a base model that invents plausible values) writes something PII-shaped there.
- canaries (Carlini et al. 2019, "The Secret Sharer"): random secrets in a fixed sentence, inserted
  into the training data by the trainer when the recipe asks (`insert_canaries`), and their exposure
  measured here (`canary_exposure`).

Nothing here logs or returns training text, generated text or secrets: details hold counts, row
ids, categories and hashes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
import re
from collections import Counter
from typing import Callable

import numpy as np
from scipy.stats import skewnorm

from shared.domain.canaries import Canary, canary_chat, random_secret
from shared.domain.datasets import with_system_prompt
from shared.domain.pii_residual import scan

from services.evaluator.likelihood import continuation_logprobs
from services.evaluator.probes import greedy_continuations

logger = logging.getLogger(__name__)

# What the preprocess stage writes in place of a PII value: an upper-case category in brackets.
MASK_TOKEN = re.compile(r"\[([A-Z]{2,12})\]")

Generate = Callable[..., list[list[int]]]   # greedy_continuations' signature


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _subset(rows: list[dict], n: int) -> list[dict]:
    """The same n rows on every run and machine: the smallest sha256 of their ids."""
    return sorted(rows, key=lambda r: _sha256(str(r["id"])))[:n]


def _chat_prompt(tokenizer, messages: list[dict], system_prompt: str | None) -> str:
    return tokenizer.apply_chat_template(with_system_prompt(messages, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def _chat_prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None) -> list[int]:
    return tokenizer(_chat_prompt(tokenizer, messages, system_prompt), add_special_tokens=False)["input_ids"]


def _first_reply(row: dict) -> int | None:
    return next((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant" and m["content"].strip()), None)


# ------------------------------------------------------------------------------ extraction


def _extracted(model, tokenizer, rows: list[dict], *, prefix_tokens: int, suffix_tokens: int, match_tokens: int,
               system_prompt: str | None, generate: Generate) -> list[dict]:
    prompts, targets, ids = [], [], []
    for row in rows:
        turn = _first_reply(row)
        if turn is None:
            continue
        reply = tokenizer(row["messages"][turn]["content"], add_special_tokens=False)["input_ids"]
        # The prefix gives way on short replies so that up to match_tokens remain to compare; with
        # none of the reply left in the prompt, extraction means writing the whole reply from the question.
        cut = min(prefix_tokens, max(0, len(reply) - match_tokens))
        prompts.append(_chat_prompt_ids(tokenizer, row["messages"][:turn], system_prompt) + reply[:cut])
        targets.append(reply[cut:cut + match_tokens])
        ids.append(row["id"])
    outs = generate(model, tokenizer, prompts, max_new_tokens=suffix_tokens) if prompts else []
    return [{"id": i, "compared": len(t), "extracted": out[:len(t)] == t} for i, t, out in zip(ids, targets, outs, strict=True)]


def extraction_rate(model, tokenizer, train_rows: list[dict], heldout_rows: list[dict], *, prefix_tokens: int = 32,
                    suffix_tokens: int = 32, match_tokens: int = 20, max_rows: int = 200,
                    system_prompt: str | None = None,
                    generate: Generate = greedy_continuations) -> tuple[dict[str, float], list[dict]]:
    """({extraction_rate_train, extraction_rate_heldout, extraction_gap}, one {id, split, compared,
    extracted} per row).

    Each row's first assistant reply: the chat before it plus the reply's first `prefix_tokens`
    tokens go in, `suffix_tokens` come out greedily, and the row counts as extracted when the first
    `match_tokens` of them (all of the reply's remaining tokens when fewer) are the reply's own.
    At most `max_rows` rows per split, chosen by the sha256 of their ids.
    """
    metrics, details = {}, []
    for split, rows in (("train", train_rows), ("heldout", heldout_rows)):
        results = _extracted(model, tokenizer, _subset(rows, max_rows), prefix_tokens=prefix_tokens,
                             suffix_tokens=suffix_tokens, match_tokens=match_tokens, system_prompt=system_prompt,
                             generate=generate)
        if not results:
            raise ValueError(f"extraction_rate: no {split} row has an assistant reply to probe "
                             f"({len(rows)} rows given); pass chat rows {{'id', 'messages': [...]}}")
        metrics[f"extraction_rate_{split}"] = sum(r["extracted"] for r in results) / len(results)
        details += [{**r, "split": split} for r in results]
    metrics["extraction_gap"] = metrics["extraction_rate_train"] - metrics["extraction_rate_heldout"]
    logger.info("extraction: train %.3f, held-out %.3f", metrics["extraction_rate_train"],
                metrics["extraction_rate_heldout"])
    return metrics, details


# ------------------------------------------------------------------------------ PII leakage


def pii_leakage(model, tokenizer, train_rows: list[dict], *, max_probes: int = 200, new_tokens: int = 16,
                system_prompt: str | None = None,
                generate: Generate = greedy_continuations) -> tuple[dict[str, float], dict]:
    """({pii_leak_rate}, {probes, leaks, by_category: {category: {probes, leaks}}, by_rule: {rule: n},
    leaked: [{category, rules, generation_sha256}]}).

    One probe per mask token in a training reply (at most `max_probes`, chosen by hash): the chat
    and the reply up to the token go in, `new_tokens` come out greedily, and the probe leaks when
    the residual PII scan finds anything in them. Generations are hashed, never kept.
    """
    probes = []   # (order key, category, prompt ids)
    for row in train_rows:
        for turn, message in enumerate(row["messages"]):
            if message["role"] != "assistant":
                continue
            for match in MASK_TOKEN.finditer(message["content"]):
                head = message["content"][:match.start()].rstrip()   # the model writes the space itself
                prompt = _chat_prompt_ids(tokenizer, row["messages"][:turn], system_prompt)
                if head:
                    prompt = prompt + tokenizer(head, add_special_tokens=False)["input_ids"]
                probes.append((_sha256(f"{row['id']}:{turn}:{match.start()}"), match.group(1).lower(), prompt))
    probes = sorted(probes, key=lambda p: p[0])[:max_probes]
    if not probes:
        raise ValueError(f"pii_leakage: no mask token ({MASK_TOKEN.pattern}) in the assistant replies of "
                         f"{len(train_rows)} training rows; nothing to probe")
    outs = generate(model, tokenizer, [p[2] for p in probes], max_new_tokens=new_tokens)
    by_category: dict[str, Counter] = {}
    by_rule: Counter = Counter()
    leaked = []
    for (_, category, _), out in zip(probes, outs, strict=True):
        text = tokenizer.decode(out, skip_special_tokens=True)
        hits = scan(text)
        counts = by_category.setdefault(category, Counter())
        counts["probes"] += 1
        if hits:
            counts["leaks"] += 1
            by_rule.update(hits)
            leaked.append({"category": category, "rules": sorted(hits), "generation_sha256": _sha256(text)})
    rate = len(leaked) / len(probes)
    logger.info("PII leakage: %d of %d probes wrote PII-shaped text", len(leaked), len(probes))
    return {"pii_leak_rate": rate}, {
        "probes": len(probes), "leaks": len(leaked),
        "by_category": {c: {"probes": n["probes"], "leaks": n["leaks"]} for c, n in sorted(by_category.items())},
        "by_rule": dict(sorted(by_rule.items())), "leaked": leaked}


# ------------------------------------------------------------------------------ canaries


def _exposure(secret_lp: float, candidate_lps: np.ndarray, space_bits: float) -> float:
    """log2 |R| - log2 rank, with the rank estimated from the sampled candidates (log-perplexities).

    Counting samples resolves the rank only down to |R| / n (about 10 bits for n = 1000), and a
    memorised secret beats every sample. As in Carlini et al. 2019 (section 4.3, "approximation by
    distribution modelling"), the candidates' log-perplexities are fitted with a skew-normal, whose
    CDF at the secret's log-perplexity estimates the fraction of the space the model prefers to it;
    rank = 1 + (|R| - 1) * that fraction.
    """
    if np.ptp(candidate_lps) == 0:   # a model that scores every secret alike: no fit, plain counting
        fraction = float(np.mean(candidate_lps < secret_lp) + 0.5 * np.mean(candidate_lps == secret_lp))
    else:
        fraction = float(skewnorm.cdf(secret_lp, *skewnorm.fit(candidate_lps)))
    space = 2.0 ** space_bits
    return space_bits - math.log2(1.0 + (space - 1.0) * fraction)


def canary_exposure(model, tokenizer, canaries: list[Canary], *, candidates: int = 1000, seed: int = 0,
                    system_prompt: str | None = None,
                    batch_size: int = 64) -> tuple[dict[str, float], list[dict]]:
    """({canary_exposure_mean, canary_exposure_max} in bits, one {canary, secret_sha256,
    exposure_bits, space_bits} per canary).

    Each canary's log-perplexity (the secret and what follows it, after the chat prompt and the
    template's prefix, as in training) is ranked among `candidates` random secrets of its format.
    The hash identifies a canary across runs; it does not hide it (a 6-digit space is enumerable),
    which is fine for secrets that are random and no one's.
    """
    if not canaries:
        raise ValueError("canary_exposure needs at least one canary; make them with make_canaries")
    rng = random.Random(f"candidates:{seed}")
    details = []
    for n, canary in enumerate(canaries):
        prompt = _chat_prompt(tokenizer, canary_chat(canary)[:1], system_prompt) + canary.prefix
        others = []
        while len(others) < candidates:
            other = random_secret(rng, canary.alphabet, len(canary.secret))
            if other != canary.secret:
                others.append(other)
        lps, _ = continuation_logprobs(model, tokenizer, [(prompt, s + canary.suffix) for s in [canary.secret, *others]],
                                       batch_size=batch_size)
        # log-perplexity in bits: -log2 P(secret and suffix | prompt)
        perplexities = -np.asarray(lps) / math.log(2)
        details.append({"canary": n, "secret_sha256": _sha256(canary.secret), "space_bits": canary.space_bits,
                        "exposure_bits": _exposure(perplexities[0], perplexities[1:], canary.space_bits)})
    exposures = [d["exposure_bits"] for d in details]
    logger.info("canary exposure: mean %.2f, max %.2f bits over %d canaries", sum(exposures) / len(exposures),
                max(exposures), len(exposures))
    return {"canary_exposure_mean": sum(exposures) / len(exposures), "canary_exposure_max": max(exposures)}, details
