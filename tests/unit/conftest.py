import pytest

from shared.platform.config import Settings, bootstrap


@pytest.fixture
def adapters(tmp_path):
    """The local adapters (SQLite bus and documents, a folder store) on a fresh state folder."""
    a = bootstrap(Settings(state_dir=tmp_path / "state"))
    yield a
    a.close()
