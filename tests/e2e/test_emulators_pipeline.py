"""The whole flow on the `emulators` profile: the Google adapters against the official Pub/Sub and
Firestore emulators and fake-gcs-server. The drop is an upload to fake-gcs-server, whose
OBJECT_FINALIZE notification on the Pub/Sub emulator starts the run, exactly as GCS would."""
import pytest

from ftpipe.client import Client
from ftpipe.stack import down, up
from shared.platform.config import Settings
from tests.e2e.conftest import tiny_recipe, write_chats
from tests.emulators import EmulatorMissing, start_all

pytestmark = [pytest.mark.slow, pytest.mark.emulators]


@pytest.fixture
def emulators(monkeypatch, tmp_path):
    try:
        stack = start_all(project="ftpipe-e2e", log_dir=tmp_path / "emulator-logs")
    except EmulatorMissing as exc:
        pytest.skip(f"emulators unavailable: {exc}")
    for key, value in stack.env.items():
        monkeypatch.setenv(key, value)
    yield stack
    stack.stop()


def test_gcs_notification_to_registered_model(emulators, tmp_path):
    settings = Settings.from_env(state_dir=tmp_path / "state", ack_deadline_s=10, min_backoff_s=0.5)
    assert settings.profile == "emulators"
    up(settings)
    try:
        client = Client(settings)
        run_id = client.drop(write_chats(tmp_path / "chats.jsonl"), str(tiny_recipe(tmp_path / "e2e-tiny.yaml")))
        run = client.wait(run_id, timeout_s=600)
        assert run["status"] == "succeeded", run.get("error")
        assert run["source"]["object"] == "incoming/default/e2e-tiny/chats.jsonl"   # the default tenant's door
        assert run["model"]["uri"].startswith("gs://ftpipe/models/e2e-tiny/")
        bucket, prefix = client.adapters.store.parse_url(run["model"]["uri"])
        assert client.adapters.store.stat(bucket, prefix + "bundle.json") is not None
        assert [m["version"] for m in client.models("e2e-tiny")] == ["1.1"]
    finally:
        down(settings)
