"""What a run learns from its rows: one objective per kind of data (Recipe.data_kind).

- `ChatSFT`: next-token loss on assistant turns only (located with the model's own chat template,
  services/trainer/chat_templates.py), optionally packed several conversations to a row.
- `Preference`: DPO (TRL's sigmoid loss against the base model, which is the LoRA model with its
  adapter disabled) or ORPO (SFT on the chosen answer plus TRL's odds-ratio term; no reference).
- `Classification`: cross-entropy of a sequence classifier's label.

The loop (services/trainer/training.py) only sees the protocol: `encode` rows into examples,
their `length` (batching) and `weight` (the step divides its summed loss by the total weight, so
every trained token, pair or example weighs the same however a step is cut into micro-batches),
`prepare` once before training, `loss_sum` of a micro-batch, and `loss_kernel` (which computation
of the loss runs, for the run record).

The language-model losses compute logits only at trained positions, and there in chunks whose
logits are recomputed in the backward pass (`head_logps`), so the loss's memory does not grow
with vocabulary x positions; chat SFT uses Liger's fused linear cross-entropy instead where it is
installed on a GPU (services/trainer/kernels.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from shared.domain.datasets import with_system_prompt
from shared.domain.recipe import Recipe

from services.trainer import kernels
from services.trainer.chat_templates import (
    Labelled,
    TemplateError,
    generation_marked,
    label_assistant_turns,
    model_template,
)
from services.trainer.distributed import shards_parameters

IGNORE_INDEX = -100  # label value the losses skip: prompt, system and padding tokens


class DataError(ValueError):
    """Rows that cannot be trained on; the message says which and what to fix."""


class Objective(Protocol):
    def encode(self, rows: list[dict], split: str, log: logging.Logger) -> list: ...
    def length(self, example) -> int: ...
    def weight(self, example) -> int: ...
    def tokens(self, example) -> int: ...
    def prepare(self, model, examples: list, device: torch.device) -> list: ...
    def loss_sum(self, model, batch: list, device: torch.device) -> torch.Tensor: ...
    def loss_kernel(self, model, device: torch.device) -> str: ...


def for_recipe(recipe: Recipe, tokenizer, *, labels: list[str] | None = None) -> "Objective":
    kind = recipe.data_kind
    if kind == "chat":
        return ChatSFT(recipe, tokenizer)
    if kind == "preference":
        return Preference(recipe, tokenizer)
    return Classification(recipe, tokenizer, labels or [])


# ------------------------------------------------------------------------------ shared pieces

def _backbone(model):
    """The transformers model under a PEFT wrapper (or the model itself for a full fine-tune)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model) -> bool:
    """Whether logits can be computed from the decoder's last hidden state at chosen positions
    only: the output embedding not scaled or soft-capped afterwards (Llama, Mistral, Qwen, SmolLM,
    not Gemma 2, Cohere, Granite), with whole parameters, and no prompt-learning adapter that must run
    the PEFT forward."""
    if shards_parameters(model):  # sharded parameters are gathered only by the model's own forward
        return False
    if getattr(model, "peft_type", None) is not None and str(model.peft_type).endswith("PREFIX_TUNING"):
        return False
    config = _backbone(model).config
    return not any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# Logits computed at once: a chunk of trained positions holds at most this many (vocabulary x
# positions; 64 MiB in float32), or as many as the hidden states it comes from, whichever is more
# (a head over a big model's many positions then runs in matmuls big enough to keep a GPU busy).
LOGITS_CHUNK = 2**24


def _trained(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
             position_ids: torch.Tensor | None):
    """(states, head, targets, rows) of every trained next token (labels shifted by one): with a
    plain head, the decoder's hidden states there and the head that turns them into logits; else
    the model's own logits there and no head."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(targets)[trained]
    if _plain_head(model):
        backbone = _backbone(model)
        hidden = backbone.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state
        return hidden[:, :-1][trained], backbone.get_output_embeddings(), targets[trained], rows
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    logits = logits[:, -labels.size(1):][:, :-1][trained]  # prompt learning may prepend positions
    return logits, None, targets[trained], rows


def _logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # cross_entropy's fused log-softmax + gather: no second vocabulary-wide copy of the logits
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def _head_chunk_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _logps(head(states), targets)


def head_logps(head, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of each position from its hidden state, through the LM head, in chunks of
    positions. Under autograd each chunk is checkpointed (PyTorch's non-reentrant checkpoint): its
    logits are freed after its loss and recomputed in the backward pass, one chunk at a time, so at
    most one chunk's logits exist at once. The values and gradients are those of one whole head
    call, to float rounding."""
    per_chunk = max(1, max(LOGITS_CHUNK, states.numel()) // head.out_features)
    if states.size(0) <= per_chunk:
        return _head_chunk_logps(head, states, targets)
    pieces = zip(states.split(per_chunk), targets.split(per_chunk), strict=True)
    if not torch.is_grad_enabled():
        return torch.cat([_head_chunk_logps(head, s, t) for s, t in pieces])
    return torch.cat([checkpoint(_head_chunk_logps, head, s, t, use_reentrant=False) for s, t in pieces])


def target_logps(model, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every trained next token (labels shifted by one), and its row.

    With a plain head the LM head runs at trained positions only: over a 49k vocabulary it costs a
    sixth of a small model's compute per position, and most positions (system, user, prompt) are
    not trained. About 15% faster on CPU (bench/train)."""
    states, head, targets, rows = _trained(model, input_ids, labels, attention_mask, position_ids)
    return (_logps(states, targets) if head is None else head_logps(head, states, targets)), rows


def _fusable(head, device: torch.device) -> bool:
    """Whether Liger's fused linear cross-entropy can stand for this head: a plain Linear (an
    adapter on the head would be skipped) with Liger installed, on a GPU."""
    return (type(head) is torch.nn.Linear and device.type == "cuda"
            and kernels.liger_fused_linear_cross_entropy() is not None)


def target_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The summed negative log-likelihood of the trained next tokens: -target_logps(...).sum(), by
    Liger's fused linear cross-entropy where it can (a sum has one upstream gradient, which Liger
    folds into the forward; per-token log-probabilities would not)."""
    states, head, targets, _ = _trained(model, input_ids, labels, attention_mask, position_ids)
    if head is None:
        return -_logps(states, targets).sum()
    if _fusable(head, states.device):
        fused = kernels.liger_fused_linear_cross_entropy()
        return fused(states, head.weight, targets, bias=head.bias, reduction="sum")
    return -head_logps(head, states, targets).sum()


def lm_loss_kernel(model, device: torch.device, *, fused: bool) -> str:
    """Which computation of a language-model loss runs: liger_fused_linear_ce (fused: a summed
    loss may use it), chunked_head_ce (ours), or model_logits (the model's own forward computes
    every position's logits: prefix tuning, sharded parameters, a scaled or soft-capped head)."""
    if not _plain_head(model):
        return "model_logits"
    head = _backbone(model).get_output_embeddings()
    return "liger_fused_linear_ce" if fused and _fusable(head, device) else "chunked_head_ce"


# ------------------------------------------------------------------------------ chat SFT

@dataclass(frozen=True)
class ChatExample:
    input_ids: list[int]
    labels: list[int]                       # IGNORE_INDEX everywhere but assistant content + end-of-turn
    position_ids: list[int] | None = None   # packed rows: positions restart at each conversation

    @property
    def trained_tokens(self) -> int:
        # Labels are shifted by one in the loss, so the first token is never a target.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def label_conversation(tokenizer, template: str, messages: list[dict], *, system_prompt: str | None,
                       marked: bool | None = None) -> Labelled:
    """The conversation (with the recipe's system prompt where it has none) and which of its tokens the
    assistant says, located with the chat template (services/trainer/chat_templates.py)."""
    messages = with_system_prompt(messages, system_prompt)
    if messages and messages[0]["role"] == "assistant":
        raise DataError("a conversation starts with an assistant turn; there is no prompt to answer (fix the "
                        "data, or set data.system_prompt in the recipe)")
    try:
        return label_assistant_turns(tokenizer, template, messages, marked=marked)
    except TemplateError as exc:
        raise DataError(str(exc)) from None


def chat_examples(labelled: Labelled, max_seq_len: int) -> list[ChatExample]:
    """Token ids and labels, cut to max_seq_len: only what the assistant says is trained."""
    return [ChatExample(r.input_ids[:max_seq_len],
                        [tok if said else IGNORE_INDEX for tok, said in zip(r.input_ids, r.assistant, strict=True)][:max_seq_len])
            for r in labelled.examples]


def encode_conversation(tokenizer, template: str, messages: list[dict], *, system_prompt: str | None,
                        max_seq_len: int) -> ChatExample:
    """The conversation as one example, where the template renders it consistently (ChatSFT also takes
    the one-example-per-assistant-turn fallback of templates that do not)."""
    labelled = label_conversation(tokenizer, template, messages, system_prompt=system_prompt)
    if labelled.per_turn:
        raise DataError("the chat template renders earlier turns differently once later ones follow, so this "
                        "conversation trains as one example per assistant turn (chat_examples)")
    return chat_examples(labelled, max_seq_len)[0]


def pack(examples: list[ChatExample], max_seq_len: int) -> list[ChatExample]:
    """Conversations packed into rows of at most max_seq_len tokens, first-fit by decreasing
    length (deterministic: the same examples give the same rows). Positions restart at each
    conversation, which transformers turns into a block-diagonal causal mask: a conversation never
    attends to its neighbours, so packing changes the speed, not what is learned."""
    bins: list[list[ChatExample]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([ex])
            room.append(max_seq_len - n)
        else:
            bins[slot].append(ex)
            room[slot] -= n
    packed = []
    for group in bins:
        ids, labels, positions = [], [], []
        for ex in group:
            ids += ex.input_ids
            # the first token of a conversation is never a target: that would train the previous
            # conversation's last token to predict it
            labels += [IGNORE_INDEX] + ex.labels[1:]
            positions += list(range(len(ex.input_ids)))
        packed.append(ChatExample(ids, labels, positions))
    return packed


class ChatSFT:
    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        try:
            self.template = model_template(tokenizer)
        except TemplateError as exc:
            raise DataError(f"base_model {recipe.base_model!r}: {exc}") from None
        self.marked = generation_marked(self.template)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, rows: list[dict], split: str, log: logging.Logger) -> list[ChatExample]:
        spec = self.recipe.training
        examples, no_assistant, truncated_away, per_turn, folded = [], 0, 0, 0, 0
        for row in rows:
            if not any(m["role"] == "assistant" for m in row["messages"]):
                no_assistant += 1
                continue
            try:
                labelled = label_conversation(self.tokenizer, self.template, row["messages"],
                                              system_prompt=self.recipe.data.system_prompt, marked=self.marked)
            except DataError as exc:
                raise DataError(f"{split} row {row.get('id', '?')}: {exc}") from None
            per_turn += labelled.per_turn
            folded += labelled.system_folded
            for example in chat_examples(labelled, spec.max_seq_len):
                if example.trained_tokens == 0:
                    truncated_away += 1
                else:
                    examples.append(example)
        if rows and not examples:
            if no_assistant == len(rows):
                raise DataError(f"{split} split: none of its {len(rows)} conversations has an assistant turn, so "
                                "there is nothing to learn; check the dataset format (chat rows need assistant messages)")
            raise DataError(f"{split} split: every assistant turn lies beyond training.max_seq_len="
                            f"{spec.max_seq_len} tokens; raise max_seq_len or shorten the prompts")
        if no_assistant or truncated_away:
            log.warning("%s split: skipped %d conversations without assistant turns and %d examples whose assistant "
                        "turns lie beyond max_seq_len", split, no_assistant, truncated_away)
        if per_turn:
            log.info("%s split: the chat template renders earlier turns differently once later ones follow, so %d "
                     "conversations train as one example per assistant turn", split, per_turn)
        if folded:
            log.info("%s split: the chat template does not keep a system message in place, so it went into the first "
                     "user turn of %d conversations", split, folded)
        if spec.packing and split == "train":
            packed = pack(examples, spec.max_seq_len)
            log.info("packed %d conversations into %d rows of at most %d tokens", len(examples), len(packed),
                     spec.max_seq_len)
            return packed
        return examples

    def length(self, example: ChatExample) -> int:
        return len(example.input_ids)

    def weight(self, example: ChatExample) -> int:
        return example.trained_tokens

    def tokens(self, example: ChatExample) -> int:
        return len(example.input_ids)

    def prepare(self, model, examples: list, device: torch.device) -> list:
        return examples

    def loss_sum(self, model, batch: list[ChatExample], device: torch.device) -> torch.Tensor:
        ids = _pad([e.input_ids for e in batch], self.pad_id).to(device)
        labels = _pad([e.labels for e in batch], IGNORE_INDEX).to(device)
        if batch[0].position_ids is not None:
            # Packed: no attention mask, so that transformers reads the conversations' boundaries off the
            # positions; padding continues the positions of a pseudo-conversation of its own.
            positions = _pad([e.position_ids for e in batch], 0)
            for i, e in enumerate(batch):
                positions[i, len(e.position_ids):] = torch.arange(positions.size(1) - len(e.position_ids))
            return target_nll(model, ids, labels, attention_mask=None, position_ids=positions.to(device))
        mask = _pad([[1] * len(e.input_ids) for e in batch], 0).to(device)
        return target_nll(model, ids, labels, attention_mask=mask)

    def loss_kernel(self, model, device: torch.device) -> str:
        return lm_loss_kernel(model, device, fused=True)


# ------------------------------------------------------------------------------ preference (DPO, ORPO)

@dataclass(frozen=True)
class PairExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_logps: tuple[float, float] | None = None   # DPO: the base model's (chosen, rejected) log-probabilities


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float) -> torch.Tensor:
    """TRL's DPO loss (DPOTrainer, loss_type 'sigmoid', reverse KL), per pair. TRL 1.16 computes it
    inline in DPOTrainer._compute_loss, with no function of its own to call, so it is restated here;
    a test checks that our objective gives DPOTrainer's loss on the same batch."""
    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * delta)


def orpo_loss(chosen_mean_logps, rejected_mean_logps, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024) per pair: the chosen answer's mean token NLL minus beta x the log-sigmoid
    of the log odds ratio, the odds term being TRL's `ORPOTrainer.odds_ratio_loss`."""
    from trl.experimental.orpo.orpo_trainer import log1mexp

    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -chosen - beta * F.logsigmoid(log_odds)


class Preference:
    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.method, self.beta = recipe.method, recipe.training.beta
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if tokenizer.chat_template is None:
            raise DataError(f"base_model {recipe.base_model!r} has no chat template; preference training renders "
                            "conversational pairs with it, so it needs an instruct model")

    def _ids(self, text: str) -> list[int]:
        # Prompt and answers are tokenized apart and joined, as TRL's DPOTrainer does, so that the
        # loss of a batch is the loss TRL computes on it (tests/unit/test_methods.py checks it).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, rows: list[dict], split: str, log: logging.Logger) -> list[PairExample]:
        from trl.data_utils import apply_chat_template

        max_len = self.recipe.training.max_seq_len
        examples, too_long = [], 0
        for row in rows:
            pair = {"prompt": with_system_prompt(row["prompt"], self.recipe.data.system_prompt),
                    "chosen": row["chosen"], "rejected": row["rejected"]}
            try:
                text = apply_chat_template(pair, self.tokenizer)
            except Exception as exc:  # noqa: BLE001 - jinja / shape errors of one row
                raise DataError(f"{split} row {row.get('id', '?')}: not a conversational preference pair "
                                f"(prompt, chosen, rejected message lists): {exc}") from None
            prompt = self._ids(text["prompt"])
            room = max_len - len(prompt)
            if room < 2:
                too_long += 1
                continue
            examples.append(PairExample(prompt, self._ids(text["chosen"])[:room], self._ids(text["rejected"])[:room]))
        if rows and not examples:
            raise DataError(f"{split} split: every prompt is longer than training.max_seq_len={max_len} tokens; "
                            "raise max_seq_len or shorten the prompts")
        if too_long:
            log.warning("%s split: skipped %d pairs whose prompt leaves no room for an answer in max_seq_len",
                        split, too_long)
        return examples

    def length(self, example: PairExample) -> int:
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))

    def weight(self, example: PairExample) -> int:
        return 1

    def tokens(self, example: PairExample) -> int:
        return 2 * len(example.prompt_ids) + len(example.chosen_ids) + len(example.rejected_ids)

    def _sequence_logps(self, model, batch: list[PairExample], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probability of each pair's chosen and rejected answer, and answer lengths:
        rows 0..n-1 chosen, n..2n-1 rejected, one forward."""
        sequences = [e.prompt_ids + e.chosen_ids for e in batch] + [e.prompt_ids + e.rejected_ids for e in batch]
        answers = [e.chosen_ids for e in batch] + [e.rejected_ids for e in batch]
        labels = [[IGNORE_INDEX] * (len(s) - len(a)) + a for s, a in zip(sequences, answers, strict=True)]
        ids = _pad(sequences, self.pad_id).to(device)
        mask = _pad([[1] * len(s) for s in sequences], 0).to(device)
        logps, rows = target_logps(model, ids, _pad(labels, IGNORE_INDEX).to(device), attention_mask=mask)
        sums = torch.zeros(len(sequences), device=device, dtype=logps.dtype).index_add(0, rows, logps)
        lengths = torch.tensor([len(a) for a in answers], device=device, dtype=logps.dtype)
        return sums, lengths

    @torch.no_grad()
    def prepare(self, model, examples: list[PairExample], device: torch.device) -> list[PairExample]:
        """DPO: the reference (base) log-probabilities of every pair, once, with the adapter
        disabled (TRL's `precompute_ref_log_probs`): each step then runs the policy only. In
        micro-batches of training.batch_size, which the out-of-memory back-off lowers."""
        if self.method != "dpo" or not examples or examples[0].ref_logps is not None:
            return examples
        if not hasattr(model, "disable_adapter"):
            raise DataError("DPO against the base model needs an adapter (lora, qlora or prefix) so that the "
                            "base is the model with its adapter disabled; adapter.kind 'full' would need a "
                            "second copy of the model: use lora")
        was_training = model.training
        model.eval()
        out = []
        size = self.recipe.training.batch_size
        with model.disable_adapter():
            for start in range(0, len(examples), size):
                batch = examples[start:start + size]
                sums, _ = self._sequence_logps(model, batch, device)
                n = len(batch)
                out += [replace(e, ref_logps=(float(sums[i]), float(sums[n + i]))) for i, e in enumerate(batch)]
        model.train(was_training)
        return out

    def loss_sum(self, model, batch: list[PairExample], device: torch.device) -> torch.Tensor:
        sums, lengths = self._sequence_logps(model, batch, device)
        n = len(batch)
        if self.method == "orpo":
            means = sums / lengths.clamp(min=1)
            return orpo_loss(means[:n], means[n:], self.beta).sum()
        ref = torch.tensor([e.ref_logps for e in batch], device=device, dtype=sums.dtype)
        return dpo_loss(sums[:n], sums[n:], ref[:, 0], ref[:, 1], self.beta).sum()

    def loss_kernel(self, model, device: torch.device) -> str:
        return lm_loss_kernel(model, device, fused=False)  # per-sequence sums need per-token log-probabilities


# ------------------------------------------------------------------------------ classification

@dataclass(frozen=True)
class LabelledExample:
    input_ids: list[int]
    label: int


def split_labels(recipe: Recipe, rows: list[dict]) -> list[str]:
    """The classes, in index order: the recipe's data.labels, else the train split's labels sorted."""
    if recipe.data.labels:
        return [str(label) for label in recipe.data.labels]
    return sorted({str(row["label"]) for row in rows})


class Classification:
    def __init__(self, recipe: Recipe, tokenizer, labels: list[str]):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.index = {label: i for i, label in enumerate(labels)}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, rows: list[dict], split: str, log: logging.Logger) -> list[LabelledExample]:
        examples, unknown = [], 0
        for row in rows:
            label = self.index.get(str(row["label"]))
            if label is None:
                unknown += 1
                continue
            ids = self.tokenizer(row["text"], truncation=True, max_length=self.recipe.training.max_seq_len)["input_ids"]
            examples.append(LabelledExample(ids, label))
        if unknown:
            log.warning("%s split: skipped %d rows whose label is not one of the %d classes of the train split",
                        split, unknown, len(self.index))
        return examples

    def length(self, example: LabelledExample) -> int:
        return len(example.input_ids)

    def weight(self, example: LabelledExample) -> int:
        return 1

    def tokens(self, example: LabelledExample) -> int:
        return len(example.input_ids)

    def prepare(self, model, examples: list, device: torch.device) -> list:
        return examples

    def loss_sum(self, model, batch: list[LabelledExample], device: torch.device) -> torch.Tensor:
        ids = _pad([e.input_ids for e in batch], self.pad_id).to(device)
        mask = _pad([[1] * len(e.input_ids) for e in batch], 0).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits.float(), torch.tensor([e.label for e in batch], device=device), reduction="sum")

    def loss_kernel(self, model, device: torch.device) -> str:
        return "classifier_ce"
