"""Which tokens of a conversation the assistant says, read off the model's own chat template, so
that chat SFT trains on assistant turns only.

A template with `{% generation %}` markers says so itself: transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` reads the mask off them. Most instruct models (Llama 3.x,
Mistral, Qwen, Gemma, Phi, SmolLM2) ship templates without markers, and a marked copy of each
would be a per-model table that goes stale with every new template. For those the template is
asked instead, by rendering the conversation's prefixes:

- up to before assistant turn i, with `add_generation_prompt=True`: where its reply starts;
- up to the end of assistant turn i: where it ends.

The tokens in between are the reply and its end-of-turn token(s) (`<|eot_id|>`, `</s>`,
`<|im_end|>`, `<end_of_turn>`, `<|end|>`): what the model generates until it stops. Whitespace
after them (the newline between turns) is formatting the model never has to produce, and is not
trained (as in the markers of ftpipe's marked SmolLM2 template; TRL's marked copies vary on this).

Each prefix's tokens must be a prefix of the whole conversation's tokens, which holds for a
template that renders earlier turns the same whatever follows. Where it does not (Qwen3 drops past
`<think>` blocks; Phi-3.5 closes the conversation with an end-of-text token), each assistant turn
becomes an example of its own, its conversation rendered up to that turn as the model would see
it at inference time, and the same checks apply to it. A template that fails those too is refused.
Templates that refuse a system message (Gemma 2), drop it (Phi-3-mini) or move it next to the last
user turn (Mistral) get it folded into the first user turn, as Gemma 3's template does itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError as JinjaError


class TemplateError(ValueError):
    """The model's chat template cannot be used for assistant-only training."""


class _Inconsistent(TemplateError):
    """Rendering this way breaks the prefix property; another way may not."""


@dataclass(frozen=True)
class Rendered:
    """One training example: token ids and, for each, whether the assistant says it."""
    input_ids: list[int]
    assistant: list[bool]


@dataclass(frozen=True)
class Labelled:
    examples: list[Rendered]
    per_turn: bool = False        # the template rewrites earlier turns: one example per assistant turn
    system_folded: bool = False   # the system message went into the first user turn


def model_template(tokenizer) -> str:
    """The tokenizer's own chat template (its default one where it has several)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template is None:
        raise TemplateError("the base model has no chat template; chat SFT needs an instruct model (or a "
                            "tokenizer_config.json / chat_template.jinja with one)")
    return template


def generation_marked(template: str) -> bool:
    """Whether the template marks what the assistant generates (TRL's check; importing TRL maps its
    template tables, about 1.5 GB of address space, so callers ask once, up front)."""
    from trl.chat_template_utils import has_generation_markers

    return has_generation_markers(template)


def label_assistant_turns(tokenizer, template: str, messages: list[dict], *, marked: bool | None = None) -> Labelled:
    """The conversation's tokens with its assistant replies marked, as one example where the template
    renders it consistently, else one example per assistant turn (module docstring). `marked`:
    generation_marked(template), where the caller knows it already."""
    marked = generation_marked(template) if marked is None else marked
    ways = [_marked] if marked else [_by_prefixes, _turn_by_turn]
    failures = []
    for folded, variant in _system_variants(messages):
        for way in ways:
            attempt = f"{'with the system message in the first user turn, ' if folded else ''}{_WAYS[way.__name__]}"
            try:
                examples = way(tokenizer, template, variant)
            except _Inconsistent as exc:
                failures.append(f"{attempt}: {exc}")
                continue
            except JinjaError as exc:  # the template's raise_exception: a system role it refuses, say
                failures.append(f"{attempt}: the template refused the conversation ({exc})")
                break
            return Labelled(examples, per_turn=way is _turn_by_turn, system_folded=folded)
    raise TemplateError("assistant replies cannot be located with the base model's chat template: " + "; ".join(failures))


_WAYS = {"_marked": "by its generation markers", "_by_prefixes": "as one example",
         "_turn_by_turn": "one example per assistant turn"}


def _system_variants(messages: list[dict]):
    """The conversation as given, then (if it has a system message) with it folded into the first
    user turn, which every template renders."""
    yield False, messages
    if messages and messages[0]["role"] == "system" and len(messages) > 1 and messages[1]["role"] == "user":
        system, user = messages[0], messages[1]
        yield True, [{**user, "content": f"{system['content']}\n\n{user['content']}"}, *messages[2:]]


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # The template writes the special tokens (BOS and all) into the text itself.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _marked(tokenizer, template: str, messages: list[dict]) -> list[Rendered]:
    encoded = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    return [Rendered(list(encoded["input_ids"]), [bool(m) for m in encoded["assistant_masks"]])]


def _by_prefixes(tokenizer, template: str, messages: list[dict]) -> list[Rendered]:
    full = _render(tokenizer, template, messages, False)
    _check_system_kept(messages, full)
    ids = _ids(tokenizer, full)
    assistant = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = _reply_span(tokenizer, template, messages, i, ids, full)
            assistant[start:end] = [True] * (end - start)
    return [Rendered(ids, assistant)]


def _turn_by_turn(tokenizer, template: str, messages: list[dict]) -> list[Rendered]:
    examples = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            text = _render(tokenizer, template, messages[:i + 1], False)
            _check_system_kept(messages, text)
            ids = _ids(tokenizer, text)
            start, end = _reply_span(tokenizer, template, messages, i, ids, text)
            examples.append(Rendered(ids, [start <= k < end for k in range(len(ids))]))
    return examples


def _check_system_kept(messages: list[dict], text: str) -> None:
    if messages[0]["role"] == "system" and messages[0]["content"].strip() not in text:
        raise _Inconsistent("the chat template leaves the system message out of the conversation")


def _reply_span(tokenizer, template: str, messages: list[dict], i: int, ids: list[int], text: str) -> tuple[int, int]:
    """[start, end) of assistant turn i's reply and end-of-turn tokens within `ids` (the rendering
    `text` of a conversation that goes at least to the end of turn i)."""
    prompt = _render(tokenizer, template, messages[:i], True)
    start = _prefix_length(tokenizer, prompt, ids, text, i)
    end = _prefix_length(tokenizer, _render(tokenizer, template, messages[:i + 1], False), ids, text, i + 1)
    while end > start and not tokenizer.decode(ids[end - 1:end]).strip():
        end -= 1  # whitespace after the end-of-turn token: formatting, not generated
    reply = messages[i]["content"].strip()
    if prompt == _render(tokenizer, template, messages[:i], False) and \
            not tokenizer.decode(ids[start:end]).lstrip().startswith(reply):
        raise TemplateError(
            "the base model's chat template has no {% generation %} markers and ignores add_generation_prompt: it "
            "writes the assistant's turn header together with the reply, so the header cannot be told apart from "
            "what the assistant says; add a chat_template.jinja to the model folder that opens the assistant turn "
            "for add_generation_prompt, or one with {% generation %}...{% endgeneration %} around what the "
            "assistant says")
    return start, end


def _prefix_length(tokenizer, prefix: str, ids: list[int], text: str, upto: int) -> int:
    prefix_ids = _ids(tokenizer, prefix)
    if ids[:len(prefix_ids)] == prefix_ids:
        return len(prefix_ids)
    if text.startswith(prefix):
        why = "its last token merges with the next one's text"
    else:
        why = "the template renders earlier turns differently once later ones follow"
    raise _Inconsistent(f"the conversation cut after message {upto} does not render to a prefix of the whole "
                        f"conversation's tokens ({why})")


# ------------------------------------------------------------------------------ TRL's SFTTrainer

# SmolLM2-Instruct (ChatML with a default system prompt), as shipped in its tokenizer_config.json.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same text; an assistant message's content and its end-of-turn token are the generation (the
# newline after <|im_end|> is formatting the model never has to produce).
SMOLLM2_TRAINING = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEMPLATES = {SMOLLM2: SMOLLM2_TRAINING}


def training_template(tokenizer) -> str:
    """A template that renders like the tokenizer's and marks what the assistant generates, for TRL's
    `SFTTrainer(assistant_only_loss=True)`, which reads the mask off markers only (the TRL baseline of
    bench/train). ftpipe's own trainer needs none of this: it labels by prefixes (above)."""
    from trl.chat_template_utils import get_training_chat_template

    template = model_template(tokenizer)
    if generation_marked(template):
        return template
    if template in _TRAINING_TEMPLATES:
        return _TRAINING_TEMPLATES[template]
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        raise TemplateError("the base model's chat template has no {% generation %} markers and neither ftpipe "
                            "nor TRL knows a marked equivalent") from None
    return template if patched is None else patched
