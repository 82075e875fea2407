"""Local bucket notifications: writes under incoming/, and files copied in by hand, reach
`dataset-uploads` as GCS OBJECT_FINALIZE notifications — once per object generation."""
import json
import os
import shutil
import time

from shared.domain import events as ev
from shared.platform.notifications import LocalBucketNotifier, scan_incoming


def uploads(adapters):
    msgs = adapters.bus.pull(ev.subscription_name("preprocess", ev.DATASET_UPLOADS), max_messages=10, timeout_s=1)
    for m in msgs:
        m.ack()
    return msgs


def test_store_writes_under_incoming_are_announced_in_gcs_format(adapters):
    info = adapters.store.write("ftpipe", "incoming/support/data.jsonl", b'{"a": 1}\n')
    adapters.store.write("ftpipe", "datasets/x/train.jsonl", b"{}\n")   # not under incoming/: silent
    [msg] = uploads(adapters)
    assert msg.attributes["eventType"] == "OBJECT_FINALIZE"
    assert msg.attributes["payloadFormat"] == "JSON_API_V1"
    assert msg.attributes["bucketId"] == "ftpipe" and msg.attributes["objectId"] == "incoming/support/data.jsonl"
    assert msg.attributes["objectGeneration"] == str(info.generation)
    body = json.loads(msg.data)
    assert body["bucket"] == "ftpipe" and body["name"] == "incoming/support/data.jsonl"
    assert body["size"] == "9" and body["generation"] == str(info.generation) and body["md5Hash"]
    assert isinstance(ev.decode(msg.data, msg.attributes), ev.ObjectFinalized)


def test_files_copied_by_hand_are_announced_once_when_complete(adapters, tmp_path):
    notifier = LocalBucketNotifier(adapters.bus, adapters.docs)
    target = adapters.store.root / "ftpipe" / "incoming" / "support"
    target.mkdir(parents=True)
    src = tmp_path / "chats.jsonl"
    src.write_text('{"messages": []}\n')
    shutil.copy(src, target / "chats.jsonl")
    assert scan_incoming(adapters.store, notifier, settle_s=5) == 0     # still "being copied"
    past = time.time() - 10
    os.utime(target / "chats.jsonl", (past, past))
    assert scan_incoming(adapters.store, notifier, settle_s=5) == 1
    assert scan_incoming(adapters.store, notifier, settle_s=5) == 0     # never twice
    [msg] = uploads(adapters)
    assert json.loads(msg.data)["name"] == "incoming/support/chats.jsonl"
