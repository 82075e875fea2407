"""PII: the rules backend per category, overlap resolution, the canary, the residual scan, the DLP
request/response mapping, and (with Spark) the canary and residual gates in `prepare`."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.domain import pii_residual
from shared.domain.recipe import DataSpec, Recipe

from services.preprocess import pii

# ------------------------------------------------------------------ rules backend, per category

POSITIVE = {
    "email": ["jane.doe@example.com", "a.b+tag@mail.example.co.uk"],
    "phone": ["+1 415 555 0100", "(415) 555-0100", "0412 345 678", "+44 20 7946 0958", "(02) 9876 5432",
              "+91 98765 43210", "030 123456", "01 23 45 67 89",
              "(349) 555-0155", "349-555-0155"],  # unassigned area codes are still phones
    "card": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"],
    "iban": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR14 2004 1010 0505 0001 3M02 606"],
    "ip": ["192.0.2.44", "10.0.0.1", "2001:db8::8a2e:370:7334", "fe80::1"],
    "ssn": ["536-22-8726", "123 45 6789"],
    "tfn": ["123 456 782"],
    "abn": ["51 824 753 556"],
    "medicare": ["2123 45670 1"],
}

NEGATIVE = {  # checksum-invalid or out of range: left alone
    "card": ["4111 1111 1111 1112", "1234567812345678"],
    "iban": ["GB82 WEST 1234 5698 7654 33", "DE89370400440532013001"],
    "ip": ["256.1.1.1", "v1.2.3.4", "10:30:00"],
    "ssn": ["666-12-3456", "000-12-3456", "912-34-5678", "123-00-4567", "123-45-0000"],
    "tfn": ["123 456 789"],
    "abn": ["51 824 753 557"],
    "medicare": ["2123 45671 1", "7123 45670 1"],
    "phone": ["ORD-2024-001234", "order #123456", "12 345 678 units", "in 2019", "$1,299.00", "v1.2.3"],
}


@pytest.mark.parametrize("category,value", [(c, v) for c, vs in POSITIVE.items() for v in vs])
def test_rules_detect(category, value):
    masked, counts = pii.mask(f"value {value} here", [category])
    assert masked == f"value {pii.TOKENS[category]} here" and counts == {category: 1}
    # and with every category on, the same value gets the same token
    assert pii.mask(f"value {value} here")[0] == f"value {pii.TOKENS[category]} here"


@pytest.mark.parametrize("category,value", [(c, v) for c, vs in NEGATIVE.items() for v in vs])
def test_rules_leave_alone(category, value):
    text = f"value {value} here"
    assert pii.mask(text, [category]) == (text, {})


def test_context_categories():
    cases = [
        ("I was born on 14 March 1987.", "I was born on [DOB]."),
        ("DOB: 01/02/1990, meeting 01-02-2024", "DOB: [DOB], meeting 01-02-2024"),
        ("date of birth is 1990-02-01", "date of birth is [DOB]"),
        ("Send it to 42 Wallaby Way, Sydney", "Send it to [ADDRESS], Sydney"),
        ("at 1600 Pennsylvania Avenue NW", "at [ADDRESS]"),
        ("Unit 5, 27 George St please", "[ADDRESS] please"),
        ("Hauptstraße 12 in Berlin", "[ADDRESS] in Berlin"),
        ("au 12 rue de la Paix", "au [ADDRESS]"),
        ("My name is Zephyrine Quackenbush.", "My name is [PERSON]."),
        ("Hi, I'm Sarah and I need help", "Hi, I'm [PERSON] and I need help"),
        ("I'm Happy to help", "I'm Happy to help"),
        ("Ask Dr. Okonkwo or Mrs Patel", "Ask Dr. [PERSON] or Mrs [PERSON]"),
        ("Then James Wilson called", "Then [PERSON] called"),
        ("Thanks,\nPriya Sharma", "Thanks,\n[PERSON]"),
        ("Open Settings and follow step 3.", "Open Settings and follow step 3."),
    ]
    for text, want in cases:
        assert pii.mask(text)[0] == want, text


def test_ssn_and_tfn_and_abn_unseparated_need_context():
    assert pii.mask("ssn 536228726")[0] == "ssn [SSN]"
    assert pii.mask("TFN 123456782, abn 51824753556")[0] == "TFN [TFN], abn [ABN]"
    assert pii.mask("order 123456782")[0] == "order 123456782"


def test_overlaps_resolved_longest_then_most_specific():
    assert pii.resolve([(0, 10, "phone"), (0, 19, "card"), (20, 25, "person")]) == [(0, 19, "card"), (20, 25, "person")]
    assert pii.resolve([(5, 15, "phone"), (5, 15, "tfn")]) == [(5, 15, "tfn")]  # tie: more specific
    assert pii.resolve([(0, 10, "person"), (5, 15, "address")]) == [(5, 15, "address")]  # tie: priority
    assert pii.resolve([(3, 8, "person"), (0, 4, "dob")]) == [(3, 8, "person")]  # longer wins
    # email local part with digits is one email, not a phone
    assert pii.mask("mail 04123456789@example.com now") == ("mail [EMAIL] now", {"email": 1})
    # deterministic whatever the order of detection
    spans = [(0, 5, "person"), (2, 7, "address"), (6, 9, "ip")]
    assert pii.resolve(spans) == pii.resolve(list(reversed(spans)))


def test_checksums():
    assert pii.iban_ok("GB82WEST12345698765432") and not pii.iban_ok("GB82WEST12345698765433")
    assert pii.tfn_ok("123456782") and not pii.tfn_ok("123456789")
    assert pii.abn_ok("51824753556") and not pii.abn_ok("51824753557")
    assert pii.medicare_ok("2123456701") and not pii.medicare_ok("2123456711")
    assert pii.ssn_ok("536", "22", "8726") and not pii.ssn_ok("666", "22", "8726")


def test_detector_protocol_and_unknown_backend():
    det: pii.Detector = pii.RulesDetector(["email"])
    assert det.detect("x jane@example.com") == [(2, 18, "email")]
    with pytest.raises(ValueError, match="unknown pii_backend"):
        pii.backend("nope")
    with pytest.raises(ValueError, match="unknown PII categories"):
        pii.RulesDetector(["email", "passport"])


def test_presidio_missing_is_a_clear_error():
    try:  # presidio is deliberately not a dependency of ftpipe
        import presidio_analyzer  # noqa: F401
    except ImportError:
        with pytest.raises(pii.PiiBackendUnavailable, match="pii_backend 'presidio' needs presidio-analyzer"):
            pii.PresidioDetector()
    else:
        pytest.skip("presidio-analyzer is installed here")


def test_dlp_missing_is_a_clear_error():
    try:
        from google.cloud import dlp_v2  # noqa: F401
    except ImportError:
        with pytest.raises(pii.PiiBackendUnavailable, match="pii_backend 'dlp' needs google-cloud-dlp"):
            pii.DlpMasker()
    else:
        pytest.skip("google-cloud-dlp is installed here")


def test_presidio_span_mapping():
    results = [SimpleNamespace(entity_type="PERSON", start=0, end=4), SimpleNamespace(entity_type="URL", start=5, end=9),
               SimpleNamespace(entity_type="AU_TFN", start=10, end=21)]
    assert pii.presidio_spans(results, ["person", "tfn"]) == [(0, 4, "person"), (10, 21, "tfn")]


# ------------------------------------------------------------------ Cloud DLP (pure functions)


def test_dlp_request():
    req = pii.dlp_deidentify_request("proj", "call me", ["email", "person", "tfn"])
    names = [t["name"] for t in req["inspect_config"]["info_types"]]
    assert req["parent"] == "projects/proj/locations/global" and req["item"] == {"value": "call me"}
    assert names == ["EMAIL_ADDRESS", "AUSTRALIA_TAX_FILE_NUMBER", "PERSON_NAME"]
    [transformation] = req["deidentify_config"]["info_type_transformations"]["transformations"]
    assert transformation["primitive_transformation"] == {"replace_with_info_type_config": {}}
    assert [t["name"] for t in transformation["info_types"]] == names


def test_dlp_response_mapping():
    response = {
        "item": {"value": "Hi [PERSON_NAME], mail [EMAIL_ADDRESS] or EMAIL_ADDRESS, TFN [AUSTRALIA_TAX_FILE_NUMBER]"},
        "overview": {"transformed_bytes": "40", "transformation_summaries": [
            {"info_type": {"name": "EMAIL_ADDRESS"}, "results": [{"count": "2", "code": "SUCCESS"}]},
            {"info_type": {"name": "PERSON_NAME"}, "results": [{"count": "1", "code": "SUCCESS"}]},
            {"info_type": {"name": "AUSTRALIA_TAX_FILE_NUMBER"}, "results": [{"count": "1", "code": "ERROR"}]},
        ]},
    }
    text, counts = pii.dlp_map_response(response)
    assert text == "Hi [PERSON], mail [EMAIL] or [EMAIL], TFN [TFN]"
    assert counts == {"email": 2, "person": 1}


# ------------------------------------------------------------------ canary and residual scan


def test_canary_passes_for_rules_on_every_subset():
    assert pii.canary_missed() == []
    for cat in pii.CATEGORIES:
        doc = pii.canary_document([cat])
        assert pii.CANARY_VALUES[cat][1] in doc and pii.canary_missed([cat]) == []


def test_canary_names_the_missed_categories(monkeypatch):
    real = pii.RulesDetector.detect
    monkeypatch.setattr(pii.RulesDetector, "detect",
                        lambda self, text: [s for s in real(self, text) if s[2] not in ("iban", "person")])
    pii.backend.cache_clear()
    try:
        assert pii.canary_missed() == ["iban", "person"]
    finally:
        pii.backend.cache_clear()


def test_residual_scan_catches_unmasked_values_and_not_masked_text():
    masked, _ = pii.mask(pii.canary_document())
    assert pii_residual.scan(masked) == {}
    assert pii_residual.scan("reach me at someone@somewhere.example") == {"email_like": 1}
    assert pii_residual.scan("ref 123456789012") == {"digit_run_9plus": 1}
    assert pii_residual.scan("acct DE12 ABCD 1234 5678 9012 34") == {"iban_like": 1, "digit_run_9plus": 1}
    assert pii_residual.scan("tracking ST458885071313AU") == {}  # an IBAN country, not an IBAN length
    assert pii_residual.scan("Open Settings and follow step 3 at 10:30, v1.2.3") == {}
    # order and tracking codes are not identifiers of people; a greeted name is
    assert pii_residual.scan("order ORD-2024-001234, tracking AP123456789012AU, Hi Team, hi there") == {}
    assert pii_residual.scan("Thanks Aroha, it ships today") == {"name_after_greeting": 1}


@pytest.mark.parametrize("text, masked", [
    ("Hi Aroha, thanks for reaching out.", "Hi [PERSON], thanks for reaching out."),
    ("Thanks Tam Nguyen, I have updated the order.", "Thanks [PERSON], I have updated the order."),
    ("This is Siobhan again.", "This is [PERSON] again."),
    ("The order is under the name Kiri Waititi.", "The order is under the name [PERSON]."),
    ("I spoke to Liam in your store", "I spoke to [PERSON] in your store"),
    ("my TFN is 123456782 thanks", "my TFN is [TFN] thanks"),
    ("my tax file number is 123-456-782.", "my tax file number is [TFN]."),
    ("social security number, it is 536228726", "social security number, it is [SSN]"),
    ("ABN is 51824753556", "ABN is [ABN]"),
    ("Email o'brien@example.com now", "Email [EMAIL] now"),
    ("call 021 123 4567", "call [PHONE]"),
    ("Send it to 42 King Rd East please", "Send it to [ADDRESS] please"),
    # copies with doubled spaces or in one case, and addresses in other scripts
    ("Hi  Lily, thanks for reaching out", "Hi  [PERSON], thanks for reaching out"),
    ("My  name  is  Kiri Waititi.", "My  name  is  [PERSON]."),
    ("MY NAME IS OLIVIA BENNETT.", "MY NAME IS [PERSON]."),
    ("my iban is gb82 west 1234 5698 7654 32 thanks", "my iban is [IBAN] thanks"),
    ("DATE OF BIRTH 21 JANUARY 2004, AS", "DATE OF BIRTH [DOB], AS"),
    ("email me at chloé2001@orange.fr if easier", "email me at [EMAIL] if easier"),
])
def test_names_and_numbers_in_context(text, masked):
    assert pii.mask(text)[0] == masked


@pytest.mark.parametrize("text", ["Hi there, thanks", "Hey Team, the parcel", "I'm Happy to help.",
                                  "my name is on the order", "MY NAME IS ON THE ORDER",
                                  "I spoke to Customer Service yesterday", "I'm Australian.", "Thanks Again!"])
def test_capitalised_words_that_are_not_names(text):
    assert pii.mask(text) == (text, {})


def test_a_keyword_decides_between_two_checksums():
    # 11 digits that pass both the ABN and the Medicare checks: "ABN" says which
    value = next(f"{n:011d}" for n in range(51824753556, 51824853556) if pii.abn_ok(f"{n:011d}")
                 and pii.medicare_ok(f"{n:011d}"))
    assert pii.mask(f"ABN: {value}") == ("ABN: [ABN]", {"abn": 1})


def test_residual_summary_rate():
    from services.preprocess import partitions

    # unmasked (no categories), so the residual scan of mask_and_place sees the values
    rows = [(f"{i:064x}", (i, (("user", text), ("assistant", "Sure.")))) for i, text in
            enumerate(["fine", "id 1234567890", "[EMAIL] ok", "x@y.io"])]
    records = list(partitions.mask_and_place(rows, categories=(), fractions=(0.8, 0.1, 0.1)))
    parts = list(pii_residual.summarise(records))
    total = pii_residual.merge(parts + [{"documents": 4, "documents_with_hits": 0, "hits": {}}])
    assert total["documents"] == 8 and total["documents_with_hits"] == 2 and total["rate"] == 0.25
    assert total["hits"] == {"digit_run_9plus": 1, "email_like": 1}


def test_recipe_defaults():
    d = DataSpec()
    assert d.pii_backend == "rules" and d.pii_residual_threshold == 0.001
    assert set(d.pii_categories) == set(pii.CATEGORIES)


# ------------------------------------------------------------------ through `prepare` (Spark)

SOURCE = {"bucket": "local", "name": "incoming/test/pii.jsonl", "generation": "1"}


def _recipe(**data) -> Recipe:
    return Recipe(name="pii-test", version=1, base_model="tiny", model_name="pii-bot", data=DataSpec(**data))


def _rows(n: int, extra: dict[int, str]) -> list[dict]:
    rows = []
    for i in range(n):
        user = extra.get(i, f"How do I reset my password, case {i}?")
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": f"Open Settings and follow step {i}."}]})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path



def test_prepare_reports_residual_rate_and_rejects_residual_pii(spark, tmp_path):
    from services.preprocess.job import prepare

    pii_rows = {0: "Mail jane.doe@example.com, TFN 123 456 782, I was born on 3 May 1980.",
                1: "My name is Olivia Bennett, 42 Wallaby Way."}
    ok = prepare(spark, str(_write(tmp_path / "ok.jsonl", _rows(20, pii_rows))), _recipe(), tmp_path / "ok",
                 source=SOURCE)
    assert not ok.rejected, ok.reason
    report = json.loads((ok.out_dir / "pii_report.json").read_text())
    assert report["residual"]["rate"] == 0.0 and report["residual"]["documents_scanned"] == 20
    assert report["canary"] == "passed" and report["backend"] == "rules"
    assert {k: v for k, v in report["counts"].items() if v} == {
        "email": 1, "tfn": 1, "dob": 1, "person": 1, "address": 1}
    text = "".join(p.read_text() for p in ok.out_dir.iterdir())
    for value in ("jane.doe@example.com", "123 456 782", "3 May 1980", "Olivia Bennett", "Wallaby"):
        assert value not in text

    # a customer reference the rules cannot know (no checksum, no context) but the residual scan flags
    leaky = _rows(20, {3: "My customer reference is 8812 7733 9104 27, please check."})
    bad = prepare(spark, str(_write(tmp_path / "bad.jsonl", leaky)), _recipe(), tmp_path / "bad", source=SOURCE)
    assert bad.rejected and bad.reason.startswith("PII residual rate 5.00% above threshold 0.10%")
    assert "8812" not in bad.reason
    assert not any((tmp_path / "bad" / f).exists() for f in ("train.jsonl", "val.jsonl", "test.jsonl", "pii_report.json"))
    manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    assert manifest["status"] == "rejected" and manifest["pii"]["residual_rate"] == 0.05


def test_prepare_fails_fast_when_canary_missed(spark, tmp_path, monkeypatch):
    from services.preprocess.job import prepare

    real = pii.RulesDetector.detect
    monkeypatch.setattr(pii.RulesDetector, "detect",
                        lambda self, text: [s for s in real(self, text) if s[2] != "medicare"])
    pii.backend.cache_clear()
    try:
        result = prepare(spark, str(_write(tmp_path / "in.jsonl", _rows(12, {}))), _recipe(), tmp_path / "out",
                         source=SOURCE)
    finally:
        pii.backend.cache_clear()
    assert result.rejected and result.reason == "PII canary not fully detected: missed ['medicare'] (pii_backend 'rules')"
    assert "raw" not in result.counts  # failed before reading the input


def test_prepare_presidio_backend_missing(spark, tmp_path):
    try:
        import presidio_analyzer  # noqa: F401
        pytest.skip("presidio-analyzer is installed here")
    except ImportError:
        pass
    from services.preprocess.job import prepare

    result = prepare(spark, str(_write(tmp_path / "in.jsonl", _rows(12, {}))), _recipe(pii_backend="presidio"),
                     tmp_path / "out", source=SOURCE)
    assert result.rejected and result.reason.startswith("pii_backend 'presidio' needs presidio-analyzer")
