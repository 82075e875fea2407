"""The ObjectStore port's contract, the same for every adapter."""
import pytest

from shared.platform.ports import InvalidObjectName, ObjectNotFound, PreconditionFailed

BUCKET = "ftpipe"


def test_write_read_stat(store, name):
    info = store.write(BUCKET, f"{name}/a.txt", b"hello")
    assert info.size == 5 and info.generation > 0
    assert store.read(BUCKET, f"{name}/a.txt") == b"hello"
    assert store.stat(BUCKET, f"{name}/a.txt").generation == info.generation
    assert store.stat(BUCKET, f"{name}/missing") is None
    with pytest.raises(ObjectNotFound):
        store.read(BUCKET, f"{name}/missing")


def test_write_if_absent(store, name):
    store.write(BUCKET, f"{name}/once", b"1", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        store.write(BUCKET, f"{name}/once", b"2", if_generation_match=0)
    assert store.read(BUCKET, f"{name}/once") == b"1"


def test_generation_preconditions(store, name):
    first = store.write(BUCKET, f"{name}/g", b"1")
    second = store.write(BUCKET, f"{name}/g", b"2", if_generation_match=first.generation)
    assert second.generation != first.generation
    with pytest.raises(PreconditionFailed):
        store.write(BUCKET, f"{name}/g", b"3", if_generation_match=first.generation)
    with pytest.raises(PreconditionFailed):
        store.delete(BUCKET, f"{name}/g", if_generation_match=first.generation)
    store.delete(BUCKET, f"{name}/g", if_generation_match=second.generation)
    assert store.stat(BUCKET, f"{name}/g") is None


def test_list_by_prefix_in_name_order(store, name):
    for obj in ("b/2", "a/1", "a/0", "c"):
        store.write(BUCKET, f"{name}/{obj}", obj.encode())
    assert [i.name for i in store.list(BUCKET, f"{name}/a/")] == [f"{name}/a/0", f"{name}/a/1"]
    assert len(list(store.list(BUCKET, f"{name}/"))) == 4


def test_files_and_urls(store, name, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    store.upload_file(BUCKET, f"{name}/f.bin", str(src))
    store.download_file(BUCKET, f"{name}/f.bin", str(tmp_path / "dst.bin"))
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert store.parse_url(store.url(BUCKET, f"{name}/f.bin")) == (BUCKET, f"{name}/f.bin")
    assert store.parse_url(store.url(BUCKET, f"{name}/folder/")) == (BUCKET, f"{name}/folder/")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/abs/path", "a\x00b", "line\nbreak", "a//b", "", "a\\b", "./x"])
def test_invalid_names_are_refused(store, bad):
    with pytest.raises(InvalidObjectName):
        store.write(BUCKET, bad, b"x")
