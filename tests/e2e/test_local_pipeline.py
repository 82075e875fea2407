"""The whole flow on the embedded defaults: every service its own OS process, a drop through the
CLI, a registered version at the end — and a trainer SIGKILLed mid-run that resumes."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ftpipe.client import Client
from ftpipe.stack import down, running, tracker_url, up
from shared.platform.config import Settings
from tests.browser.fixtures import open_dashboard
from tests.e2e.conftest import ROOT, ftpipe, tiny_recipe, write_chats

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(tmp_path):
    settings = Settings.from_env(state_dir=tmp_path / "state", ack_deadline_s=10, min_backoff_s=0.5,
                                 trainer_lease_s=6)
    up(settings)
    yield settings
    down(settings)


def test_drop_to_registered_model_watched_and_approved_in_the_dashboard(stack, tmp_path, page):
    """A drop through the CLI while someone watches in the dashboard (Debian's chromium): the run
    appears, its loss chart fills as training reports, and, the recipe asking for approval, an
    approve click on the model page puts the version in production."""
    from playwright.sync_api import expect

    data = write_chats(tmp_path / "chats.jsonl")
    recipe = tiny_recipe(tmp_path / "e2e-tiny.yaml", approval=True)
    drop = subprocess.Popen([sys.executable, "-m", "ftpipe.cli", "drop", str(data), "--recipe", str(recipe), "--wait",
                             "--json", "--timeout", "600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FTPIPE_STATE": str(stack.state_dir)}, cwd=ROOT)
    # The person who approves holds an approver token of the tenant (the drop itself ran as the stack's admin).
    made = subprocess.run([sys.executable, "-m", "ftpipe.cli", "tokens", "create", "reviewer", "--role", "approver",
                           "--tenant", "default"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "FTPIPE_STATE": str(stack.state_dir)})
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    open_dashboard(page, tracker_url(stack), token)
    row = page.get_by_test_id("run-row")
    expect(row).to_have_count(1, timeout=120_000)  # once the drop's JobSubmitted is recorded
    row.get_by_test_id("run-link").click()
    chart = page.get_by_test_id("chart-loss")
    expect(chart).to_have_count(1)
    # Every value the chart's point count takes, from now on, in this page (no reload).
    page.evaluate("""el => { window.pointsSeen = [el.dataset.points];
        new MutationObserver(() => window.pointsSeen.push(el.dataset.points))
            .observe(el, {attributes: true, attributeFilter: ["data-points"]}); }""", chart.element_handle())
    expect(chart).to_have_attribute("data-points", "6", timeout=300_000)  # one point per step
    seen = [int(n) for n in page.evaluate("window.pointsSeen")]
    assert seen[0] < 6 and seen == sorted(seen), seen  # opened before training reported: it grew live

    out, err = drop.communicate(timeout=600)
    assert drop.returncode == 0, err[-3000:]
    record = json.loads(out)
    assert record["status"] == "succeeded"
    counts = record["dataset"]["counts"]
    assert counts["rejected"] == 1 and counts["duplicates_removed"] == 1
    assert counts["train"] + counts["val"] + counts["test"] == 40
    assert record["gate"] == "passed" and record["model"]["version"] == "1.1"
    assert set(record["eval"]["scores"]) == {"base", "candidate"}
    assert record["final_metrics"]["train_loss"] > 0

    client = Client(stack)
    store = client.adapters.store
    bucket, prefix = store.parse_url(record["model"]["uri"])
    bundle = json.loads(store.read(bucket, prefix + "bundle.json"))
    assert bundle["run_id"] == record["run_id"] and bundle["status"] == "candidate"  # waits for approval
    assert any(f["name"].endswith("adapter_model.safetensors") for f in bundle["files"])
    run_record = json.loads(store.read(bucket, prefix + bundle["run_record"]))
    assert run_record["recipe"]["hash"] == bundle["recipe_hash"] and run_record["packages"]["torch"]
    assert run_record["dataset"]["manifest_sha256"] == hashlib.sha256(
        store.read(bucket, store.parse_url(record["artefacts"]["dataset"])[1] + "manifest.json")).hexdigest()
    # Masked PII never reaches the prepared data.
    _, dataset = store.parse_url(record["artefacts"]["dataset"])
    train = store.read(bucket, dataset + "train.jsonl").decode()
    assert "@example.com" not in train and "[EMAIL]" in train

    # Lineage through the tracker's API: contiguous per-run sequence numbers, one row per step.
    def api(path: str, method: str = "GET", auth: bool = True):
        headers = {"Authorization": f"Bearer {token}"} if auth else {}
        request = urllib.request.Request(f"{tracker_url(stack)}/api/{path}", method=method, headers=headers)
        with urllib.request.urlopen(request) as resp:
            return json.load(resp)
    run = api(f"runs/{record['run_id']}")
    assert [e["seq"] for e in run["events"]] == list(range(1, len(run["events"]) + 1))
    steps = [m["step"] for m in api(f"runs/{record['run_id']}/metrics")]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    with pytest.raises(urllib.error.HTTPError) as refused:  # a write without the token
        api("models/e2e-tiny/1.1/approve", method="POST", auth=False)
    assert refused.value.code == 401
    submitter = client.create_token("sam", "submitter", "default")
    request = urllib.request.Request(f"{tracker_url(stack)}/api/models/e2e-tiny/1.1/approve", method="POST",
                                     headers={"Authorization": f"Bearer {submitter}"})
    with pytest.raises(urllib.error.HTTPError) as refused:   # a submitter may not approve
        urllib.request.urlopen(request)
    assert refused.value.code == 403
    assert client.model("e2e-tiny")["aliases"].get("production") is None

    page.evaluate("location.hash = '#/models/e2e-tiny'")
    version = page.locator('[data-testid=version-row][data-version="1.1"]')
    expect(version.get_by_test_id("version-status")).to_have_text("candidate")
    version.get_by_test_id("action-approve").click()
    version.get_by_test_id("action-approve-confirm").click()
    expect(version.get_by_test_id("version-status")).to_have_text("promoted")
    assert client.model_version("e2e-tiny", "1.1")["approval"]["approver"] == "token:reviewer"
    assert client.model("e2e-tiny")["aliases"]["production"] == "1.1"
    assert [m["version"] for m in client.models("e2e-tiny")] == ["1.1"]
    deadline = time.monotonic() + 60  # the tracker folds the registry's ModelPromoted into the run
    while (client.run(record["run_id"])["model"].get("status")) != "promoted":
        assert time.monotonic() < deadline, client.run(record["run_id"])["model"]
        time.sleep(0.2)


# SIGKILL (the pod died; the replacement waits out its lease and resumes from the last upload) is
# the chaos suite's (`make chaos`, chaos/test_crashes.py: every service killed at random points,
# the trainer among them, with the same checks); it would cost the regular suite 90 s more.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["sigterm"])
def test_trainer_stopped_mid_run_resumes_and_registers_once(stack, tmp_path, sig):
    """SIGTERM: spot preemption; the trainer checkpoints where it is, hands the message back, exits,
    and the replacement resumes from that checkpoint."""
    data = write_chats(tmp_path / "chats.jsonl", n=60)
    recipe = tiny_recipe(tmp_path / "e2e-tiny.yaml", max_steps=60, checkpoint_every=5, batch_size=4, max_seq_len=128)
    client = Client(stack)
    run_id = client.drop(data, str(recipe))
    pid_file = stack.state_dir / "pids" / "trainer.pid"

    deadline = time.monotonic() + 300
    while not (client.run(run_id) or {}).get("checkpoints"):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    killed_at = client.run(run_id)["training"].get("step", 0)
    pid = int(pid_file.read_text())
    os.kill(pid, sig)
    while running(stack).get("trainer") == pid:   # signals are asynchronous; SIGTERM checkpoints first
        time.sleep(0.05)
    up(stack)  # a replacement trainer: it must wait out the dead one's lease, then resume
    assert running(stack)["trainer"] != pid

    run = client.wait(run_id, timeout_s=600)
    assert run["status"] == "succeeded", run.get("error")
    assert killed_at < 60
    from services.tracker.lineage import RUN_EVENTS

    starts = [e["summary"] for _, e in client.adapters.docs.query(RUN_EVENTS, where=[("run_id", "==", run_id), ("type", "==", "TrainingStarted")])]
    assert len(starts) == 2 and starts[0] == "training from step 0" and starts[1] != "training from step 0", starts
    assert [m["version"] for m in client.models("e2e-tiny")] == ["1.1"]
    assert run["training"]["step"] == 60


def test_prepare_alone_then_submit_the_prepared_dataset(stack, tmp_path):
    """`ftpipe prepare` runs the Spark stage in-process; `ftpipe submit` of its output folder goes
    straight to the trainer through the `jobs` topic."""
    recipe = tiny_recipe(tmp_path / "e2e-tiny.yaml")
    prepared = tmp_path / "prepared"
    proc = ftpipe("prepare", str(write_chats(tmp_path / "chats.jsonl")), "--recipe", str(recipe), "--out", str(prepared), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["counts"]["rejected"] == 1
    job = tmp_path / "job.yaml"
    job.write_text(f"recipe: {recipe}\ndataset: prepared\nprepared: true\ntenant: team-a\n")
    state = {"FTPIPE_STATE": str(stack.state_dir)}
    assert ftpipe("tenants", "set", "team-a", "--unlimited", env=state).returncode == 0   # a tenant is an admin's
    proc = ftpipe("submit", str(job), "--wait", "--json", "--timeout", "600", env=state)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["status"] == "succeeded" and record["model"]["version"] == "1.1"
    assert record["artefacts"]["input"].endswith("/dataset/")
