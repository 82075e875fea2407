import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def write_chats(path: Path, n: int = 40) -> Path:
    """A small chat dataset with the things preprocess must handle: PII, a duplicate, a bad row."""
    rows = []
    for i in range(n):
        rows.append({"messages": [
            {"role": "user", "content": f"Question {i}: when does order {1000 + i} arrive? Mail me at user{i}@example.com"},
            {"role": "assistant", "content": f"Order {1000 + i} arrives in {i % 5 + 2} days."}]})
    lines = [json.dumps(r) for r in rows]
    lines.append(lines[0])                      # an exact duplicate
    lines.append('{"messages": [oops')           # malformed JSON
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_recipe(path: Path, *, approval: bool = False, **training) -> Path:
    settings = {"epochs": 1, "max_steps": 6, "batch_size": 2, "max_seq_len": 96, "checkpoint_every": 2,
                "metrics_every": 2, "learning_rate": 0.001, **training}
    body = "\n".join(f"  {k}: {v}" for k, v in settings.items())
    path.write_text(f"""name: e2e-tiny
version: 1
base_model: tiny-random-smollm2
model_name: e2e-tiny
registry:
  approval: {"true" if approval else "false"}
data:
  min_rows: 5
adapter:
  r: 4
  alpha: 8
training:
{body}
eval:
  max_examples: 4
  max_new_tokens: 8
  safety: {{max_prompts: 9, max_new_tokens: 4}}
  memorisation: {{max_rows: 4, match_tokens: 4, pii_max_probes: 4}}
  fairness: {{max_templates: 2}}
  # A random model's scores are noise: the flow is what is tested, so the gate only warns.
  gate:
    chrf: {{tolerance: 100.0}}
    refusal_rate: {{tolerance: 0.0, action: warn}}
    instruction_following_rate: {{tolerance: 0.0, action: warn}}
    honesty_rate: {{tolerance: 0.0, action: warn}}
    extraction_gap: {{tolerance: 0.0, action: warn}}
    pii_leak_rate: {{tolerance: 0.0, action: warn}}
    fairness_disparity: {{tolerance: 0.0, action: warn}}
""")
    return path


def ftpipe(*args, env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftpipe.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=ROOT)


@pytest.fixture
def chats(tmp_path):
    return write_chats(tmp_path / "chats.jsonl")
