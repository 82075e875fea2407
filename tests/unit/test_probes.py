"""Knowledge probes: file validation and scoring, on the tiny model (mechanics, not quality)."""
import json

import pytest

from shared.domain.models import TINY, resolve_model

from services.evaluator.probes import Probe, ProbeError, fact_rate, load_probes


def write(tmp_path, lines):
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line, message", [
    ("{oops", "not valid JSON"),
    (json.dumps({"expect": ["x"]}), "'question' must be a non-empty string"),
    (json.dumps({"question": "q", "expect": []}), "'expect' must be a non-empty list"),
    (json.dumps({"question": "q", "expect": "45 days"}), "'expect' must be a non-empty list"),
])
def test_bad_probe_files_name_the_line(tmp_path, line, message):
    path = write(tmp_path, [json.dumps({"question": "ok?", "expect": ["yes"]}), line])
    with pytest.raises(ProbeError, match=rf"probes.jsonl:2: {message}"):
        load_probes(path)


def test_empty_probe_file_is_refused(tmp_path):
    with pytest.raises(ProbeError, match="no probes"):
        load_probes(write(tmp_path, [""]))


def test_a_probe_passes_on_any_expected_string_case_insensitively():
    probe = Probe(question="How long to return?", expect=("45 days", "forty-five days"))
    assert probe.passes("You have Forty-Five Days to return it.")
    assert not probe.passes("You have 30 days.")


def test_fact_rate_scores_every_probe(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(TINY)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    probes = load_probes(write(tmp_path, [json.dumps({"question": f"q{i}", "expect": ["zzzz-never"], "fact": f"f{i}"})
                                          for i in range(3)]))
    rate, details = fact_rate(model, tokenizer, probes, system_prompt="Be brief.", max_new_tokens=4)
    assert rate == 0.0 and len(details) == 3


def test_a_rejected_string_fails_an_answer_that_also_states_the_fact():
    probe = Probe(question="How long to return?", expect=("30 days",), reject=("21 days", "6 weeks"))
    assert probe.passes("You have 30 days.")
    assert not probe.passes("You have 30 days, or 21 Days for price matches.")
    assert not probe.passes("Six weeks.")


def test_probes_carry_reject_and_split_and_select_by_split(tmp_path):
    path = write(tmp_path, [
        json.dumps({"question": "a?", "expect": ["1"], "reject": ["2"], "split": "val"}),
        json.dumps({"question": "b?", "expect": ["1"], "split": "test"}),
        json.dumps({"question": "c?", "expect": ["1"]}),     # no split: a test probe, gated as before
    ])
    assert [(p.question, p.split, p.reject) for p in load_probes(path)] == [
        ("a?", "val", ("2",)), ("b?", "test", ()), ("c?", "test", ())]
    assert [p.question for p in load_probes(path, split="test")] == ["b?", "c?"]
    assert [p.question for p in load_probes(path, split="val")] == ["a?"]


@pytest.mark.parametrize("extra, message", [
    ({"reject": "2"}, "'reject', when given, must be a list of non-empty strings"),
    ({"reject": [""]}, "'reject', when given, must be a list of non-empty strings"),
    ({"split": "train"}, "'split' must be one of val, test"),
])
def test_bad_reject_or_split_names_the_line(tmp_path, extra, message):
    path = write(tmp_path, [json.dumps({"question": "q", "expect": ["x"], **extra})])
    with pytest.raises(ProbeError, match=rf"probes.jsonl:1: {message}"):
        load_probes(path)


def test_a_file_without_probes_of_the_asked_split_is_refused(tmp_path):
    path = write(tmp_path, [json.dumps({"question": "q", "expect": ["x"]})])
    with pytest.raises(ProbeError, match='no val probes; mark some with "split": "val"'):
        load_probes(path, split="val")
