"""Quality filters: each rule positive and negative, language id, and the job's audit outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.domain.recipe import QualitySpec

from services.preprocess import quality

R = quality.Rules()
GOOD_ANSWER = ("To change your password, open Settings, choose Security and follow the steps. "
               "You will get a confirmation email within a few minutes.")


def conv(answer: str, user: str = "How do I change my password?") -> list[tuple[str, str]]:
    return [("user", user), ("assistant", answer)]


def trips(messages, rules: quality.Rules = R) -> tuple[str, ...]:
    return quality.check(messages, rules)


def test_good_rows_pass():
    assert trips(conv(GOOD_ANSWER)) == ()
    # short support answers are fine
    assert trips(conv("Yes.", "Is there a student discount?")) == ()
    assert trips(conv("Bonjour", "Translate to French: Good morning")) == ()
    assert trips(conv("Payment taken.", "Please charge card [CARD].")) == ()


def test_empty_and_short_answer():
    assert "empty_answer" in trips(conv("...!"))
    strict = quality.Rules(min_answer_words=3)
    assert trips(conv("Yes, sure.", "Can I?"), strict) == ("short_answer",)
    assert trips(conv("Yes, you can.", "Can I?"), strict) == ()


def test_long_answer():
    rules = quality.Rules(max_answer_words=20)
    assert "long_answer" in trips(conv(GOOD_ANSWER + " " + GOOD_ANSWER), rules)
    assert "long_answer" not in trips(conv("Open Settings, then Security."), rules)


def test_truncated_answer():
    cut = GOOD_ANSWER + " If the email does not arrive, check your spam folder and then ask us to send it again or to use"
    assert trips(conv(cut)) == ("truncated_answer",)
    assert trips(conv(cut + " another address.")) == ()
    assert trips(conv("Open Settings and then")) == ()  # short: not judged


def test_symbol_ratio():
    assert "symbol_ratio" in trips(conv("### ### ### Steps ... ... ... # # #"))
    assert "symbol_ratio" not in trips(conv("## Steps\n1. Open Settings.\n2. Choose Security.\n## Done"))
    assert "symbol_ratio" in trips(conv("Wait... what... no... really... ok..."))
    assert trips(conv("Order #842654 shipped on 12/05 via UPS 1Z999AA10123456784.", "Status of #842654?")) == ()


def test_digit_ratio():
    assert "digit_ratio" in trips(conv("0000 1111 2222 3333 4444 5555 6666 7777 8888 9999 0000 1111 ok"))
    assert "digit_ratio" not in trips(conv("Your order 100234 ships on 12 May 2024, tracking 1Z999."))


def test_duplicate_lines():
    spam = "\n".join(["Buy now!", "Buy now!", "Buy now!", "Great offer.", "Buy now!"])
    assert "duplicate_lines" in trips(conv(spam))
    assert "duplicate_lines" not in trips(conv("Step one.\nStep two.\nStep three.\nDone."))


def test_repeated_ngrams():
    rep = "thank you " * 15 + "for contacting us."
    assert "repeated_ngrams" in trips(conv(rep))
    assert "repeated_ngrams" not in trips(conv(GOOD_ANSWER))


@pytest.mark.parametrize("text", [
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "As an AI language model, I cannot help with that.",
    "Click here to learn more about our plans.",
    "This website uses cookies to improve your experience.",
    "Please enable JavaScript to view this page.",
])
def test_boilerplate(text):
    assert "boilerplate" in trips(conv(text))


def test_boilerplate_only_in_answers():
    assert "boilerplate" not in trips(conv(GOOD_ANSWER, "I click here and nothing happens, why?"))


def test_non_printable():
    assert "non_printable" in trips(conv("Open \x00\x01\x02 Settings\ufffd\ufffd now."))
    assert "non_printable" not in trips(conv("Open Settings\tthen Security.\nDone."))


def test_language():
    es = conv("Abra la configuración, elija Seguridad y siga los pasos indicados en la pantalla.",
              "¿Cómo puedo cambiar la contraseña de mi cuenta?")
    assert trips(es) == ("language",)
    assert quality.identify_language(" ".join(c for _, c in es))[0] == "es"
    assert trips(es, quality.Rules(languages=("en", "es"))) == ()
    assert "language" not in trips(conv(GOOD_ANSWER))
    assert "language" not in trips(conv("Bonjour", "Translate: Good morning"))  # too short to judge
    code = "```python\nfor i in range(10):\n    print(i, i * i, sorted(set(xs)))\n```"
    assert trips(conv(code, "Loop please")) == ()  # code is not prose: too short to judge


def test_toxicity_off_by_default_and_on_when_enabled():
    rude = conv("You idiot, that is a stupid question, figure it out yourself.")
    assert "toxicity" not in trips(rude)
    on = quality.Rules(rules=R.rules + ("toxicity",))
    assert "toxicity" in trips(rude, on)
    assert "toxicity" not in trips(conv(GOOD_ANSWER), on)


def test_several_rules_counted_once_removed():
    row = conv("Lorem ipsum " * 12 + "dolor sit amet and")
    tripped = trips(row)
    assert {"boilerplate", "repeated_ngrams"} <= set(tripped)
    summary = quality.merge(quality.summarise([(None, tripped), (None, ())]))
    assert summary["removed"] == 1 and summary["checked"] == 2
    assert summary["rules"]["boilerplate"] == 1 and summary["rules"]["repeated_ngrams"] == 1


def test_recipe_spec_and_unknown_rule():
    rules = quality.Rules.from_spec(QualitySpec(languages=["en", "fr"]))
    assert rules.languages == ("en", "fr") and "toxicity" not in rules.rules
    with pytest.raises(ValueError, match="unknown rule"):
        QualitySpec(rules=("no_such_rule",))


# ------------------------------------------------------------------ in the job


def test_job_writes_filtered_and_report(tmp_path, spark):
    from shared.domain.recipe import DataSpec, Recipe

    from services.preprocess.job import prepare

    rows = [{"messages": [{"role": "user", "content": f"How do I reset device {i} model {i * 7}?"},
                          {"role": "assistant", "content": f"Hold the power button of device {i} for "
                                                           f"{i % 9 + 2} seconds until it restarts."}]}
            for i in range(14)]
    junk = {3: "As an AI language model I cannot help. Write to jane.doe@example.com",
            8: "Abra la configuración, elija Seguridad y siga los pasos indicados en la pantalla."}
    for line, answer in junk.items():
        rows[line - 1]["messages"][1]["content"] = answer
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(name="q-test", version=1, base_model="tiny", model_name="q-bot", data=DataSpec(min_rows=5))
    result = prepare(spark, str(src), recipe, tmp_path / "out",
                     source={})
    assert not result.rejected, result.reason
    assert result.counts["quality_filtered"] == 2 and result.counts["near_duplicates_removed"] == 0
    filtered = [json.loads(x) for x in Path(result.files["filtered.jsonl"]).read_text().splitlines()]
    assert [f["line"] for f in filtered] == [3, 8]
    assert filtered[0]["rules"] == ["boilerplate"] and filtered[1]["rules"] == ["language"]
    assert "jane.doe@example.com" not in json.dumps(filtered) and "[EMAIL]" in filtered[0]["excerpt"]
    report = json.loads(Path(result.files["quality_report.json"]).read_text())
    assert report["rows_removed"] == 2 and report["counts"]["boilerplate"] == 1 and report["counts"]["language"] == 1
    assert report["rows_checked"] == 14
