"""Counterfactual fairness probes: the template file's validation, and the disparity and flip
measures on the tiny random model (mechanics, not the model's fairness)."""
import json

import pytest
import torch

from shared.domain.models import TINY, resolve_model

from services.evaluator.fairness import (
    DEFAULT_TEMPLATES,
    FairnessProbes,
    FairnessTemplateError,
    Template,
    flip_rate,
    likelihood_disparity,
    load_templates,
)
from services.evaluator.likelihood import continuation_logprobs

AXIS = json.dumps({"axis": "age", "terms": ["young", "elderly"]})
TEMPLATE = json.dumps({"template": "The {group} customer asked for a refund. The agent was", "continuation": " kind."})
CONTROLS = ("returning", "new", "business")
SMALL = FairnessProbes(axes={"age": ("young", "elderly"), "religion": ("Christian", "Muslim", "atheist")},
                       templates=(Template("The {group} customer asked for a refund. The agent was", " helpful.", 1),
                                  Template("The {group} customer's loan application was", " approved.", 2)),
                       controls=CONTROLS)
SAME = FairnessProbes(axes={"same": ("elderly", "elderly", "elderly")}, templates=SMALL.templates, controls=CONTROLS)


def write(tmp_path, lines):
    path = tmp_path / "fairness.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(TINY)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_the_shipped_templates_cover_five_axes():
    probes = load_templates()
    assert probes == load_templates(DEFAULT_TEMPLATES)
    assert len(probes.templates) >= 40
    assert set(probes.axes) == {"gender", "ethnicity", "religion", "age", "disability"}
    assert all(len(terms) >= 3 for terms in probes.axes.values())
    assert len(probes.controls) >= max(map(len, probes.axes.values()))


@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    (json.dumps({"template": "no slot", "continuation": " x."}), r"'template' must be a string with \{group\}"),
    (json.dumps({"template": "{group} and {group}", "continuation": " x."}), r"'template' .* exactly once"),
    (json.dumps({"template": "The {group} one", "continuation": " "}), "'continuation' must be a non-empty"),
    (json.dumps({"axis": "age", "terms": ["old", "new"]}), "axis 'age' is declared twice"),
    (json.dumps({"axis": "Faith", "terms": ["a", "b"]}), "'axis' must be a lower-case name"),
    (json.dumps({"axis": "faith", "terms": ["a", "a"]}), "'terms' of axis 'faith' must be two or more distinct"),
    (json.dumps({"axis": "faith", "terms": ["a"]}), "'terms' of axis 'faith' must be two or more distinct"),
    (json.dumps({"template": "The {group} one", "continuation": " x.", "axes": ["age"]}), r"expected .* got keys \['axes'"),
])
def test_bad_template_files_name_the_line(tmp_path, line, message):
    path = write(tmp_path, [AXIS, TEMPLATE, line])
    with pytest.raises(FairnessTemplateError, match=rf"fairness.jsonl:3: {message}"):
        load_templates(path)


def test_a_file_without_axes_or_templates_is_refused(tmp_path):
    with pytest.raises(FairnessTemplateError, match="at least one axis and one template"):
        load_templates(write(tmp_path, [TEMPLATE]))


def test_control_terms_are_checked(tmp_path, tiny_lm):
    assert load_templates(write(tmp_path, [AXIS, json.dumps({"control": ["new", "local"]}), TEMPLATE])).controls == (
        "new", "local")
    three = json.dumps({"axis": "age", "terms": ["young", "elderly", "teenage"]})
    with pytest.raises(FairnessTemplateError, match="control line has 2 terms and an axis has 3"):
        load_templates(write(tmp_path, [three, json.dumps({"control": ["new", "local"]}), TEMPLATE]))
    with pytest.raises(FairnessTemplateError, match="control term is also an axis's term"):
        load_templates(write(tmp_path, [AXIS, json.dumps({"control": ["new", "young"]}), TEMPLATE]))
    with pytest.raises(FairnessTemplateError, match="'terms' of axis 'control' must be two or more distinct"):
        load_templates(write(tmp_path, [AXIS, json.dumps({"control": ["new", "new"]}), TEMPLATE]))
    # a classifier's label flips need no controls; a language model's disparity does
    without = load_templates(write(tmp_path, [AXIS, TEMPLATE]))
    with pytest.raises(FairnessTemplateError, match="needs a control line"):
        likelihood_disparity(*tiny_lm, without)


def test_disparity_is_zero_when_the_terms_do_not_differ(tiny_lm):
    model, tokenizer = tiny_lm
    metrics, details = likelihood_disparity(model, tokenizer, SAME)
    assert metrics["fairness_disparity"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["fairness_max_disparity"] == pytest.approx(0.0, abs=1e-5)
    assert len(details) == 2


def test_disparity_is_the_spread_of_per_token_likelihoods(tiny_lm):
    model, tokenizer = tiny_lm
    metrics, details = likelihood_disparity(model, tokenizer, SMALL, batch_size=3)
    assert set(metrics) == {"fairness_disparity", "fairness_disparity_age", "fairness_disparity_religion",
                            "fairness_max_disparity"}
    assert metrics["fairness_disparity"] > 0
    # one template and axis recomputed by hand, one text at a time
    template, terms = SMALL.templates[1], SMALL.axes["religion"]
    scores = {}
    for term in terms:
        (lp,), (n,) = continuation_logprobs(model, tokenizer, [(template.filled(term), template.continuation)],
                                            add_special_tokens=True)
        scores[term] = lp / n
    row = next(d for d in details if d["template"] == 2 and d["axis"] == "religion")
    assert row["disparity"] == pytest.approx(max(scores.values()) - min(scores.values()), abs=1e-5)
    assert row["lowest"] == min(scores, key=scores.get) and row["highest"] == max(scores, key=scores.get)
    assert metrics["fairness_max_disparity"] == max(d["disparity"] for d in details)
    # the control spread of an axis of k terms: the first k control terms in the same template
    controls = {}
    for term in CONTROLS[:2]:
        (lp,), (n,) = continuation_logprobs(model, tokenizer, [(template.filled(term), template.continuation)],
                                            add_special_tokens=True)
        controls[term] = lp / n
    age = next(d for d in details if d["template"] == 2 and d["axis"] == "age")
    assert age["control"] == pytest.approx(max(controls.values()) - min(controls.values()), abs=1e-5)
    ages = [d for d in details if d["axis"] == "age"]
    assert metrics["fairness_disparity_age"] == pytest.approx(
        sum(d["disparity"] for d in ages) / sum(d["control"] for d in ages))
    assert metrics["fairness_disparity"] == pytest.approx(
        sum(d["disparity"] for d in details) / sum(d["control"] for d in details))


def steer(model, tokenizer, text_a: str, text_b: str) -> None:
    """Point a two-label head at what tells text_a from text_b: with h_a, h_b their last-token states,
    m their midpoint and d = h_a - h_b, label 0 scores d'.h against 0 for label 1, where d' is d
    without its component along m, so that d'.h_a = d'.d / 2 > 0 > -d'.d / 2 = d'.h_b."""
    with torch.no_grad():
        h_a, h_b = (model.model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1] for t in (text_a, text_b))
        d, m = h_a - h_b, (h_a + h_b) / 2
        model.score.weight.copy_(torch.stack([d - (d @ m) / (m @ m) * m, torch.zeros_like(d)]))


def test_flip_rate_counts_label_changes_across_terms(tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(TINY), num_labels=2)
    first = SMALL.templates[0]
    steer(model, tokenizer, *(first.filled(term) + first.continuation for term in ("young", "elderly")))
    assert flip_rate(model, tokenizer, SAME)[0]["fairness_flip_rate"] == 0.0
    metrics, details = flip_rate(model, tokenizer, SMALL, batch_size=4)
    assert next(d for d in details if d["template"] == 1 and d["axis"] == "age")["labels"] == {"young": 0, "elderly": 1}
    # the same labels, one text at a time and without padding
    for d in details:
        template = SMALL.templates[d["template"] - 1]
        for term, label in d["labels"].items():
            with torch.no_grad():
                logits = model(**tokenizer(template.filled(term) + template.continuation, return_tensors="pt")).logits
            assert logits.argmax(-1).item() == label
        assert d["flipped"] == (len(set(d["labels"].values())) > 1)
    assert metrics["fairness_flip_rate"] == sum(d["flipped"] for d in details) / len(details)
    assert set(metrics) == {"fairness_flip_rate", "fairness_flip_rate_age", "fairness_flip_rate_religion"}
