"""The one way a process starts (shared/platform/main.py) and how local processes find each other
(shared/platform/discovery.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from shared.domain import events as ev
from shared.platform.config import Settings
from shared.platform.discovery import advertise, bind_host, lookup, port_for, withdraw
from shared.platform.main import Process
from shared.platform.runtime import Service, publish_event
from shared.platform.topology import SERVICE_TOPICS


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_process_binds_the_loopback_locally_and_every_interface_in_the_cloud(tmp_path, monkeypatch):
    assert bind_host(Settings(state_dir=tmp_path)) == "127.0.0.1"
    assert bind_host(Settings(state_dir=tmp_path, profile="emulators")) == "127.0.0.1"
    assert bind_host(Settings(state_dir=tmp_path, profile="gcp")) == "0.0.0.0"
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("FTPIPE_TRACKER_PORT", raising=False)
    assert port_for("tracker") == 0
    monkeypatch.setenv("PORT", "8080")
    assert port_for("tracker") == 8080
    monkeypatch.setenv("FTPIPE_TRACKER_PORT", "8123")
    assert port_for("tracker") == 8123 and port_for("trainer") == 8080


def test_only_local_processes_advertise_and_a_withdrawn_one_is_gone(tmp_path):
    local, cloud = Settings(state_dir=tmp_path), Settings(state_dir=tmp_path, profile="gcp")
    advertise(cloud, "tracker", url="http://x")
    assert lookup(tmp_path, "tracker") is None
    advertise(local, "tracker", url="http://127.0.0.1:1")
    assert lookup(tmp_path, "tracker") == {"service": "tracker", "pid": os.getpid(), "url": "http://127.0.0.1:1"}
    assert [p.name for p in (tmp_path / "services").iterdir()] == ["tracker.json"]  # no temp file left
    withdraw(local, "tracker")
    assert lookup(tmp_path, "tracker") is None


def test_a_service_process_serves_its_app_advertises_consumes_and_withdraws(adapters):
    handled = []
    service = Service("tracker", {cls: lambda event, ctx: handled.append(event.run_id) or []
                                  for topic in SERVICE_TOPICS["tracker"]
                                  for cls in ev.events_on(topic)}, skip_cancelled=False)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"app at {environ['PATH_INFO']}".encode()]

    process = Process("tracker", adapters, service=service, http_app=app, port=0, info={"extra": 1}).start()
    try:
        found = lookup(adapters.settings.state_dir, "tracker")
        assert found == {"service": "tracker", "pid": os.getpid(), "url": process.url, "extra": 1}
        assert _get(process.url + "/anything") == (200, b"app at /anything")  # the app owns every path
        publish_event(adapters.bus, ev.TrainingFailed(run_id="r1", reason="x"))
        deadline = time.monotonic() + 20
        while not process.counters["handled"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert handled == ["r1"] and process.counters["handled"] == 1
    finally:
        process.stop()
    assert lookup(adapters.settings.state_dir, "tracker") is None
    with pytest.raises(OSError):
        urllib.request.urlopen(process.url + "/anything", timeout=2)


def test_a_process_without_an_app_answers_healthz_alone(adapters):
    process = Process("notifier", adapters, loop=lambda stop: stop.wait(), port=0).start()
    try:
        status, body = _get(process.url + "/healthz")
        health = json.loads(body)
        assert status == 200 and health["service"] == "notifier" and health["status"] == "ok"
        assert _get(process.url + "/v1/models")[0] == 404
    finally:
        process.stop()


def test_a_process_that_fails_its_start_up_checks_releases_its_port(adapters):
    wrong = Service("trainer", {ev.JobSubmitted: lambda event, ctx: []})  # the topology also gives it datasets
    process = Process("trainer", adapters, service=wrong, port=0)
    with pytest.raises(Exception, match="subscribes it to"):
        process.start()
    process.stop()  # returns: nothing was serving
    assert lookup(adapters.settings.state_dir, "trainer") is None


def test_serve_runs_a_real_process_until_sigterm_then_withdraws(tmp_path):
    """The notifier, started as `ftpipe up` starts it: advertised, healthy, and on SIGTERM it stops
    cleanly (exit 0) and takes its advertisement with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTPIPE_") and k != "PORT"}
    proc = subprocess.Popen([sys.executable, "-m", "ftpipe.notifier"], env={**env, "FTPIPE_STATE": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while (found := lookup(tmp_path, "notifier")) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the notifier did not advertise itself"
            time.sleep(0.1)
        assert found["pid"] == proc.pid
        assert json.loads(_get(found["url"] + "/healthz")[1])["service"] == "notifier"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert lookup(tmp_path, "notifier") is None
    finally:
        if proc.poll() is None:
            proc.kill()


def test_processes_starting_together_agree_on_one_whole_local_token(tmp_path):
    """`ftpipe up` starts the tracker and the registry at once, and each reads or creates the
    stack's token: none may read it half written, and all must end with the same one."""
    code = "import sys; from shared.platform.auth import local_token; print(local_token(sys.argv[1]))"
    for round_ in range(3):
        state = tmp_path / f"state-{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(state)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(6)]
        results = [proc.communicate(timeout=60) for proc in procs]
        assert all(proc.returncode == 0 for proc in procs), [err for _, err in results]
        tokens = {out.strip() for out, _ in results}
        assert len(tokens) == 1 and tokens == {(state / "auth-token").read_text().strip()}
        assert (state / "auth-token").stat().st_mode & 0o777 == 0o600
        assert [p.name for p in state.iterdir()] == ["auth-token"]  # no temporary file left
