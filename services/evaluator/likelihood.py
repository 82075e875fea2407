"""How likely a causal LM finds a continuation after a prompt: the one scorer behind the canary
exposure and fairness probes.

The prompt and the continuation are tokenized separately and concatenated (as lm-eval does), so a
continuation's tokens are the same whatever prompt it follows and candidates compare like with
like; write the continuation with its leading space (" helpful."). Whitespace that ends the prompt
moves to the continuation, where the tokenizer expects it (" 123456" is one space token and six
digits; "is " + "123456" would not be).
"""
from __future__ import annotations

import copy

import torch

from shared.domain.probes import KV_CACHE


def _split_ids(tokenizer, prompt: str, continuation: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    stripped = prompt.rstrip()
    continuation = prompt[len(stripped):] + continuation
    prompt_ids = tokenizer(stripped, add_special_tokens=add_special_tokens)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not prompt_ids or not continuation_ids:
        raise ValueError(f"continuation_logprobs needs a non-empty prompt and continuation; got prompt "
                         f"{len(prompt_ids)} tokens, continuation {len(continuation_ids)} tokens")
    return prompt_ids, continuation_ids


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 16,
                          add_special_tokens: bool = False) -> tuple[list[float], list[int]]:
    """(summed natural-log probability of each continuation given its prompt, its token count).

    `add_special_tokens` is for plain-text prompts (a BOS where the tokenizer adds one); leave it
    off for chat-template text, which carries its own special tokens. The model must take
    `logits_to_keep` (transformers' causal LMs and PEFT wrappers of them do).
    """
    encoded = [_split_ids(tokenizer, p, c, add_special_tokens) for p, c in pairs]
    logprobs = [lp for lp, _ in teacher_forced(model, tokenizer, encoded, batch_size=batch_size)]
    return logprobs, [len(c) for _, c in encoded]


@torch.no_grad()
def teacher_forced(model, tokenizer, encoded: list[tuple[list[int], list[int]]], *,
                   batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (prompt ids, continuation ids): the continuation's summed log-probability, and whether
    greedy decoding from the prompt writes it (the most likely next token is the continuation's own
    at every position; float ties aside, what generating would give). One forward pass per batch
    instead of a decoding step per token. Batches are right-padded, which leaves every real
    position's attention unchanged in a causal model."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # longest first, so that rows of similar length share a batch and padding stays small
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.tensor([p + c + [pad_id] * (width - len(p) - len(c)) for p, c in batch], device=device)
        mask = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in batch],
                            device=device)
        # position t predicts token t + 1, so a continuation is predicted from len(prompt) - 1 on;
        # projecting only those positions onto the vocabulary (logits_to_keep) saves most of the work
        first = min(len(p) for p, _ in batch) - 1
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
        scores = logits.float().log_softmax(-1)
        for row, (i, (p, c)) in enumerate(zip(order[start:start + batch_size], batch, strict=True)):
            at = len(p) - 1 - first
            target = torch.tensor(c, device=device)
            out[i] = (scores[row, at:at + len(c)].gather(-1, target[:, None]).sum().item(),
                      bool((logits[row, at:at + len(c)].argmax(-1) == target).all()))
    model.train(was_training)
    return out


@torch.no_grad()
def shared_prompt_logprobs(model, tokenizer, prompt: str, continuations: list[str], *, batch_size: int = 64,
                           add_special_tokens: bool = False) -> tuple[list[float], list[int]]:
    """continuation_logprobs for many continuations of one prompt (the canaries' candidate secrets):
    the prompt runs once and each batch of continuations attends to a copy of its KV cache, so only
    the continuations' tokens are computed again (a canary's chat prompt is ~6x its secret and suffix).
    The same tokenization as continuation_logprobs, so the figures equal its up to float rounding."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [_split_ids(tokenizer, prompt, c, add_special_tokens) for c in continuations]
    prompt_ids = encoded[0][0]   # the prompt's trailing whitespace moves into every continuation alike
    was_training = model.training
    model.eval()
    head = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    first = head.logits[0, -1].float().log_softmax(-1)   # predicts each continuation's first token
    logprobs = []
    for start in range(0, len(encoded), batch_size):
        batch = [c for _, c in encoded[start:start + batch_size]]
        width = max(len(c) for c in batch)
        ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in batch], device=device)
        mask = torch.tensor([[1] * (len(prompt_ids) + len(c)) + [0] * (width - len(c)) for c in batch], device=device)
        cache = copy.deepcopy(getattr(head, KV_CACHE))
        cache.batch_repeat_interleave(len(batch))
        scores = model(input_ids=ids, attention_mask=mask, **{KV_CACHE: cache}).logits.float().log_softmax(-1)
        for row, c in enumerate(batch):
            rest = scores[row, :len(c) - 1].gather(-1, torch.tensor(c[1:], device=device)[:, None]).sum().item()
            logprobs.append(first[c[0]].item() + rest)
    model.train(was_training)
    return logprobs, [len(c) for _, c in encoded]
