"""The preprocess Spark job on a real local Spark (one session for the module)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("pyspark")

from shared.domain.recipe import DataSpec, Recipe  # noqa: E402

from services.preprocess import formats, pii, split  # noqa: E402
from services.preprocess.job import PrepareResult, main, prepare  # noqa: E402

SOURCE = {"bucket": "local", "name": "incoming/test/chats.jsonl", "generation": "1"}


def recipe(**data) -> Recipe:
    return Recipe(name="support-test", version=3, base_model="tiny", model_name="support-bot", data=DataSpec(**data))


def chat(user: str, assistant: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {"messages": msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


TOPICS = ["refund", "invoice", "password", "shipping", "login", "upgrade", "warranty", "exchange", "coupon", "account"]
VERBS = ["change", "check", "cancel", "track", "reset", "update", "confirm", "find"]


def good_rows(n: int, tag: str = "") -> list[dict]:
    return [chat(f"How do I {VERBS[i % 8]} my {TOPICS[i % 10]} {tag}#{i}?",
                 f"To {VERBS[i % 8]} your {TOPICS[i % 10]}, open Settings and follow step {i}.")
            for i in range(n)]


def write_jsonl(path: Path, items: list) -> Path:
    """`items`: dicts (dumped) or raw strings (written as they are), one per line."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]



# ------------------------------------------------------------------ the mixed JSONL dataset

LUHN_CARD = "4111 1111 1111 1111"
BAD_CARD = "4111 1111 1111 1112"
PII_VALUES = ["jane.doe@example.com", "+1 415 555 0100", "(415) 555-0100", "0412 345 678", "+44 20 7946 0958",
              LUHN_CARD, "5500-0000-0000-0004"]

# line number -> (row, reason fragment)
BAD = {
    3: ('{"messages": [{"role": "user", "content": "hi"}', "bad JSON"),
    5: ('["just", "a", "list"]', "not a JSON object (got array)"),
    7: ({"question": "q", "answer": "a"}, "unknown row shape"),
    9: ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "role 'bot'"),
    11: ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "ok"}]},
         "message 1 (user) has empty content"),
    13: ({"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello?"}]},
         "no assistant turn"),
    15: ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}]}, "last turn is from 'user'"),
    17: (chat("x" * 3000 + " jane.doe@example.com", "y"), "over data.max_row_bytes=2000"),
    19: ({"instruction": "Summarise this", "input": "text"}, "without 'response' or 'output'"),
}


def mixed_rows() -> list:
    good = good_rows(48)
    good[2] = chat(f"My email is {PII_VALUES[0]}, call me on {PII_VALUES[1]} or (415) 555-0100.",
                   "Thanks, noted. We will call you back.")
    good[4] = chat("Mobile 0412 345 678, office +44 20 7946 0958.", "We have updated your contact details.")
    good[6] = chat(f"Please charge card {LUHN_CARD}; old card 5500-0000-0000-0004.", "Payment taken.")
    good[8] = chat(f"My order number is {BAD_CARD} from 2019, it cost $1,299.00 (ticket #123456).",
                   "I have found order 4111 1111 1111 1112.")
    good[10] = {"instruction": "Translate to French", "input": "Good morning", "output": "Bonjour"}
    good[12] = {"prompt": "What are your opening hours?", "completion": "9am to 5pm, Monday to Friday."}
    good[14] = {"conversations": [{"from": "human", "value": "Is there a student discount?"},
                                  {"from": "gpt", "value": "Yes, 15% with a valid student ID."}]}
    items: list = []
    it = iter(good)
    for line in range(1, 61):
        if line in BAD:
            items.append(BAD[line][0])
        elif line == 21:
            items.append("")  # blank line: skipped, counted apart
        elif line == 30:
            items.append(good[0])  # exact duplicate of line 1
        elif line == 40:  # same content modulo whitespace and case: duplicate of line 2
            row = good[1]
            items.append(chat("  " + row["messages"][0]["content"].upper().replace(" ", "   "),
                              row["messages"][1]["content"].lower()))
        else:
            items.append(next(it))
    return items


# the Luhn-invalid "order number" row is (rightly) flagged by the loose residual PII scan: 1 of 48
# documents, so the mixed dataset's recipe allows a residual rate up to 5%
MIXED = {"max_row_bytes": 2000, "pii_residual_threshold": 0.05}


@pytest.fixture(scope="module")
def mixed(spark, tmp_path_factory) -> tuple[PrepareResult, Path]:
    tmp = tmp_path_factory.mktemp("mixed")
    src = write_jsonl(tmp / "chats.jsonl", mixed_rows())
    result = prepare(spark, str(src), recipe(**MIXED), tmp / "out",
                     source=SOURCE)
    return result, src


def test_mixed_counts(mixed):
    result, _ = mixed
    assert not result.rejected, result.reason
    c = result.counts
    assert c["raw"] == 59 and c["blank_lines"] == 1
    assert c["rejected"] == len(BAD) and c["valid"] == 59 - len(BAD)
    assert c["duplicates_removed"] == 2 and c["deduplicated"] == c["valid"] - 2
    assert c["train"] + c["val"] + c["test"] == c["deduplicated"]
    assert c["near_duplicates_removed"] == 0 and c["quality_filtered"] == 0
    assert set(result.files) == {"train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "pii_report.json",
                                 "filtered.jsonl", "quality_report.json", "manifest.json"}


def test_rejected_rows_have_line_numbers_and_specific_reasons(mixed):
    result, _ = mixed
    rejected = read_jsonl(result.out_dir / "rejected.jsonl")
    assert [r["line"] for r in rejected] == sorted(BAD)
    for r in rejected:
        assert BAD[r["line"]][1] in r["reason"], r
        assert len(r["raw_excerpt"]) <= 200
    too_big = next(r for r in rejected if r["line"] == 17)
    assert too_big["code"] == "too_large"


def all_output_text(out: Path) -> str:
    return "".join(p.read_text() for p in sorted(out.iterdir()))


def test_no_pii_values_anywhere_in_outputs(mixed):
    result, _ = mixed
    text = all_output_text(result.out_dir)
    for value in PII_VALUES:
        assert value not in text


def test_pii_masked_with_tokens_and_counted(mixed):
    result, _ = mixed
    rows = [r for name in ("train", "val", "test") for r in read_jsonl(result.out_dir / f"{name}.jsonl")]
    text = json.dumps(rows)
    assert "My email is [EMAIL], call me on [PHONE] or [PHONE]." in text
    assert "Mobile [PHONE], office [PHONE]." in text
    assert "Please charge card [CARD]; old card [CARD]." in text
    # Luhn-invalid number, year, price and ticket number are left alone
    assert f"My order number is {BAD_CARD} from 2019, it cost $1,299.00 (ticket #123456)." in text
    report = json.loads((result.out_dir / "pii_report.json").read_text())
    assert {k: v for k, v in report["counts"].items() if v} == {"email": 1, "phone": 4, "card": 2}
    assert report["residual"]["documents_with_hits"] == 1 and report["residual"]["hits_by_rule"] == {"digit_run_9plus": 2}
    assert report["rows_masked"] == 3 == result.counts["pii_masked_rows"]


def test_normalised_rows_and_dedup_keeps_first(mixed):
    result, _ = mixed
    rows = {r["id"]: r for name in ("train", "val", "test") for r in read_jsonl(result.out_dir / f"{name}.jsonl")}
    by_user = {r["messages"][0]["content"]: r for r in rows.values()}
    assert by_user["Translate to French\n\nGood morning"]["messages"] == [
        {"role": "user", "content": "Translate to French\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"}]
    assert by_user["What are your opening hours?"]["messages"][1]["content"] == "9am to 5pm, Monday to Friday."
    assert by_user["Is there a student discount?"]["messages"][1]["role"] == "assistant"
    for r in rows.values():
        assert set(r) == {"id", "messages"}
        assert [m["role"] for m in r["messages"]][-1] == "assistant"
    # the whitespace/case variant on line 40 was dropped, the original (line 2) kept as written
    original = good_rows(48)[1]["messages"][0]["content"]
    assert original in by_user and original.upper() not in json.dumps(list(rows.values()))


def test_split_files_sorted_disjoint_and_covering(mixed):
    result, _ = mixed
    seen: set[str] = set()
    for name in ("train", "val", "test"):
        ids = [r["id"] for r in read_jsonl(result.out_dir / f"{name}.jsonl")]
        assert ids == sorted(ids) and len(ids) == result.counts[name] >= 1
        assert not seen & set(ids)
        seen |= set(ids)
    assert len(seen) == result.counts["deduplicated"]


def test_manifest(mixed):
    result, src = mixed
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["status"] == "prepared" and m["reason"] is None
    assert m["dataset_id"] == result.dataset_id and m["source"] == SOURCE
    assert m["recipe"] == {"name": "support-test", "version": 3, "hash": recipe(**MIXED).hash}
    assert m["counts"] == result.counts
    assert m["code_version"]["ftpipe"] and m["created_at"]
    assert m["rejected_by_code"]["bad_json"] == 1
    for name, meta in m["files"].items():
        data = (result.out_dir / name).read_bytes()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["bytes"] == len(data)


def test_same_input_same_outputs(spark, mixed, tmp_path):
    result, src = mixed
    again = prepare(spark, str(src), recipe(**MIXED), tmp_path / "again", source=SOURCE)
    assert again.dataset_id == result.dataset_id and again.counts == result.counts
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "pii_report.json"):
        assert (tmp_path / "again" / name).read_bytes() == (result.out_dir / name).read_bytes()
    other_recipe = recipe(**MIXED, min_rows=5)
    assert prepare(spark, str(src), other_recipe, tmp_path / "r2", source=SOURCE).dataset_id != result.dataset_id


# ------------------------------------------------------------------ CSV


def test_csv_instruction_columns_with_record_numbers(spark, tmp_path):
    src = tmp_path / "faq.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        for row in good_rows(12):
            w.writerow([row["messages"][0]["content"], "", row["messages"][1]["content"]])
        w.writerow(["Explain the return policy", "Order placed\nlast week", "Returns are free for\n30 days."])
        w.writerow(["Write a haiku about refunds", "", ""])  # record 14: empty output
    result = prepare(spark, str(src), recipe(min_rows=5), tmp_path / "out", source=SOURCE)
    assert not result.rejected, result.reason
    assert result.counts["raw"] == 14 and result.counts["valid"] == 13 and result.counts["deduplicated"] == 13
    assert read_jsonl(result.out_dir / "rejected.jsonl") == [
        {"line": 14, "code": "empty_content", "reason": "'output' is empty",
         "raw_excerpt": '{"input": null, "instruction": "Write a haiku about refunds", "output": null}'}]
    rows = [r for n in ("train", "val", "test") for r in read_jsonl(result.out_dir / f"{n}.jsonl")]
    multi = next(r for r in rows if r["messages"][0]["content"].startswith("Explain"))
    assert multi["messages"] == [{"role": "user", "content": "Explain the return policy\n\nOrder placed\nlast week"},
                                 {"role": "assistant", "content": "Returns are free for\n30 days."}]


def test_csv_messages_column(spark, tmp_path):
    src = tmp_path / "chats.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "ticket"])
        for i, row in enumerate(good_rows(11)):
            w.writerow([json.dumps(row["messages"]), f"T-{i}"])
        w.writerow(["[{\"role\": \"user\"", "T-99"])
    result = prepare(spark, str(src), recipe(system_prompt="You are a helpful support agent."), tmp_path / "out",
                     source=SOURCE)
    assert not result.rejected, result.reason
    assert result.counts["valid"] == 11 and result.counts["rejected"] == 1
    [bad] = read_jsonl(result.out_dir / "rejected.jsonl")
    assert bad["line"] == 12 and bad["reason"].startswith("bad JSON in the 'messages' column")
    row = read_jsonl(result.out_dir / "train.jsonl")[0]
    assert row["messages"][0] == {"role": "system", "content": "You are a helpful support agent."}


def test_parquet_chat_dataset(spark, tmp_path):
    rows = [(r["messages"], f"T-{i}") for i, r in enumerate(good_rows(10))]
    df = spark.createDataFrame(rows, "messages array<struct<role:string,content:string>>, ticket string")
    df.coalesce(1).write.parquet(str(tmp_path / "chats.parquet"))
    result = prepare(spark, str(tmp_path / "chats.parquet"), recipe(), tmp_path / "out", source=SOURCE)
    assert not result.rejected, result.reason
    assert result.counts["valid"] == 10 and result.counts["rejected"] == 0


# ------------------------------------------------------------------ splits


def test_split_assignment_is_deterministic_and_80_10_10():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(20_000)]
    first = [split.assign(i, (0.8, 0.1, 0.1)) for i in ids]
    assert first == [split.assign(i, (0.8, 0.1, 0.1)) for i in ids]
    shares = [first.count(k) / len(ids) for k in range(3)]
    assert abs(shares[0] - 0.8) < 0.01 and abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.1) < 0.01
    # a zero fraction stays empty despite float rounding (0.7 + 0.2 < 0.9)
    assert {split.assign(i, (0.7, 0.3, 0.0)) for i in ids} == {0, 1}
    assert {split.assign(i, (1.0, 0.0, 0.0)) for i in ids} == {0}


def test_small_dataset_gets_every_split(spark, tmp_path):
    src = write_jsonl(tmp_path / "small.jsonl", good_rows(12, "small"))
    # 1% val / 1% test would almost always leave both empty with 12 rows
    result = prepare(spark, str(src), recipe(split=(0.98, 0.01, 0.01)), tmp_path / "out", source=SOURCE)
    assert not result.rejected, result.reason
    assert result.counts["val"] >= 1 and result.counts["test"] >= 1
    assert result.counts["train"] + result.counts["val"] + result.counts["test"] == 12
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["split"]["rows_moved_to_fill_empty_splits"] >= 1
    prepare(spark, str(src), recipe(split=(0.98, 0.01, 0.01)), tmp_path / "again", source=SOURCE)
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (result.out_dir / "test.jsonl").read_bytes()


# ------------------------------------------------------------------ dataset rejection


def assert_rejected(result: PrepareResult, fragment: str) -> dict:
    assert result.rejected and fragment in result.reason, result.reason
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert not (result.out_dir / name).exists()
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["status"] == "rejected" and manifest["reason"] == result.reason
    assert (result.out_dir / "rejected.jsonl").exists()
    return manifest


def test_rejected_above_threshold(spark, tmp_path):
    rows = good_rows(20) + ['{"broken": ', {"messages": []}, "nope", {"prompt": "p"}, {"a": 1}, "[]"]
    src = write_jsonl(tmp_path / "noisy.jsonl", rows)
    result = prepare(spark, str(src), recipe(max_rejected_fraction=0.2), tmp_path / "out", source=SOURCE)
    manifest = assert_rejected(result, "6 of 26 rows rejected (23%), above data.max_rejected_fraction=0.2")
    assert manifest["counts"]["rejected"] == 6
    assert len(read_jsonl(result.out_dir / "rejected.jsonl")) == 6


def test_empty_file_rejected(spark, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    assert_rejected(prepare(spark, str(src), recipe(), tmp_path / "out", source=SOURCE), "input is empty")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert_rejected(prepare(spark, str(blank), recipe(), tmp_path / "out2", source=SOURCE), "input is empty (no rows)")


def test_binary_oversized_and_corrupt_compressed_files_rejected_whole(spark, tmp_path):
    import gzip

    binary = tmp_path / "model.jsonl.gz"
    with gzip.open(binary, "wb") as fh:
        fh.write(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    assert_rejected(prepare(spark, str(binary), recipe(), tmp_path / "a", source=SOURCE), "input looks binary")
    big = write_jsonl(tmp_path / "big.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}] * 20)
    assert_rejected(prepare(spark, str(big), recipe(max_file_bytes=100), tmp_path / "b", source=SOURCE),
                    "over the recipe's data.max_file_bytes")
    corrupt = tmp_path / "broken.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    assert_rejected(prepare(spark, str(corrupt), recipe(), tmp_path / "c", source=SOURCE), "cannot be decompressed")


def test_not_jsonl_missing_and_unsupported_rejected(spark, tmp_path):
    src = tmp_path / "table.jsonl"
    src.write_text("id,question,answer\n1,hi,hello\n2,bye,ciao\n")
    assert_rejected(prepare(spark, str(src), recipe(), tmp_path / "a", source=SOURCE), "input is not JSONL")
    assert_rejected(prepare(spark, str(tmp_path / "nope.jsonl"), recipe(), tmp_path / "b", source=SOURCE),
                    "input not found")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert_rejected(prepare(spark, str(txt), recipe(), tmp_path / "c", source=SOURCE), "unsupported input type")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("a,b\n1,2\n")
    assert_rejected(prepare(spark, str(wrong), recipe(), tmp_path / "d", source=SOURCE), "match no known shape")


def test_wrong_declared_format_rejected(spark, tmp_path):
    src = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {i}", "output": str(i)} for i in range(12)])
    assert_rejected(prepare(spark, str(src), recipe(format="chat"), tmp_path / "out", source=SOURCE),
                    "all 12 rows rejected, e.g. line 1: instruction-shaped row ('instruction' + 'output'/'response') "
                    "but data.format is 'chat'")


def test_too_few_rows_after_dedup_rejected(spark, tmp_path):
    src = write_jsonl(tmp_path / "dups.jsonl", good_rows(6) * 3)
    manifest = assert_rejected(prepare(spark, str(src), recipe(min_rows=10), tmp_path / "out", source=SOURCE),
                               "only 6 valid rows after dedup, fewer than data.min_rows=10")
    assert manifest["counts"]["duplicates_removed"] == 12


def test_main_cli(spark, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", good_rows(10))
    rc = main(["--input", str(src), "--recipe", recipe().model_dump_json(), "--out", str(tmp_path / "out"),
               "--source-json", json.dumps(SOURCE)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["counts"]["deduplicated"] == 10 and not out["rejected"]
    assert main(["--input", str(src), "--recipe", "{not json", "--out", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------ pure functions (no Spark)


@pytest.mark.parametrize("text", ["+1 415 555 0100", "(415) 555-0100", "0412 345 678", "+44 20 7946 0958",
                                  "415-555-0100", "+14155550100", "(02) 9876 5432", "07700 900123"])
def test_phone_formats(text):
    assert pii.mask(f"call {text} today") == ("call [PHONE] today", {"phone": 1})


@pytest.mark.parametrize("text", ["in 2019", "$1,299.00", "order #123456", "ORD-2024-001234", "v1.2.3",
                                  "01-02-2024", "4111 1111 1111 1112", "1234567812345678", "12 345 678 units"])
def test_not_pii(text):
    assert pii.mask(text) == (text, {})


def test_luhn_and_categories():
    assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("4111111111111112")
    assert pii.mask("a@b.io 4111-1111-1111-1111", ("card",)) == ("a@b.io [CARD]", {"card": 1})
    assert pii.mask_excerpt("x" * 195 + " mail jane@example.com")  == "x" * 195 + " mail"


def test_normalise_rules():
    rules = formats.RowRules()
    with pytest.raises(formats.RowError, match="data.format is 'chat'"):
        formats.normalise({"prompt": "p", "completion": "c"}, formats.RowRules(format="chat"))
    with pytest.raises(formats.RowError, match="message 2 is a system message"):
        formats.normalise({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                                        {"role": "assistant", "content": "b"}]}, rules)
    assert formats.normalise({"instruction": "Do it", "input": None, "response": " done "}, rules) == [
        ("user", "Do it"), ("assistant", "done")]
    a = formats.content_hash([("user", "Hello  World"), ("assistant", "Hi")])
    assert a == formats.content_hash([("user", "hello world"), ("assistant", " HI ")])


def test_row_id_does_not_depend_on_the_recipe_system_prompt():
    line = json.dumps(chat("Where is my parcel?", "It ships tomorrow."))
    [plain] = formats.validate_jsonl([(line, 0)], formats.RowRules())
    [prompted] = formats.validate_jsonl([(line, 0)], formats.RowRules(system_prompt="Be brief."))
    assert plain[3] == prompted[3]
    assert prompted[4][0] == ("system", "Be brief.") and plain[4][0][0] == "user"
