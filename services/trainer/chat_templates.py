"""Chat templates with generation markers, so that chat SFT trains on assistant turns only.

`apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens a template wraps in
`{% generation %}` ... `{% endgeneration %}`. Many instruct models ship templates without these
markers. TRL keeps marked copies of the common ones (`get_training_chat_template`); SmolLM2's is
not among them, so ftpipe keeps its own table of templates that render text identical to the
model's, character for character (tests/unit/test_chat_templates.py checks it).
"""
from __future__ import annotations


class TemplateError(ValueError):
    """The model's chat template cannot be used for assistant-only training."""


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
    """A template that renders like the tokenizer's and marks what the assistant generates."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if template is None:
        raise TemplateError("the base model has no chat template; chat SFT needs an instruct model (or a "
                            "tokenizer_config.json / chat_template.jinja with one)")
    if has_generation_markers(template):
        return template
    if template in _TRAINING_TEMPLATES:
        return _TRAINING_TEMPLATES[template]
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:
        raise TemplateError("the base model's chat template has no {% generation %} markers and neither ftpipe "
                            "nor TRL knows a marked equivalent, so assistant turns cannot be told apart; add a "
                            "chat_template.jinja to the model folder with {% generation %}...{% endgeneration %} "
                            "around what the assistant says") from None
    return template if patched is None else patched
