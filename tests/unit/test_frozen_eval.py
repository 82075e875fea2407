"""The second support dataset (examples/support_b) is held-out evaluation data, frozen before any
training-recipe change was tried and never tuned on: its generator and outputs must match the
sha256 recorded in bench/eval/FROZEN.json. Changing them means re-recording the freeze on purpose
(and saying so in bench/README.md), not editing them in passing."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from pathlib import Path

import pytest

from shared.domain.probes import load_probes

ROOT = Path(__file__).resolve().parents[2]
FROZEN = json.loads((ROOT / "bench" / "eval" / "FROZEN.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted(FROZEN["sha256"]))
def test_frozen_files_are_unchanged(path):
    digest = hashlib.sha256((ROOT / path).read_bytes()).hexdigest()
    assert digest == FROZEN["sha256"][path], (
        f"{path} changed after it was frozen; it is held-out evaluation data. Revert it, or re-record "
        "bench/eval/FROZEN.json deliberately and declare why in bench/README.md")


def test_the_generator_reproduces_its_outputs():
    spec = importlib.util.spec_from_file_location("support_b_generate", ROOT / "examples/support_b/generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.check_facts()
    folder = ROOT / "examples" / "support_b"
    assert "\n".join(gen.build_rows(random.Random(gen.SEED))) + "\n" == (folder / "support_chats.jsonl").read_text()
    probes = gen.build_probes(random.Random(gen.SEED + 1))
    assert "\n".join(probes) + "\n" == (folder / "probes.jsonl").read_text()
    rows = [json.loads(line) for line in probes]
    assert sum(r["split"] == "test" for r in rows) >= 100 and {r["split"] for r in rows} == {"val", "test"}


def test_the_probe_file_loads_with_100_test_probes_that_reject_confused_values():
    path = ROOT / "examples" / "support_b" / "probes.jsonl"
    test, val = load_probes(path, split="test"), load_probes(path, split="val")
    assert (len(test), len(val)) == (100, 50) and not {p.question for p in test} & {p.question for p in val}
    assert sum(bool(p.reject) for p in test) >= 90
