"""Adapter fixtures: each contract suite runs against the local adapter always and the Google
adapter against the official emulators (skipped, with the reason, where a binary is missing)."""
import uuid

import pytest


@pytest.fixture(params=["sqlite", "pubsub"])
def bus(request, tmp_path):
    if request.param == "sqlite":
        from shared.platform.adapters.sqlite_bus import SqliteBus

        adapter = SqliteBus(tmp_path / "bus.db", poll_interval_s=0.05)
    else:
        from tests.emulators import make_pubsub_bus

        adapter = make_pubsub_bus(request.getfixturevalue("pubsub_emulator"))
    yield adapter
    adapter.close()


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        from shared.platform.adapters.local_store import LocalObjectStore

        yield LocalObjectStore(tmp_path / "buckets")
    else:
        from tests.emulators import make_gcs_store

        yield make_gcs_store(request.getfixturevalue("gcs_emulator"))


@pytest.fixture(params=["sqlite", "firestore"])
def docs(request, tmp_path):
    if request.param == "sqlite":
        from shared.platform.adapters.sqlite_docs import SqliteDocStore

        adapter = SqliteDocStore(tmp_path / "docs.db")
    else:
        from tests.emulators import make_firestore_docs

        adapter = make_firestore_docs(request.getfixturevalue("firestore_emulator"))
    yield adapter
    adapter.close()


@pytest.fixture
def name():
    """A unique resource name per test (emulator state outlives a test)."""
    return f"t{uuid.uuid4().hex[:10]}"
