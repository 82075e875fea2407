"""What every chaos scenario shares: a local (or emulators) stack of real service processes, a
quick recipe on the tiny model, a prepared dataset made once, the invariants a run must keep
whatever was done to it, and where the figures go (chaos/results/*.json, quoted by RELIABILITY.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ftpipe.client import Client
from ftpipe.stack import PROCESSES, running
from shared.domain import events as ev
from shared.domain.jobs import RUNS, TERMINAL
from shared.domain.model_registry import MODEL_VERSIONS
from shared.platform.config import Settings

from services.tracker.lineage import METRICS, RUN_EVENTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results")
MAX_STEPS = 40


def recipe(path: Path, *, name: str = "chaos-tiny", max_steps: int = MAX_STEPS, checkpoint_every: int = 5) -> Path:
    """The tiny model, a few steps, the task score only (the probe suites off): a whole run is
    about a minute on 2 cores, so a trial is mostly the fault and the recovery."""
    path.write_text(f"""name: {name}
version: 1
base_model: tiny-random-smollm2
model_name: {name}
data:
  min_rows: 5
adapter: {{r: 4, alpha: 8}}
training: {{epochs: 1, max_steps: {max_steps}, batch_size: 2, max_seq_len: 96, checkpoint_every: {checkpoint_every},
           metrics_every: 2, learning_rate: 0.001}}
eval:
  max_examples: 2
  max_new_tokens: 4
  bootstrap_iters: 50
  safety: {{enabled: false}}
  memorisation: {{enabled: false}}
  fairness: {{enabled: false}}
  gate:
    chrf: {{tolerance: 100.0}}
""")
    return path


def chats(path: Path, n: int = 40, salt: str = "") -> Path:
    """Support chats with PII, one duplicate and one malformed row (as tests/e2e); `salt` makes a
    drop's content, and so its dataset, its own."""
    rows = [json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}{salt}: when does order {1000 + i} arrive? Mail me at user{i}@example.com"},
        {"role": "assistant", "content": f"Order {1000 + i} arrives in {i % 5 + 2} days."}]}) for i in range(n)]
    path.write_text("\n".join(rows + [rows[0], '{"messages": [oops']) + "\n")
    return path


def ftpipe(*args, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftpipe.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout, cwd=ROOT)


def prepared_dataset(tmp: Path, recipe_path: Path) -> Path:
    """A prepared dataset folder (`ftpipe prepare`, Spark in a child process), for runs that skip
    preprocessing by submitting it to `jobs` with prepared: true."""
    out = tmp / "prepared"
    proc = ftpipe("prepare", str(chats(tmp / "prep-chats.jsonl")), "--recipe", str(recipe_path), "--out", str(out),
                  "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def stack_settings(state: Path, **overrides) -> Settings:
    return Settings.from_env(state_dir=state, ack_deadline_s=10, min_backoff_s=0.5, trainer_lease_s=6,
                             **overrides)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def services_up(settings: Settings) -> list[str]:
    """The stack's services that are not running (none, when all are up)."""
    expected = [n for n in PROCESSES if n != "notifier" or settings.profile == "local"]
    alive = running(settings)
    return [n for n in expected if n not in alive]


def in_flight(settings: Settings, subscription: str, kind: str, run_id: str) -> bool:
    """Whether a message of `kind` for `run_id` is leased on `subscription` now (its consumer is
    handling it), read from the local bus's tables."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(settings.state_dir / "bus.db", timeout=30)) as db:
        row = db.execute(
            "SELECT 1 FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE d.subscription = ? "
            "AND d.lease IS NOT NULL AND d.visible_at > ? AND json_extract(m.attributes, '$.type') = ? "
            "AND json_extract(m.attributes, '$.run_id') = ? LIMIT 1", (subscription, time.time(), kind, run_id)).fetchone()
    return row is not None


def receivers(topic: str, attributes: dict) -> int:
    """How many subscriptions get a message with these attributes on `topic` (shared/platform/topology.py)."""
    from shared.platform.topology import SERVICE_TOPICS, subscriptions

    return sum(1 for service, topics in SERVICE_TOPICS.items() if topic in topics
               for _, f in subscriptions(service, topic) if f is None or f.matches(attributes))


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children now (Spark's JVM is a child of preprocess)."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def faults_injected(settings: Settings) -> dict[str, int]:
    """Injected faults per service, counted from the services' logs (shared/platform/faults.py logs each)."""
    out = {}
    for log in sorted((settings.state_dir / "logs").glob("*.log")):
        n = sum(1 for line in log.read_text(errors="replace").splitlines() if "injected fault" in line)
        if n:
            out[log.stem] = n
    return out


def log_count(settings: Settings, text: str) -> dict[str, int]:
    out = {}
    for log in sorted((settings.state_dir / "logs").glob("*.log")):
        n = log.read_text(errors="replace").count(text)
        if n:
            out[log.stem] = n
    return out


# ------------------------------------------------------------------ invariants

def run_violations(client: Client, run_id: str, *, max_steps: int = MAX_STEPS, expect: str = "succeeded") -> list[str]:
    """Everything wrong with how `run_id` ended (empty: it ended exactly once, as it should)."""
    docs, store, bucket = client.adapters.docs, client.adapters.store, client.settings.bucket
    problems = []
    run = docs.get(RUNS, run_id) or {}
    if run.get("status") != expect:
        problems.append(f"status {run.get('status')!r}, expected {expect!r} ({run.get('error')})")
    versions = [doc for _, doc in docs.query(MODEL_VERSIONS, where=[("run_id", "==", run_id)])]
    if expect == "succeeded":
        if len(versions) != 1:
            problems.append(f"{len(versions)} registered versions: {[v['version'] for v in versions]}")
        if (run.get("model") or {}).get("version") not in [v["version"] for v in versions]:
            problems.append(f"the run names version {(run.get('model') or {}).get('version')!r}")
    elif versions:
        problems.append(f"a {expect} run registered {[v['version'] for v in versions]}")
    events = [doc for _, doc in docs.query(RUN_EVENTS, where=[("run_id", "==", run_id)])]
    ids = [e["event_id"] for e in events]
    if len(ids) != len(set(ids)):
        problems.append(f"event rows duplicated: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    if sorted(e["seq"] for e in events) != list(range(1, len(events) + 1)):
        problems.append("event sequence numbers not contiguous")
    if expect == "succeeded":
        def steps() -> list[int]:
            return sorted(doc["step"] for _, doc in docs.query(METRICS, where=[("run_id", "==", run_id)]))
        # The tracker is eventually consistent: Pub/Sub may deliver the registry's events before the
        # last progress events, so the run can read `succeeded` a moment before every row is in.
        try:
            wait_for(lambda: steps() == list(range(1, max_steps + 1)), 60, "the metric rows", poll_s=1)
        except AssertionError:
            pass
        steps = steps()
        if steps != list(range(1, max_steps + 1)):
            problems.append(f"metric rows for steps {steps}, expected 1..{max_steps} once each")
        names = {info.name for info in store.list(bucket, f"runs/{run_id}/")}
        checkpoints = {n.split("/checkpoints/")[1].split("/")[0] for n in names if "/checkpoints/" in n}
        for step in sorted(checkpoints):
            if f"runs/{run_id}/checkpoints/{step}/COMPLETE" not in names:
                problems.append(f"partial checkpoint runs/{run_id}/checkpoints/{step}/ (no COMPLETE)")
        if f"runs/{run_id}/adapter/COMPLETE" not in names:
            problems.append("the run's adapter folder has no COMPLETE marker")
    return problems


def store_violations(client: Client) -> list[str]:
    """Orphans anywhere in the bucket: model folders without bundle.json, bundles whose files are
    missing or differ, prepared datasets without their splits, leftover temp objects."""
    store, bucket = client.adapters.store, client.settings.bucket
    problems = []
    by_folder: dict[str, set[str]] = {}
    for info in store.list(bucket, "models/"):
        parts = info.name.split("/")
        by_folder.setdefault("/".join(parts[:3]), set()).add("/".join(parts[3:]))
    for folder, files in sorted(by_folder.items()):
        if "bundle.json" not in files:
            problems.append(f"{folder}/ has no bundle.json ({len(files)} files): a half-written version")
            continue
        bundle = json.loads(store.read(bucket, f"{folder}/bundle.json"))
        missing = [f["name"] for f in bundle["files"] if f["name"] not in files]
        if missing:
            problems.append(f"{folder}/bundle.json lists missing files {missing}")
    datasets: dict[str, set[str]] = {}
    for info in store.list(bucket, "datasets/"):
        _, dataset_id, rel = info.name.split("/", 2)
        datasets.setdefault(dataset_id, set()).add(rel)
    for dataset_id, files in sorted(datasets.items()):
        if "manifest.json" not in files:
            problems.append(f"datasets/{dataset_id}/ has no manifest.json")
            continue
        manifest = json.loads(store.read(bucket, f"datasets/{dataset_id}/manifest.json"))
        if manifest.get("status") == "prepared" and not {"train.jsonl", "val.jsonl", "test.jsonl"} <= files:
            problems.append(f"datasets/{dataset_id}/ lacks splits: has {sorted(files)}")
    tmp = getattr(store, "root", None)
    if tmp is not None:
        leftovers = [p.name for p in (Path(tmp) / ".tmp").iterdir() if not p.name.endswith(".lock")]
        if leftovers:
            problems.append(f"{len(leftovers)} temp objects left in {Path(tmp) / '.tmp'}")
    return problems


def dead_letters(client: Client) -> list[dict]:
    return client.dlq_list()


def save(name: str, figures: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"scenario": name, "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"), **figures},
                               indent=2, default=str) + "\n")
    return path


def run_doc(client: Client, run_id: str) -> dict:
    return client.adapters.docs.get(RUNS, run_id) or {}


def terminal(client: Client, run_id: str) -> bool:
    return run_doc(client, run_id).get("status") in TERMINAL


__all__ = ["ev", "Client"]
